"""Reading one field of a sweep spec: each reader checks a value's type and range and raises a
``SpecError`` whose one line names the field (``where``: e.g. ``certify.n`` or ``sigmas[2]``).

A message quotes at most QUOTE characters of a value (``shown``): a spec is input a user may not
have written, and a value can be a megabyte long or, through YAML aliases, a structure far
larger than its file."""

from __future__ import annotations

import math
import reprlib
import unicodedata
from dataclasses import fields
from typing import Any

QUOTE = 80  # characters of a value a message quotes
# Every integer of a spec is at most 2**53: beyond, JSON readers that parse numbers as float64
# (the dashboard's JavaScript among them) and the estimate's float arithmetic lose it.
LARGEST_INTEGER = 2**53
LIST_ITEMS = 100_000  # entries of one list (a spec given as data): a spec file holds fewer
PATH_CHARACTERS = 4096  # Linux's PATH_MAX: no longer path can be opened


class SpecError(ValueError):
    """A sweep spec that cannot run; the message is one line naming the field."""


class _Short(reprlib.Repr):
    """reprlib, with integers too large for ``repr`` (Python refuses beyond 4,300 digits) counted."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 2, 4, 4, 4, 4
        self.maxstring, self.maxother, self.maxlong = QUOTE, QUOTE, 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<an integer of {digits(x)} digits>"
        return super().repr_int(x, level)


_SHORT = _Short()


def digits(value: int) -> int:
    """Decimal digits of ``value``, counted without converting it (which is quadratic)."""
    return max(1, math.floor(abs(value).bit_length() * math.log10(2)) + 1) if value else 1


def shown(value: Any) -> str:
    """``value`` for a message: its repr, cut to about QUOTE characters (with its full length
    when cut); never the whole of a large or deeply shared structure."""
    if isinstance(value, str) and len(value) > QUOTE:
        return f"{value[:QUOTE]!r}... ({len(value):,} characters)"
    text = _SHORT.repr(value)
    if len(text) > QUOTE + 20:  # reprlib bounds each part; the whole is cut here
        text = text[:QUOTE] + "..."
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 4:
        text += f" ({len(value):,} items)"
    return text


def field_name(path: str, key: Any) -> str:
    """``path.key``, or ``key`` at the top level (a key quoted with ``shown`` when it is long)."""
    key = key if isinstance(key, str) and len(key) <= QUOTE else shown(key)
    return f"{path}.{key}" if path else key


def check_keys(data: Any, cls: type, path: str) -> dict:
    """``data`` as a mapping holding only the fields of dataclass ``cls``."""
    if not isinstance(data, dict):
        raise SpecError(f"{path or 'spec'}: must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted((key for key in data if key not in known), key=lambda key: str(key)[:QUOTE])
    if unknown:
        raise SpecError(f"{field_name(path, unknown[0])}: unknown key (expected one of {', '.join(sorted(known))})")
    return data


def integer(value: Any, where: str, minimum: int | None = None, maximum: int = LARGEST_INTEGER) -> int:
    """An integer in [minimum, maximum]; ``maximum`` defaults to LARGEST_INTEGER, and the keys
    whose larger values would make a run impossible pass their own (with the reason beside it)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}: must be an integer, got {shown(value)}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{where}: must be >= {minimum}, got {shown(value)}")
    if value > maximum:
        raise SpecError(f"{where}: must be <= {maximum:,}, got {shown(value)}")
    return value


def optional_integer(value: Any, where: str, minimum: int | None = None, maximum: int = LARGEST_INTEGER) -> int | None:
    return None if value is None else integer(value, where, minimum, maximum)


def number(
    value: Any,
    where: str,
    *,
    positive: bool = False,
    minimum: float | None = None,
    below: float | None = None,
    maximum: float | None = None,
) -> float:
    """A finite number, as a float; ``maximum`` (inclusive) and ``below`` (exclusive) bound it
    above. Integers too large for a float are refused, never converted (OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where}: must be a finite number, got {shown(value)}")
    if isinstance(value, int) and abs(value) > LARGEST_INTEGER:  # compared exactly, before any float()
        raise SpecError(f"{where}: must be a finite number of at most {LARGEST_INTEGER:,}, got {shown(value)}")
    if not math.isfinite(value):
        raise SpecError(f"{where}: must be a finite number, got {shown(value)}")
    if positive and value <= 0:
        raise SpecError(f"{where}: must be > 0, got {shown(value)}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{where}: must be >= {minimum}, got {shown(value)}")
    if below is not None and value >= below:
        raise SpecError(f"{where}: must be < {below}, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise SpecError(f"{where}: must be <= {maximum:g}, got {shown(value)}")
    return float(value)


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{where}: must be true or false, got {shown(value)}")
    return value


def auto_or_boolean(value: Any, where: str) -> bool | str:
    if value != "auto" and not isinstance(value, bool):
        raise SpecError(f"{where}: must be true, false or auto, got {shown(value)}")
    return value


def string(value: Any, where: str, choices=None) -> str:
    """A non-empty string of at most PATH_CHARACTERS characters, none of them a control
    character (a newline or a NUL in a name or path is a mistake, never a meaning)."""
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: must be a non-empty string, got {shown(value)}")
    if choices is not None and value not in choices:
        raise SpecError(f"{where}: must be one of {', '.join(choices)}, got {shown(value)}")
    if len(value) > PATH_CHARACTERS:
        raise SpecError(f"{where}: at most {PATH_CHARACTERS} characters (Linux's PATH_MAX), got {shown(value)}")
    if not value.isprintable() and any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
        raise SpecError(f"{where}: must not contain control characters or line breaks, got {shown(value)}")
    return value


def unique_list(value: Any, where: str, item, allow_empty: bool = False) -> tuple:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise SpecError(f"{where}: must be a non-empty list, got {shown(value)}")
    if len(value) > LIST_ITEMS:
        raise SpecError(f"{where}: at most {LIST_ITEMS:,} entries, got {len(value):,}")
    items = tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(set(items)) != len(items):
        raise SpecError(f"{where}: contains duplicates")
    return items


def seed_value(value: Any, where: str) -> int:
    seed = integer(value, where, 0)
    if seed >= 2**32:  # numpy's RandomState, which draws DSSN's offset vector, takes 32-bit seeds
        raise SpecError(f"{where}: must be < 2**32, got {seed}")
    return seed
