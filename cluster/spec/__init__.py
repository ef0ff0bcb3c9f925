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
import string as formatting
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from certlib.data import DATASETS
from certlib.engine.cascade import PRECISIONS, EngineOptions
from certlib.families import FAMILIES, CertifySettings, family, make_noise
from certlib.training.config import DATA_PLACEMENTS, PAPER_DEFAULTS, TRAINING_MODES, TrainSettings
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
from cluster.spec.loading import MAX_SPEC_BYTES, load_yaml, read_spec_text

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # whole names only (re.fullmatch): "rev\n" is not one
MODEL_FIELDS = ("method", "training", "sigma", "seed")
TEMPLATE_FIELDS = (*MODEL_FIELDS, "dataset")

# Upper bounds of the numeric keys: beyond them a run cannot finish, or a value overflows the
# column or the arithmetic that holds it. (Every integer is also at most 2**53: fields.py.)
# n0 and n are forward passes per image: 10**12 is more than a day per image at 10**7 samples/s
# (a fast GPU on CIFAR-10's smallest network), far inside the Int64 vote columns.
MAX_SAMPLES = 10**12
# A batch holds batch_size x input values (certification and training): many CUDA kernels index
# with 32-bit integers, and 2**31 values are 8 GiB of float32 before the first activation.
MAX_BATCH_VALUES = 2**31
# Images are in [0, 1]. The noisy input is computed in the cascade's first precision, and fp16
# (its first level on GPUs) holds at most 65,504: noise of sigma 1,000 reaches that in its far
# tails (Laplace: about 15 scales at float32's smallest uniform draws). The published grids stop
# at 4; DSSN's L = 2 sqrt(3) sigma q forward passes per image stay below 10**6.
MAX_SIGMA = 1000.0
MAX_IMAGES = 10**9  # every, start, limit, shard_size, heldout_limit: no dataset here has 10**7 images
MAX_EPOCHS = 100_000  # the papers train 90 to 120; 10**5 epochs of digits (1,437 images) take days
# A worker runs on one node: no node has 4,096 CPUs (the largest two-socket servers have 768
# hardware threads) or more than 16 GPUs, and `certify plan` hands cpus_per_worker to torch's
# set_num_threads, a C int.
MAX_CPUS = 4096
MAX_GPUS = 16
MAX_WORKERS = 100_000  # a cap per kind; Ray clusters hold a few thousand nodes
MAX_RETRIES = 100  # each attempt reruns its unit: a failure repeated 100 times is not chance
FLOAT32_MAX = 3.4028234663852886e38  # lr, weight_decay, stability_weight: the training step is float32
# Every configuration (method x sigma x k x seed x training x models.sigmas) is a model to read or
# train and certify: the published grids have at most a few hundred, and validating reads each
# model's card.
MAX_CONFIGURATIONS = 10_000
# The validated spec as JSON: what the job ships to its driver and writes to <output>.job/.
MAX_SPEC_JSON = 4 * MAX_SPEC_BYTES


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

    def settings(self, seed: int = 0) -> CertifySettings:
        """What a family's votes and certificate may depend on (the rest is how the engine runs),
        for the model of ``seed`` (which seeds the Monte Carlo streams)."""
        return CertifySettings(n0=self.n0, n=self.n, alpha=self.alpha, multiclass=self.multiclass, seed=seed)

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
    radii: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
    resources: ResourcesSpec = ResourcesSpec()

    @property
    def q(self) -> int:
        return DATASETS[self.dataset.name].q

    def to_json(self) -> str:
        data = asdict(self)  # tuples are written as JSON lists, as YAML gives them
        if data["models"]["train"] is None:  # "train:" present, even empty, means "train with defaults"
            del data["models"]["train"]
        if self.ks == Sweep.ks:  # the default: a spec without shaped families may not name ks
            del data["ks"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Sweep:
        return parse_spec(json.loads(text))


# --------------------------------------------------------------------------- parsing


def _image_count(value: Any, where: str, minimum: int) -> int:
    return integer(value, where, minimum, MAX_IMAGES)


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
        _image_count(data.get("every", 1), f"{path}.every", 1),
        _image_count(data.get("start", 0), f"{path}.start", 0),
        optional_integer(data.get("limit"), f"{path}.limit", 1, MAX_IMAGES),
    )


