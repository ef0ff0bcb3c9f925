"""Weight files read without running pickled code and within bounded memory, strict state-dict
loading with one-line errors, and the architectures of imported models.

Reading (``read_weights``): a ``.safetensors`` file through ``safetensors`` (a JSON header and raw
tensors: nothing executable), its header checked first (a mapping of tensors whose dtype, shape
and offsets agree and fit in the file, ``__metadata__`` a mapping of strings, at most 16 MiB);
every other suffix (``.pt``, ``.pth``, ``.pth.tar``, ``.tar``, ``.torch``) through
``torch.load(weights_only=True)``, whose unpickler accepts tensors, dicts, lists, tuples, strings
and numbers only, so a file that would construct an arbitrary class or call a function to load
is refused instead of run. That unpickler is an allow-list, not a sandbox: before it reads, a
zip archive must hold only stored (uncompressed) entries no larger than the file (``torch.save``
never compresses; a deflated entry could inflate a small file to any size), and any other file
must begin as a pickle; after, every tensor must lie within its storage (a view with stride 0
would make a 2 KB file a tensor of gigabytes) and all of them within a few times the file's
size. A truncated, corrupt or foreign file is refused with one line either way.

Imported architectures (``build_architecture``): a card's ``architecture`` is either one of
``certlib.models.ARCHITECTURES`` or ``torchvision:<name>`` (``torchvision.models.get_model``),
``timm:<name>`` (``timm.create_model``; the optional ``timm`` extra) or
``factory:<package.module>:<function>`` (the user's own module, imported where the model is
built, so it must be importable on every worker, and only where the caller trusts it by name:
``trust_code``, ``certlib.checkpoints.trust``). Each sits behind ``Standardize``, so the model
takes pixel-scale [0, 1] images like every other.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certlib.checkpoints.trust import factory_module, importable_from_here, require_consent, short
from certlib.models import ARCHITECTURES, Standardize, build_model

__all__ = ["build_architecture", "factory_module", "read_weights", "safetensors_header", "strict_load"]

SAFETENSORS_SUFFIX = ".safetensors"
CARD_METADATA_KEY = "certlib_card"
# A header larger than this is not a vision model's (ResNet-50's is 30 KB): a corrupt length
# would otherwise have gigabytes read and parsed.
_MAX_HEADER_BYTES = 16 * 2**20
# The tensors a weights file may describe, in bytes per multiple of the file's size: shared
# storages (tied weights) count once per tensor.
_TENSOR_BYTES_PER_FILE_BYTE = 4
_DTYPE_BYTES = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3"), 1),
    **dict.fromkeys(("U16", "I16", "F16", "BF16"), 2),
    **dict.fromkeys(("U32", "I32", "F32"), 4),
    **dict.fromkeys(("U64", "I64", "F64", "C64"), 8),
}
TIMM_MISSING = "timm is not installed: pip install 'certify-smoothing[timm]'"


def is_safetensors(path: str | Path) -> bool:
    return Path(path).suffix == SAFETENSORS_SUFFIX


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets and the
    ``__metadata__`` strings), read from its first bytes and checked: no tensor is loaded. The
    format is an 8-byte little-endian header length, the header, then the tensors' bytes."""
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
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"{path}: corrupt safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors file (its header is a {type(header).__name__}, not a mapping)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: corrupt safetensors file (its __metadata__ is not a mapping of strings)")
    for name, entry in header.items():
        problem = None if name == "__metadata__" else _entry_problem(entry, size - 8 - length)
        if problem:
            kind = "truncated" if problem.startswith("past") else "corrupt"
            raise ValueError(f"{path}: {kind} safetensors file (tensor {short(name)}: {problem})")
    return header


