"""Training throughput: the product's training step against its ceiling and the landed step,
one unit and packed units, side by side in one run, printed as tables.

    python bench/train.py --device cuda --acceptance      # issue 11's targets, ~6 minutes on an H100
    python bench/train.py --architecture small_cnn --images 4000 --epochs 2   # a CPU smoke run

On the GPU machine, after ``../shared/tools/gpu-stage`` here: one command carrying .gpu/a,
``bash .gpu/a/unpack.sh``, then at once one carrying .gpu/c, ``bash .gpu/c/unpack.sh &&
CIFAR=/tmp/gpu-stage/cifar python3 bench/train.py --device cuda --acceptance``. The staged
training subset is tiled to ``--images`` rows (50,000: a CIFAR-10 epoch; throughput does not
depend on which images repeat). Held-out accuracy uses test images from 5,000 on.

1. Ceilings: WRN-40-2 forward + backward + SGD on one static batch, replayed as a CUDA graph
   (amp, channels_last), at batch 64 and 256, standard and stability (two forward passes);
   no data, augmentation or noise. On a CPU, the same step eagerly.
2. One training unit (``train_model``, DSSN noise sigma 0.5, batch 64, amp and channels_last
   on a GPU): the product's step (CUDA graph on a GPU), the same step eagerly, and the landed
   step (batches pulled from host memory, loss and accuracy read back every batch), standard
   and stability; steady-state images/s (median epoch after the first) and the ratio to the
   ceiling.
3. Packed units: k processes training at once on one GPU (as Ray packs training workers at
   1/k GPU each); aggregate images/s.
4. Accuracy: held-out noisy accuracy of models trained with the product's step and with the
   landed step, same config, a few epochs, two seeds each.
5. Projection: DSSN Table 1's 90 models (45 standard, 45 stability) x 120 epochs x 50,000
   images at the best measured aggregate rates, and, with ``--acceptance``, PASS/FAIL against
   issue 11's targets. Benchmarks never assert on timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from certlib.data import QuantizedDataset, load_dataset  # noqa: E402
from certlib.engine.voting import stream_seed  # noqa: E402
from certlib.families import make_noise  # noqa: E402
from certlib.models import build_model  # noqa: E402
from certlib.training.config import TrainConfig  # noqa: E402
from certlib.training.step import augment, stability_loss  # noqa: E402
from certlib.training.train import train_model  # noqa: E402

DEFAULT_CIFAR = Path(
    os.environ.get("CIFAR") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-bin"
)
TARGETS = {"standard_images_per_s": 15_000, "stability_share": 0.5, "table1_gpu_hours": 12}
TABLE1 = {"standard": 45, "stability": 45, "epochs": 120, "images": 50_000}


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiled(data: QuantizedDataset, rows: int) -> QuantizedDataset:
    """``rows`` rows cycling through ``data`` (an epoch of the full split's length)."""
    index = torch.arange(rows) % len(data)
    return QuantizedDataset(
        data.name, data.split, data.values[index], data.labels[index], data.q, data.class_names, data.mean, data.std
    )


# --------------------------------------------------------------------------- 1. ceilings


def ceiling(architecture: str, batch: int, stability: bool, device: torch.device, seconds: float) -> float:
    """Images/s of forward + backward + SGD on one static batch; a CUDA graph on a GPU."""
    torch.manual_seed(0)
    model = build_model(architecture, 10, (0.5,) * 3, (0.25,) * 3, (3, 32, 32)).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    gpu = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu, cache_enabled=False):
            logits = model(x)
            loss = stability_loss(logits, model(x), y, 6.0) if stability else F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=not gpu)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    run = step
    if gpu:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    synchronize(device)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            run()
        steps += 20
        synchronize(device)
    return steps * batch / (time.perf_counter() - start)


# --------------------------------------------------------------------------- 2. one unit


