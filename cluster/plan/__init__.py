"""The sweep as a plan, pure (files and arithmetic, no Ray): its smoothed classifiers and units
and the names and card checks every side shares (``units``), which units are done and which
models must be trained first (``state``), how many images a unit takes (``sizing``), what the
command line checks before submitting (``preflight``) and what a sweep will cost (``estimate``).
"""

from cluster.plan.preflight import preflight, relative_paths, resolve_paths
from cluster.plan.sizing import known_shard_size, measured_shard_size, passes_per_image, with_shard_size
from cluster.plan.state import Plan, plan_sweep
from cluster.plan.units import (
    ModelKey,
    SweepConflict,
    Unit,
    calibration_architecture,
    cannot_train,
    expand,
    model_keys,
    select_images,
    unit_parameters,
)

__all__ = [
    "ModelKey",
    "Plan",
    "SweepConflict",
    "Unit",
    "calibration_architecture",
    "cannot_train",
    "expand",
    "known_shard_size",
    "measured_shard_size",
    "model_keys",
    "passes_per_image",
    "plan_sweep",
    "preflight",
    "relative_paths",
    "resolve_paths",
    "select_images",
    "unit_parameters",
    "with_shard_size",
]
