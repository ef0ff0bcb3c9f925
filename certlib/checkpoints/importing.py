"""Import an external model: its weights into a checkpoint with a model card, so that it is
certified like the models this product trains (``import_model``; ``certify import-model``).

Weights are read by the weights_only unpickler or as safetensors, within bounds
(``certlib.checkpoints.weights.read_weights``: pickled code is refused, not run) and loaded with
``strict=True`` after the layout's key mapping: a missing or unexpected key, a shape or a class
count that differs is refused with one line, never a half-loaded model. Every imported model
takes pixel-scale [0, 1] images: the layout's input normalization becomes its ``Standardize``
layer. The card records the source (layout, file, the file's SHA-256), the normalization, the
class count, dataset, input shape and the noise the model was trained with.

Layouts:

* ``torchvision`` / ``timm``: SOURCE is an architecture name (``resnet50`` or
  ``torchvision:resnet50``, ``timm:resnet18``), the file its state dict (optionally under
  ``state_dict`` or ``model``, and ``module.`` prefixes of ``DataParallel`` are removed). The
  normalization is ``mean``/``std`` if given, else the dataset's (``certlib.data.DATASETS``).
* ``factory``: SOURCE is ``package.module:function`` returning the ``nn.Module`` (called with
  ``num_classes`` where it takes it), the file its state dict as above. Naming the module here
  is the consent to import and run it (``certlib.checkpoints.trust``); a sweep that certifies
  the checkpoint must trust it again (``models.trust_code``), and so must ``load_checkpoint``.
* ``cohen``: Cohen et al. 2019, github.com/locuslab/smoothing (``code/train.py`` saves
  ``{'epoch': int, 'arch': str, 'state_dict': ..., 'optimizer': SGD state}`` as
  ``checkpoint.pth.tar``; weights_only accepts all of it). The model is
  ``Sequential(NormalizeLayer, net)`` (``code/architectures.py``); NormalizeLayer keeps its
  constants as plain attributes, so the keys are ``1.<net key>``, and for ImageNet the net is a
  ``DataParallel``: ``1.module.<key>``. ``arch`` ``cifar_resnet110``: ``code/archs/cifar_resnet.py``
  (``conv1``, ``bn1``, ``layer{1,2,3}.{0..17}.{conv1,bn1,conv2,bn2,downsample.{0,1}}``, ``fc``;
  post-activation basic blocks, 1x1-conv+BN projection shortcuts, an 8x8 average pool) is this
  library's ``resnet110`` with its keys renamed (same computation, checked by equal logits in
  ``tests/test_import.py``); ``resnet50`` is torchvision's (this library's ``resnet50``).
  Normalization (``code/datasets.py``): CIFAR-10 mean (0.4914, 0.4822, 0.4465), std
  (0.2023, 0.1994, 0.2010); ImageNet (0.485, 0.456, 0.406), (0.229, 0.224, 0.225). Their
  training adds Gaussian noise only, so the noise is ``gaussian``; sigma is read from a
  ``noise_<sigma>`` directory of the path (their released models' layout) unless given.
* ``levine-feizi``: Levine & Feizi 2021, github.com/alevine0/smoothingSplittingNoise (a fork of
  Yang et al.'s rs4a): ``src/train.py`` saves ``model.state_dict()`` of a ``Forecaster`` as
  ``<output>/<experiment>/model_ckpt.torch``. Keys (``src/models.py``): ``norm.module.mu`` and
  ``norm.module.log_sig`` (``NormalizeLayer`` parameters of shape (3, 1, 1): mean and log std,
  so std = exp(log_sig)) and ``model.module.<net key>`` (both wrapped in ``DataParallel``).
  CIFAR-10 (``WideResNet``, ``src/lib/wide_resnet.py``, depth 40, widen 2): ``conv1``,
  ``block{1,2,3}.layer.{0..5}.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``:
  pre-activation blocks computing what this library's ``wrn40_2`` computes, keys renamed.
  ImageNet (``ResNet``): torchvision's resnet50 (this library's ``resnet50``). Their CIFAR
  ``ResNet`` (``src/lib/classic_resnet.py``, option-A shortcuts, key ``linear``) is not
  supported. The file does not record the noise: it is read from the experiment directory
  their README names (``cifar_split_<sigma>``: SSN, ``cifar_split_derandomized_<sigma>``: DSSN,
  ``_stabilized``: stability training) or given; a DSSN model needs its seed (their README
  trains with ``--seed=0``). Their published CIFAR-10 ``model_ckpt.torch`` files are stored
  outside git in their repository and could not be inspected here; the layout above is the one
  their code writes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from certlib.checkpoints.checkpoint import ModelCard, save_checkpoint
from certlib.checkpoints.trust import short
from certlib.checkpoints.weights import build_architecture, factory_module, read_weights, strict_load
from certlib.data import CIFAR10_CLASSES, DATASETS
from certlib.families import family, make_noise

__all__ = ["LAYOUTS", "import_model", "summary"]

_CLASS_NAMES = {"cifar10": list(CIFAR10_CLASSES)}
# Cohen et al.'s code/datasets.py: their CIFAR-10 std differs from this library's own.
_COHEN_NORMALIZATION = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
# Cohen et al.'s `arch` -> (this library's architecture, the dataset it is for).
_COHEN_ARCHS = {"cifar_resnet110": ("resnet110", "cifar10"), "resnet50": ("resnet50", "imagenet")}
# Levine & Feizi's README names experiments <data>_<noise>_<sigma>[_stabilized]; their noises'
# names in this library's registry.
_LEVINE_NOISES = {"split": "ssn", "split_derandomized": "dssn"}
_LEVINE_EXPERIMENT = re.compile(r"^[a-z0-9-]+?_(split_derandomized|split)_([0-9.]+)(_stabilized)?$")


@dataclass
class Imported:
    """What a layout made of a weights file: this library's architecture name, the state dict
    with its keys mapped onto it, and what the layout says of normalization and noise."""

    architecture: str
    state: dict[str, torch.Tensor]
    said_by: str
    mean: list[float] | None = None
    std: list[float] | None = None
    method: str | None = None
    sigma: float | None = None
    training: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def import_model(
    source: str | None,
    weights: str | Path,
    out: str | Path,
    *,
    layout: str,
    dataset: str,
    num_classes: int | None = None,
    trained_with: str | None = None,
    sigma: float | None = None,
    seed: int | None = None,
    training: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> ModelCard:
    """Write ``out`` (``.pt`` or ``.safetensors``): the model of ``weights`` in ``layout`` behind
    its input normalization, with a model card; returns the card. ``trained_with``/``sigma`` are
    the noise the model was trained with, required where the layout does not say it."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    info = DATASETS[dataset]
    if num_classes is not None and num_classes != info.num_classes:
        raise ValueError(f"class count: --num-classes {num_classes} differs from {dataset}'s {info.num_classes}")
    classes, weights = info.num_classes, Path(weights)
    imported = read_layout(layout, source, read_weights(weights), weights, dataset)
    method, sigma, training = _noise(imported, trained_with, sigma, training)
    if seed is None and "seed" in family(method).card_keys:
        raise ValueError(f"a {method} model needs the seed it was trained with (its offset vector): give --seed")
    mean = list(mean) if mean is not None else imported.mean or list(info.mean)
    std = list(std) if std is not None else imported.std or list(info.std)
    trusted = _named_module(layout, imported.architecture)
    model = build_architecture(imported.architecture, classes, mean, std, list(info.input_shape), trust_code=trusted)
    strict_load(model[1], imported.state, str(weights), classes)
    if ":" in imported.architecture:  # a built-in's classifier width is checked by the strict load
        _check_outputs(model, classes, list(info.input_shape), weights)
    described = make_noise(method, sigma, q=info.q, seed=seed or 0).describe()
    card = ModelCard(
        architecture=imported.architecture,
        dataset=dataset,
        class_names=_CLASS_NAMES.get(dataset, [str(i) for i in range(classes)]),
        input_shape=list(info.input_shape),
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        q=info.q,
        method=method,
        sigma=float(sigma),
        lam=described.get("lambda"),
        levels=described.get("levels"),
        seed=seed or 0,
        training=training,
        heldout=None,
        source={
            "layout": layout,
            "name": source,
            "file": str(weights),
            "file_sha256": _file_sha256(weights),
            **imported.details,
        },
    )
    return save_checkpoint(out, model, card)