def landed_step_rate(config: TrainConfig, train_set: QuantizedDataset, device: torch.device, epochs: int) -> float:
    """The step as it landed before issue 11: each batch pulled from host memory, augmented and
    noised as floats, its loss and accuracy read back at once. Steady-state images/s."""
    cfg = config.resolved()
    noise = make_noise(cfg.method, cfg.sigma, q=train_set.q, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.architecture, 10, train_set.mean, train_set.std, train_set.input_shape).to(device)
    model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    )
    labels = train_set.labels.to(device)
    amp = cfg.amp and device.type == "cuda"
    rates = []
    for epoch in range(epochs):
        generator = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, epoch, 2, 0))
        order = torch.randperm(len(labels), generator=generator, device=device)
        synchronize(device)
        start, total, correct = time.perf_counter(), 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x = augment(
                train_set.grid_values(idx.cpu()).to(device).float() / train_set.q, generator, cfg.crop_padding, cfg.flip
            )
            y = labels[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                noisy = noise.sample(x, generator)
                noisy = noisy.contiguous(memory_format=torch.channels_last) if cfg.channels_last else noisy
                logits = model(noisy)
                loss = (
                    stability_loss(logits, model(noise.sample(x, generator)), y, cfg.stability_weight)
                    if cfg.training == "stability"
                    else F.cross_entropy(logits, y)
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        rates.append(len(order) / (time.perf_counter() - start))
    return steady(rates)


def steady(rates: list[float]) -> float:
    """Median epoch rate after the first (set-up, capture and cuDNN's autotuning)."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def unit_rate(config: TrainConfig, train_set, heldout, device, out: Path) -> tuple[float, object]:
    rates = []
    card = train_model(
        config,
        out,
        train_set,
        heldout,
        device=device,
        log=lambda line: None,
        on_epoch=lambda m: rates.append(m["images_per_second"]),
    )
    return steady(rates), card


# --------------------------------------------------------------------------- 3. packed units


def _packed_worker(config: TrainConfig, cifar: str, images: int, out: str, barrier, results) -> None:
    train_set = tiled(load_dataset("cifar10", "train", cifar), images)
    heldout = load_dataset("cifar10", "test", cifar, start=5_000, limit=64)
    torch.zeros(1, device="cuda")  # the CUDA context, before the clock starts
    barrier.wait()
    rates = []
    start = time.perf_counter()
    train_model(
        config,
        out,
        train_set,
        heldout,
        device="cuda",
        log=lambda line: None,
        on_epoch=lambda m: rates.append(m["images_per_second"]),
    )
    results.put((steady(rates), time.perf_counter() - start))


def packed_rate(config: TrainConfig, k: int, cifar: Path, images: int, folder: Path) -> tuple[float, float]:
    """(aggregate steady images/s, wall seconds) of k processes training ``config`` at once."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [
        ctx.Process(
            target=_packed_worker, args=(config, str(cifar), images, str(folder / f"p{k}-{i}.pt"), barrier, results)
        )
        for i in range(k)
    ]
    for p in procs:
        p.start()
    got = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rate for rate, _ in got), max(wall for _, wall in got)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--architecture", default="wrn40_2")
    parser.add_argument("--images", type=int, default=None, help="rows per epoch (GPU 50,000; CPU 4,000)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per throughput cell (GPU 4; CPU 2)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per ceiling cell (GPU 10; CPU 3)")
    parser.add_argument("--packs", default="standard:2,4;stability:2", help="processes per GPU in section 3 (GPU only)")
    parser.add_argument("--accuracy-epochs", type=int, default=2)
    parser.add_argument(
        "--sections", default="1,2,3,4,5", help="which sections to run (section 2 is needed by 3 and 5)"
    )
    parser.add_argument("--acceptance", action="store_true", help="print issue 11's targets with PASS/FAIL")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    images = args.images or (50_000 if gpu else 4_000)
    epochs = args.epochs or (4 if gpu else 2)
    seconds = args.seconds or (10.0 if gpu else 3.0)
    started = time.perf_counter()
    clock = lambda: f"[{time.perf_counter() - started:.0f} s]"  # noqa: E731
    staged = load_dataset("cifar10", "train", args.cifar)
    train_set = tiled(staged, images)
    heldout = load_dataset("cifar10", "test", args.cifar, start=5_000, limit=1_000)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# training benchmark: {name}, torch {torch.__version__}, {args.architecture}, batch 64, "
        f"{len(staged):,} staged CIFAR-10 training images tiled to {images:,} per epoch {clock()}\n"
    )
    folder = Path(tempfile.mkdtemp(prefix="certify-train-bench-"))
    modes = ("standard", "stability")
    sections = {int(v) for v in args.sections.split(",")}
    baseline_set = tiled(staged, images // 2)  # the slow baselines: half an epoch's rows, the same rate

    ceilings = {(mode, b): float("nan") for mode in modes for b in (64, 256)}
    if 1 in sections:
        print(
            "## 1. Ceilings: forward + backward + SGD on one static batch"
            f"{' (CUDA graph, amp, channels_last)' if gpu else ''}\n"
        )
        ceilings = {
            (mode, b): ceiling(args.architecture, b, mode == "stability", device, seconds)
            for mode in modes
            for b in (64, 256)
        }
        print(
            table(
                ["training", "batch 64 images/s", "batch 256 images/s"],
                [[m, f"{ceilings[m, 64]:,.0f}", f"{ceilings[m, 256]:,.0f}"] for m in modes],
            )
            + f"\n{clock()}\n"
        )
    if not sections & {2, 3, 4, 5}:
        return

    base = TrainConfig(
        "cifar10",
        "dssn",
        0.5,
        architecture=args.architecture,
        epochs=epochs,
        amp=gpu,
        channels_last=gpu,
        heldout_limit=64,
    )
    step = "CUDA graph" if gpu else "eager"
    one, rows = {}, []
    for mode in modes if sections & {2, 3, 5} else ():
        config = dataclasses.replace(base, training=mode)
        product, _ = unit_rate(config, train_set, heldout, device, folder / f"u-{mode}.pt")
        one[mode] = product
        eager = None
        if gpu:
            eager, _ = unit_rate(
                dataclasses.replace(config, cuda_graph=False, epochs=2),
                baseline_set,
                heldout,
                device,
                folder / f"e-{mode}.pt",
            )
        landed = landed_step_rate(config, baseline_set, device, 2)
        rows.append(
            [
                mode,
                f"{product:,.0f}",
                f"{product / ceilings[mode, 64]:.2f}",
                "-" if eager is None else f"{eager:,.0f}",
                f"{landed:,.0f}",
                f"{product / landed:.1f}x",
            ]
        )
    if one:
        print("## 2. One training unit (DSSN sigma 0.5, batch 64)\n")
        print(
            table(
                [
                    "training",
                    f"product step ({step}) images/s",
                    "/ ceiling b64",
                    "same step eager",
                    "landed step",
                    "product / landed",
                ],
                rows,
            )
            + f"\n{clock()}\n"
        )

    packed = {mode: {1: rate} for mode, rate in one.items()}
    if gpu and 3 in sections:
        print("## 3. Packed units: k processes on one GPU\n")
        rows = []
        for entry in args.packs.split(";"):
            mode, counts = entry.split(":")
            config = dataclasses.replace(base, training=mode, epochs=3)
            for k in (int(v) for v in counts.split(",")):
                rate, wall = packed_rate(config, k, args.cifar, images, folder)
                packed[mode][k] = rate
                rows.append(
                    [
                        mode,
                        str(k),
                        f"{rate:,.0f}",
                        f"{rate / one[mode]:.2f}",
                        f"{rate / ceilings[mode, 256]:.2f}",
                        f"{wall:.0f}",
                    ]
                )
        print(
            table(["training", "units per GPU", "aggregate images/s", "/ one unit", "/ ceiling b256", "wall s"], rows)
            + f"\n{clock()}\n"
        )

    if 4 in sections:
        accuracy_rows(base, args.accuracy_epochs, train_set, heldout, device, folder, step, clock)
    if 5 in sections and one:
        projection(packed, args.acceptance)
    print(f"\n{clock()}")


def accuracy_rows(base: TrainConfig, epochs: int, train_set, heldout, device, folder: Path, step: str, clock) -> None:
    print(f"## 4. Held-out noisy accuracy after {epochs} epochs (1,000 test images, DSSN sigma 0.5)\n")
    rows = []
    for seed in (0, 1):
        config = dataclasses.replace(base, epochs=epochs, seed=seed, heldout_limit=1000)
        _, card = unit_rate(config, train_set, heldout, device, folder / f"a-{seed}.pt")
        host_fed = dataclasses.replace(config, cuda_graph=False, data="loader", loader_workers=0)
        _, host_fed_card = unit_rate(host_fed, train_set, heldout, device, folder / f"l-{seed}.pt")
        rows.append([str(seed), f"{card.noisy_accuracy:.1%}", f"{host_fed_card.noisy_accuracy:.1%}"])
    spread = 2 * math.sqrt(0.25 / 1000)
    print(
        table(["seed", f"product step ({step})", "host-fed eager step (the landed step's math)"], rows)
        + f"\n(two binomial standard deviations at 1,000 images: {spread:.1%}) {clock()}\n"
    )


def projection(packed: dict[str, dict[int, float]], acceptance: bool) -> None:
    print("## 5. Projection: DSSN Table 1 training (45 standard + 45 stability WRN-40-2, 120 epochs x 50,000)\n")
    best = {mode: max(rates.values()) for mode, rates in packed.items()}
    hours = sum(TABLE1[mode] * TABLE1["epochs"] * TABLE1["images"] / best[mode] for mode in best) / 3600
    print(
        table(
            ["training", "best aggregate images/s", "units per GPU"],
            [[m, f"{best[m]:,.0f}", str(max(packed[m], key=packed[m].get))] for m in best],
        )
    )
    print(f"\nprojected: {hours:.1f} device-hours on this device\n")
    if acceptance:
        checks = [
            (
                f"standard training >= {TARGETS['standard_images_per_s']:,} images/s per GPU",
                best["standard"],
                best["standard"] >= TARGETS["standard_images_per_s"],
            ),
            (
                f"stability >= {TARGETS['stability_share']} of standard",
                best["stability"] / best["standard"],
                best["stability"] >= TARGETS["stability_share"] * best["standard"],
            ),
            (f"Table 1 training < {TARGETS['table1_gpu_hours']} GPU-hours", hours, hours < TARGETS["table1_gpu_hours"]),
        ]
        print(
            table(["target", "measured", "result"], [[t, f"{v:,.2f}", "PASS" if ok else "FAIL"] for t, v, ok in checks])
        )


if __name__ == "__main__":
    main()
