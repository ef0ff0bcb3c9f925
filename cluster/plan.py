"""The sweep as a plan: its units, which are done already, which models must be trained first
and which units wait for them, and how many images a unit takes.

Pure: files and arithmetic, no Ray (``cluster.job.executor`` runs a plan on Ray actors). The
command line checks a spec against its files here before submitting it (``preflight``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from certlib.checkpoints.checkpoint import check_card, read_card
from certlib.data import DATASETS, QuantizedDataset, load_dataset
from certlib.families import SmoothingNoise, family, make_noise
from certlib.rows import existing_shards, legacy_layout, shard_config, shard_path, shard_state
from certlib.training.config import PAPER_DEFAULTS
from cluster.progress import Progress
from cluster.record import sweep_file
from cluster.spec import SpecError, Sweep, parse_spec


class SweepConflict(ValueError):
    """The output directory or the models cannot serve this sweep; one line naming why."""


# --------------------------------------------------------------------------- units


@dataclass(frozen=True)
class ModelKey:
    """One smoothed classifier of the sweep: a trained model and how it is certified."""

    method: str
    training: str
    sigma: float
    seed: int
    k: float | None = None  # the shape of Zhang et al.'s families; None for the others
    training_sigma: float | None = None  # models.sigmas: the model's own sigma; None: ``sigma``

    @property
    def model_sigma(self) -> float:
        """The sigma the model was trained at (its card's)."""
        return self.sigma if self.training_sigma is None else self.training_sigma

    @property
    def label(self) -> str:
        shape = "" if self.k is None else f"/k={self.k}"
        trained = "" if self.training_sigma is None else f"/trained-at={self.training_sigma}"
        return f"{self.method}/{self.training}/sigma={self.sigma}{shape}{trained}/seed={self.seed}"

    def identity(self) -> dict:
        """The fields that name this smoothed classifier in a shard's recorded parameters
        (training_sigma only where models.sigmas gives it: earlier shards stay valid)."""
        fields = asdict(self)
        if self.training_sigma is None:
            del fields["training_sigma"]
        return fields

    def noise(self, sweep: Sweep) -> SmoothingNoise:
        """The smoothing this model is certified with, on the sweep's grid."""
        dim = math.prod(DATASETS[sweep.dataset.name].input_shape) if self.k is not None else None
        return make_noise(self.method, self.sigma, q=sweep.q, seed=self.seed, k=self.k, dim=dim)

    def training_noise(self, sweep: Sweep) -> str:
        """The noise the model was trained with: ``models.noise``, else the certifying method."""
        return sweep.models.noise or self.method

    def checkpoint(self, sweep: Sweep) -> Path:
        return Path(
            sweep.models.path.format(
                method=self.training_noise(sweep),
                training=self.training,
                sigma=self.model_sigma,
                seed=self.seed,
                dataset=sweep.dataset.name,
            )
        )


@dataclass(frozen=True)
class Unit:
    """Certification of rows [start, stop) of the sweep's selected images with one model:
    idempotent, its output is exactly one Parquet file."""

    model: ModelKey
    start: int
    stop: int

    @property
    def unit_id(self) -> str:
        m = self.model
        shape = "" if m.k is None else f"-k{m.k}"
        trained = "" if m.training_sigma is None else f"-t{m.training_sigma}"
        return f"{m.method}-{m.training}-s{m.sigma}{shape}{trained}-seed{m.seed}-{self.start:07d}-{self.stop:07d}"

    @property
    def size(self) -> int:
        return self.stop - self.start

    def path(self, sweep: Sweep) -> Path:
        """The unit's Parquet shard."""
        return shard_path(sweep.output, asdict(self.model), self.unit_id)


def model_keys(sweep: Sweep) -> list[ModelKey]:
    return [
        ModelKey(m, t, s, seed, k, trained)
        for m in sweep.methods
        for t in sweep.training
        for s in sweep.sigmas
        for k in (sweep.ks if "k" in family(m).parameters else (None,))
        for trained in sweep.models.sigmas or (None,)
        for seed in sweep.seeds
    ]


def calibration_architecture(sweep: Sweep) -> str:
    """The architecture whose speed sizes the units: an existing checkpoint's, else the one
    models.train will build (its dataset's paper default where the spec names none)."""
    existing = [k.checkpoint(sweep) for k in model_keys(sweep) if k.checkpoint(sweep).is_file()]
    if existing:
        return read_card(existing[0]).architecture
    if sweep.models.train is None:
        key = model_keys(sweep)[0]
        raise SweepConflict(
            f"models.path: no checkpoint {key.checkpoint(sweep)} for {key.label}, "
            "and no models.train section to train it"
        )
    return sweep.models.train.architecture or PAPER_DEFAULTS[sweep.dataset.name]["architecture"]


def expand(sweep: Sweep, num_images: int) -> list[Unit]:
    """All units of the sweep over ``num_images`` selected images, shard by shard."""
    size = sweep.resources.shard_size
    if isinstance(size, str):
        raise ValueError(
            "expand: resources.shard_size must be resolved (cluster.job.executor.resolve_shard_size) first"
        )
    return [
        Unit(key, start, min(start + size, num_images))
        for key in model_keys(sweep)
        for start in range(0, num_images, size)
    ]


def unit_parameters(sweep: Sweep, unit: Unit, model_sha256: str) -> str:
    """The JSON of everything that determines a unit's rows, the model's weights included;
    stored in its Parquet file so a resumed job can tell a valid earlier shard from one
    computed under other parameters or with another model."""
    # How the votes are computed does not change them (the precision cascade): batch size,
    # precision, kernels and compilation are recorded in the rows, not part of a shard's identity.
    certify = unit.model.noise(sweep).depends_on(sweep.certify.settings(unit.model.seed))
    return json.dumps(
        {
            "dataset": asdict(sweep.dataset) | {"root": None},
            "model": unit.model.identity(),
            "certify": certify,
            "start": unit.start,
            "stop": unit.stop,
            "model_sha256": model_sha256,
        },
        sort_keys=True,
    )


def select_images(sweep: Sweep) -> QuantizedDataset:
    """The images the sweep certifies: its split, every k-th from ``start``, at most ``limit``."""
    ds = sweep.dataset
    return load_dataset(ds.name, ds.split, ds.root, ds.every, ds.start, ds.limit)


# --------------------------------------------------------------------------- the plan


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
        progress.training = {k.label: {"state": "queued"} for k in self.to_train}
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
                raise SweepConflict(
                    f"models.path: no checkpoint {key.checkpoint(sweep)} for {key.label}, "
                    "and no models.train section to train it"
                )
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


# --------------------------------------------------------------------------- shard size

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
    """Forward passes one image costs: DSSN's L noisy copies, or Monte Carlo's n0 + n."""
    return key.noise(sweep).passes_per_image(sweep.certify.settings(key.seed))


def with_shard_size(sweep: Sweep, size: int) -> Sweep:
    """``sweep`` with ``resources.shard_size`` set to ``size``."""
    return dataclasses.replace(sweep, resources=dataclasses.replace(sweep.resources, shard_size=size))


# --------------------------------------------------------------------------- preflight


def preflight(sweep: Sweep) -> None:
    """Checks that need the files: the dataset, the models' cards, the output directory."""
    try:
        images = select_images(sweep)
    except (FileNotFoundError, ValueError) as err:
        raise SpecError(f"dataset: {err}") from None
    if len(images) == 0:
        raise SpecError("dataset: the selection (every/start/limit) holds no image")
    for key in model_keys(sweep):
        path = key.checkpoint(sweep)
        if path.is_file():
            try:
                card = read_card(path)
            except ValueError as err:
                raise SpecError(f"models.path: {err}") from None
            problems = check_card(
                card,
                method=key.training_noise(sweep),
                sigma=key.model_sigma,
                seed=key.seed,
                q=sweep.q,
                dataset=sweep.dataset.name,
                training=key.training,
            )
            if problems and not sweep.models.override_card:
                raise SpecError(
                    f"models.path: {path}: the card does not match: {problems[0]} "
                    "(models.override_card: true to use it)"
                )
    refused = legacy_layout(sweep.output)
    if refused:
        raise SpecError(f"output: {refused}")
    given = sweep.resources.shard_size
    size = recorded_shard_size(sweep.output) if isinstance(given, str) else given
    if size is not None:  # else the driver sizes the units: no shard can be there yet
        plan_sweep(with_shard_size(sweep, size), len(images), log=lambda line: None)


def relative_paths(sweep: Sweep) -> list[str]:
    """The spec fields holding relative paths (a remote cluster cannot know what they mean)."""
    candidates = {"output": sweep.output, "models.path": sweep.models.path, "dataset.root": sweep.dataset.root}
    return [
        key for key, value in candidates.items() if value is not None and not Path(value).expanduser().is_absolute()
    ]


def resolve_paths(sweep: Sweep, base: Path) -> Sweep:
    """The sweep with its relative file paths (output, models.path, dataset.root) made
    absolute against ``base``: a job's driver runs in another working directory."""

    def absolute(p: str | None) -> str | None:
        return None if p is None else str(base / Path(p).expanduser())  # an absolute p stays as it is

    data = json.loads(sweep.to_json())
    data["output"] = absolute(data["output"])
    data["models"]["path"] = absolute(data["models"]["path"])
    data["dataset"]["root"] = absolute(data["dataset"]["root"])
    return parse_spec(data)
