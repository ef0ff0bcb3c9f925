"""The sweep spec: schema, validation with one-line errors, path resolution.

A spec is a YAML file (see jobs/). Every error a user can make is caught here, before anything
starts, and reported as one ``SpecError`` line naming the field. ``cluster.plan`` expands a
sweep into its units.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from certlib.analysis.tables import LINF_RADII, RADII
from certlib.checkpoints.trust import module_problem
from certlib.data import DATASETS
from certlib.engine.cascade import PRECISIONS, EngineOptions
from certlib.families import FAMILIES, SAMPLINGS, CertifySettings, SmoothingNoise, family, make_noise
from certlib.training.config import DATA_PLACEMENTS, PAPER_DEFAULTS, TRAINING_MODES, TrainSettings
from cluster.spec import bounds
from cluster.spec.fields import (
    SpecError,
    auto_or_boolean,
    boolean,
    check_keys,
    integer,
    number,
    optional_integer,
    seed_value,
    shown,
    string,
    unique_list,
)
from cluster.spec.loading import load_yaml, read_spec_text
from cluster.spec.sampling import check_sampling
from cluster.spec.templates import check_template, check_template_text

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # whole names only (re.fullmatch): "rev\n" is not one


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    split: str = "test"
    root: str | None = None
    every: int = 1
    start: int = 0
    limit: int | None = None


@dataclass(frozen=True)
class ModelsSpec:
    path: str  # template with {method} {training} {sigma} {seed} (and {dataset})
    train: TrainSettings | None = None
    override_card: bool = False
    noise: str | None = None  # the models' training noise where it is not the certifying method
    # The models' training sigmas where they differ from the certification's: every model is
    # certified at every sigma of the sweep (Zhang et al. search the smoothing's (k, sigma)).
    sigmas: tuple[float, ...] | None = None
    # The modules a card's factory:<module>:<function> architecture may import and run, by name
    # (certlib.checkpoints.trust): without it such a card is refused.
    trust_code: tuple[str, ...] = ()


@dataclass(frozen=True)
class CertifySpec:
    n0: int = 64
    n: int = 100_000
    alpha: float = 0.001
    multiclass: bool = False
    batch_size: int | None = None
    precision: str = "auto"
    deterministic: bool = False
    compile: bool | str = "auto"
    sampling: str = "fixed"  # or sequential: n is then each image's cap
    epsilon: float | None = None  # sequential: stop at a radius within epsilon of the estimate's

    def settings(self, seed: int = 0, radii: tuple[float, ...] = ()) -> CertifySettings:
        """What a family's votes and certificate may depend on (the rest is how the engine runs),
        for the model of ``seed`` (which seeds the Monte Carlo streams); ``radii``, in the
        family's norm, is the table grid sequential sampling stops on."""
        return CertifySettings(
            n0=self.n0,
            n=self.n,
            alpha=self.alpha,
            multiclass=self.multiclass,
            seed=seed,
            sampling=self.sampling,
            radii=radii if self.sampling == "sequential" else (),
            epsilon=self.epsilon,
        )

    def engine(self) -> EngineOptions:
        """How the engine runs: speed only, never a vote (``certlib.engine.cascade.EngineOptions``)."""
        return {"batch_size": self.batch_size, "precision": self.precision, "compile": self.compile}


@dataclass(frozen=True)
class ResourcesSpec:
    workers: int | str = "auto"
    gpus_per_worker: float | str = "auto"
    gpus_per_train_worker: float | str = "auto"
    cpus_per_worker: float = 1
    shard_size: int | str = "auto"  # images per unit; auto: sized by the driver from a measured rate
    max_retries: int = 3


