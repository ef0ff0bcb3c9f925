"""The run-time audit's cost: the Monte Carlo and DSSN engines with the audit at its stride and
with it off, side by side in one run on the same model, images and precision (issue 26's
target: under 2% of engine time).

    python bench/audit.py                                   # CPU: WRN-40-2, CIFAR-10 images
    python bench/audit.py --device cuda --images 32 --n 20000 --checkpoint <trained WRN-40-2>

Each engine is timed twice per setting, alternating, and the faster of the two is kept (the
machine may be shared). The audit's stride is ``certlib.engine.voting.AUDIT_EVERY``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certlib.checkpoints import load_checkpoint  # noqa: E402
from certlib.data import load_dataset  # noqa: E402
from certlib.engine import voting  # noqa: E402
from certlib.engine.cascade import Cascade  # noqa: E402
from certlib.families import make_noise  # noqa: E402
from certlib.models import build_model  # noqa: E402

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
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--checkpoint", type=Path, help="a CIFAR-10 checkpoint (default: a random WRN-40-2)")
    args = parser.parse_args()
    device = torch.device(args.device)
    test = load_dataset("cifar10", "test", args.cifar, limit=args.images)
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint, device=device)
    else:
        torch.manual_seed(0)
        model = build_model("wrn40_2", 10, test.mean, test.std, test.input_shape).to(device).eval()
    images = test.pixels().to(device)
    cascade = Cascade(model, 10, voting.default_batch_size(device, 3072), device=device)
    gaussian, dssn = make_noise("gaussian", args.sigma), make_noise("dssn", args.sigma, q=255)
    engines = {
        "Monte Carlo": lambda: voting.monte_carlo_counts(
            cascade, images, test.indices, gaussian, 10, n0=64, n=args.n, seed=0
        ),
        "DSSN": lambda: voting.dssn_votes(cascade, images[:1], dssn, 10),
    }
    stride = dict(voting.AUDIT_EVERY)
    rows = []
    for name, run in engines.items():
        run()  # warm-up: the spot check, the float64 reference
        times: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(2):
            for setting in ("on", "off"):
                voting.AUDIT_EVERY.update(stride if setting == "on" else dict.fromkeys(stride, 2**62))
                times[setting].append(timed(run, device))
        voting.AUDIT_EVERY.update(stride)
        on, off = min(times["on"]), min(times["off"])
        rows.append((name, off, on, on / off - 1))
    print(f"device {device} ({cascade.name}), {args.images} images, n {args.n}, audit every {stride[device.type]}")
    print("| engine | audit off (s) | audit on (s) | cost |")
    print("|---|---:|---:|---:|")
    for name, off, on, cost in rows:
        print(f"| {name} | {off:.2f} | {on:.2f} | {100 * cost:+.1f}% |")
    worst = max(cost for *_, cost in rows)
    print(f"target: under 2% of engine time: {'PASS' if worst < 0.02 else 'FAIL'} (worst {100 * worst:+.1f}%)")


if __name__ == "__main__":
    main()
