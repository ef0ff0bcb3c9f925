"""The speed benchmark suite: every measurement side by side in one run, printed as tables.

    python bench/suite.py --acceptance                    # CPU: the engine against its ceilings
    python bench/suite.py --device cuda --acceptance      # GPU acceptance, under 8 minutes on an H100
    python bench/suite.py --sections 4                    # the pipeline through Ray (CPU workers)

On the GPU machine, after ``../shared/tools/gpu-stage`` here (the engine needs no Ray): one
command carrying .gpu/a, ``bash .gpu/a/unpack.sh`` (test images), then at once one carrying
.gpu/c, ``bash .gpu/c/unpack.sh && CIFAR=/tmp/gpu-stage/cifar python3 bench/suite.py --device
cuda --acceptance`` (python3 there; training images). CIFAR-10 is read from $CIFAR when it is set.

0. The network: ``--checkpoint`` (a CIFAR-10 WRN-40-2), or with ``--acceptance`` a WRN-40-2
   trained here with DSSN noise (sigma 1.0) on the first 6,000 training images (a few epochs
   give realistic margins; a random network's logits sit within ~1e-3 of each other), else
   random weights.
1. Forward ceilings: the network's own forward rate (channels_last, inference mode) in each
   precision, eager and compiled, the folded network too; the best is the ceiling an engine
   is compared with.
2. DSSN exact voting at sigma 0.25, 1.0, 3.5 through the precision cascades (auto: the device's
   fast precision, compiled on a GPU; fp32; on a GPU also auto without its tf32 level), each
   cell sized to ``--cell-seconds`` of device work; samples/s, ratio to the best ceiling, the
   share of samples each level evaluated; and the reference code's strategy (one image, 128
   copies per forward, fp32, NCHW, counts on the host).
3. Monte Carlo CERTIFY (n0 = 64, n = 100,000 on a GPU; smaller on a CPU, projected) for uniform
   and Gaussian noise, and Cohen et al.'s loop.
4. The whole pipeline through Ray with one worker against the bare engine on the same images
   (overhead fraction), and with more workers (scaling efficiency).
5. Ground truth: every noisy copy of the first ``--truth-images`` images per sigma through the
   unfolded float64 network (a loop of this file's own), the votes of every engine cell
   compared with it (must be 0 differences), and each level's worst logit error against it
   with the headroom its band leaves (band / twice the error: must exceed 1).
6. Projections (DSSN Table 1 certification, Monte Carlo at n = 100,000) and, with
   ``--acceptance``, the targets of issue 10 with PASS/FAIL.
Benchmarks never assert on timing.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from certlib.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from certlib.data import (  # noqa: E402
    load_cifar10,
    load_dataset,
    quantize,  # noqa: E402
)
from certlib.engine.cascade import EXACT_TIE, LEVELS, Cascade, disable_tf32, fold_batchnorm  # noqa: E402
from certlib.engine.voting import MC_BLOCK, default_batch_size, dssn_votes, monte_carlo_counts, stream_seed  # noqa: E402
from certlib.families import DSSNNoise, GaussianNoise, UniformNoise  # noqa: E402
from certlib.models import build_model  # noqa: E402

DEFAULT_CIFAR = Path(
    os.environ.get("CIFAR") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-bin"
)
SIGMAS = (0.25, 1.0, 3.5)
TABLE1_SIGMAS = [0.15] + [0.25 * n for n in range(1, 15)]
PAPER_DSSN_SECONDS_AT_3_5 = 0.41  # Levine & Feizi, 2080 Ti
PAPER_UNIFORM_SECONDS = 13.44
TARGETS = {
    "samples_per_s": 200_000,
    "ceiling_ratio": 0.8,
    "table1_minutes": 20,
    "mc_seconds_per_image": 0.5,
    "cpu_fp32_ratio": 0.9,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


class Clock:
    """Seconds since the start, printed with each section (the acceptance run has 8 minutes)."""

    def __init__(self):
        self.start = time.perf_counter()

    def __str__(self) -> str:
        return f"[{time.perf_counter() - self.start:.0f} s]"


def cycled(test, count: int, device) -> torch.Tensor:
    """``count`` test images 0, 1, ... (repeating when the split is shorter), on ``device``."""
    return test.pixels(np.arange(count) % len(test.labels)).to(device)


# --------------------------------------------------------------------------- 0. the network


def acceptance_model(
    cifar: Path,
    device: torch.device,
    epochs: int,
    out: Path,
    images: int = 6_000,
    heldout: int = 1_000,
    architecture: str = "wrn40_2",
):
    """``architecture`` trained with DSSN noise (sigma 1.0) on the first ``images`` training
    images, checked on ``heldout`` test images from 5,000 on; returns (model, card)."""
    from certlib.training.config import TrainConfig
    from certlib.training.train import train_model

    train = load_dataset("cifar10", "train", cifar, limit=images)
    held = load_dataset("cifar10", "test", cifar, start=5_000, limit=heldout)  # the cells use images 0..
    config = TrainConfig(
        dataset="cifar10",
        method="dssn",
        sigma=1.0,
        architecture=architecture,
        epochs=epochs,
        channels_last=True,
        heldout_limit=None,
    )
    card = train_model(config, out, train, held, device=device, log=lambda line: None)
    return load_checkpoint(out, device=device, dataset="cifar10")[0], card


def checked_cascade(model, test, device: torch.device, batch: int) -> Cascade:
    """The ``precision: auto`` cascade (compiled where ``auto`` compiles) after its spot check on
    64 DSSN copies of test image 0, so that a level the check leaves out is out of every cell."""
    auto = Cascade(model, 10, batch, device=device, precision="auto", compile="auto")
    first = DSSNNoise(1.0)
    x_int = quantize(test.pixels([0]).to(device), first.q).flatten(1)
    auto.check(first.copies(x_int.expand(64, -1), torch.arange(64, device=device)).view(-1, 3, 32, 32))
    return auto


# --------------------------------------------------------------------------- 1. forward ceiling


@torch.inference_mode()
def forward_rate(forward, x, device, min_seconds: float) -> float:
    forward(x)  # warm-up (and compilation, cuDNN's set-up)
    times = []
    while sum(times) < min_seconds or len(times) < 5:
        times.append(timed(lambda: forward(x), device)[1])
    return len(x) / statistics.median(times)


def autocast_forward(net, level: str, device):
    spec = LEVELS[level]

    def forward(x):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = spec.tf32
        try:
            with torch.autocast(device.type, dtype=spec.autocast or torch.float32, enabled=spec.autocast is not None):
                return net(x)
        finally:
            disable_tf32()

    return forward


def forward_ceilings(model, engine: Cascade, device, batch: int, min_seconds: float) -> tuple[dict, str]:
    """Rates (samples/s) of the bare forward pass in every precision: the unfolded network eager
    (and compiled in the engine's first level), the engine's folded network eager, and the
    engine's own compiled forward."""
    gpu = device.type == "cuda"
    fast = ["fp16", "bf16"] if gpu else ["bf16"]
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    folded = fold_batchnorm(model)
    folded.to(memory_format=torch.channels_last)
    compile_mode = "max-autotune" if gpu else None
    cells = [
        (f"{level} eager", autocast_forward(model, level, device))
        for level in fast + (["tf32"] if gpu else []) + ["fp32"]
    ]
    cells += [
        (f"{level} eager, BatchNorm folded", autocast_forward(folded, level, device)) for level in fast + ["fp32"]
    ]
    if engine.compiled:  # the unfolded network compiled as the engine compiles (each compilation takes minutes)
        level = engine.levels[0]
        cells.append(
            (
                f"{level} compiled ({compile_mode or 'default'}), unfolded",
                autocast_forward(torch.compile(model, mode=compile_mode, dynamic=False), level, device),
            )
        )
        cells.append(
            (f"{engine.levels[0]} engine forward (folded, compiled)", lambda x: engine.logits(engine.levels[0], x))
        )
    rates = {name: forward_rate(fn, x, device, min_seconds) for name, fn in cells}
    best = max(rates.values())
    rows = [[name, f"{rate:,.0f}", f"{rate / best:.2f}"] for name, rate in rates.items()]
    return rates, table([f"forward, batch {batch}", "samples/s (median)", "of the best"], rows)


# --------------------------------------------------------------------------- 2. DSSN


@torch.inference_mode()
def reference_strategy_votes(model, images, noise: DSSNNoise, chunk: int = 128) -> np.ndarray:
    """The reference code's loop: per image, chunks of offsets, argmax counted on the host."""
    votes = np.zeros((len(images), 10), dtype=np.int64)
    for i, image in enumerate(images):
        x_int = quantize(image[None], noise.q).flatten(1)
        for start in range(0, noise.levels, chunk):
            s_base = torch.arange(start, min(start + chunk, noise.levels), device=image.device)
            noisy = noise.copies(x_int.expand(len(s_base), -1), s_base).view(-1, *image.shape)
            votes[i] += np.bincount(model(noisy).argmax(1).cpu().numpy(), minlength=10)
    return votes


class Cell:
    """One engine measurement: its rate, the share of samples each level evaluated, its votes."""

    def __init__(
        self, name: str, engine: Cascade, sigma, samples: int, seconds: float, stats: dict, votes, images: int
    ):
        self.name, self.sigma, self.samples, self.seconds, self.votes, self.images = (
            name,
            sigma,
            samples,
            seconds,
            votes,
            images,
        )
        self.levels, self.stats = engine.name, stats

    @property
    def rate(self) -> float:
        return self.samples / self.seconds

    def shares(self) -> str:
        used = [level for level in LEVELS if self.stats.get(level)]
        return " ".join(f"{level} {self.stats[level] / self.samples:.2%}" for level in used) or "-"


def sized(run, per_image: int, budget_seconds: float, device, probe_images: int) -> int:
    """Images for a cell of ``budget_seconds``: a probe run (which also pays compilation and
    the spot check, as a worker's first unit does) gives the rate."""
    _, seconds = timed(lambda: run(probe_images), device)
    rate = probe_images * per_image / seconds
    return max(probe_images, math.ceil(budget_seconds * rate / per_image))


def dssn_cell(name, engine, test, sigma, device, budget, min_images) -> Cell:
    noise = DSSNNoise(sigma)
    probe = max(1, 4 * engine.batch_size // noise.levels)

    def run(count, stats=None):
        return dssn_votes(engine, cycled(test, count, device), noise, 10, stats=stats)

    count = max(min_images, sized(run, noise.levels, budget, device, probe))
    stats = {}
    votes, seconds = timed(lambda: run(count, stats), device)
    return Cell(name, engine, sigma, count * noise.levels, seconds, stats, votes, count)


def dssn_section(
    engines: dict[str, Cascade], model, test, device, budget: float, min_images: int, best_ceiling: float
) -> tuple[list[Cell], str]:
    cells = []
    for sigma in SIGMAS:
        for name, engine in engines.items():
            if sigma == SIGMAS[0] and name != "auto":
                continue  # the other variants at the sigmas of the acceptance only
            cells.append(dssn_cell(name, engine, test, sigma, device, budget, min_images))
    reference_model = copy.deepcopy(model).to(
        memory_format=torch.contiguous_format
    )  # NCHW, fp32, as the reference runs
    rows = [
        [
            str(c.sigma),
            str(DSSNNoise(c.sigma).levels),
            f"{c.name} ({c.levels})",
            str(c.images),
            f"{c.seconds:.1f}",
            f"{c.rate:,.0f}",
            f"{c.rate / best_ceiling:.2f}",
            f"{c.seconds / c.images:.4f}",
            c.shares(),
        ]
        for c in cells
    ]
    noise = DSSNNoise(1.0)
    count = max(
        1,
        sized(
            lambda k: reference_strategy_votes(reference_model, cycled(test, k, device), noise),
            noise.levels,
            budget / 3,
            device,
            1,
        ),
    )
    _, seconds = timed(lambda: reference_strategy_votes(reference_model, cycled(test, count, device), noise), device)
    rate = count * noise.levels / seconds
    rows.append(
        [
            "1.0",
            str(noise.levels),
            "reference strategy (fp32, NCHW, 128 copies)",
            str(count),
            f"{seconds:.1f}",
            f"{rate:,.0f}",
            f"{rate / best_ceiling:.2f}",
            f"{seconds / count:.4f}",
            "-",
        ]
    )
    return cells, table(
        [
            "sigma",
            "L",
            "engine",
            "images",
            "s",
            "samples/s",
            "of best ceiling",
            "s/image",
            "samples evaluated per level",
        ],
        rows,
    )


# --------------------------------------------------------------------------- 3. Monte Carlo


@torch.inference_mode()
def cohen_loop(model, images, noise, n0: int, n: int, chunk: int, seed: int) -> np.ndarray:
    """Cohen et al.'s core.py loop: per image, noise drawn per chunk, counts on the host."""
    counts = np.zeros((len(images), 10), dtype=np.int64)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    for i, image in enumerate(images):
        for total in (n0, n):
            for start in range(0, total, chunk):
                batch = image[None].expand(min(chunk, total - start), *image.shape)
                counts[i] += np.bincount(model(noise.sample(batch, generator)).argmax(1).cpu().numpy(), minlength=10)
    return counts


def monte_carlo_section(
    engines: dict[str, Cascade], model, test, device, budget: float, n: int, best_ceiling: float
) -> tuple[list[Cell], str]:
    cells, rows = [], []
    for noise in (UniformNoise(0.5), GaussianNoise(0.5)):
        for name, engine in engines.items():

            def run(count, stats=None):
                return monte_carlo_counts(
                    engine, cycled(test, count, device), range(count), noise, 10, n0=64, n=n, seed=0, stats=stats
                )

            count = sized(run, 64 + n, budget, device, 1)
            stats = {}
            counts, seconds = timed(lambda: run(count, stats), device)
            cell = Cell(f"{noise.name} {name}", engine, None, count * (64 + n), seconds, stats, counts, count)
            cells.append(cell)
            rows.append(
                [
                    noise.name,
                    f"{name} ({engine.name})",
                    f"{n:,}",
                    str(count),
                    f"{seconds:.1f}",
                    f"{cell.rate:,.0f}",
                    f"{cell.rate / best_ceiling:.2f}",
                    f"{(64 + 100_000) / cell.rate:.3f}",
                    cell.shares(),
                ]
            )
        reference_model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        loop_n = min(n, 20_000)
        _, seconds = timed(
            lambda: cohen_loop(reference_model, cycled(test, 1, device), noise, 64, loop_n, 400, 0), device
        )
        rate = (64 + loop_n) / seconds
        rows.append(
            [
                noise.name,
                "Cohen loop (fp32, NCHW, chunks of 400)",
                f"{loop_n:,}",
                "1",
                f"{seconds:.1f}",
                f"{rate:,.0f}",
                f"{rate / best_ceiling:.2f}",
                f"{(64 + 100_000) / rate:.3f}",
                "-",
            ]
        )
    return cells, table(
        [
            "noise",
            "engine",
            "n",
            "images",
            "s",
            "samples/s",
            "of best ceiling",
            "s/image at n=100,000",
            "samples evaluated per level",
        ],
        rows,
    ) + f"\npaper: {PAPER_UNIFORM_SECONDS} s/image (uniform, n = 100,000, 2080 Ti)"


# --------------------------------------------------------------------------- 5. ground truth


@torch.inference_mode()
def ground_truth(
    model,
    engine: Cascade,
    test,
    device,
    count: int,
    batch: int,
    mc_n: int,
    sigmas: tuple[float, ...] = SIGMAS,
    mc_noises: tuple = (UniformNoise(0.5), GaussianNoise(0.5)),
    levels: tuple[str, ...] | None = None,
) -> tuple[dict, dict, str]:
    """Float64 votes of every DSSN copy of the first ``count`` images per sigma and Monte Carlo
    counts of the first image under each of ``mc_noises`` (this file's own loops: the unfolded
    network in float64, a margin under EXACT_TIE to the lower class), and the worst logit error
    against it of each of ``levels`` (None: every level the device runs)."""
    model64 = copy.deepcopy(model).to(memory_format=torch.contiguous_format).double()

    def exact_votes(x):
        logits = model64(x.double())
        top = logits.max(dim=1, keepdim=True).values
        return (logits >= top - EXACT_TIE * (1 + top.abs())).to(torch.uint8).argmax(dim=1), logits

    if levels is None:
        levels = ("fp16", "bf16", "tf32", "fp32") if device.type == "cuda" else ("bf16", "fp32")
    worst = {(level, sigma): 0.0 for level in levels for sigma in sigmas}
    truth = {}
    images = cycled(test, count, device)
    for sigma in sigmas:
        noise = DSSNNoise(sigma)
        x_int = quantize(images, noise.q).flatten(1)
        votes = torch.zeros(count, 10, dtype=torch.int64, device=device)
        for start in range(0, count * noise.levels, batch):
            pair = torch.arange(start, min(start + batch, count * noise.levels), device=device)
            x = noise.copies(x_int[pair // noise.levels], pair % noise.levels).view(-1, *images.shape[1:])
            prediction, exact = exact_votes(x)
            votes.index_put_((pair // noise.levels, prediction), torch.ones_like(prediction), accumulate=True)
            scale = 1 + exact.max(dim=1).values.abs()
            for level in levels:
                error = ((engine.logits(level, x).double() - exact).abs().max(dim=1).values / scale).max()
                worst[(level, sigma)] = max(worst[(level, sigma)], float(error))
        truth[sigma] = votes.cpu().numpy()
    mc_truth = {}
    for noise in mc_noises:
        counts = np.zeros((2, 10), dtype=np.int64)
        for stage, total in ((0, 64), (1, mc_n)):
            for block, start in enumerate(range(0, total, MC_BLOCK)):
                generator = torch.Generator(device=device).manual_seed(stream_seed(0, 0, stage, block))
                x = noise.sample(images[0][None].expand(min(MC_BLOCK, total - start), *images.shape[1:]), generator)
                counts[stage] += np.bincount(exact_votes(x)[0].cpu().numpy(), minlength=10)
        mc_truth[noise.name] = counts
    rows = [
        [
            level,
            *(f"{worst[(level, s)]:.2e}" for s in sigmas),
            f"{LEVELS[level].band:.0e}",
            f"{LEVELS[level].band / (2 * max(worst[(level, s)] for s in sigmas)):,.1f}",
        ]
        for level in levels
    ]
    return (
        truth,
        mc_truth,
        table(["level (engine's network)", *(f"worst error, sigma {s}" for s in sigmas), "band", "headroom"], rows),
    )


def vote_differences(cells: list[Cell], truth: dict, mc_truth: dict, mc_n: int) -> tuple[int, str]:
    rows, total = [], 0
    for cell in cells:
        if cell.sigma is not None:
            k = min(len(truth[cell.sigma]), cell.images)
            differ = int(np.abs(cell.votes[:k] - truth[cell.sigma][:k]).sum() // 2)
            rows.append([f"DSSN sigma {cell.sigma}", cell.name, str(k), f"{differ}/{k * DSSNNoise(cell.sigma).levels}"])
        else:
            noise_name = cell.name.split()[0]
            selection, estimation = cell.votes
            if len(estimation[0]) and estimation[0].sum() != mc_n:
                continue  # counted with another n
            mine = np.stack([selection[0], estimation[0]])
            differ = int(np.abs(mine - mc_truth[noise_name]).sum() // 2)
            rows.append([f"Monte Carlo {noise_name}", cell.name.split(" ", 1)[1], "1", f"{differ}/{64 + mc_n}"])
        total += differ
    return total, table(["votes", "engine", "images", "differing from float64"], rows)


# --------------------------------------------------------------------------- 4. pipeline


def pipeline_section(cifar: Path, images: int, workers: list[int], sigma: float, arch: str) -> str:
    import ray

    from certlib.analysis import load_results
    from certlib.checkpoints.checkpoint import ModelCard, save_checkpoint
    from certlib.smooth import Smooth
    from cluster.job.executor import run_sweep
    from cluster.plan import model_keys
    from cluster.spec import parse_spec

    test = load_cifar10(cifar, "test")
    noise = DSSNNoise(sigma)
    work = Path(tempfile.mkdtemp(prefix="certify-bench-"))
    torch.manual_seed(0)
    model = build_model(arch, 10, test.mean, test.std, test.input_shape)
    template = str(work / "{method}-{training}-{sigma}-{seed}.pt")
    card = ModelCard.describing(arch, test, noise, seed=0, training="standard")
    checkpoint = Path(template.format(method="dssn", training="standard", sigma=sigma, seed=0))
    save_checkpoint(checkpoint, model, card)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker's share, as each Ray worker gets one CPU
    bare_model, _ = load_checkpoint(checkpoint)
    pixels = test.pixels(range(images))
    _, bare = timed(lambda: Smooth(bare_model, noise, 10).certify(pixels), torch.device("cpu"))
    torch.set_num_threads(threads)

    rows = []
    start = time.perf_counter()
    ray.init(address="local", num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - start
    bare_rate = images / bare
    for k in workers:
        spec = parse_spec(
            {
                "name": "bench",
                "output": str(work / f"out-{k}"),
                "dataset": {"name": "cifar10", "split": "test", "root": str(cifar), "limit": images},
                "models": {"path": template},
                "methods": ["dssn"],
                "sigmas": [sigma],
                "resources": {
                    "workers": k,
                    "cpus_per_worker": 1,
                    "gpus_per_worker": 0,
                    "shard_size": max(1, images // (4 * k)),
                },
            }
        )
        assert model_keys(spec)[0].checkpoint(spec) == checkpoint
        _, wall = timed(lambda: run_sweep(spec, f"bench-{k}", log=lambda line: None), torch.device("cpu"))
        engine = float(load_results(spec.output, columns=["seconds"])["seconds"].sum())
        rate = images / wall
        rows.append(
            [
                str(k),
                f"{wall:.1f}",
                f"{engine:.1f}",
                f"{1 - engine / (k * wall):.1%}",
                f"{1 - engine / (k * (wall + startup)):.1%}",
                f"{rate:.2f}",
                f"{rate / (k * bare_rate):.2f}",
            ]
        )
    ray.shutdown()
    header = (
        f"{images} CIFAR-10 images, DSSN sigma={sigma} (L={noise.levels}), {arch}; bare engine (1 thread, no Ray): "
        f"{bare:.1f} s; Ray start-up {startup:.1f} s (not in the walls below)\n"
    )
    return header + table(
        [
            "workers",
            "sweep wall s",
            "certification s (all workers)",
            "outside certification",
            "same, with Ray start-up",
            "images/s",
            "scaling efficiency (vs k x bare engine)",
        ],
        rows,
    )


# --------------------------------------------------------------------------- 6. projections, acceptance


def verdicts(gpu: bool, ceilings: dict, dssn: list[Cell], mc: list[Cell], differences: int) -> tuple[float, str]:
    best = max(ceilings.values())
    auto = {c.sigma: c for c in dssn if c.name == "auto"}
    total = sum(DSSNNoise(s).levels for s in TABLE1_SIGMAS) * 10_000
    table1_minutes = total / min(auto[1.0].rate, auto[3.5].rate) / 60
    lines = []

    def check(ok: bool, what: str) -> None:
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {what}")

    if gpu:
        for cell in [auto[1.0], auto[3.5]] + [c for c in mc if c.name.endswith(" auto")]:
            what = f"DSSN sigma {cell.sigma}" if cell.sigma else f"Monte Carlo {cell.name.split()[0]}"
            check(
                cell.rate >= TARGETS["samples_per_s"] and cell.rate >= TARGETS["ceiling_ratio"] * best,
                f"{what}: {cell.rate:,.0f} samples/s (target {TARGETS['samples_per_s']:,}), "
                f"{cell.rate / best:.2f} of the best ceiling {best:,.0f} (target {TARGETS['ceiling_ratio']})",
            )
        check(
            table1_minutes < TARGETS["table1_minutes"],
            f"projected DSSN Table 1 certification {table1_minutes:.1f} min (target < {TARGETS['table1_minutes']})",
        )
        for cell in (c for c in mc if c.name.endswith(" auto")):
            seconds = (64 + 100_000) / cell.rate
            check(
                seconds < TARGETS["mc_seconds_per_image"],
                f"Monte Carlo {cell.name.split()[0]} n = 100,000: "
                f"{seconds:.3f} s/image (target < {TARGETS['mc_seconds_per_image']})",
            )
    else:
        fp32_ceiling = max(rate for name, rate in ceilings.items() if name.startswith("fp32"))
        # the engine as configured (default batch size); the odd-batch cell is there for its votes
        for cell in (
            c for c in dssn if c.name in ("auto", "fp32") and c.levels == "fp32>fp64" and c.sigma in (1.0, 3.5)
        ):
            check(
                cell.rate >= TARGETS["cpu_fp32_ratio"] * fp32_ceiling,
                f"CPU fp32 engine ({cell.name}), DSSN sigma {cell.sigma}: "
                f"{cell.rate / fp32_ceiling:.2f} of the fp32 ceiling "
                f"{fp32_ceiling:,.0f} (target {TARGETS['cpu_fp32_ratio']})",
            )
        lines.append(
            "- the GPU targets (200,000 samples/s, 0.8 of the ceiling, Table 1 < 20 min, Monte Carlo < 0.5 s) "
            "need a GPU: run with --device cuda there"
        )
    check(differences == 0, f"{differences} votes differ from the float64 ground truth (target 0)")
    return table1_minutes, "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", type=Path, help="a trained CIFAR-10 WRN-40-2 (bench/train_quick.py)")
    parser.add_argument(
        "--acceptance",
        action="store_true",
        help="sections 1, 2, 3, 5, 6 with PASS/FAIL; trains a WRN-40-2 unless --checkpoint is given",
    )
    parser.add_argument("--train-epochs", type=int, default=None, help="epochs of the acceptance model (GPU 6, CPU 1)")
    parser.add_argument("--sections", default="1,2,3,5,6", help="which sections to run (comma-separated numbers)")
    parser.add_argument("--cell-seconds", type=float, default=10.0, help="device work per engine cell")
    parser.add_argument(
        "--truth-images", type=int, default=None, help="images per sigma checked in float64 (GPU 100, CPU 2)"
    )
    parser.add_argument("--pipeline-images", type=int, default=400)
    parser.add_argument("--pipeline-workers", default="1,2", help="worker counts for section 4")
    args = parser.parse_args()
    sections = {1, 2, 3, 5, 6} if args.acceptance else {int(v) for v in args.sections.split(",")}
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    clock = Clock()
    disable_tf32()  # as the engines run; compiled code guards on these flags

    if sections & {1, 2, 3, 5, 6}:
        test = load_cifar10(args.cifar, "test")
        if args.checkpoint:
            model, card = load_checkpoint(args.checkpoint, device=device, dataset="cifar10")
            if card.architecture != "wrn40_2":
                raise SystemExit(f"{args.checkpoint}: a {card.architecture}; the suite measures WRN-40-2")
        elif args.acceptance:
            epochs = args.train_epochs or (6 if gpu else 1)
            out = Path(tempfile.mkdtemp(prefix="certify-acceptance-")) / "wrn40_2-dssn-1.0.pt"
            model, card = acceptance_model(args.cifar, device, epochs, out)
        else:
            torch.manual_seed(0)
            model, card = build_model("wrn40_2", 10, test.mean, test.std, test.input_shape).to(device).eval(), None
        described = (
            f"WRN-40-2 trained with {card.method} sigma={card.sigma} for {card.epochs_done} epochs"
            f"{'' if args.checkpoint else ' on the first 6,000 training images'} (held-out noisy accuracy "
            f"{card.noisy_accuracy:.1%})"
            if card
            else "WRN-40-2 (random init)"
        )
        model.to(memory_format=torch.channels_last)  # the layout of every measurement but the reference strategy's
        batch = default_batch_size(device, 3 * 32 * 32)
        name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
        print(
            f"# certify benchmark suite: {name}, torch {torch.__version__}, {described}, CIFAR-10 test images, "
            f"engine batch {batch} {clock}\n"
        )
        auto = checked_cascade(model, test, device, batch)
        engines = {"auto": auto}
        if auto.levels[0] != "fp32":
            engines["fp32"] = Cascade(model, 10, batch, device=device, precision="fp32", compile=False)
        else:  # a CPU: the bf16 cascade that auto does not choose there, for the comparison
            engines["bf16"] = Cascade(model, 10, batch, device=device, precision="bf16", compile=False)
        if "tf32" in auto.levels:
            without_tf32 = copy.copy(auto)  # shares the compiled network, the reference and the spot check
            without_tf32.levels = tuple(level for level in auto.levels if level != "tf32")
            engines["auto without tf32"] = without_tf32
        odd = batch // 3 + 1
        engines[f"auto, eager, batch {odd}"] = Cascade(model, 10, odd, device=device, precision="auto", compile=False)
        print(
            "engines: "
            + "; ".join(f"{k} = {e.name}{' compiled' if e.compiled else ''}" for k, e in engines.items())
            + f" {clock}\n"
        )
        truth_images = args.truth_images or (100 if gpu else 2)

    ceilings: dict = {}
    if sections & {1, 2, 3, 6}:
        ceilings, text = forward_ceilings(model, auto, device, batch, min_seconds=2.0 if gpu else 3.0)
        print(f"## 1. Forward ceilings (channels_last, inference mode) {clock}\n{text}\n")
    best = max(ceilings.values()) if ceilings else float("nan")
    dssn_cells, mc_cells = [], []
    if sections & {2, 6}:
        dssn_cells, text = dssn_section(engines, model, test, device, args.cell_seconds, truth_images, best)
        fastest = max((c for c in dssn_cells if c.sigma == 3.5), key=lambda c: c.rate)
        print(
            f"## 2. DSSN exact voting {clock}\n{text}\npaper: {PAPER_DSSN_SECONDS_AT_3_5} s/image at sigma 3.5 "
            f"(2080 Ti); here ({fastest.name}): {fastest.seconds / fastest.images:.3f} s\n"
        )
    mc_n = 100_000 if gpu else 2_000
    if sections & {3, 6}:
        mc_engines = {k: e for k, e in engines.items() if k in ("auto", "fp32", "bf16")}
        mc_cells, text = monte_carlo_section(mc_engines, model, test, device, args.cell_seconds, mc_n, best)
        print(f"## 3. Monte Carlo CERTIFY (n0 = 64) {clock}\n{text}\n")
    if 4 in sections:
        workers = [int(v) for v in args.pipeline_workers.split(",")]
        print(
            f"## 4. Pipeline through Ray against the bare engine (CPU workers) {clock}\n"
            f"{pipeline_section(args.cifar, args.pipeline_images, workers, 0.25, 'small_cnn')}\n"
        )
    differences = None
    if 5 in sections:
        truth, mc_truth, text = ground_truth(model, auto, test, device, truth_images, batch, mc_n)
        print(
            f"## 5. Ground truth: the float64 network on every copy of {truth_images} images per sigma {clock}\n"
            f"Worst logit error against it, relative to 1 + |top logit| (headroom = band / twice the worst error):\n"
            f"{text}\n"
        )
        differences, text = vote_differences(dssn_cells + mc_cells, truth, mc_truth, mc_n)
        print(f"{text}\n")
    if 6 in sections and dssn_cells and mc_cells and differences is not None:
        minutes, text = verdicts(gpu, ceilings, dssn_cells, mc_cells, differences)
        total = sum(DSSNNoise(s).levels for s in TABLE1_SIGMAS) * 10_000
        print(
            f"## 6. Projections and targets {clock}\nDSSN Table 1 certification ({total:.3g} forward passes, at the "
            f"slower of the auto engine's sigma 1.0 and 3.5 rates, one device): {minutes:.1f} min\n{text}"
        )


if __name__ == "__main__":
    main()