@dataclass(frozen=True)
class Sweep:
    name: str
    output: str
    dataset: DatasetSpec
    models: ModelsSpec
    methods: tuple[str, ...]
    sigmas: tuple[float, ...]
    ks: tuple[float, ...] = (0.0,)  # shapes of Zhang et al.'s families (ignored by the others)
    seeds: tuple[int, ...] = (0,)
    training: tuple[str, ...] = ("standard",)
    certify: CertifySpec = CertifySpec()
    radii: tuple[float, ...] = RADII
    radii_linf: tuple[float, ...] = LINF_RADII  # in units of 1/255, for the L-infinity families
    resources: ResourcesSpec = ResourcesSpec()

    @property
    def q(self) -> int:
        return DATASETS[self.dataset.name].q

    def table_radii(self, norm: str) -> tuple[float, ...]:
        """The radii of a table in ``norm``, pixel scale: ``radii_linf`` / 255 for L-infinity."""
        return tuple(r / 255 for r in self.radii_linf) if norm == "linf" else self.radii

    def certify_settings(self, noise: SmoothingNoise, seed: int) -> CertifySettings:
        """The settings the smoothing ``noise`` of a model of ``seed`` is certified with."""
        return self.certify.settings(seed, self.table_radii(noise.norm))

    def to_json(self) -> str:
        data = asdict(self)  # tuples are written as JSON lists, as YAML gives them
        if data["models"]["train"] is None:  # "train:" present, even empty, means "train with defaults"
            del data["models"]["train"]
        if self.ks == Sweep.ks:  # the default: a spec without shaped families may not name ks
            del data["ks"]
        # Defaults added after specs were in use stay out: an unchanged spec keeps its job id.
        if self.radii_linf == Sweep.radii_linf:
            del data["radii_linf"]
        for key in ("sampling", "epsilon"):
            if data["certify"][key] == getattr(CertifySpec, key):
                del data["certify"][key]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Sweep:
        return parse_spec(json.loads(text))


# --------------------------------------------------------------------------- parsing


def _dataset(data, path="dataset") -> DatasetSpec:
    data = check_keys(data, DatasetSpec, path)
    if "name" not in data:
        raise SpecError(f"{path}.name: missing")
    name = string(data["name"], f"{path}.name", sorted(DATASETS))
    split = string(data.get("split", "test"), f"{path}.split", DATASETS[name].splits)
    root = data.get("root")
    if not DATASETS[name].needs_root:
        if root is not None:
            raise SpecError(f"{path}.root: the {name} dataset ships with its library and takes no root")
    else:
        root = string(root, f"{path}.root")
    return DatasetSpec(
        name,
        split,
        root,
        bounds.image_count(data.get("every", 1), f"{path}.every", 1),
        bounds.image_count(data.get("start", 0), f"{path}.start", 0),
        optional_integer(data.get("limit"), f"{path}.limit", 1, bounds.MAX_IMAGES),
    )


def _train(data, dataset: str, path="models.train") -> TrainSettings:
    data = check_keys({} if data is None else data, TrainSettings, path)
    d = TrainSettings()
    side = max(DATASETS[dataset].input_shape[1:])  # padding beyond it: a random crop may hold no image
    arch = data.get("architecture")
    if arch is not None:
        from certlib.models import ARCHITECTURES

        arch = string(arch, f"{path}.architecture", sorted(ARCHITECTURES))
    return TrainSettings(
        architecture=arch,
        epochs=optional_integer(data.get("epochs"), f"{path}.epochs", 1, bounds.MAX_EPOCHS),
        batch_size=bounds.batch_size(data.get("batch_size", d.batch_size), f"{path}.batch_size", dataset),
        lr=number(data.get("lr", d.lr), f"{path}.lr", positive=True, maximum=bounds.FLOAT32_MAX),
        momentum=number(data.get("momentum", d.momentum), f"{path}.momentum", minimum=0, below=1),
        nesterov=boolean(data.get("nesterov", d.nesterov), f"{path}.nesterov"),
        weight_decay=number(
            data.get("weight_decay", d.weight_decay), f"{path}.weight_decay", minimum=0, maximum=bounds.FLOAT32_MAX
        ),
        stability_weight=number(
            data.get("stability_weight", d.stability_weight),
            f"{path}.stability_weight",
            minimum=0,
            maximum=bounds.FLOAT32_MAX,
        ),
        crop_padding=optional_integer(data.get("crop_padding"), f"{path}.crop_padding", 0, side),
        flip=None if data.get("flip") is None else boolean(data["flip"], f"{path}.flip"),
        amp=boolean(data.get("amp", d.amp), f"{path}.amp"),
        channels_last=boolean(data.get("channels_last", d.channels_last), f"{path}.channels_last"),
        heldout_limit=optional_integer(
            data.get("heldout_limit", d.heldout_limit), f"{path}.heldout_limit", 1, bounds.MAX_IMAGES
        ),
        deterministic=boolean(data.get("deterministic", d.deterministic), f"{path}.deterministic"),
        cuda_graph=auto_or_boolean(data.get("cuda_graph", d.cuda_graph), f"{path}.cuda_graph"),
        data=string(data.get("data", d.data), f"{path}.data", DATA_PLACEMENTS),
        loader_workers=optional_integer(
            data.get("loader_workers", d.loader_workers), f"{path}.loader_workers", 0, bounds.MAX_CPUS
        ),
    )