def _batch_size(value: Any, where: str, dataset: str) -> int:
    """A batch of images of ``dataset``: at most MAX_BATCH_VALUES input values."""
    values = math.prod(DATASETS[dataset].input_shape)
    return integer(value, where, 1, MAX_BATCH_VALUES // values)


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
        epochs=optional_integer(data.get("epochs"), f"{path}.epochs", 1, MAX_EPOCHS),
        batch_size=_batch_size(data.get("batch_size", d.batch_size), f"{path}.batch_size", dataset),
        lr=number(data.get("lr", d.lr), f"{path}.lr", positive=True, maximum=FLOAT32_MAX),
        momentum=number(data.get("momentum", d.momentum), f"{path}.momentum", minimum=0, below=1),
        nesterov=boolean(data.get("nesterov", d.nesterov), f"{path}.nesterov"),
        weight_decay=number(
            data.get("weight_decay", d.weight_decay), f"{path}.weight_decay", minimum=0, maximum=FLOAT32_MAX
        ),
        stability_weight=number(
            data.get("stability_weight", d.stability_weight),
            f"{path}.stability_weight",
            minimum=0,
            maximum=FLOAT32_MAX,
        ),
        crop_padding=optional_integer(data.get("crop_padding"), f"{path}.crop_padding", 0, side),
        flip=None if data.get("flip") is None else boolean(data["flip"], f"{path}.flip"),
        amp=boolean(data.get("amp", d.amp), f"{path}.amp"),
        channels_last=boolean(data.get("channels_last", d.channels_last), f"{path}.channels_last"),
        heldout_limit=optional_integer(
            data.get("heldout_limit", d.heldout_limit), f"{path}.heldout_limit", 1, MAX_IMAGES
        ),
        deterministic=boolean(data.get("deterministic", d.deterministic), f"{path}.deterministic"),
        cuda_graph=auto_or_boolean(data.get("cuda_graph", d.cuda_graph), f"{path}.cuda_graph"),
        data=string(data.get("data", d.data), f"{path}.data", DATA_PLACEMENTS),
        loader_workers=optional_integer(
            data.get("loader_workers", d.loader_workers), f"{path}.loader_workers", 0, MAX_CPUS
        ),
    )


def _check_template_text(template: str, where: str) -> None:
    """A checkpoint template names the five fields, plainly or with a short format (``{sigma}``,
    ``{seed:03d}``): no other field, attribute or index, no nested field, and no width or
    precision beyond 255 (a file name's length: a width of 10**9 would build a gigabyte)."""
    fields = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
    try:
        parts = list(formatting.Formatter().parse(template))
    except ValueError as err:
        raise SpecError(f"{where}: bad template ({err}); use the fields {fields}") from None
    for _, field, spec, _conversion in parts:
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS:
            raise SpecError(f"{where}: bad template field {{{shown(field)[1:-1]}}}; use the fields {fields}")
        if "{" in (spec or "") or any(len(n) > 3 or int(n) > 255 for n in re.findall(r"\d+", spec or "")):
            raise SpecError(f"{where}: the format of {{{field}}} may not nest fields or exceed a width of 255")


