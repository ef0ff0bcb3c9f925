"""Checks of a certificate's numeric inputs: each raises ValueError naming the argument."""

from __future__ import annotations

import math

import numpy as np


def probabilities(p, name: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name} must be probabilities in [0, 1]")
    return p


def positive(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def level(alpha: float) -> float:
    alpha = float(alpha)
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
    return alpha


def counts(k, n):
    k = np.asarray(k)
    n = np.asarray(n)
    if not (np.issubdtype(k.dtype, np.integer) or np.all(np.mod(k, 1) == 0)):
        raise ValueError("counts k must be integers")
    if (n < 1).any() or (k < 0).any() or (k > n).any():
        raise ValueError("counts must satisfy 0 <= k <= n with n >= 1")
    return k.astype(np.int64), np.broadcast_to(n, k.shape).astype(np.int64)