def _trusted_module(value: Any, where: str) -> str:
    """A module the user trusts by name (``models.trust_code``): a dotted module name outside the
    standard library; never a pattern."""
    problem = module_problem(value)
    if problem:
        raise SpecError(f"{where}: {problem}")
    return value


def _models(data, dataset: str, path="models") -> ModelsSpec:
    data = check_keys(data, ModelsSpec, path)
    template = string(data.get("path"), f"{path}.path")
    check_template_text(template, f"{path}.path")
    train = _train(data["train"], dataset) if "train" in data else None
    noise = None if data.get("noise") is None else string(data["noise"], f"{path}.noise", sorted(FAMILIES))
    sigmas = None if data.get("sigmas") is None else unique_list(data["sigmas"], f"{path}.sigmas", bounds.sigma_value)
    trust_code = unique_list(data.get("trust_code", []), f"{path}.trust_code", _trusted_module, allow_empty=True)
    return ModelsSpec(
        template, train, boolean(data.get("override_card", False), f"{path}.override_card"), noise, sigmas, trust_code
    )


def _certify(data, dataset: str, path="certify") -> CertifySpec:
    data = check_keys({} if data is None else data, CertifySpec, path)
    d = CertifySpec()
    batch = data.get("batch_size")
    return CertifySpec(
        n0=integer(data.get("n0", d.n0), f"{path}.n0", 1, bounds.MAX_SAMPLES),
        n=integer(data.get("n", d.n), f"{path}.n", 1, bounds.MAX_SAMPLES),
        alpha=number(data.get("alpha", d.alpha), f"{path}.alpha", positive=True, below=0.5),
        multiclass=boolean(data.get("multiclass", d.multiclass), f"{path}.multiclass"),
        batch_size=None if batch is None else bounds.batch_size(batch, f"{path}.batch_size", dataset),
        precision=string(data.get("precision", d.precision), f"{path}.precision", PRECISIONS),
        deterministic=boolean(data.get("deterministic", d.deterministic), f"{path}.deterministic"),
        compile=auto_or_boolean(data.get("compile", d.compile), f"{path}.compile"),
        sampling=string(data.get("sampling", d.sampling), f"{path}.sampling", SAMPLINGS),
        epsilon=None if data.get("epsilon") is None else number(data["epsilon"], f"{path}.epsilon", positive=True),
    )


def _resources(data, path="resources") -> ResourcesSpec:
    data = check_keys({} if data is None else data, ResourcesSpec, path)
    d = ResourcesSpec()
    workers = data.get("workers", d.workers)
    if workers != "auto":
        workers = integer(workers, f"{path}.workers", 1, bounds.MAX_WORKERS)
    gpus = data.get("gpus_per_worker", d.gpus_per_worker)
    if gpus != "auto":
        gpus = number(gpus, f"{path}.gpus_per_worker", minimum=0, maximum=bounds.MAX_GPUS)
    train_gpus = data.get("gpus_per_train_worker", d.gpus_per_train_worker)
    if train_gpus != "auto":  # a training run uses one device: a GPU or a share of one
        train_gpus = number(train_gpus, f"{path}.gpus_per_train_worker", minimum=0, maximum=bounds.MAX_GPUS)
        if train_gpus > 1:
            raise SpecError(f"{path}.gpus_per_train_worker: a training run uses one GPU at most, got {train_gpus}")
    return ResourcesSpec(
        workers,
        gpus,
        train_gpus,
        number(
            data.get("cpus_per_worker", d.cpus_per_worker),
            f"{path}.cpus_per_worker",
            positive=True,
            maximum=bounds.MAX_CPUS,
        ),
        bounds.image_count(shard_size, f"{path}.shard_size", 1)
        if (shard_size := data.get("shard_size", d.shard_size)) != "auto"
        else "auto",
        integer(data.get("max_retries", d.max_retries), f"{path}.max_retries", 0, bounds.MAX_RETRIES),
    )


