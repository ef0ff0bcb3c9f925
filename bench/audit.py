"""The run-time audit's cost: the Monte Carlo and DSSN engines with the audit at its stride and
with it off, side by side in one run on the same model, images and precision (issue 26's
target: under 2% of engine time).

    python bench/audit.py               # CPU: a small CNN trained here on digits (seconds)
    python bench/audit.py --device cuda --images 32 --n 20000 --checkpoint <trained CIFAR-10 WRN-40-2>

A trained network: a random one's logits sit within ~1e-3 of each other, so most samples
would fall in the near-tie band and measure the refinement, not the audit. Each engine is timed
twice per setting, alternating, and the faster of the two is kept (the machine may be shared).
The audit's stride is ``certlib.engine.voting.AUDIT_EVERY``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certlib.checkpoints import load_checkpoint  # noqa: E402
from certlib.data import load_dataset  # noqa: E402
from certlib.engine import voting  # noqa: E402
from certlib.engine.cascade import Cascade  # noqa: E402
from certlib.families import make_noise  # noqa: E402
from certlib.training import TrainConfig, train_model  # noqa: E402

DEFAULT_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-bin"


def timed(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=360)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--cell-seconds", type=float, default=10.0, help="work per timed cell")
    parser.add_argument("--checkpoint", type=Path, help="a CIFAR-10 checkpoint (default: a random WRN-40-2)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.checkpoint:
        model, card = load_checkpoint(args.checkpoint, device=device)
        test = load_dataset(card.dataset, "test", args.cifar, limit=args.images)
    else:
        test = load_dataset("digits", "test", limit=args.images)
        with tempfile.TemporaryDirectory() as work:
            config = TrainConfig("digits", "gaussian", sigma=args.sigma, seed=0, training="standard", epochs=10)
            train_model(config, Path(work) / "m.pt", load_dataset("digits", "train"), test, log=lambda line: None)
            model, _ = load_checkpoint(Path(work) / "m.pt", device=device)
    images = test.pixels().to(device)
    sample = int(np.prod(test.input_shape))
    cascade = Cascade(model, test.num_classes, voting.default_batch_size(device, sample), device=device)
    # DSSN at sigma 3 on the digits' 1/16 grid has L = 166 offsets (at 0.5 only 27): a real cell
    dssn_sigma = args.sigma if test.q > 16 else 3.0
    gaussian, dssn = make_noise("gaussian", args.sigma), make_noise("dssn", dssn_sigma, q=test.q)
    engines = {
        "Monte Carlo": lambda: voting.monte_carlo_counts(
            cascade, images, test.indices, gaussian, test.num_classes, n0=64, n=args.n, seed=0
        ),
        "DSSN": lambda: voting.dssn_votes(cascade, images, dssn, test.num_classes),
    }
    for name, run in list(engines.items()):  # each cell repeated to about --cell-seconds of work
        run()  # warm-up: the spot check and the float64 copy are built once, not in the sizing
        repeats = max(1, math.ceil(args.cell_seconds / max(timed(run, device), 1e-3)))
        engines[name] = lambda run=run, repeats=repeats: [run() for _ in range(repeats)]
    stride = dict(voting.AUDIT_EVERY)
    rows = []
    for name, run in engines.items():
        times: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(2):
            for setting in ("on", "off"):
                voting.AUDIT_EVERY.update(stride if setting == "on" else dict.fromkeys(stride, 2**62))
                times[setting].append(timed(run, device))
        voting.AUDIT_EVERY.update(stride)
        on, off = min(times["on"]), min(times["off"])
        rows.append((name, off, on, on / off - 1))
    print(
        f"device {device} ({cascade.name}), {test.name}, {len(images)} images, n {args.n}, "
        f"audit every {stride[device.type]}"
    )
    print("| engine | audit off (s) | audit on (s) | cost |")
    print("|---|---:|---:|---:|")
    for name, off, on, cost in rows:
        print(f"| {name} | {off:.2f} | {on:.2f} | {100 * cost:+.1f}% |")
    worst = max(cost for *_, cost in rows)
    print(f"target: under 2% of engine time: {'PASS' if worst < 0.02 else 'FAIL'} (worst {100 * worst:+.1f}%)")


if __name__ == "__main__":
    main()
