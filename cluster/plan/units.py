"""A sweep's smoothed classifiers (``ModelKey``) and units of work (``Unit``), and the rules
every side applies to them in one place: their names (``identity_parts``), what a model's card
must say (``ModelKey.expected_card``), and the refusal of a model that is missing and cannot be
trained (``cannot_train``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from certlib.checkpoints.checkpoint import read_card
from certlib.data import DATASETS, QuantizedDataset, load_dataset
from certlib.families import SmoothingNoise, family, make_noise
from certlib.rows import shard_path
from certlib.training.config import PAPER_DEFAULTS
from cluster.spec import Sweep


class SweepConflict(ValueError):
    """The output directory or the models cannot serve this sweep; one line naming why."""


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

    def identity_parts(self) -> list[tuple[str, str, Any]]:
        """The fields that tell this classifier from the sweep's others, as (name in a label,
        abbreviation in a file or unit name, value): k and the training sigma only where the
        sweep has them. Every name of a model or unit is built from these."""
        parts: list[tuple[str, str, Any]] = [("", "", self.method), ("", "", self.training), ("sigma", "s", self.sigma)]
        if self.k is not None:
            parts.append(("k", "k", self.k))
        if self.training_sigma is not None:
            parts.append(("trained-at", "t", self.training_sigma))
        return [*parts, ("seed", "seed", self.seed)]

    @property
    def label(self) -> str:
        """For people: ``dssn/standard/sigma=0.5/seed=0`` (progress, logs, tables of the plan)."""
        return "/".join(f"{name}={value}" if name else str(value) for name, _, value in self.identity_parts())

    @property
    def slug(self) -> str:
        """For files and Ray task names: ``dssn-standard-s0.5-seed0``."""
        return "-".join(f"{short}{value}" for _, short, value in self.identity_parts())

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

    def expected_card(self, sweep: Sweep) -> dict[str, Any]:
        """What the model's card must say (``certlib.checkpoints.checkpoint.check_card``), and
        the images it must take (their shape and class count: never overridden): checked when a
        spec is validated and again when a worker loads the model."""
        info = DATASETS[sweep.dataset.name]
        return {
            "method": self.training_noise(sweep),
            "sigma": self.model_sigma,
            "seed": self.seed,
            "q": sweep.q,
            "dataset": sweep.dataset.name,
            "training": self.training,
            "input_shape": list(info.input_shape),
            "num_classes": info.num_classes,
        }

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


def cannot_train(sweep: Sweep, key: ModelKey) -> SweepConflict:
    """The refusal of a model whose checkpoint is missing in a sweep without ``models.train``."""
    return SweepConflict(
        f"models.path: no checkpoint {key.checkpoint(sweep)} for {key.label}, and no models.train section to train it"
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
        return f"{self.model.slug}-{self.start:07d}-{self.stop:07d}"

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
        raise cannot_train(sweep, model_keys(sweep)[0])
    return sweep.models.train.architecture or PAPER_DEFAULTS[sweep.dataset.name]["architecture"]


def expand(sweep: Sweep, num_images: int) -> list[Unit]:
    """All units of the sweep over ``num_images`` selected images, shard by shard."""
    size = sweep.resources.shard_size
    if isinstance(size, str):
        raise ValueError("expand: resources.shard_size must be resolved (cluster.plan.sizing) first")
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
    noise = unit.model.noise(sweep)
    certify = noise.depends_on(sweep.certify_settings(noise, unit.model.seed))
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