def _models(data, dataset: str, path="models") -> ModelsSpec:
    data = check_keys(data, ModelsSpec, path)
    template = string(data.get("path"), f"{path}.path")
    _check_template_text(template, f"{path}.path")
    try:
        template.format(method="m", training="t", sigma=1.0, seed=0, dataset="d")
    except Exception as err:  # noqa: BLE001 - any formatting failure is a bad template
        fields = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
        raise SpecError(f"{path}.path: bad template ({shown(str(err))}); use the fields {fields}") from None
    train = _train(data["train"], dataset) if "train" in data else None
    noise = None if data.get("noise") is None else string(data["noise"], f"{path}.noise", sorted(FAMILIES))
    sigmas = None if data.get("sigmas") is None else unique_list(data["sigmas"], f"{path}.sigmas", _sigma)
    return ModelsSpec(
        template, train, boolean(data.get("override_card", False), f"{path}.override_card"), noise, sigmas
    )


def _check_template(sweep: Sweep) -> None:
    """models.path must name each field that varies across the sweep's models, so that every
    model has its own file; a field with one value may be left out (one imported model)."""
    values = {
        "method": (sweep.models.noise,) if sweep.models.noise else sweep.methods,
        "training": sweep.training,
        "sigma": sweep.models.sigmas or sweep.sigmas,
        "seed": sweep.seeds,
    }
    for name in MODEL_FIELDS:
        if len(values[name]) > 1 and "{" + name + "}" not in sweep.models.path:
            raise SpecError(
                f"models.path: the template must contain {{{name}}}: the sweep's models differ in it "
                "and each needs its own file"
            )


def _certify(data, dataset: str, path="certify") -> CertifySpec:
    data = check_keys({} if data is None else data, CertifySpec, path)
    d = CertifySpec()
    batch = data.get("batch_size")
    return CertifySpec(
        n0=integer(data.get("n0", d.n0), f"{path}.n0", 1, MAX_SAMPLES),
        n=integer(data.get("n", d.n), f"{path}.n", 1, MAX_SAMPLES),
        alpha=number(data.get("alpha", d.alpha), f"{path}.alpha", positive=True, below=0.5),
        multiclass=boolean(data.get("multiclass", d.multiclass), f"{path}.multiclass"),
        batch_size=None if batch is None else _batch_size(batch, f"{path}.batch_size", dataset),
        precision=string(data.get("precision", d.precision), f"{path}.precision", PRECISIONS),
        deterministic=boolean(data.get("deterministic", d.deterministic), f"{path}.deterministic"),
        compile=auto_or_boolean(data.get("compile", d.compile), f"{path}.compile"),
    )


def _resources(data, path="resources") -> ResourcesSpec:
    data = check_keys({} if data is None else data, ResourcesSpec, path)
    d = ResourcesSpec()
    workers = data.get("workers", d.workers)
    if workers != "auto":
        workers = integer(workers, f"{path}.workers", 1, MAX_WORKERS)
    gpus = data.get("gpus_per_worker", d.gpus_per_worker)
    if gpus != "auto":
        gpus = number(gpus, f"{path}.gpus_per_worker", minimum=0, maximum=MAX_GPUS)
    train_gpus = data.get("gpus_per_train_worker", d.gpus_per_train_worker)
    if train_gpus != "auto":  # a training run uses one device: a GPU or a share of one
        train_gpus = number(train_gpus, f"{path}.gpus_per_train_worker", minimum=0, maximum=MAX_GPUS)
        if train_gpus > 1:
            raise SpecError(f"{path}.gpus_per_train_worker: a training run uses one GPU at most, got {train_gpus}")
    return ResourcesSpec(
        workers,
        gpus,
        train_gpus,
        number(
            data.get("cpus_per_worker", d.cpus_per_worker), f"{path}.cpus_per_worker", positive=True, maximum=MAX_CPUS
        ),
        _image_count(shard_size, f"{path}.shard_size", 1)
        if (shard_size := data.get("shard_size", d.shard_size)) != "auto"
        else "auto",
        integer(data.get("max_retries", d.max_retries), f"{path}.max_retries", 0, MAX_RETRIES),
    )


def _sigma(value: Any, where: str) -> float:
    return number(value, where, positive=True, maximum=MAX_SIGMA)


