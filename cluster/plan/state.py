"""The sweep as a plan: its units, which are done already, which models must be trained first
and which units wait for them. Pure: files and arithmetic, no Ray (``cluster.job.executor``
runs a plan on Ray actors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from certlib.checkpoints.checkpoint import read_card
from certlib.rows import existing_shards, legacy_layout, shard_config, shard_state
from cluster.plan.units import ModelKey, SweepConflict, Unit, cannot_train, expand, model_keys, unit_parameters
from cluster.progress import Progress, TrainingState
from cluster.spec import Sweep


@dataclass
class Plan:
    """What a run of the sweep must do: the pending units and the models to train first."""

    models: list[ModelKey]  # every model of the sweep, in the spec's order
    pending: list[Unit]
    to_train: list[ModelKey]
    skipped: int  # units whose shard is already valid
    images_per_model: int
    # Each model whose checkpoint is missing -> the one in to_train that trains it (models that
    # differ only in how they are certified, e.g. Zhang et al.'s k, share one checkpoint).
    trained_by: dict[ModelKey, ModelKey] = field(default_factory=dict)

    @property
    def total_images(self) -> int:
        return self.images_per_model * len(self.models)

    @property
    def waiting(self) -> dict[ModelKey, list[Unit]]:
        """For each model to train (in training order), the pending units that wait for it."""
        waiting: dict[ModelKey, list[Unit]] = {key: [] for key in self.to_train}
        for unit in self.pending:
            if unit.model in self.trained_by:
                waiting[self.trained_by[unit.model]].append(unit)
        return waiting

    @property
    def ready(self) -> list[Unit]:
        """The pending units whose model exists: they can run at once."""
        return [unit for unit in self.pending if unit.model not in self.trained_by]

    def progress(self) -> Progress:
        """The progress before the run: the skipped units' images done, per model and overall,
        and every model to train queued."""
        by_model = {k.label: [self.images_per_model, self.images_per_model] for k in self.models}
        for unit in self.pending:
            by_model[unit.model.label][0] -= unit.size
        total = self.total_images
        progress = Progress(
            total=total,
            done=total - sum(u.size for u in self.pending),
            by_model=by_model,
            units_total=self.skipped + len(self.pending),
            units_done=self.skipped,
            models_to_train=len(self.to_train),
        )
        progress.training = {k.label: {"state": TrainingState.QUEUED} for k in self.to_train}
        return progress


def plan_sweep(sweep: Sweep, num_images: int, log=print) -> Plan:
    """Which units must run and which models must be trained first.

    Refuses an output directory holding shards this sweep would not write (another shard size
    or image selection) or shards computed with other parameters: mixing them would duplicate
    or corrupt results.
    """
    refused = legacy_layout(sweep.output)
    if refused:
        raise SweepConflict(f"output: {refused}")
    units = expand(sweep, num_images)
    expected = {u.path(sweep): u for u in units}
    keys = model_keys(sweep)
    _check_foreign_shards(sweep, expected, set(keys))
    weights = {}
    for key in keys:
        checkpoint = key.checkpoint(sweep)
        weights[key] = read_card(checkpoint).weights_sha256 if checkpoint.is_file() else None
    pending, skipped = [], 0
    for path, unit in expected.items():
        if _shard_state(sweep, path, unit, weights[unit.model], log) == "valid":
            skipped += 1
        else:
            pending.append(unit)
    trainer: dict[Path, ModelKey] = {}  # one training per checkpoint
    for key in dict.fromkeys(u.model for u in pending):
        if weights[key] is None:
            if sweep.models.train is None:
                raise cannot_train(sweep, key)
            trainer.setdefault(key.checkpoint(sweep), key)
    trained_by = {key: trainer[key.checkpoint(sweep)] for key in keys if key.checkpoint(sweep) in trainer}
    return Plan(keys, pending, list(trainer.values()), skipped, num_images, trained_by)


def _check_foreign_shards(sweep: Sweep, expected: dict[Path, Unit], keys: set[ModelKey]) -> None:
    """Refuse shards of this sweep's models that this sweep would not write."""
    configs = {(key.method, key.training, key.sigma, key.seed) for key in keys}
    for path in existing_shards(sweep.output):
        if path not in expected:
            if tuple(shard_config(sweep.output, path).values()) in configs:
                raise SweepConflict(
                    f"output: {path} was written with another shard size or image selection; use a new output directory"
                )


def _shard_state(sweep: Sweep, path: Path, unit: Unit, sha: str | None, log) -> str:
    """'valid', 'missing', or why the unit must run again; a conflict raises SweepConflict."""
    if sha is None:
        if path.exists():
            raise SweepConflict(
                f"output: {path} was computed with a model that is no longer at models.path; use a new output directory"
            )
        return "missing"
    state = shard_state(path, unit_parameters(sweep, unit, sha), unit.size)
    if state == "computed with other parameters":
        raise SweepConflict(
            f"output: {path} holds results computed with other parameters or another model "
            "(image selection, certification settings or weights); use a new output directory"
        )
    if state not in ("valid", "missing"):
        log(f"recomputing {unit.unit_id}: its file {state}")
    return state
