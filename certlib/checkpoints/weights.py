"""Weight files read without running their code, strict state-dict loading with one-line errors,
and the architectures of imported models.

Reading (``read_weights``): a ``.safetensors`` file through ``safetensors`` (a JSON header and raw
tensors: nothing executable); every other suffix (``.pt``, ``.pth``, ``.pth.tar``, ``.tar``,
``.torch``) through ``torch.load(weights_only=True)``, whose unpickler accepts tensors, dicts,
lists, tuples, strings and numbers only, so a file that would construct an arbitrary class or
call a function to load is refused instead of run. A truncated or corrupt file is refused with
one line either way.

Imported architectures (``build_architecture``): a card's ``architecture`` is either one of
``certlib.models.ARCHITECTURES`` or ``torchvision:<name>`` (``torchvision.models.get_model``),
``timm:<name>`` (``timm.create_model``; the optional ``timm`` extra) or
``factory:<package.module>:<function>`` (the user's own module, imported where the model is
loaded, so it must be importable on every worker). Each sits behind ``Standardize``, so the
model takes pixel-scale [0, 1] images like every other.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certlib.models import ARCHITECTURES, Standardize, build_model

SAFETENSORS_SUFFIX = ".safetensors"
CARD_METADATA_KEY = "certlib_card"
# A header larger than this is not a header: a corrupt length would otherwise allocate gigabytes.
_MAX_HEADER_BYTES = 100 * 2**20
TIMM_MISSING = "timm is not installed: pip install 'certify-smoothing[timm]'"


def is_safetensors(path: str | Path) -> bool:
    return Path(path).suffix == SAFETENSORS_SUFFIX


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets and the
    ``__metadata__`` strings), read from its first bytes: no tensor is loaded. The format is an
    8-byte little-endian header length, the header, then the tensors' bytes."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES or 8 + length > size:
            raise ValueError(f"{path}: truncated or corrupt safetensors file (header of {length} bytes in {size})")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: corrupt safetensors file (its header is not JSON)") from None
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, its header describes more)")
    return header


def read_weights(path: str | Path) -> Any:
    """The content of a weight file, loaded without running pickled code (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if is_safetensors(path):
        safetensors_header(path)  # a truncated file gets its one line before the library's message
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - the library's errors have no common base
            raise ValueError(f"{path}: corrupt safetensors file: {_first_line(err)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds more than weights and would run pickled code to load (refused; "
            f"re-save its state dict or use safetensors): {_first_line(err)}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path}: truncated or corrupt weights file: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _names(keys: list[str], shown: int = 3) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def strict_load(net: nn.Module, state: dict[str, torch.Tensor], source: str, num_classes: int | None = None) -> None:
    """``net.load_state_dict(state, strict=True)``, refusing first with one line that names the
    mismatch: missing or unexpected keys (the first few), a shape (key and both shapes), or a
    class count (a classifier whose output rows differ from ``num_classes``)."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise ValueError(f"{source}: missing keys {_names(missing)} for the model's architecture")
    if unexpected:
        raise ValueError(f"{source}: unexpected keys {_names(unexpected)} for the model's architecture")
    for key, want in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise ValueError(f"{source}: {key} is a {type(got).__name__}, not a tensor")
        if got.shape == want.shape:
            continue
        if num_classes is not None and want.shape[:1] == (num_classes,) and got.shape[1:] == want.shape[1:]:
            raise ValueError(
                f"{source}: class count: the classifier {key} has {got.shape[0]} outputs, expected {num_classes}"
            )
        raise ValueError(
            f"{source}: {key} has shape {tuple(got.shape)} in the file, the model expects {tuple(want.shape)}"
        )
    net.load_state_dict(state, strict=True)


def build_architecture(
    arch: str, num_classes: int, mean: list[float], std: list[float], input_shape: list[int]
) -> nn.Sequential:
    """``Sequential(Standardize(mean, std), net)`` for a built-in or an imported architecture."""
    if ":" not in arch and arch not in ARCHITECTURES:
        return build_model(arch, num_classes, mean, std, input_shape)  # its one-line error
    # build_model's structure without its forward pass on zeros, which only lazy layers need (an
    # ImageNet ResNet-50's costs seconds on a CPU)
    net = ARCHITECTURES[arch](num_classes, input_shape[0]) if ":" not in arch else external_net(arch, num_classes)
    model = nn.Sequential(Standardize(mean, std), net)
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        with torch.no_grad():  # materialize lazy layers so that the state dict is fixed
            model.eval()(torch.zeros(1, *input_shape))
    return model


def external_net(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised ``torchvision:``, ``timm:`` or ``factory:`` network."""
    kind, _, name = arch.partition(":")
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision architecture {name!r}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError(TIMM_MISSING) from None
        if not timm.is_model(name):
            raise ValueError(f"unknown timm architecture {name!r}")
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if kind == "factory":
        return _from_factory(name, num_classes)
    raise ValueError(f"unknown architecture {arch!r}: expected a built-in name or torchvision:, timm:, factory:")


def factory_module(architecture: str) -> str | None:
    """The module a ``factory:<package.module>:<function>`` architecture imports; None for the
    other architectures."""
    kind, _, target = architecture.partition(":")
    if kind != "factory":
        return None
    return target.partition(":")[0] or None


def _from_factory(target: str, num_classes: int) -> nn.Module:
    """``package.module:function`` called with ``num_classes`` where it takes one, else with no
    arguments."""
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"factory {target!r}: expected package.module:function")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except ImportError as err:
        raise ValueError(
            f"factory {target!r}: cannot import {module_name}: {_first_line(err)} "
            "(submit the job where it is importable, or install it on the cluster)"
        ) from None
    except AttributeError:
        raise ValueError(f"factory {target!r}: {module_name} has no {function_name}") from None
    try:
        takes_classes = "num_classes" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        takes_classes = False
    net = function(num_classes=num_classes) if takes_classes else function()
    if not isinstance(net, nn.Module):
        raise ValueError(f"factory {target!r} returned a {type(net).__name__}, not a torch.nn.Module")
    return net
