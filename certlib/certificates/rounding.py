"""Directed rounding for certified radii: results at or below (or above) the exact value of an
operation on float inputs, so that a radius is never above the exact value of its formula, not
even by an ulp. Error-free transformations (Knuth's TwoSum, Dekker's TwoProduct with
Veltkamp's split) give the exact error of a rounded sum or product; its sign says whether the
rounded result must step toward -inf."""

from __future__ import annotations

import numpy as np

_SPLITTER = 2.0**27 + 1  # Veltkamp's constant: splits a double into two halves of 26 bits


def down(value):
    """The next double toward -inf: at or below the exact value of any result rounded to nearest."""
    return np.nextafter(value, -np.inf)


def up(value):
    return np.nextafter(value, np.inf)


def sub_down(a, b):
    """a - b rounded toward -inf: Knuth's TwoSum gives the exact error of the rounded difference
    (no overflow, else the NaN error steps down)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        total = a - b
        from_b = total - a
        error = (a - (total - from_b)) + (-b - from_b)
    return np.where(error >= 0, total, down(total))


def sub_up(a, b):
    return -sub_down(b, a)


def _split(a):
    scaled = _SPLITTER * a
    high = scaled - (scaled - a)
    return high, a - high


def mul_down(a, b):
    """a * b rounded toward -inf: Dekker's TwoProduct gives the exact error of the rounded product
    where no step can overflow or underflow (factors and product within 2^+-450); outside that
    range, where a float64 radius never lies in practice, it steps down regardless."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        product = a * b
        (a_high, a_low), (b_high, b_low) = _split(a), _split(b)
        error = ((a_high * b_high - product) + a_high * b_low + a_low * b_high) + a_low * b_low
    magnitudes = np.stack(np.broadcast_arrays(np.abs(a), np.abs(b), np.abs(product)))
    safe = ((magnitudes >= 2.0**-450) & (magnitudes <= 2.0**450)).all(axis=0)
    return np.where(safe & (error >= 0), product, down(product))
