"""Reading one field of a sweep spec: each reader checks a value's type and range and raises a
``SpecError`` whose one line names the field (``where``: e.g. ``certify.n`` or ``sigmas[2]``)."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any


class SpecError(ValueError):
    """A sweep spec that cannot run; the message is one line naming the field."""


def field_name(path: str, key: str) -> str:
    """``path.key``, or ``key`` at the top level."""
    return f"{path}.{key}" if path else key


def check_keys(data: Any, cls: type, path: str) -> dict:
    """``data`` as a mapping holding only the fields of dataclass ``cls``."""
    if not isinstance(data, dict):
        raise SpecError(f"{path or 'spec'}: must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        raise SpecError(f"{field_name(path, unknown[0])}: unknown key (expected one of {', '.join(sorted(known))})")
    return data


def integer(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}: must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{where}: must be >= {minimum}, got {value}")
    return value


def optional_integer(value: Any, where: str, minimum: int | None = None) -> int | None:
    return None if value is None else integer(value, where, minimum)


def number(
    value: Any, where: str, *, positive: bool = False, minimum: float | None = None, below: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{where}: must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise SpecError(f"{where}: must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{where}: must be >= {minimum}, got {value}")
    if below is not None and value >= below:
        raise SpecError(f"{where}: must be < {below}, got {value}")
    return float(value)


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{where}: must be true or false, got {value!r}")
    return value


def auto_or_boolean(value: Any, where: str) -> bool | str:
    if value != "auto" and not isinstance(value, bool):
        raise SpecError(f"{where}: must be true, false or auto, got {value!r}")
    return value


def string(value: Any, where: str, choices=None) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: must be a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        raise SpecError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def unique_list(value: Any, where: str, item, allow_empty: bool = False) -> tuple:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise SpecError(f"{where}: must be a non-empty list, got {value!r}")
    items = tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(set(items)) != len(items):
        raise SpecError(f"{where}: contains duplicates")
    return items


def seed_value(value: Any, where: str) -> int:
    seed = integer(value, where, 0)
    if seed >= 2**32:  # numpy's RandomState, which draws DSSN's offset vector, takes 32-bit seeds
        raise SpecError(f"{where}: must be < 2**32, got {seed}")
    return seed
