"""How many images a unit takes: the spec's ``resources.shard_size``, the size an earlier run of
the same output chose (its job record), or, for ``auto``, a size from a worker's measured rate
(the executor measures it, ``certify plan`` estimates it; both size the units here)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cluster.plan.units import ModelKey, model_keys
from cluster.record import sweep_file
from cluster.spec import Sweep

# Automatic shard size: each unit long enough that its fixed cost (a driver round trip, its
# Parquet write, the engine's spot check) is noise, short enough that a lost worker loses
# little, and enough units per worker that the last ones finish together.
MIN_UNIT_SECONDS, MAX_UNIT_SECONDS, UNITS_PER_WORKER = 60.0, 600.0, 8


def choose_shard_size(
    num_images: int, models: int, passes_per_image: float, samples_per_second: float, workers: int
) -> int:
    """Images per unit: a unit lasts total / (workers x UNITS_PER_WORKER), kept within
    [MIN_UNIT_SECONDS, MAX_UNIT_SECONDS], at the measured ``samples_per_second`` of one worker."""
    image_seconds = passes_per_image / max(samples_per_second, 1e-9)
    total = num_images * models * image_seconds
    unit_seconds = min(MAX_UNIT_SECONDS, max(MIN_UNIT_SECONDS, total / (max(1, workers) * UNITS_PER_WORKER)))
    return int(min(num_images, max(1, round(unit_seconds / image_seconds))))


def recorded_shard_size(output: str | Path) -> int | None:
    """The shard size an earlier run of this output directory resolved (its job record)."""
    try:
        size = json.loads(sweep_file(output).read_text())["resources"]["shard_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return size if isinstance(size, int) else None


def passes_per_image(sweep: Sweep, key: ModelKey) -> int:
    """Forward passes one image costs: DSSN's L noisy copies, or Monte Carlo's n0 + n (with
    sequential sampling n is the cap: at most that)."""
    noise = key.noise(sweep)
    return noise.passes_per_image(sweep.certify_settings(noise, key.seed))


def with_shard_size(sweep: Sweep, size: int) -> Sweep:
    """``sweep`` with ``resources.shard_size`` set to ``size``."""
    return dataclasses.replace(sweep, resources=dataclasses.replace(sweep.resources, shard_size=size))


def known_shard_size(sweep: Sweep) -> tuple[int, str] | None:
    """The shard size a run takes without measuring, and where it comes from: the spec's
    ("spec"), else the one an earlier run of the same output directory chose ("earlier run");
    None when a run chooses it from a measured rate (``measured_shard_size``)."""
    given = sweep.resources.shard_size
    if isinstance(given, int):
        return given, "spec"
    recorded = recorded_shard_size(sweep.output)
    return None if recorded is None else (recorded, "earlier run")


def measured_shard_size(sweep: Sweep, num_images: int, samples_per_second: float, workers: int) -> int:
    """The shard size of ``shard_size: auto`` when a worker measures ``samples_per_second`` and
    ``workers`` certification workers fit (``choose_shard_size`` over the sweep's mean cost)."""
    keys = model_keys(sweep)
    passes = sum(passes_per_image(sweep, k) for k in keys) / len(keys)
    return choose_shard_size(num_images, len(keys), passes, samples_per_second, workers)