def _entry_problem(entry: Any, data_bytes: int) -> str | None:
    """Why a safetensors header entry is not a tensor of the file's data; None where it is."""
    if not isinstance(entry, dict):
        return "not a mapping"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        return f"dtype {short(dtype)} is not one this reads"
    if not isinstance(shape, list) or not all(_natural(n) for n in shape):
        return f"shape {short(shape)} is not a list of sizes"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(n) for n in offsets):
        return f"data_offsets {short(offsets)} is not [begin, end]"
    if offsets[1] > data_bytes:
        return f"past the end: its data ends at {offsets[1]}, the file holds {data_bytes} bytes of tensors"
    if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
        return f"data_offsets {offsets} do not hold a {dtype} tensor of shape {shape}"
    return None


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_weights(path: str | Path) -> Any:
    """The content of a weight file, loaded without running pickled code and within bounded
    memory (see the module doc); one-line ValueError for anything else."""
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
    size = path.stat().st_size
    _check_torch_file(path, size)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's loader raises a dozen kinds on a corrupt file
        raise ValueError(_torch_refusal(path, err)) from None
    _check_tensors(path, payload, size)
    return payload


def _check_torch_file(path: Path, size: int) -> None:
    """Refuse, before torch reads it, a file that is no PyTorch file or would inflate."""
    if size == 0:
        raise ValueError(f"{path}: empty file, not weights")
    if not zipfile.is_zipfile(path):
        with path.open("rb") as handle:
            start = handle.read(4)
        if start == b"PK\x03\x04":  # a zip archive's first entry, without the archive's end
            raise ValueError(f"{path}: truncated or corrupt weights file (a zip archive without its directory)")
        if start[:1] != b"\x80":  # a pickle of protocol 2 or later: torch's legacy format
            raise ValueError(f"{path}: not a PyTorch weights file (neither torch.save's zip archive nor a pickle)")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as err:
        raise ValueError(f"{path}: corrupt zip archive: {_first_line(err)}") from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise ValueError(
                f"{path}: its entry {short(entry.filename)} is compressed, which torch.save never does "
                "(refused: a small file could inflate to any size)"
            )
        if entry.file_size > size:
            raise ValueError(f"{path}: corrupt zip archive (an entry larger than the file)")


def _torch_refusal(path: Path, err: Exception) -> str:
    """One line for torch.load's error (the unpickler's is a paragraph)."""
    text = str(err)
    called = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(err, pickle.UnpicklingError) and called:
        return (
            f"{path} holds more than weights: loading it would run pickled code (it calls {called[1]}; "
            "refused: re-save its state dict or use safetensors)"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return f"{path}: truncated or corrupt weights file ({detail[1] if detail else _first_line(err)})"


def _check_tensors(path: Path, payload: Any, size: int) -> None:
    """Every tensor of ``payload`` within its storage, and all of them within a few times the
    file's size: a copy of them (hashing one makes one) cannot take more memory than that."""
    total, seen, stack = 0, set(), [payload]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, torch.Tensor):
            if item.layout != torch.strided:
                raise ValueError(f"{path}: holds a {item.layout} tensor, not weights")
            nbytes = item.numel() * item.element_size()
            if nbytes > item.untyped_storage().nbytes() - item.storage_offset() * item.element_size():
                raise ValueError(f"{path}: a tensor of shape {tuple(item.shape)} is larger than its storage (refused)")
            total += nbytes
    if total > _TENSOR_BYTES_PER_FILE_BYTE * size + 2**20:
        raise ValueError(f"{path}: its tensors hold {total:,} bytes in a file of {size:,} (refused)")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _raised(err: BaseException) -> str:
    return f"{type(err).__name__}: {_first_line(err)[:120]}"


