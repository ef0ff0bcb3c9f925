"""The ``certify plan`` command, and ``certify submit-job --dry-run`` through ``print_plan``: a
spec's plan as counts and a time estimate from a short measurement on this machine's device (or
given rates), without submitting, starting Ray or writing anything.

The spec is validated as ``submit-job`` validates it for a local run (``load_spec``,
``resolve_paths``, ``preflight``: they only read), so a bad spec gets the same one-line error.
The counts are ``cluster.plan.estimate``'s, the measurements ``certlib.engine.throughput``'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cluster.cli.errors import UserError, user_errors

if TYPE_CHECKING:
    import torch

    from cluster.plan.estimate import Cost, Workers
    from cluster.spec import Sweep

CALIBRATION_SECONDS = 1.0  # per measured rate: the speed of a steady state, not of a run
FORMATS = ("markdown", "json")
SpecSource = str | Path | Mapping[str, Any]  # a YAML file, or the spec as plain data


def _validated(spec: SpecSource) -> Sweep:
    """The spec checked completely, its relative paths made absolute against the current
    directory, exactly as ``submit-job`` checks it for a local Ray."""
    from cluster.plan import preflight, resolve_paths
    from cluster.spec import load_spec, parse_spec

    sweep = parse_spec(dict(spec)) if isinstance(spec, Mapping) else load_spec(spec)
    sweep = resolve_paths(sweep, Path.cwd())
    preflight(sweep)
    return sweep


def _devices(sweep: Sweep, name: str) -> dict[str, torch.device]:
    """The device each rate is measured on, by stage (``certify``, ``train``). ``auto`` measures
    each where a local Ray's worker of that kind would run: CUDA where this machine has a GPU and
    the spec gives that kind of worker one (``gpus_per_worker`` / ``gpus_per_train_worker`` auto
    or above 0), else the CPU. ``cpu`` and ``cuda`` measure both there."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device on this machine")
    gpu = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    settings = {"certify": sweep.resources.gpus_per_worker, "train": sweep.resources.gpus_per_train_worker}
    return {k: torch.device("cuda" if gpu and (name == "cuda" or v != 0) else "cpu") for k, v in settings.items()}


