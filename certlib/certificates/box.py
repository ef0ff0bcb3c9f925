"""Voracek & Hein 2023's box-constrained L1 radii (Proposition 2.5 and Theorem 2.8 plugged into
Propositions 2.1 and 2.12), never above the exact supremum for the float inputs
(``l1_box_radius``).

Both overlap bounds are piecewise linear in the L1 distance c: on the k-th piece [S_k, S_k+1],
g(c) = P_k (1 - (c - S_k) / (2 lam)), where S_k is the distance spent moving the k coordinates of
largest reach fully (reach 1 in Prop. 2.5; max(x_i, 1 - x_i) in Theorem 2.8, largest first) and P_k
the product of their factors max(0, 1 - reach / (2 lam)). The slope -P_k / (2 lam) rises with k, so
g is convex and lies above the line through each of its pieces: where that line crosses the target
tau, S_k + 2 lam (1 - tau / P_k), is a lower bound on the radius sup{c : g(c) > tau} for *every* k
with P_k > 0, and equals it for the piece on which g crosses tau. A rounding error in picking the
piece therefore costs tightness, never soundness. Soundness needs only that crossing evaluated from
lower bounds on S_k and P_k and an upper bound on tau, which is what this module computes, with
first-order bounds on the rounding error of sums and products (u = 2^-53, the unit roundoff:
a sum or product of k terms in any order is within gamma_{k-1} = (k-1) u / (1 - (k-1) u) of its
exact value relative to it, Higham 2002, Lemma 3.1 and Section 4.2).
"""

from __future__ import annotations

import math

import numpy as np

from certlib.certificates.inputs import positive, probabilities
from certlib.certificates.radii import l1_uniform_radius
from certlib.certificates.rounding import mul_down, sub_down, sub_up, up

_U = 2.0**-53  # unit roundoff of float64
_MAX_PIECES = 2**32  # beyond, n u is no longer tiny (lambda > 3e9): the plain bound only


def overlap_target_upper(p_a: np.ndarray, p_b: np.ndarray | None) -> np.ndarray:
    """An upper bound (in [1/2, 1]) on the smallest overlap fraction Vol(B1 n B2) / Vol(B2) that
    keeps the prediction: 1.5 - p_A (Prop. 2.1: h(y) >= p_A - 1 + overlap > 1/2; exact in float
    for p_A in [1/2, 1]) or 1 - (p_A - p_B) / 2 (Prop. 2.12). Meaningful where certified only."""
    if p_b is None:
        return sub_up(1.5, p_a)
    return sub_up(1.0, 0.5 * sub_down(p_a, p_b))


def _crossing(spent_lo, prefix_lo, tau_hi, lam: float) -> np.ndarray:
    """A lower bound on S + 2 lam (1 - tau / P), increasing in S and P and decreasing in tau, from
    S >= spent_lo, P >= prefix_lo > 0 and tau <= tau_hi, with every rounding directed down."""
    ratio_hi = up(tau_hi / prefix_lo)  # >= tau / P: one rounding to nearest, one step up
    room = sub_down(1.0, ratio_hi)
    return sub_down(spent_lo, -mul_down(lam, 2 * room))


def _power(base: float, n: np.ndarray) -> np.ndarray:
    """base ** n for integers 0 <= n by repeated squaring: n - 1 rounded products in all (Sum over
    the set bits j of 2^j - 1 in the squares, popcount - 1 in combining them), so the result is
    within gamma_{n-1} of base ** n relative to it, without any library pow's undocumented error."""
    bits = n.astype(np.int64)
    result = np.ones(bits.shape)
    square = np.float64(base)
    while bits.any():
        result = np.where(bits & 1, result * square, result)
        square = square * square
        bits >>= 1
    return result


def grid_free_radius(tau_hi: np.ndarray, lam: float) -> np.ndarray:
    """A lower bound on the largest c with (1 - 1/(2 lam))^floor(c) (1 - frac(c) / (2 lam)) >= tau
    (Prop. 2.5: reach 1 per coordinate, so S_n = n and P_n = beta^n with beta = 1 - 1/(2 lam)).
    ``tau_hi`` >= tau, both in [1/2, 1]."""
    tau_hi = np.asarray(tau_hi, dtype=np.float64)
    if lam <= 1:
        # beta <= 1/2 <= tau: g crosses tau on its first piece, the plain bound (Prop. 2.2).
        return _crossing(0.0, 1.0, tau_hi, lam)
    beta_lo = sub_down(1.0, up(0.5 / lam))  # <= beta, at most two ulps below it
    with np.errstate(divide="ignore", over="ignore"):  # tau = 1 or a huge lambda: n = 0 below
        n = np.floor(np.log(tau_hi) / math.log1p(-0.5 / lam))  # the crossing piece, up to rounding
    n = np.where((n >= 0) & (n <= _MAX_PIECES), n, 0.0)
    # beta^n >= beta_lo^n >= _power(beta_lo, n) / (1 + gamma_{n-1}) >= _power(beta_lo, n) (1 - n u)
    # to first order; 2 (n + 1) u leaves room for the second-order terms (n u <= 2^-21).
    prefix_lo = mul_down(_power(beta_lo, n), 1 - (n + 1) * 2 * _U)
    return _crossing(n, prefix_lo, tau_hi, lam)


