"""What the steps of ``bench/gpu_check.py`` share (``Row``, ``Sizes``, ``Context``) and its
model, training and pipeline steps; the engine's steps are in ``bench/gpu_engine.py``.

Each step runs in a process of its own (``python bench/gpu_check.py --step NAME``) and returns
``Row``s: a figure as printed, its target and whether it is met. The steps reuse the other
benchmarks' code (``bench/suite.py``, ``train.py``, ``zhang.py``, ``pipeline.py``,
``sequential.py``). Units are in each figure's name.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.suite import timed  # noqa: E402
from certlib.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from certlib.data import QuantizedDataset, load_dataset  # noqa: E402
from certlib.models import build_model  # noqa: E402

TARGETS = {  # issue 28's targets (issue 10's for the engine, 11's for training, 12's for the pipeline)
    "samples_per_s": 200_000,
    "ceiling_ratio": 0.8,
    "mc_seconds_per_image": 0.5,
    "zhang_ratio": 1.2,
    "train_images_per_s": 15_000,
    "driver_ratio": 0.95,
    "sequential_rate_ratio": 1 / 1.3,  # issue 27: wall time within 1.3x of the samples ratio
}
MODEL_SIGMA = 1.0  # DSSN noise of the model trained in the run (bench/suite.py's acceptance model)
DSSN_SIGMAS = (0.25, 1.0)
PROGRESS = "@@"  # starts the lines that say where a step is: the last one is what a timeout reports


@dataclass(frozen=True)
class Row:
    """One measured figure, as printed, with its target and whether it is met."""

    figure: str
    measured: str
    target: str = ""
    ok: bool | None = None  # None: no target, for information
    exact: bool = False  # votes, bits, test outcomes: meaningful at any size (rates and times are not)
    note: str = ""


@dataclass(frozen=True)
class Sizes:
    """How much each step does: ``FULL`` on one H100/H200 (the 8-minute acceptance), ``QUICK``
    anywhere in a few minutes (figures not meaningful)."""

    architecture: str  # of every network: WRN-40-2 at full size, a small CNN for the quick run
    cell_seconds: float  # device work per timed engine cell, s
    ceiling_seconds: float  # timed forward passes per ceiling cell, s
    model_epochs: int
    model_images: int  # training images of the model trained in the run
    heldout: int  # test images from 5,000 on for its held-out accuracy
    truth_images: int  # images per sigma whose every DSSN copy is checked in float64
    mc_images: int  # images per Monte Carlo cell
    mc_n: int  # estimation samples per image (Gaussian, Zhang et al., sequential cap)
    zhang_curve_samples: int | None  # samples of pi0 behind each radius curve; None: the product's
    train_rows: int  # rows per epoch of the training-throughput cells (the staged subset tiled)
    train_epochs: int
    determinism_images: int
    determinism_epochs: int
    pipeline_images: int
    sequential_images: int
    limits: dict[str, float]  # seconds per step


FULL = Sizes(
    architecture="wrn40_2",
    cell_seconds=10.0,
    ceiling_seconds=3.0,
    model_epochs=6,
    model_images=6_000,
    heldout=1_000,
    truth_images=20,
    mc_images=16,
    mc_n=100_000,
    zhang_curve_samples=None,
    train_rows=50_000,
    train_epochs=4,
    determinism_images=4_096,
    determinism_epochs=3,
    pipeline_images=2_000,
    sequential_images=16,
    limits={
        "model": 60,
        "engine": 150,
        "monte-carlo": 110,
        "training": 80,
        "pipeline": 130,
        "sequential": 60,
        "tests": 200,
    },
)
QUICK = Sizes(
    architecture="small_cnn",
    cell_seconds=0.3,
    ceiling_seconds=0.3,
    model_epochs=1,
    model_images=64,
    heldout=16,
    truth_images=1,
    mc_images=1,
    mc_n=200,
    zhang_curve_samples=5_000,
    train_rows=64,
    train_epochs=2,
    determinism_images=32,
    determinism_epochs=2,
    pipeline_images=2,
    sequential_images=2,
    limits={
        "model": 60,
        "engine": 80,
        "monte-carlo": 70,
        "training": 70,
        "pipeline": 150,
        "sequential": 50,
        "tests": 90,
    },
)


@dataclass(frozen=True)
class Context:
    """What a step knows: the device, the sizes, the CIFAR-10 directory (``synthetic``: random
    images written by the run where no CIFAR-10 was found), its work folder and time limit."""

    device: torch.device
    sizes: Sizes
    cifar: Path
    synthetic: bool
    work: Path
    limit: float  # seconds this step may take
    address: str | None = None  # the pipeline's Ray (its dashboard); None: a private one it starts

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def checkpoint(self) -> Path:
        """Where the model step leaves its trained network."""
        return self.work / "model" / f"{self.sizes.architecture}-dssn-{MODEL_SIGMA}.pt"

    @property
    def network(self) -> str:
        """The architecture as the figures name it."""
        return {"wrn40_2": "WRN-40-2", "small_cnn": "small CNN"}.get(self.sizes.architecture, self.sizes.architecture)

    def model(self) -> tuple[torch.nn.Module, str]:
        """(the model step's network in eval mode, ""), or random weights with a
        note when that step left none (its failure is reported by itself)."""
        if self.checkpoint.is_file():
            return load_checkpoint(self.checkpoint, device=self.device, dataset="cifar10")[0], ""
        torch.manual_seed(0)
        test = self.test(1)
        model = build_model(self.sizes.architecture, 10, test.mean, test.std, test.input_shape)
        return model.to(self.device).eval(), "random weights: the model step left no checkpoint"

    def progress(self, what: str) -> None:
        """Say what the step starts now (a timeout names the last such line)."""
        print(f"{PROGRESS} {what}", flush=True)

    def test(self, limit: int | None = None) -> QuantizedDataset:
        return load_dataset("cifar10", "test", self.cifar, limit=limit)


def quiet(_line: str) -> None:
    """A ``log`` that drops the line."""


# --------------------------------------------------------------------------- the model


def model_step(ctx: Context) -> list[Row]:
    """The network trained with DSSN noise (sigma 1.0) on the staged training images, for the
    engine, Monte Carlo, pipeline and sequential steps (bench/suite.py's acceptance model)."""
    from bench.suite import acceptance_model

    s = ctx.sizes
    ctx.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    ctx.progress(f"training {ctx.network} for {s.model_epochs} epochs")
    (_, card), seconds = timed(
        lambda: acceptance_model(
            ctx.cifar, ctx.device, s.model_epochs, ctx.checkpoint, s.model_images, s.heldout, s.architecture
        ),
        ctx.device,
    )
    about = f"{ctx.network}, DSSN sigma {MODEL_SIGMA}, {s.model_epochs} epochs on {s.model_images:,} training images"
    return [
        Row(f"{about}: training wall time (s)", f"{seconds:.1f}"),
        Row(f"{about}: held-out noisy accuracy ({s.heldout:,} images)", f"{card.noisy_accuracy:.1%}"),
    ]


# --------------------------------------------------------------------------- training


def training_step(ctx: Context) -> list[Row]:
    """Images/s of the training unit's step (a CUDA graph on a GPU) against the same step
    eagerly, standard training at batch 256 (bench/train.py's cells), and deterministic training
    interrupted and resumed against the same run uninterrupted, bit for bit."""
    from bench.train import tiled, unit_rate
    from certlib.training.config import TrainConfig

    s = ctx.sizes
    staged = load_dataset("cifar10", "train", ctx.cifar)
    heldout = load_dataset("cifar10", "test", ctx.cifar, start=5_000, limit=64)
    base = TrainConfig(
        "cifar10",
        "dssn",
        0.5,
        architecture=s.architecture,
        batch_size=256,
        epochs=s.train_epochs,
        amp=ctx.gpu,
        channels_last=ctx.gpu,
        heldout_limit=64,
    )
    ctx.progress("the training step's cell (a CUDA graph on a GPU)")
    graph, _ = unit_rate(base, tiled(staged, s.train_rows), heldout, ctx.device, ctx.work / "graph.pt")
    eager_config = dataclasses.replace(base, cuda_graph=False, epochs=max(2, s.train_epochs - 1))
    ctx.progress("the eager step's cell")
    eager, _ = unit_rate(eager_config, tiled(staged, s.train_rows // 2), heldout, ctx.device, ctx.work / "eager.pt")
    step = "CUDA graph" if ctx.gpu else "eager: no CUDA graph on a CPU"
    rows = [
        Row(
            f"training step ({step}), standard {ctx.network}, batch 256{', amp' if ctx.gpu else ''}: images/s",
            f"{graph:,.0f}",
            f">= {TARGETS['train_images_per_s']:,}",
            graph >= TARGETS["train_images_per_s"],
        ),
        Row("the same step eagerly: images/s (graph / eager)", f"{eager:,.0f} ({graph / eager:.2f}x)"),
    ]
    return rows + [determinism_row(ctx, staged.subset(np.arange(s.determinism_images)), heldout)]


def determinism_row(ctx: Context, train_set: QuantizedDataset, heldout: QuantizedDataset) -> Row:
    """``deterministic: true``: a run stopped after its next-to-last epoch and resumed gives the
    uninterrupted run's weights, bit for bit (as tests/test_train.py checks on digits)."""
    from certlib.training.config import TrainConfig
    from certlib.training.train import train_model

    epochs = ctx.sizes.determinism_epochs
    config = TrainConfig(
        "cifar10",
        "dssn",
        0.5,
        architecture=ctx.sizes.architecture,
        epochs=epochs,
        amp=ctx.gpu,
        channels_last=ctx.gpu,
        deterministic=True,
        heldout_limit=64,
    )

    class Interrupted(Exception):
        pass

    def interrupt(metrics: dict) -> None:
        if metrics["epoch"] == epochs - 1:
            raise Interrupted

    ctx.progress("deterministic training: uninterrupted, interrupted, resumed")
    straight = train_model(config, ctx.work / "straight.pt", train_set, heldout, device=ctx.device, log=quiet)
    try:
        train_model(
            config, ctx.work / "resumed.pt", train_set, heldout, device=ctx.device, log=quiet, on_epoch=interrupt
        )
    except Interrupted:
        pass
    lines: list[str] = []
    resumed = train_model(config, ctx.work / "resumed.pt", train_set, heldout, device=ctx.device, log=lines.append)
    was_resumed = bool(lines) and lines[0].startswith("resuming")
    equal = resumed.weights_sha256 == straight.weights_sha256
    return Row(
        f"deterministic {ctx.network} ({len(train_set):,} images, {epochs} epochs) stopped after epoch {epochs - 1} "
        "and resumed: weights equal the uninterrupted run's",
        ("equal" if equal else "DIFFERENT") + f" (sha256 {resumed.weights_sha256[:12]})",
        "bit for bit",
        equal and was_resumed,
        exact=True,
        note="" if was_resumed else "the second run did not resume",
    )


# --------------------------------------------------------------------------- the pipeline


def pipeline_step(ctx: Context) -> list[Row]:
    """A ``certify submit-job --wait`` sweep (DSSN at the model's sigma, one worker) on a private
    local Ray against the bare engine on the same images (bench/pipeline.py's cells): end to
    end and driver-only ratios of the warm engine's rate, votes bit for bit."""
    from bench.pipeline import bare_engine, job, job_spec, model_checkpoint
    from cluster.client import local_ray
    from cluster.plan import model_keys
    from cluster.spec import parse_spec

    images = ctx.sizes.pipeline_images
    test = ctx.test(images)
    shard = max(1, images // 8)
    spec = job_spec(ctx.cifar, images, ctx.work / "models", MODEL_SIGMA)
    sweep = parse_spec({**spec, "name": "probe", "output": str(ctx.work / "probe")})
    trained = ctx.checkpoint if ctx.checkpoint.is_file() else None
    where = model_keys(sweep)[0].checkpoint(sweep)
    checkpoint = model_checkpoint(
        argparse.Namespace(checkpoint=trained, arch=ctx.sizes.architecture, sigma=MODEL_SIGMA), test, where
    )
    threads = torch.get_num_threads()
    ctx.progress(f"the bare engine on {images} images")
    first, per_image, bare_votes = bare_engine(checkpoint, MODEL_SIGMA, test, images, shard, ctx.device, threads)
    steady = per_image * images  # the warm engine's time for every image
    instance, startup = None, None
    if ctx.address is None:
        ctx.progress("starting a private local Ray")
        (instance, startup) = timed(
            lambda: local_ray.start(num_cpus=threads, num_gpus=1 if ctx.gpu else 0, private=True), ctx.device
        )
    try:
        resources = {"workers": 1, "gpus_per_worker": int(ctx.gpu), "cpus_per_worker": threads, "shard_size": shard}
        ctx.progress("the job: certify submit-job --wait")
        url = ctx.address or instance.dashboard_url
        wall, driver, votes = job(url, {**spec, "resources": resources}, ctx.work, "job")
    finally:
        if instance is not None:
            local_ray.stop(instance)
    differ = int((votes != bare_votes).any(axis=1).sum())
    what = f"{images:,} images, DSSN sigma {MODEL_SIGMA}, units of {shard}"
    note = "" if trained else "random weights: the model step left no checkpoint"
    return [
        Row(f"bare engine ({what}): warm images/s (first unit {first:.1f} s)", f"{1 / per_image:,.1f}", note=note),
        Row(
            "`certify submit-job --wait`, one worker: end-to-end s "
            + (f"(Ray start {startup:.1f} s apart)" if startup is not None else "(on the Ray at --address)"),
            f"{wall:.1f}",
        ),
        Row("job against the warm engine, end to end", f"{steady / wall:.3f}"),
        Row(
            "job against the warm engine, driver only",
            f"{steady / driver:.3f}",
            f">= {TARGETS['driver_ratio']}",
            steady / driver >= TARGETS["driver_ratio"],
        ),
        Row(
            "images whose job votes differ from the bare engine's",
            f"{differ}/{images}",
            "0",
            differ == 0,
            exact=True,
        ),
    ]
