"""Closed-form certified radii, one per paper equation: DSSN's exact L1 radius (Levine & Feizi
2021), the uniform/SSN L1 radius, Cohen et al.'s L2 Gaussian radius and the L1 Laplace radius.
The conventions are the package's (``certlib.certificates``)."""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

from certlib.certificates.inputs import positive, probabilities
from certlib.certificates.rounding import down, mul_down, sub_down


def dssn_radius(votes, levels: int, q: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Exact DSSN prediction and L1 radius from the vote counts over all L offsets.

    Levine & Feizi 2021, Corollary 1 (general case, Eq. 46-49) with the derandomization of
    Section 4.1: the smoothed scores p_c = votes_c / L are 1/(2 lambda)-Lipschitz in L1 on the
    1/q grid, so a perturbation of L1 size k/q moves each vote count by at most k, and moves at
    most k votes in all. With the tie rule of Appendix B (ties go to the lower class index) the
    prediction A is certified up to and including radius k/q for the largest k with
    votes_A - votes_B - 2k >= [B < A] for every other class B, i.e.
    k = min_B floor((votes_A - votes_B - [B < A]) / 2).

    ``votes``: (N, C) or (C,) non-negative integer counts, each row summing to ``levels`` (= L).
    Returns (prediction, radius_l1) with radius in pixel scale; radius is +inf with one class.
    The radius is the double nearest k/q, not rounded down: L1 distances between points of the 1/q
    grid are multiples of 1/q, so that double (half an ulp from k/q at most) bounds exactly the grid
    points that k/q does, and it equals the DSSN paper's published radii and table radii such as
    0.2 = 51/255, which a rounded-down radius would miss.
    """
    votes = np.asarray(votes)
    if votes.ndim not in (1, 2) or votes.shape[-1] < 1:
        raise ValueError(f"votes must have shape (N, C) or (C,), got {votes.shape}")
    if not np.issubdtype(votes.dtype, np.integer):
        if not np.issubdtype(votes.dtype, np.number) or np.isnan(votes).any() or (np.mod(votes, 1) != 0).any():
            raise ValueError("votes must be integer counts")
    if int(levels) != levels or levels < 1:
        raise ValueError(f"levels (L) must be an integer >= 1, got {levels}")
    if int(q) != q or q < 1:
        raise ValueError(f"q must be a positive integer, got {q}")
    single = votes.ndim == 1
    v = np.atleast_2d(votes).astype(np.int64)
    if (v < 0).any():
        raise ValueError("votes must be non-negative")
    bad = np.flatnonzero(v.sum(axis=1) != levels)
    if bad.size:
        raise ValueError(f"votes of row {bad[0]} sum to {v[bad[0]].sum()}, not to levels L={levels}")
    prediction = v.argmax(axis=1)  # first maximum: ties go to the lower class index
    top = v[np.arange(len(v)), prediction]
    classes = np.arange(v.shape[1])
    margin = top[:, None] - v - (classes[None, :] < prediction[:, None])
    margin[np.arange(len(v)), prediction] = np.iinfo(np.int64).max
    k = margin.min(axis=1) // 2
    radius = np.where(k == np.iinfo(np.int64).max // 2, np.inf, k / q)
    if single:
        return prediction[0], radius[0]
    return prediction, radius


def l1_uniform_radius(p_a_lower, lam: float, p_b_upper=None) -> np.ndarray:
    """L1 radius for uniform noise on [-lam, lam]^d and for independent SSN.

    Binary (p_b_upper None; Lee et al. 2019 via Levine & Feizi Theorem 1, Voracek & Hein
    Corollary 2.4): r = 2 lam (p_A - 1/2), certified where p_A > 1/2.
    Multiclass (Voracek & Hein Corollary 2.13): r = lam (p_A - p_B), certified where p_A > p_B.
    NaN where not certified. ``lam`` is lambda, the half-width of the uniform noise.
    Rounded toward -inf: the largest double at or below the exact value (binary; multiclass at
    most two ulps below, p_A - p_B rounding down first).
    """
    lam = positive(lam, "lambda")
    p_a = probabilities(p_a_lower, "p_a_lower")
    if p_b_upper is None:
        certified, gap = p_a > 0.5, 2 * (p_a - 0.5)  # exact for p_a in [1/4, 1] (Sterbenz)
    else:
        p_b = probabilities(p_b_upper, "p_b_upper")
        certified, gap = p_a > p_b, sub_down(p_a, p_b)
    return np.where(certified, np.maximum(mul_down(lam, gap), 0.0), np.nan)


# scipy's ndtri (Cephes: a measured peak relative error of 7.2e-16) and libm's log1p (glibc's
# tables: at most 2 ulps) are accurate to below 1e-15 of their value. Lowering by 1e-12 of the
# error's scale dominates that a thousandfold, and with it the few roundings around them (1.1e-16
# each), while moving no radius by more than 1e-12 of that scale; tests check it against mpmath.
_LIBM_MARGIN = 1e-12


def _lowered(estimate, scale):
    """``estimate`` less _LIBM_MARGIN * ``scale``, rounded down: at or below the exact value
    wherever ``estimate`` is within 1e-15 * ``scale`` of it."""
    return down(estimate - _LIBM_MARGIN * scale)


def l2_gaussian_radius(p_a_lower, sigma: float, p_b_upper=None) -> np.ndarray:
    """L2 radius for Gaussian noise N(0, sigma^2 I) (Cohen et al. 2019, Theorem 1).

    Binary (p_b_upper None, p_B = 1 - p_A): r = sigma Phi^-1(p_A), certified where p_A > 1/2.
    Multiclass: r = sigma/2 (Phi^-1(p_A) - Phi^-1(p_B)), certified where p_A > p_B. NaN otherwise.
    Lowered by 1e-12 of sigma |Phi^-1(p_A)| (multiclass: of sigma/2 (|Phi^-1(p_A)| + |Phi^-1(p_B)|),
    the difference can cancel) below the computed value, so never above the exact one.
    """
    sigma = positive(sigma, "sigma")
    p_a = probabilities(p_a_lower, "p_a_lower")
    with np.errstate(invalid="ignore"):
        quantile_a = ndtri(p_a)
        if p_b_upper is None:
            certified, infinite = p_a > 0.5, p_a == 1
            gap = _lowered(quantile_a, np.abs(quantile_a))
        else:
            p_b = probabilities(p_b_upper, "p_b_upper")
            quantile_b = ndtri(p_b)
            certified, infinite = p_a > p_b, (p_a == 1) | (p_b == 0)
            # halving is exact: distinct quantiles differ by far more than the smallest normal
            gap = _lowered(0.5 * (quantile_a - quantile_b), 0.5 * (np.abs(quantile_a) + np.abs(quantile_b)))
        radius = np.maximum(mul_down(sigma, gap), 0.0)
    return np.where(certified, np.where(infinite, np.inf, radius), np.nan)


def l1_laplace_radius(p_a_lower, b: float) -> np.ndarray:
    """L1 radius for i.i.d. Laplace noise of scale b (Teng et al. 2020; recovered by Zhang et al.
    2020, Corollary 1, Eq. 7): r = -b log(2 (1 - p_A)), certified where p_A > 1/2, NaN otherwise.
    Lowered by 1e-12 of itself below the computed value, so never above the exact one."""
    b = positive(b, "b")
    p_a = probabilities(p_a_lower, "p_a_lower")
    with np.errstate(divide="ignore", invalid="ignore"):
        # log(2 (1 - p_A)) = log1p(-t) with t = 2 (p_A - 1/2), exact for p_A in [1/4, 1] (Sterbenz):
        # log1p keeps its relative accuracy near p_A = 1/2, where 2 (1 - p_A) nears 1.
        level = -np.log1p(-2 * (p_a - 0.5))
        radius = np.maximum(mul_down(b, _lowered(level, level)), 0.0)
    return np.where(p_a > 0.5, np.where(p_a == 1, np.inf, radius), np.nan)