def _names(keys: list[str], shown: int = 3) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def check_state(
    shapes: dict[str, tuple[int, ...]], state: dict[str, Any], source: str, num_classes: int | None
) -> None:
    """Refuse with one line a state dict that does not fit the parameter ``shapes`` of a model:
    missing or unexpected keys (the first few), a value that is no tensor, a shape (key and both
    shapes), or a class count (a classifier whose output rows differ from ``num_classes``)."""
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    if missing:
        raise ValueError(f"{source}: missing keys {_names(missing)} for the model's architecture")
    if unexpected:
        raise ValueError(
            f"{source}: unexpected keys {_names([short(k)[1:-1] for k in unexpected])} for the model's architecture"
        )
    for key, want in shapes.items():
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise ValueError(f"{source}: {key} is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) == want:
            continue
        if num_classes is not None and want[:1] == (num_classes,) and tuple(got.shape[1:]) == want[1:]:
            raise ValueError(
                f"{source}: class count: the classifier {key} has {got.shape[0]} outputs, expected {num_classes}"
            )
        raise ValueError(f"{source}: {key} has shape {tuple(got.shape)} in the file, the model expects {want}")


def shapes_of(net: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shape of each entry of ``net``'s state dict."""
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def strict_load(net: nn.Module, state: dict[str, torch.Tensor], source: str, num_classes: int | None = None) -> None:
    """``net.load_state_dict(state, strict=True)``, refusing first with ``check_state``'s one line."""
    check_state(shapes_of(net), state, source, num_classes)
    net.load_state_dict(state, strict=True)


def build_architecture(
    arch: str,
    num_classes: int,
    mean: list[float],
    std: list[float],
    input_shape: list[int],
    *,
    trust_code: Iterable[str] = (),
) -> nn.Sequential:
    """``Sequential(Standardize(mean, std), net)`` for a built-in or an imported architecture;
    a ``factory:`` one only where ``trust_code`` names its module (``certlib.checkpoints.trust``)."""
    if ":" not in arch and arch not in ARCHITECTURES:
        return build_model(arch, num_classes, mean, std, input_shape)  # its one-line error
    # build_model's structure without its forward pass on zeros, which only lazy layers need (an
    # ImageNet ResNet-50's costs seconds on a CPU)
    if ":" not in arch:
        net = ARCHITECTURES[arch](num_classes, input_shape[0])
    else:
        net = external_net(arch, num_classes, trust_code=trust_code)
    model = nn.Sequential(Standardize(mean, std), net)
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        with torch.no_grad():  # materialize lazy layers so that the state dict is fixed
            model.eval()(torch.zeros(1, *input_shape))
    return model


def external_net(arch: str, num_classes: int, *, trust_code: Iterable[str] = ()) -> nn.Module:
    """A randomly initialised ``torchvision:``, ``timm:`` or (trusted) ``factory:`` network."""
    kind, _, name = arch.partition(":")
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision architecture {short(name)}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError(TIMM_MISSING) from None
        if not timm.is_model(name):
            raise ValueError(f"unknown timm architecture {short(name)}")
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if kind == "factory":
        require_consent(arch, trust_code)  # before anything of the module is imported
        return _from_factory(name, num_classes)
    raise ValueError(f"unknown architecture {short(arch)}: expected a built-in name or torchvision:, timm:, factory:")


def _from_factory(target: str, num_classes: int) -> nn.Module:
    """``package.module:function`` (trusted: ``external_net`` asked) called with
    ``num_classes`` where it takes one, else with no arguments."""
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"factory {short(target)}: expected package.module:function")
    importable_from_here()
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except ImportError as err:
        raise ValueError(
            f"factory {target!r}: cannot import {module_name}: {_first_line(err)} "
            "(submit the job where it is importable, or install it on the cluster)"
        ) from None
    except AttributeError:
        raise ValueError(f"factory {target!r}: {module_name} has no {function_name}") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed as it was imported
        raise ValueError(f"factory {target!r}: importing {module_name} raised {_raised(err)}") from None
    try:
        takes_classes = "num_classes" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        takes_classes = False
    try:
        net = function(num_classes=num_classes) if takes_classes else function()
    except Exception as err:  # noqa: BLE001 - the user's function failed
        raise ValueError(f"factory {target!r} raised {_raised(err)}") from None
    if not isinstance(net, nn.Module):
        raise ValueError(f"factory {target!r} returned a {type(net).__name__}, not a torch.nn.Module")
    return net