def _ks(data: dict, methods: tuple[str, ...]) -> tuple[float, ...]:
    if "ks" in data and not any("k" in family(m).parameters for m in methods):
        shaped = ", ".join(m for m, cls in FAMILIES.items() if "k" in cls.parameters)
        raise SpecError(f"ks: only the methods {shaped} take a shape k")
    return unique_list(data.get("ks", [0.0]), "ks", lambda v, w: number(v, w, minimum=0))


def _output(value: Any) -> str:
    """The results directory: a path whose last part is a name of its own, so never a
    filesystem root, ``.``, ``..`` or a path ending in them (its job record ``<output>.job``
    sits beside it). Where it lands against the files here: ``cluster.plan.resolve_paths``."""
    output = string(value, "output")
    if PurePosixPath(output).name in ("", ".."):
        raise SpecError(
            f"output: {shown(output)} is a filesystem root, the current directory or one above it; "
            "give the results a directory of their own"
        )
    return output


def _configurations(methods, sigmas, ks, seeds, training, models: ModelsSpec) -> int:
    """Models x sigmas the sweep certifies: methods (shaped ones once per k) x sigmas x seeds x
    training (x models.sigmas)."""
    shaped = sum(len(ks) if "k" in family(m).parameters else 1 for m in methods)
    return shaped * len(sigmas) * len(seeds) * len(training) * len(models.sigmas or (None,))


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
    sigmas = unique_list(data["sigmas"], "sigmas", _sigma)
    ks = _ks(data, methods)
    training = unique_list(data.get("training", ["standard"]), "training", lambda v, w: string(v, w, TRAINING_MODES))
    seeds = unique_list(data.get("seeds", [0]), "seeds", seed_value)
    models = _models(data["models"], dataset.name)
    configurations = _configurations(methods, sigmas, ks, seeds, training, models)
    if configurations > MAX_CONFIGURATIONS:
        raise SpecError(
            f"sigmas: the grid holds {configurations:,} configurations (methods x sigmas x ks x seeds x training"
            f"{' x models.sigmas' if models.sigmas else ''}), more than the {MAX_CONFIGURATIONS:,} a sweep may have"
        )
    info = DATASETS[dataset.name]
    for method, (i, sigma) in itertools.product(methods, enumerate(sigmas)):  # each family checks its own
        try:
            make_noise(method, sigma, q=info.q)
        except ValueError as err:
            raise SpecError(f"sigmas[{i}]: {err}") from None
    for method, (j, k) in itertools.product([m for m in methods if "k" in family(m).parameters], enumerate(ks)):
        try:
            make_noise(method, sigmas[0], q=info.q, k=k, dim=math.prod(info.input_shape))
        except ValueError as err:
            raise SpecError(f"ks[{j}]: {err}") from None
    certify = _certify(data.get("certify"), dataset.name)
    binary_only = [m for m in methods if family(m).multiclass_refusal]
    if certify.multiclass and binary_only:
        raise SpecError(
            f"certify.multiclass: {family(binary_only[0]).multiclass_refusal}; "
            f"certify {binary_only[0]} in a sweep of its own"
        )
    radii = unique_list(data.get("radii", list(Sweep.radii)), "radii", lambda v, w: number(v, w, minimum=0))
    sweep = Sweep(
        name=name,
        output=_output(data["output"]),
        dataset=dataset,
        models=models,
        methods=methods,
        sigmas=sigmas,
        ks=ks,
        seeds=seeds,
        training=training,
        certify=certify,
        radii=tuple(sorted(radii)),
        resources=_resources(data.get("resources")),
    )
    _check_template(sweep)
    if (
        sweep.models.train is not None
        and sweep.models.train.architecture is None
        and dataset.name not in PAPER_DEFAULTS
    ):
        raise SpecError("models.train.architecture: missing")
    size = len(sweep.to_json())
    if size > MAX_SPEC_JSON:
        raise SpecError(f"spec: {size:,} bytes as JSON, more than the {MAX_SPEC_JSON:,} a spec may have")
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