@contextmanager
def _threads(count: int):
    """Run with ``count`` torch threads, as a worker with ``cpus_per_worker`` CPUs does."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_split_size(sweep: Sweep) -> tuple[int | None, str | None]:
    """Images per training epoch, or None and why they cannot be counted here."""
    from certlib.data import load_dataset

    try:
        return len(load_dataset(sweep.dataset.name, "train", sweep.dataset.root)), None
    except (OSError, ValueError) as err:
        return None, f"the training split cannot be read here ({str(err).splitlines()[0]}): training time unknown"


def _given(rate: float) -> dict[str, Any]:
    return {"per_second": rate, "source": "given"}


def _measure_certify(sweep: Sweep, architecture: str, device: torch.device) -> dict[str, Any]:
    from certlib.data import DATASETS
    from certlib.determinism import deterministic_kernels
    from certlib.engine.throughput import forward_throughput
    from cluster.job.worker import device_name

    info = DATASETS[sweep.dataset.name]
    with deterministic_kernels(sweep.certify.deterministic):  # as the worker runs (certify.deterministic)
        measured = forward_throughput(
            architecture,
            info.num_classes,
            info.mean,
            info.std,
            info.input_shape,
            device=device,
            engine=sweep.certify.engine(),
            seconds=CALIBRATION_SECONDS,
            trust_code=sweep.models.trust_code,
        )
    return asdict(measured) | {"source": "measured", "architecture": architecture, "device": device_name(device)}


def _measure_training(sweep: Sweep, device: torch.device) -> dict[str, Any]:
    """One training run's measured rate, and its standard-training equivalent
    (``standard_per_second``): the estimate scales each training mode from it."""
    from certlib.engine.throughput import training_throughput
    from cluster.job.worker import device_name
    from cluster.plan import model_keys
    from cluster.plan.estimate import relative_training_cost, train_config

    key = next(k for k in model_keys(sweep) if not k.checkpoint(sweep).is_file())  # the first run to train
    config = train_config(sweep, key)
    measured = training_throughput(config, device=device, seconds=CALIBRATION_SECONDS)
    standard = measured.per_second * relative_training_cost(config)
    architecture = config.resolved().architecture
    return asdict(measured) | {
        "source": "measured",
        "architecture": architecture,
        "training": key.training,
        "standard_per_second": standard,
        "device": device_name(device),
    }


def _workers(sweep: Sweep, device: str, workers: int | None) -> Workers:
    import torch

    from cluster.plan.estimate import Workers, assumed_workers

    if workers is not None:
        return Workers(workers, workers, "--workers")
    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    return assumed_workers(sweep, os.cpu_count() or 1, gpus)


def _plan_cost(
    sweep: Sweep, device: torch.device, rate: float | None, workers: Workers, notes: list[str]
) -> tuple[Cost, dict[str, Any] | None]:
    """The sweep's counts, and the certification rate where one was measured to size its units."""
    from cluster.plan import calibration_architecture, known_shard_size, measured_shard_size, model_keys, select_images
    from cluster.plan.estimate import sweep_cost

    images = len(select_images(sweep))
    architecture = calibration_architecture(sweep)
    certify = None if rate is None else _given(rate)
    shard = known_shard_size(sweep)
    if shard is None:  # a run sizes its units from a measured rate: so does the plan
        certify = certify or _measure_certify(sweep, architecture, device)
        size = measured_shard_size(sweep, images, certify["per_second"], workers.certify)
        shard = (size, "auto: chosen from the certification rate and workers")
    train_images = None
    if any(not key.checkpoint(sweep).is_file() for key in model_keys(sweep)):
        train_images, why = _train_split_size(sweep)
        notes += [why] if why else []
    return sweep_cost(sweep, images, shard, architecture, train_images), certify