def _ks(data: dict, methods: tuple[str, ...]) -> tuple[float, ...]:
    if "ks" in data and not any("k" in family(m).parameters for m in methods):
        shaped = ", ".join(m for m, cls in FAMILIES.items() if "k" in cls.parameters)
        raise SpecError(f"ks: only the methods {shaped} take a shape k")
    return unique_list(data.get("ks", [0.0]), "ks", lambda v, w: number(v, w, minimum=0))


def _check_noises(methods: tuple[str, ...], sigmas: tuple[float, ...], ks: tuple[float, ...], dataset: str) -> None:
    """Each family checks its own sigmas and shapes k on ``dataset``."""
    info = DATASETS[dataset]
    for method, (i, sigma) in itertools.product(methods, enumerate(sigmas)):
        try:
            make_noise(method, sigma, q=info.q)
        except ValueError as err:
            raise SpecError(f"sigmas[{i}]: {err}") from None
    for method, (j, k) in itertools.product([m for m in methods if "k" in family(m).parameters], enumerate(ks)):
        try:
            make_noise(method, sigmas[0], q=info.q, k=k, dim=math.prod(info.input_shape))
        except ValueError as err:
            raise SpecError(f"ks[{j}]: {err}") from None


def parse_spec(data: Any) -> Sweep:
    """Validate a spec given as plain data (parsed YAML) and return the Sweep."""
    data = check_keys(data, Sweep, "")
    for key in ("name", "output", "dataset", "models", "methods", "sigmas"):
        if key not in data:
            raise SpecError(f"{key}: missing")
    name = string(data["name"], "name")
    if not NAME.fullmatch(name):
        raise SpecError(f"name: use lower-case letters, digits, '-' and '_' (at most 63), got {shown(name)}")
    dataset = _dataset(data["dataset"])
    methods = unique_list(data["methods"], "methods", lambda v, w: string(v, w, sorted(FAMILIES)))
    sigmas = unique_list(data["sigmas"], "sigmas", bounds.sigma_value)
    ks = _ks(data, methods)
    training = unique_list(data.get("training", ["standard"]), "training", lambda v, w: string(v, w, TRAINING_MODES))
    seeds = unique_list(data.get("seeds", [0]), "seeds", seed_value)
    models = _models(data["models"], dataset.name)
    bounds.check_grid(methods, sigmas, ks, seeds, training, models.sigmas)
    _check_noises(methods, sigmas, ks, dataset.name)
    certify = _certify(data.get("certify"), dataset.name)
    binary_only = [m for m in methods if family(m).multiclass_refusal]
    if certify.multiclass and binary_only:
        raise SpecError(
            f"certify.multiclass: {family(binary_only[0]).multiclass_refusal}; "
            f"certify {binary_only[0]} in a sweep of its own"
        )
    radii = unique_list(data.get("radii", list(Sweep.radii)), "radii", lambda v, w: number(v, w, minimum=0))
    radii_linf = unique_list(
        data.get("radii_linf", list(Sweep.radii_linf)), "radii_linf", lambda v, w: number(v, w, minimum=0)
    )
    sweep = Sweep(
        name=name,
        output=bounds.output_path(data["output"]),
        dataset=dataset,
        models=models,
        methods=methods,
        sigmas=sigmas,
        ks=ks,
        seeds=seeds,
        training=training,
        certify=certify,
        radii=tuple(sorted(radii)),
        radii_linf=tuple(sorted(radii_linf)),
        resources=_resources(data.get("resources")),
    )
    check_template(sweep)
    check_sampling(sweep)
    if (
        sweep.models.train is not None
        and sweep.models.train.architecture is None
        and dataset.name not in PAPER_DEFAULTS
    ):
        raise SpecError("models.train.architecture: missing")
    bounds.check_json_size(sweep.to_json())
    return sweep


def load_spec(path: str | Path) -> Sweep:
    """Read and validate a YAML spec; every error is a one-line SpecError naming the field. The
    file is read within the limits of ``cluster.spec.loading`` (size, values, nesting, aliases,
    duplicate keys)."""
    path = Path(path)
    data = load_yaml(read_spec_text(path), str(path))
    try:
        return parse_spec(data)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None
