"""What a sweep will cost before it runs: its plan as counts (models to train and their training
images, units, images, forward passes) and the time those take at given rates.

Pure: the spec's files and arithmetic, no Ray, nothing written (``certify plan`` measures the
rates with ``certlib.engine.throughput`` and prints what this module counts). A forward pass is one
evaluation of the base classifier on one input: an exact family (DSSN) costs its L noisy copies
per image, a Monte Carlo family its n0 + n samples (``passes_per_image``).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from certlib.families import family
from certlib.rows import load_results
from certlib.training.config import TrainConfig, TrainSettings, step_flops
from cluster.plan.sizing import passes_per_image, with_shard_size
from cluster.plan.state import Plan, plan_sweep
from cluster.plan.units import ModelKey
from cluster.spec import Sweep

# --------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class Group:
    """The certification of one (method, training, sigma, k) over the sweep's seeds."""

    method: str
    training: str
    sigma: float
    k: float | None
    exact: bool  # votes enumerated exactly (DSSN: L copies per image), else Monte Carlo (n0 + n)
    configurations: int  # models certified (one per seed)
    images: int  # result rows in all: selected images x configurations
    images_done: int  # rows already on disk (a resume)
    passes_per_image: int  # L, or n0 + n (sequential sampling: n0 + the cap, at most)
    forward_passes: int  # of the rows still to certify (sequential: at the cap, an upper bound)
    sequential: bool = False  # Monte Carlo sampling stopped per image (certify.sampling)
    mean_samples: float | None = None  # sequential: the estimation samples per image an earlier run used


@dataclass(frozen=True)
class TrainingGroup:
    """The training runs of one training mode: one per missing checkpoint."""

    training: str  # standard or stability
    models: int  # training runs (models sharing a checkpoint, e.g. Zhang et al.'s k, share one)
    configurations: int  # configurations waiting for these runs
    epochs: int
    images_per_epoch: int | None  # the training split's size; None where it cannot be read here
    relative_cost: float  # a training image's cost relative to standard training (step FLOPs)

    @property
    def images(self) -> int | None:
        """Training images processed by all these runs (epochs x split x runs)."""
        return None if self.images_per_epoch is None else self.models * self.epochs * self.images_per_epoch


@dataclass(frozen=True)
class Cost:
    """A sweep's plan as counts: what a run of it on this machine's files must still do."""

    name: str
    output: str
    dataset: str
    split: str
    images_per_model: int  # selected images, certified with every configuration
    configurations: int  # models certified (method x training x sigma x k x seed)
    checkpoints_present: int  # configurations whose checkpoint exists (not trained again)
    shard_size: int  # images per unit
    shard_size_source: str  # where the shard size comes from (spec, an earlier run, chosen)
    units_total: int
    units_done: int  # units whose shard is already on disk and valid (a resume)
    architecture: str  # the certified models' architecture (an existing card's, else models.train's)
    groups: tuple[Group, ...]
    training: tuple[TrainingGroup, ...]
    unit_passes: tuple[int, ...]  # forward passes of each unit still to run, for the schedule

    @property
    def units_pending(self) -> int:
        return self.units_total - self.units_done

    @property
    def images_total(self) -> int:
        return self.images_per_model * self.configurations

    @property
    def images_done(self) -> int:
        return sum(g.images_done for g in self.groups)

    @property
    def images_pending(self) -> int:
        return self.images_total - self.images_done

    @property
    def exact_passes(self) -> int:
        """Forward passes of the exact families still to run (DSSN: L per image)."""
        return sum(g.forward_passes for g in self.groups if g.exact)

    @property
    def monte_carlo_samples(self) -> int:
        """Samples of the Monte Carlo families still to draw (n0 + n per image)."""
        return sum(g.forward_passes for g in self.groups if not g.exact)

    @property
    def forward_passes(self) -> int:
        return self.exact_passes + self.monte_carlo_samples

    @property
    def models_to_train(self) -> int:
        return sum(t.models for t in self.training)

    @property
    def training_images(self) -> int | None:
        images = [t.images for t in self.training]
        return None if None in images else sum(i for i in images if i is not None)


def train_config(sweep: Sweep, key: ModelKey) -> TrainConfig:
    """The training run of ``key``'s checkpoint, as a worker configures it."""
    settings = dataclasses.asdict(sweep.models.train or TrainSettings())
    return TrainConfig(
        dataset=sweep.dataset.name,
        method=key.training_noise(sweep),
        sigma=key.model_sigma,
        seed=key.seed,
        training=key.training,
        **settings,
    )


def relative_training_cost(config: TrainConfig) -> float:
    """A training image's cost under ``config`` relative to the same step in standard training
    (stability training runs the network on two noisy copies: 2)."""
    return step_flops(config) / step_flops(dataclasses.replace(config, training="standard"))