def dry_run(
    spec: SpecSource,
    *,
    device: str = "auto",
    rate: float | None = None,
    train_rate: float | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """The plan of ``spec`` as data: its counts (``cluster.plan.estimate.cost_dict``), the rates
    measured on ``device`` (auto: each where a local Ray's worker of its kind would run, see
    ``_devices``) or given (``rate``: forward samples/s of one certification worker;
    ``train_rate``: images/s of one standard training run), the workers assumed and the time
    estimate. Starts nothing, writes nothing."""
    from cluster.plan.estimate import Rates, cost_dict, estimate, estimate_dict

    sweep = _validated(spec)
    devices = _devices(sweep, device)
    assumed = _workers(sweep, device, workers)
    notes: list[str] = []
    with _threads(max(1, int(sweep.resources.cpus_per_worker))):
        cost, certify = _plan_cost(sweep, devices["certify"], rate, assumed, notes)
        if certify is None and cost.units_pending:
            certify = _measure_certify(sweep, cost.architecture, devices["certify"])
        training = None
        if cost.training:
            training = _given(train_rate) if train_rate is not None else _measure_training(sweep, devices["train"])
    rates = Rates(
        None if certify is None else certify["per_second"],
        None if training is None else training.get("standard_per_second", training["per_second"]),
    )
    measured = [r["seconds"] for r in (certify, training) if r is not None and r["source"] == "measured"]
    return {
        "spec": None if isinstance(spec, Mapping) else str(spec),
        "plan": cost_dict(cost),
        "calibration": {
            "seconds": float(sum(measured)),
            "certification": certify,
            "training": training,
        },
        "estimate": estimate_dict(estimate(cost, rates, assumed)),
        "notes": notes,
    }


def print_plan(
    spec: SpecSource,
    *,
    fmt: str = "markdown",
    device: str = "auto",
    rate: float | None = None,
    train_rate: float | None = None,
    workers: int | None = None,
    echo: Callable[[str], None] = click.echo,
) -> dict[str, Any]:
    """Print the plan of ``spec`` and its time estimate (``dry_run``) as Markdown or JSON; what
    ``certify plan`` and ``certify submit-job --dry-run`` print. Returns the plan as data."""
    if fmt not in FORMATS:
        raise UserError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    report = dry_run(spec, device=device, rate=rate, train_rate=train_rate, workers=workers)
    echo(json.dumps(report, indent=2) if fmt == "json" else render(report))
    return report


# --------------------------------------------------------------------------- text


def _n(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def duration(seconds: float | None) -> str:
    """``seconds`` as a person reads a duration: 8.2 s, 3 min 05 s, 2 h 10 min, 4 d 03 h."""
    if seconds is None:
        return "unknown"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        whole = round(seconds)
        return f"{whole // 60} min {whole % 60:02d} s"
    if seconds < 86400:
        minutes = round(seconds / 60)
        return f"{minutes // 60} h {minutes % 60:02d} min"
    hours = round(seconds / 3600)
    return f"{hours // 24} d {hours % 24:02d} h"


def _markdown(header: list[str], rows: list[list[str]], text: int = 1) -> str:
    """A Markdown table, its first ``text`` columns left-aligned, the numbers right-aligned."""
    lines = [header, ["---"] * text + ["---:"] * (len(header) - text), *rows]
    return "\n".join("| " + " | ".join(row) + " |" for row in lines)


def _training_table(models: dict[str, Any]) -> str:
    rows = [
        [t["training"], *map(_n, (t["models"], t["configurations"], t["epochs"], t["images_per_epoch"]))]
        + [f"{t['relative_cost']:g}", _n(t["images"])]
        for t in models["training"]
    ]
    rows.append(["total", _n(models["to_train"]), "", "", "", "", _n(models["training_images"])])
    header = ["training", "runs", "configurations", "epochs", "images per epoch", "cost per image", "training images"]
    return _markdown(header, rows)


def _methods_table(plan: dict[str, Any]) -> str:
    rows = [
        [m["method"], "exact: L per image" if m["exact"] else "Monte Carlo: n0 + n per image"]
        + [*map(_n, (m["configurations"], m["images"], m["forward_passes"]))]
        for m in plan["methods"]
    ]
    totals = (plan["models"]["configurations"], plan["images"]["pending"], plan["forward_passes"]["total"])
    rows.append(["total", "", *map(_n, totals)])
    return _markdown(["method", "counted as", "configurations", "rows to certify", "forward passes"], rows, 2)


def _certification_table(plan: dict[str, Any]) -> str:
    """One row per (method, training, sigma, k): its seeds' configurations together."""
    shaped = any(g["k"] is not None for g in plan["groups"])
    header = ["method", "training", "sigma", *(["k"] if shaped else []), "configurations", "rows done"]
    header += ["rows to certify", "passes per image", "forward passes"]
    rows = []
    for g in plan["groups"]:
        per = f"{'L' if g['exact'] else 'n0 + n'} = {g['passes_per_image']:,}"
        if g.get("sequential"):
            per = f"n0 + at most n = {g['passes_per_image']:,}"
            if g.get("mean_samples") is not None:
                per += f" (earlier run: n0 + {g['mean_samples']:,.0f})"
        k = [] if not shaped else ["" if g["k"] is None else f"{g['k']:g}"]
        counts = map(_n, (g["configurations"], g["images_done"], g["images"] - g["images_done"]))
        rows.append([g["method"], g["training"], f"{g['sigma']:g}", *k, *counts, per, _n(g["forward_passes"])])
    images = plan["images"]
    totals = map(_n, (plan["models"]["configurations"], images["done"], images["pending"]))
    rows.append(["total", "", "", *([""] if shaped else []), *totals, "", _n(plan["forward_passes"]["total"])])
    return _markdown(header, rows, 2)


def _rate_line(kind: str, rate: dict[str, Any] | None, unit: str) -> str:
    if rate is None:
        return f"- {kind}: not needed (nothing to {'train' if kind == 'training' else 'certify'})"
    if rate["source"] == "given":
        return f"- {kind}: {rate['per_second']:,.0f} {unit}/s (given)"
    how = f"batch {rate['batch_size']}, {rate['mode']}"
    if kind == "training":
        how = f"{rate['training']}, {how}"
    return (
        f"- {kind}: {rate['per_second']:,.0f} {unit}/s of {rate['architecture']} ({how}), "
        f"measured on {rate['device']} in {rate['seconds']:.1f} s"
    )


def _estimate_table(plan: dict[str, Any], est: dict[str, Any]) -> str:
    one, wall, workers, total = est["one_worker_seconds"], est["wall_seconds"], est["workers"], est["total_seconds"]
    rows = [
        ["training", f"{_n(plan['models']['training_images'])} images", duration(one["training"])]
        + [str(workers["train"]), duration(wall["training"])],
        ["certification", f"{_n(plan['forward_passes']['total'])} forward passes", duration(one["certification"])]
        + [str(workers["certify"]), duration(wall["certification"])],
        ["total", "", duration(total["one_worker"]), "", duration(total["wall"])],
    ]
    return _markdown(["stage", "work", "one worker", "workers", "wall time"], rows)


def render(report: dict[str, Any]) -> str:
    """The Markdown summary ``certify plan`` prints of a ``dry_run`` report."""
    plan, cal, est = report["plan"], report["calibration"], report["estimate"]
    ds, images, units, models = plan["dataset"], plan["images"], plan["units"], plan["models"]
    parts = [
        f"plan of {plan['name']} -> {plan['output']} (nothing submitted, nothing written)",
        f"images: {_n(ds['images'])} of {ds['name']} {ds['split']} x {_n(models['configurations'])} configurations "
        f"= {_n(images['total'])} rows; {_n(images['done'])} done, {_n(images['pending'])} to certify",
        f"units: {_n(units['total'])} of {_n(units['shard_size'])} images (shard size: {units['shard_size_source']}); "
        f"{_n(units['done'])} done, {_n(units['pending'])} to run",
        f"models: {_n(models['configurations'])} configurations of {plan['architecture']}; "
        f"{_n(models['checkpoints_present'])} with a checkpoint, {_n(models['to_train'])} training runs",
    ]
    if models["training"]:
        parts += ["", "Training (runs x epochs x images per epoch):", "", _training_table(models)]
    parts += ["", "Certification (rows: images x configurations):", "", _certification_table(plan)]
    parts += ["", _methods_table(plan)]
    if cal["seconds"]:
        parts += ["", f"Calibration, {cal['seconds']:.1f} s in all:"]
    else:
        parts += ["", "Rates (nothing measured):"]
    parts += [
        _rate_line("certification", cal["certification"], "samples"),
        _rate_line("training", cal["training"], "images"),
    ]
    parts += [
        "",
        "Estimated time (an estimate, not a measurement of the run): each worker at the rate above, the "
        "training first, then the certification (a run overlaps them); not counted: the cascade's "
        "re-evaluation of near ties, data loading, start-up, compilation.",
        f"Workers assumed at once: {est['workers']['certify']} certification, {est['workers']['train']} training "
        f"({est['workers']['source']}).",
        "",
        _estimate_table(plan, est),
    ]
    parts += [f"note: {note}" for note in report["notes"]]
    return "\n".join(parts)


@click.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="markdown", show_default=True)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to measure the rates (auto: CUDA where present, else the CPU).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SAMPLES_PER_SECOND",
    help="Forward samples/s of one certification worker, instead of measuring it.",
)
@click.option(
    "--train-rate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="IMAGES_PER_SECOND",
    help="Images/s of one standard training run (stability runs cost 2x per image), instead of measuring it.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Workers of each kind assumed at once (default: what a local Ray on this machine would hold).",
)
@user_errors
def plan(
    spec_file: Path, fmt: str, device: str, rate: float | None, train_rate: float | None, workers: int | None
) -> None:
    """The plan of SPEC_FILE (models to train, units, images, forward passes) and an estimate of
    its time on this machine; submits nothing, writes nothing."""
    print_plan(spec_file, fmt=fmt, device=device, rate=rate, train_rate=train_rate, workers=workers)