def _named_module(layout: str, architecture: str) -> list[str]:
    """``--layout factory``: the module SOURCE names, which naming it trusts (the caller's
    consent to import and run it); nothing for the other layouts."""
    module = factory_module(architecture) if layout == "factory" else None
    return [module] if module else []


def _noise(imported: Imported, method: str | None, sigma: float | None, training: str | None) -> tuple[str, float, str]:
    """The training noise, sigma and training mode: given, else the layout's; a given value that
    contradicts the layout's is refused."""
    for name, given, said in (
        ("--trained-with", method, imported.method),
        ("--sigma", sigma, imported.sigma),
        ("--training", training, imported.training),
    ):
        if given is not None and said is not None and given != said:
            raise ValueError(f"{name} {given} contradicts the {imported.said_by}, which says {said}")
    method = method if method is not None else imported.method
    sigma = sigma if sigma is not None else imported.sigma
    if method is None or sigma is None:
        raise ValueError(
            "the noise the model was trained with is unknown: give --trained-with METHOD and --sigma SIGMA"
        )
    family(method)  # an unknown name gets its one line here
    return method, float(sigma), training or imported.training or "standard"


def _check_outputs(model: torch.nn.Module, classes: int, input_shape: list[int], path: Path) -> None:
    """One forward pass on a black image: a network (a factory's, say) whose logits are not
    ``classes`` wide is refused."""
    with torch.no_grad():
        logits = model.eval()(torch.zeros(1, *input_shape))
    if logits.ndim != 2 or logits.shape[1] != classes:
        raise ValueError(f"{path}: class count: the model outputs {tuple(logits.shape)} logits, expected {classes}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def summary(card: ModelCard) -> str:
    """The card in a few lines, for the command line."""
    src: dict[str, Any] = card.source
    lines = [
        f"architecture  {card.architecture} ({card.num_classes} classes, input {tuple(card.input_shape)})",
        f"dataset       {card.dataset} (q = {card.q})",
        f"normalization mean {card.mean}, std {card.std} (pixel scale [0, 1] in)",
        f"trained with  {card.method}, sigma {card.sigma}, {card.training}, seed {card.seed}",
        f"source        {src.get('layout')}: {src.get('file')} (sha256 {str(src.get('file_sha256'))[:12]}…)",
        f"weights       sha256 {card.weights_sha256[:12]}…",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- layouts


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``state`` without ``prefix`` where every key has it (a Sequential index, DataParallel's
    ``module.``)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _state_dict(payload: Any, path: Path) -> dict[str, Any]:
    """The state dict of a plain weights file: the payload itself or its ``state_dict``/``model``."""
    if isinstance(payload, dict):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not payload or not all(isinstance(k, str) for k in payload):
        raise ValueError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    return _strip(payload, "module.")


def _renamed(state: dict[str, Any], rules: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]):
    """Keys renamed by the first rule that matches them; others kept (and then reported as
    unexpected by the strict load)."""
    out = {}
    for key, value in state.items():
        for pattern, rename in rules:
            match = pattern.fullmatch(key)
            if match:
                key = rename(match)
                break
        out[key] = value
    return out


def _cifar_resnet_keys(state: dict[str, Any], n: int) -> dict[str, Any]:
    """Cohen et al.'s CIFAR ResNet keys -> ``CifarResNet``'s: the stem conv and BN are
    ``features.0``/``.1``, block i of layer g is ``features.(3 + (g-1)n + i)``."""
    return _renamed(
        state,
        [
            (re.compile(r"conv1\.(.+)"), lambda m: f"features.0.{m[1]}"),
            (re.compile(r"bn1\.(.+)"), lambda m: f"features.1.{m[1]}"),
            (
                re.compile(r"layer([123])\.(\d+)\.(.+)"),
                lambda m: f"features.{3 + (int(m[1]) - 1) * n + int(m[2])}.{m[3]}",
            ),
        ],
    )


def _wrn_keys(state: dict[str, Any], n: int) -> dict[str, Any]:
    """Yang et al.'s / Levine & Feizi's WideResNet keys -> ``WideResNet``'s: the stem conv is
    ``features.0``, block i of group g ``features.(1 + (g-1)n + i)`` (``convShortcut`` is
    ``shortcut``), the final BN ``features.(1 + 3n)``."""
    return _renamed(
        state,
        [
            (re.compile(r"conv1\.(.+)"), lambda m: f"features.0.{m[1]}"),
            (re.compile(r"bn1\.(.+)"), lambda m: f"features.{1 + 3 * n}.{m[1]}"),
            (
                re.compile(r"block([123])\.layer\.(\d+)\.(.+)"),
                lambda m: f"features.{1 + (int(m[1]) - 1) * n + int(m[2])}.{m[3].replace('convShortcut', 'shortcut')}",
            ),
        ],
    )


def _cohen(source: str | None, payload: Any, path: Path, dataset: str) -> Imported:
    if not isinstance(payload, dict) or "state_dict" not in payload or "arch" not in payload:
        raise ValueError(f"{path}: not in Cohen et al.'s layout (a dict with 'arch' and 'state_dict')")
    arch = payload["arch"]
    if not isinstance(arch, str) or arch not in _COHEN_ARCHS:
        raise ValueError(
            f"{path}: Cohen et al.'s arch {short(arch)} is not supported; expected one of {sorted(_COHEN_ARCHS)}"
        )
    architecture, arch_dataset = _COHEN_ARCHS[arch]
    if dataset != arch_dataset:
        raise ValueError(f"{path}: Cohen et al.'s {arch} is a {arch_dataset} model, not a {dataset} one")
    state = _strip(_strip(_state_dict(payload["state_dict"], path), "1."), "module.")
    if architecture == "resnet110":
        state = _cifar_resnet_keys(state, (110 - 2) // 6)
    noise_dir = next((p[len("noise_") :] for p in reversed(path.parts) if re.fullmatch(r"noise_[0-9.]+", p)), None)
    mean, std = _COHEN_NORMALIZATION[dataset]
    return Imported(
        architecture,
        state,
        said_by="Cohen et al. layout (their training noise, the path's noise_<sigma>)",
        mean=mean,
        std=std,
        method="gaussian",
        sigma=float(noise_dir) if noise_dir else None,
        details={"arch": arch, "epoch": payload.get("epoch")},
    )


def _levine_feizi(source: str | None, payload: Any, path: Path, dataset: str) -> Imported:
    if not isinstance(payload, dict) or "norm.module.mu" not in payload or "norm.module.log_sig" not in payload:
        raise ValueError(f"{path}: not in Levine & Feizi's layout (no norm.module.mu / norm.module.log_sig)")
    payload = _state_dict(payload, path)  # names are strings
    mu, log_sig = payload["norm.module.mu"], payload["norm.module.log_sig"]
    if not isinstance(mu, torch.Tensor) or not isinstance(log_sig, torch.Tensor):
        raise ValueError(f"{path}: not in Levine & Feizi's layout (norm.module.mu / log_sig are not tensors)")
    state = {k[len("model.module.") :] if k.startswith("model.module.") else k: v for k, v in payload.items()}
    del state["norm.module.mu"], state["norm.module.log_sig"]
    if "linear.weight" in state:
        raise ValueError(f"{path}: Levine & Feizi's CIFAR ResNet-110 (option-A shortcuts) is not supported")
    if "block1.layer.0.conv1.weight" in state:
        architecture, blocks = "wrn40_2", sum(1 for k in state if re.fullmatch(r"block1\.layer\.\d+\.conv1\.weight", k))
        if blocks != 6:
            raise ValueError(f"{path}: a WideResNet of depth {6 * blocks + 4}; only WRN-40-2 is supported")
        state = _wrn_keys(state, blocks)
    else:
        architecture = "resnet50"
    experiment = _LEVINE_EXPERIMENT.fullmatch(path.parent.name)
    return Imported(
        architecture,
        state,
        said_by=f"experiment directory {path.parent.name!r}",
        # exp in float32 as their NormalizeLayer computes it, so the logits are theirs
        mean=[float(v) for v in mu.float().flatten()],
        std=[float(v) for v in torch.exp(log_sig.float()).flatten()],
        method=_LEVINE_NOISES[experiment[1]] if experiment else None,
        sigma=float(experiment[2]) if experiment else None,
        training=("stability" if experiment[3] else "standard") if experiment else None,
    )


def _named(kind: str) -> Callable[[str | None, Any, Path, str], Imported]:
    def read(source: str | None, payload: Any, path: Path, dataset: str) -> Imported:
        if not source:
            raise ValueError(f"layout {kind}: give the architecture as SOURCE")
        name = source if source.startswith(f"{kind}:") else f"{kind}:{source}"
        return Imported(name, _state_dict(payload, path), said_by=f"{kind} layout")

    return read


LAYOUTS: dict[str, Callable[[str | None, Any, Path, str], Imported]] = {
    "torchvision": _named("torchvision"),
    "timm": _named("timm"),
    "factory": _named("factory"),
    "cohen": _cohen,
    "levine-feizi": _levine_feizi,
}


def read_layout(layout: str, source: str | None, payload: Any, path: Path, dataset: str) -> Imported:
    """The ``Imported`` a layout makes of a loaded weights file."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout](source, payload, path, dataset)