def input_dependent_radius(tau_hi: np.ndarray, lam: float, x: np.ndarray) -> np.ndarray:
    """A lower bound on the largest c whose worst-case overlap in Theorem 2.8 (coordinates filled
    greedily, largest reach first) stays >= tau, +inf only where moving every coordinate fully
    surely keeps it above tau. ``tau_hi`` (N,) >= tau, both in [1/2, 1]; ``x`` (N, d) in [0, 1]."""
    # Rounding to nearest is monotone, so the sorted rounded reaches are the rounded sorted exact
    # reaches: each within a factor 1 + u of the exact reach of its rank, however ties are broken.
    reach = np.sort(np.maximum(x, 1.0 - x), axis=1)[:, ::-1]
    spent = np.cumsum(reach, axis=1)  # S_1 .. S_d
    prefix = np.cumprod(np.clip(1.0 - (0.5 * reach) / lam, 0.0, None), axis=1)  # P_1 .. P_d
    rows, d = np.arange(len(x)), x.shape[1]
    k = (prefix > tau_hi[:, None]).sum(axis=1)  # prefix is non-increasing: the crossing piece
    whole = k == d  # maybe every point of the box is certified; else the last piece's line
    k = np.minimum(k, d - 1)
    spent_k = np.where(k > 0, spent[rows, k - 1], 0.0)
    prefix_k = np.where(k > 0, prefix[rows, k - 1], 1.0)
    # S_k >= (1 - u) (1 - gamma_{k-1}) S^_k >= (1 - k u) S^_k to first order: margin 2 (k + 1) u.
    spent_lo = mul_down(spent_k, 1 - (k + 1) * 2 * _U)
    # Every factor of a prefix above tau_hi >= 1/2 is above 1/2, so q = reach / (2 lam) < 1/2 and,
    # as 1 - x, / lam and 1 - round once each, |f^ - f| <= 2u q + u f <= 3u f. With the product's
    # gamma_{k-1}, P_k >= (1 - 4 k u) P^_k to first order: margin 10 (k + 1) u.
    prefix_lo = mul_down(prefix_k, 1 - (k + 1) * 10 * _U)
    radius = _crossing(spent_lo, prefix_lo, tau_hi, lam)
    whole_lo = mul_down(prefix[:, -1], 1 - (d + 1) * 10 * _U)  # P_d, as above
    return np.where(whole & (whole_lo > tau_hi), np.inf, radius)


def l1_box_radius(p_a_lower, lam: float, p_b_upper=None, x=None) -> np.ndarray:
    """Box-constrained L1 radius for uniform noise and independent SSN (Voracek & Hein 2023,
    "uniform++" / "split++").

    Adversarial inputs must stay in [0, 1]^d, so the overlap of the two noise supports is
    bounded with the exact piecewise form of Proposition 2.5,
    (1 - 1/(2 lam))^floor(c) (1 - (c - floor(c))/(2 lam)), plugged into Proposition 2.1
    (binary, p_b_upper None) or Proposition 2.12 (multiclass). The closed forms of
    Corollaries 2.7/2.14 are the looser exponential relaxation of this bound; the piecewise form
    is never below the plain radius of ``l1_uniform_radius`` for the same bounds.
    With the image ``x`` (shape (d,) or (N, d), pixel scale) the input-dependent Theorem 2.8
    (coordinates sorted by their distance to the box boundary, filled greedily) is used instead;
    it returns +inf where the certified ball covers the whole box.

    Valid for uniform noise and independent SSN only (Theorem 2.11 needs independent
    coordinates): DSSN's probabilities must never reach it. The families that hold it say so
    (``accepted_certificates``), and every caller in the product goes through them. NaN where
    not certified. Never above the exact supremum (the module docstring says how), and below it
    by about 1e-14 (1 + lam^2) at most.
    """
    lam = positive(lam, "lambda")
    p_a = probabilities(p_a_lower, "p_a_lower")
    p_b = None if p_b_upper is None else probabilities(p_b_upper, "p_b_upper")
    certified = p_a > 0.5 if p_b is None else p_a > p_b
    tau = np.where(certified, overlap_target_upper(p_a, p_b), 0.5)  # 0.5: a placeholder
    tau = np.broadcast_to(tau, np.broadcast_shapes(p_a.shape, () if p_b is None else p_b.shape))
    if x is None:
        radius = grid_free_radius(tau, lam)
    else:
        x = np.asarray(x, dtype=np.float64)
        if np.isnan(x).any() or (x < 0).any() or (x > 1).any():
            raise ValueError("x must be images in pixel scale [0, 1]")
        if tau.ndim == 0:
            radius = input_dependent_radius(tau[None], lam, x.reshape(1, -1))[0]
        elif tau.ndim == 1 and x.ndim >= 2 and len(x) == len(tau):
            radius = input_dependent_radius(tau, lam, x.reshape(len(x), -1))
        else:
            raise ValueError(f"x of shape {x.shape} does not hold one image per probability bound ({tau.shape})")
    # The plain bound (Prop. 2.2) is the line through the overlap's first piece, so it is never
    # above the box radius; the larger of the two keeps the box radius's error margins from
    # landing below the plain radius where both are equal (lambda <= 1/2, tiny radii).
    plain = l1_uniform_radius(p_a, lam, p_b)
    return np.where(certified, np.maximum(radius, plain), np.nan)