def earlier_samples(output: str) -> dict[tuple, float]:
    """The mean estimation samples per image of the sequential rows already in ``output``, per
    (method, training, sigma, k): what the same configurations used in an earlier run. Empty
    where there are none or the rows cannot be read."""
    try:
        rows = load_results(output, columns=["method", "training", "sigma", "k", "n", "sampling"])
    except (OSError, ValueError):
        return {}
    rows = rows[rows["sampling"] == "sequential"]
    means = rows.groupby(["method", "training", "sigma", "k"], dropna=False)["n"].mean()
    out: dict[tuple, float] = {}
    for key, value in means.items():
        parts: tuple = tuple(key)  # type: ignore[arg-type]
        out[(*parts[:3], None if pd.isna(parts[3]) else parts[3])] = float(value)
    return out


def _groups(plan: Plan, per_image: dict[ModelKey, int], sweep: Sweep) -> tuple[Group, ...]:
    pending: dict[ModelKey, int] = {}
    for unit in plan.pending:
        pending[unit.model] = pending.get(unit.model, 0) + unit.size
    members: dict[tuple, list[ModelKey]] = {}
    for key in plan.models:
        members.setdefault((key.method, key.training, key.sigma, key.k), []).append(key)
    sequential = sweep.certify.sampling == "sequential"
    earlier = earlier_samples(sweep.output) if sequential else {}
    groups = []
    for (method, training, sigma, k), keys in members.items():
        rows = plan.images_per_model * len(keys)
        todo = sum(pending.get(key, 0) for key in keys)
        passes = sum(pending.get(key, 0) * per_image[key] for key in keys)
        exact = family(method).exact
        group = Group(method, training, sigma, k, exact, len(keys), rows, rows - todo, per_image[keys[0]], passes)
        groups.append(
            dataclasses.replace(group, sequential=sequential, mean_samples=earlier.get((method, training, sigma, k)))
        )
    return tuple(groups)


def _training(sweep: Sweep, plan: Plan, images_per_epoch: int | None) -> tuple[TrainingGroup, ...]:
    groups = []
    for mode in sweep.training:
        runs = [key for key in plan.to_train if key.training == mode]
        if not runs:
            continue
        config = train_config(sweep, runs[0])
        waiting = sum(1 for trainer in plan.trained_by.values() if trainer in runs)
        epochs, cost = config.resolved().epochs, relative_training_cost(config)
        groups.append(TrainingGroup(mode, len(runs), waiting, epochs, images_per_epoch, cost))
    return tuple(groups)


def sweep_cost(
    sweep: Sweep, num_images: int, shard: tuple[int, str], architecture: str, train_images: int | None
) -> Cost:
    """The counts of ``sweep`` over ``num_images`` selected images cut into units of
    ``shard`` = (size, where it comes from): its plan read from the files (existing checkpoints
    are not trained, valid shards on disk are done), ``train_images`` the training split's size."""
    size, source = shard
    sized = with_shard_size(sweep, size)
    plan = plan_sweep(sized, num_images, log=lambda line: None)
    per_image = {key: passes_per_image(sized, key) for key in plan.models}  # a noise built once per model
    return Cost(
        name=sweep.name,
        output=sweep.output,
        dataset=sweep.dataset.name,
        split=sweep.dataset.split,
        images_per_model=num_images,
        configurations=len(plan.models),
        checkpoints_present=sum(1 for key in plan.models if key.checkpoint(sweep).is_file()),
        shard_size=size,
        shard_size_source=source,
        units_total=plan.skipped + len(plan.pending),
        units_done=plan.skipped,
        architecture=architecture,
        groups=_groups(plan, per_image, sweep),
        training=_training(sized, plan, train_images),
        unit_passes=tuple(u.size * per_image[u.model] for u in plan.pending),
    )


# --------------------------------------------------------------------------- time


@dataclass(frozen=True)
class Workers:
    """How many of each kind of work run at once (an assumption, stated with the estimate)."""

    certify: int  # certification workers
    train: int  # training runs
    source: str  # where the numbers come from


def assumed_workers(sweep: Sweep, cpus: int, gpus: int) -> Workers:
    """The workers a local Ray instance on a machine with ``cpus`` CPUs and ``gpus`` GPUs would
    hold, as the pool sizes them: at most ``resources.workers`` of each kind, each with
    ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs (auto: 1 where there are GPUs).
    Training runs that share a GPU are counted as one run at the measured rate per GPU: together
    they do not run faster than about one GPU's step rate. Workers given no GPU
    (``gpus_per_worker`` or ``gpus_per_train_worker`` 0) run on the CPU and count by CPUs alone."""
    res = sweep.resources
    cap = math.inf if res.workers == "auto" else int(res.workers)
    by_cpu = math.floor(cpus / res.cpus_per_worker + 1e-9)
    share = (1.0 if gpus else 0.0) if res.gpus_per_worker == "auto" else float(res.gpus_per_worker)
    per_worker = "auto" if res.gpus_per_worker == "auto" else f"{share:g}"
    by_gpu = math.floor(gpus / share + 1e-9) if share else math.inf
    certify = max(1, int(min(cap, by_cpu, by_gpu)))
    train_on_gpu = gpus and res.gpus_per_train_worker != 0
    train = max(1, int(min(cap, by_cpu, gpus if train_on_gpu else math.inf)))
    source = (
        f"a local Ray on this machine's {cpus} CPUs and {gpus} GPUs with resources.workers {res.workers}, "
        f"cpus_per_worker {res.cpus_per_worker:g}, gpus_per_worker {per_worker}, "
        f"gpus_per_train_worker {res.gpus_per_train_worker}"
    )
    return Workers(certify, train, source)


@dataclass(frozen=True)
class Rates:
    """One worker's speed: forward samples per second of a certification worker, training images
    per second of one standard training run (stability runs: ``relative_cost`` times slower)."""

    samples_per_second: float | None
    train_images_per_second: float | None


@dataclass(frozen=True)
class Estimate:
    """Seconds of work for one worker of each kind, and wall time with ``workers`` of each, the
    training first, then the certification (a run overlaps them where models exist already, so
    the wall time errs long); None where a rate or a count is unknown."""

    workers: Workers
    train_seconds: float | None
    certify_seconds: float | None
    train_wall_seconds: float | None
    certify_wall_seconds: float | None

    @property
    def total_seconds(self) -> float | None:
        return _sum(self.train_seconds, self.certify_seconds)

    @property
    def total_wall_seconds(self) -> float | None:
        return _sum(self.train_wall_seconds, self.certify_wall_seconds)


def _sum(*parts: float | None) -> float | None:
    return None if None in parts else sum(p for p in parts if p is not None)


def makespan(durations: Iterable[float], workers: int) -> float:
    """Wall time of independent tasks on ``workers`` that each take the next task as they free
    up, longest first (the sweep's queue hands units out in order; they are of nearly equal
    size, so the order matters little)."""
    loads = [0.0] * max(1, workers)
    for duration in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + duration)
    return max(loads)


def _training_runs(cost: Cost, rate: float | None) -> list[float] | None:
    """Seconds of each training run at ``rate`` standard images per second."""
    if not cost.training:
        return []
    if rate is None or any(t.images_per_epoch is None for t in cost.training):
        return None
    return [
        t.epochs * (t.images_per_epoch or 0) * t.relative_cost / rate for t in cost.training for _ in range(t.models)
    ]


def estimate(cost: Cost, rates: Rates, workers: Workers) -> Estimate:
    """The time ``cost`` takes at ``rates`` with ``workers`` (see ``Estimate``)."""
    runs = _training_runs(cost, rates.train_images_per_second)
    rate = rates.samples_per_second
    units = None if rate is None and cost.unit_passes else [p / (rate or 1.0) for p in cost.unit_passes]
    return Estimate(
        workers,
        None if runs is None else sum(runs),
        None if units is None else sum(units),
        None if runs is None else makespan(runs, workers.train),
        None if units is None else makespan(units, workers.certify),
    )


# --------------------------------------------------------------------------- as data


def cost_dict(cost: Cost) -> dict[str, Any]:
    """``cost`` as JSON-ready data: counts as integers, the totals named."""
    return {
        "name": cost.name,
        "output": cost.output,
        "dataset": {"name": cost.dataset, "split": cost.split, "images": cost.images_per_model},
        "architecture": cost.architecture,
        "models": {
            "configurations": cost.configurations,
            "checkpoints_present": cost.checkpoints_present,
            "to_train": cost.models_to_train,
            "training_images": cost.training_images,
            "training": [dataclasses.asdict(t) | {"images": t.images} for t in cost.training],
        },
        "units": {
            "total": cost.units_total,
            "done": cost.units_done,
            "pending": cost.units_pending,
            "shard_size": cost.shard_size,
            "shard_size_source": cost.shard_size_source,
        },
        "images": {"total": cost.images_total, "done": cost.images_done, "pending": cost.images_pending},
        "groups": [dataclasses.asdict(g) for g in cost.groups],
        "methods": by_method(cost.groups),
        "forward_passes": {
            "exact": cost.exact_passes,
            "monte_carlo": cost.monte_carlo_samples,
            "total": cost.forward_passes,
        },
    }


def estimate_dict(est: Estimate) -> dict[str, Any]:
    """``est`` as JSON-ready data (seconds; null where unknown)."""
    return {
        "workers": dataclasses.asdict(est.workers),
        "one_worker_seconds": {"training": est.train_seconds, "certification": est.certify_seconds},
        "wall_seconds": {"training": est.train_wall_seconds, "certification": est.certify_wall_seconds},
        "total_seconds": {"one_worker": est.total_seconds, "wall": est.total_wall_seconds},
    }


def by_method(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """Per method, in the spec's order: whether it is exact, its configurations, the rows still
    to certify and their forward passes."""
    totals: dict[str, dict[str, Any]] = {}
    for g in groups:
        entry = totals.setdefault(
            g.method, {"method": g.method, "exact": g.exact, "configurations": 0, "images": 0, "forward_passes": 0}
        )
        entry["configurations"] += g.configurations
        entry["images"] += g.images - g.images_done
        entry["forward_passes"] += g.forward_passes
    return list(totals.values())
