"""Certificates: pure, vectorised functions from votes, counts or probability bounds to
predictions and certified radii, one per paper equation.

Conventions:

* Radii are in pixel scale (images in [0, 1]^d): an L1 radius r certifies every x' with
  ||x' - x||_1 <= r (DSSN: inclusive, by the tie rule) or < r (Monte Carlo, continuous domain).
* Abstain is explicit: a prediction of ``ABSTAIN`` (-1) and a radius of NaN. A radius function
  returns NaN wherever its bound cannot certify anything; it never returns a negative radius.
* ``alpha`` is always the one-sided failure probability of a bound.
* Predictions break ties toward the lower class index.

Zhang et al. 2020's dual certificate (``zhang_radius``) needs a Monte Carlo estimate behind a
precomputed radius curve; it lives in ``certlib.dual_certificate`` and is exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from certlib.dual_certificate import zhang_radius as zhang_radius

ABSTAIN = -1


# --------------------------------------------------------------------------- input checks


def _probabilities(p, name: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name} must be probabilities in [0, 1]")
    return p


def _positive(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
    return alpha


def _counts(k, n):
    k = np.asarray(k)
    n = np.asarray(n)
    if not (np.issubdtype(k.dtype, np.integer) or np.all(np.mod(k, 1) == 0)):
        raise ValueError("counts k must be integers")
    if (n < 1).any() or (k < 0).any() or (k > n).any():
        raise ValueError("counts must satisfy 0 <= k <= n with n >= 1")
    return k.astype(np.int64), np.broadcast_to(n, k.shape).astype(np.int64)


# --------------------------------------------------------------------------- DSSN (exact)


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


# --------------------------------------------------------------------------- confidence bounds


def clopper_pearson_lower(k, n, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from k of n
    (Cohen et al. 2019, Appendix C: ``proportion_confint(k, n, alpha=2*alpha, method="beta")[0]``)."""
    k, n = _counts(k, n)
    low = proportion_confint(k, n, alpha=2 * _alpha(alpha), method="beta")[0]
    return np.where(k == 0, 0.0, low)


def clopper_pearson_upper(k, n, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion from k of n."""
    k, n = _counts(k, n)
    high = proportion_confint(k, n, alpha=2 * _alpha(alpha), method="beta")[1]
    return np.where(k == n, 1.0, high)


# --------------------------------------------------------------------------- L1: uniform / SSN


def l1_uniform_radius(p_a_lower, lam: float, p_b_upper=None) -> np.ndarray:
    """L1 radius for uniform noise on [-lam, lam]^d and for independent SSN.

    Binary (p_b_upper None; Lee et al. 2019 via Levine & Feizi Theorem 1, Voracek & Hein
    Corollary 2.4): r = 2 lam (p_A - 1/2), certified where p_A > 1/2.
    Multiclass (Voracek & Hein Corollary 2.13): r = lam (p_A - p_B), certified where p_A > p_B.
    NaN where not certified. ``lam`` is lambda, the half-width of the uniform noise.
    """
    lam = _positive(lam, "lambda")
    p_a = _probabilities(p_a_lower, "p_a_lower")
    if p_b_upper is None:
        return np.where(p_a > 0.5, 2 * lam * (p_a - 0.5), np.nan)
    p_b = _probabilities(p_b_upper, "p_b_upper")
    return np.where(p_a > p_b, lam * (p_a - p_b), np.nan)


def _overlap_target(p_a, p_b):
    """The smallest overlap fraction Vol(B1 n B2)/Vol(B2) that keeps the prediction:
    Voracek & Hein Prop. 2.1 (binary: h(y) >= p_A - 1 + overlap > 1/2) and Prop. 2.12
    (multiclass: (p_A - p_B)/2 - 1 + overlap > 0)."""
    if p_b is None:
        return 1.5 - p_a
    return 1 - (p_a - p_b) / 2


def _overlap_prop_2_5(c: np.ndarray, lam: float) -> np.ndarray:
    """Prop. 2.5's exact bound (1 - 1/(2 lam))^floor(c) (1 - (c - floor(c))/(2 lam))."""
    full = np.floor(c)
    return (1 - 1 / (2 * lam)) ** full * (1 - (c - full) / (2 * lam))


def _round_down_until(radius: np.ndarray, holds) -> np.ndarray:
    """Step a computed radius down by units in the last place until ``holds(radius)`` is true:
    the closed-form inversion may land a rounding error above the exact supremum."""
    radius = np.array(radius, dtype=np.float64)
    for _ in range(64):
        bad = np.isfinite(radius) & (radius > 0) & ~holds(radius)
        if not bad.any():
            return radius
        radius[bad] = np.nextafter(radius[bad], 0)
    raise ArithmeticError("could not round a box-constrained radius down to a certified value")


def _box_radius_grid_free(tau: np.ndarray, lam: float) -> np.ndarray:
    """Largest c with (1 - 1/(2 lam))^floor(c) (1 - frac(c)/(2 lam)) >= tau (Prop. 2.5, exact)."""
    if 2 * lam <= 1:
        # A whole coordinate moved by 1 >= 2 lam leaves no overlap: only c < 1 helps, where the
        # bound equals the plain one (Prop. 2.2).
        return 2 * lam * (1 - tau)
    log_beta = np.log1p(-1 / (2 * lam))
    beta = np.exp(log_beta)
    n = np.floor(np.log(tau) / log_beta)
    n = np.where(beta ** (n + 1) >= tau, n + 1, n)  # guard the floor against rounding
    n = np.where(beta**n < tau, n - 1, n)
    radius = n + 2 * lam * (1 - tau / beta**n)
    return _round_down_until(radius, lambda r: _overlap_prop_2_5(r, lam) >= tau)


def _box_radius_input_dependent(tau: np.ndarray, lam: float, x: np.ndarray) -> np.ndarray:
    """Largest c whose worst-case overlap in Theorem 2.8 (sorted greedy) stays >= tau."""
    reach = np.sort(np.maximum(x, 1 - x), axis=1)[:, ::-1]  # largest possible move first
    factors = np.clip(1 - reach / (2 * lam), 0, None)
    prefix = np.concatenate([np.ones((len(x), 1)), np.cumprod(factors, axis=1)], axis=1)  # P_0..P_d
    spent = np.concatenate([np.zeros((len(x), 1)), np.cumsum(reach, axis=1)], axis=1)
    t = tau[:, None]
    full = (prefix >= t).sum(axis=1) - 1  # prefix is non-increasing: count of k with P_k >= tau, minus 1
    rows = np.arange(len(x))
    d = x.shape[1]
    radius = spent[rows, full] + np.where(full < d, 2 * lam * (1 - tau / prefix[rows, full]), 0.0)

    def overlap(c):
        k = np.minimum(full, d - 1)
        return prefix[rows, k] * np.clip(1 - (c - spent[rows, k]) / (2 * lam), 0, None)

    radius = np.where(full < d, _round_down_until(np.where(full < d, radius, 0.0), lambda c: overlap(c) >= tau), radius)
    # Moving every coordinate fully keeps the overlap above tau: every point of the box is certified.
    return np.where((full == d) & (prefix[:, -1] > tau), np.inf, radius)


def l1_box_radius(p_a_lower, lam: float, p_b_upper=None, x=None, *, method: str = "uniform") -> np.ndarray:
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
    coordinates); ``method="dssn"`` is refused. NaN where not certified.
    """
    from certlib.families import with_certificate  # the families import this module

    if method not in with_certificate("box"):
        raise ValueError(
            f"box-constrained certificates hold for {' and '.join(with_certificate('box'))} only, not {method!r} "
            "(Voracek & Hein Theorem 2.11 needs independent splitting noise)"
        )
    lam = _positive(lam, "lambda")
    p_a = _probabilities(p_a_lower, "p_a_lower")
    p_b = None if p_b_upper is None else _probabilities(p_b_upper, "p_b_upper")
    certified = p_a > 0.5 if p_b is None else p_a > p_b
    tau = np.where(certified, _overlap_target(p_a, p_b), 0.5)  # placeholder where not certified
    tau = np.broadcast_to(tau, np.broadcast_shapes(p_a.shape, () if p_b is None else p_b.shape))
    if x is None:
        radius = _box_radius_grid_free(tau, lam)
    else:
        x = np.asarray(x, dtype=np.float64)
        if np.isnan(x).any() or (x < 0).any() or (x > 1).any():
            raise ValueError("x must be images in pixel scale [0, 1]")
        if tau.ndim == 0:
            radius = _box_radius_input_dependent(tau[None], lam, x.reshape(1, -1))[0]
        elif tau.ndim == 1 and x.ndim >= 2 and len(x) == len(tau):
            radius = _box_radius_input_dependent(tau, lam, x.reshape(len(x), -1))
        else:
            raise ValueError(f"x of shape {x.shape} does not hold one image per probability bound ({tau.shape})")
    # The plain bound (Prop. 2.2) is valid too; taking the larger keeps the box radius from
    # falling an ulp below it where the round-down above stepped off an equal value.
    plain = l1_uniform_radius(p_a, lam, p_b)
    return np.where(certified, np.maximum(radius, plain), np.nan)


# --------------------------------------------------------------------------- L2 Gaussian, L1 Laplace


def l2_gaussian_radius(p_a_lower, sigma: float, p_b_upper=None) -> np.ndarray:
    """L2 radius for Gaussian noise N(0, sigma^2 I) (Cohen et al. 2019, Theorem 1).

    Binary (p_b_upper None, p_B = 1 - p_A): r = sigma Phi^-1(p_A), certified where p_A > 1/2.
    Multiclass: r = sigma/2 (Phi^-1(p_A) - Phi^-1(p_B)), certified where p_A > p_B. NaN otherwise.
    """
    sigma = _positive(sigma, "sigma")
    p_a = _probabilities(p_a_lower, "p_a_lower")
    if p_b_upper is None:
        with np.errstate(invalid="ignore"):
            return np.where(p_a > 0.5, sigma * norm.ppf(p_a), np.nan)
    p_b = _probabilities(p_b_upper, "p_b_upper")
    with np.errstate(invalid="ignore"):
        return np.where(p_a > p_b, sigma / 2 * (norm.ppf(p_a) - norm.ppf(p_b)), np.nan)


def l1_laplace_radius(p_a_lower, b: float) -> np.ndarray:
    """L1 radius for i.i.d. Laplace noise of scale b (Teng et al. 2020; recovered by Zhang et al.
    2020, Corollary 1, Eq. 7): r = -b log(2 (1 - p_A)), certified where p_A > 1/2, NaN otherwise."""
    b = _positive(b, "b")
    p_a = _probabilities(p_a_lower, "p_a_lower")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p_a > 0.5, -b * np.log(2 * (1 - p_a)), np.nan)


# --------------------------------------------------------------------------- Monte Carlo CERTIFY


def monte_carlo_certify(
    counts_selection,
    counts_estimation,
    alpha: float,
    radius: Callable[..., np.ndarray],
    multiclass: bool = False,
) -> dict[str, np.ndarray]:
    """Cohen et al. 2019 CERTIFY (Appendix C.2) from the two count vectors.

    The n0 selection counts pick the class c_A (ties to the lower index); the n estimation
    counts bound its probability. Binary: p_A_lower = Clopper-Pearson lower bound at level alpha
    and p_B = 1 - p_A (implicit). Multiclass (Voracek & Hein Algorithm 1): c_B is the top
    estimation class other than c_A, and alpha is split between the two bounds (Bonferroni):
    p_A_lower and p_B_upper each at alpha/2. ``radius(p_a_lower, p_b_upper_or_None)`` is the
    noise's certificate. Where it returns NaN the prediction is ABSTAIN.

    Returns arrays: selected (c_A, the n0 choice, also for clean accuracy), prediction
    (c_A or -1), radius (NaN on abstain), p_a_lower, p_b_upper (NaN in binary mode).
    """
    c0 = np.atleast_2d(np.asarray(counts_selection, dtype=np.int64))
    c = np.atleast_2d(np.asarray(counts_estimation, dtype=np.int64))
    if c0.shape != c.shape:
        raise ValueError(f"selection counts {c0.shape} and estimation counts {c.shape} differ in shape")
    alpha = _alpha(alpha)
    rows = np.arange(len(c))
    selected = c0.argmax(axis=1)
    n = c.sum(axis=1)
    if multiclass:
        others = c.copy()
        others[rows, selected] = -1
        runner_up = others.argmax(axis=1)
        p_a = clopper_pearson_lower(c[rows, selected], n, alpha / 2)
        p_b = clopper_pearson_upper(c[rows, runner_up], n, alpha / 2)
        r = radius(p_a, p_b)
    else:
        p_a = clopper_pearson_lower(c[rows, selected], n, alpha)
        p_b = np.full(len(c), np.nan)
        r = radius(p_a, None)
    r = np.asarray(r, dtype=np.float64)
    prediction = np.where(np.isnan(r), ABSTAIN, selected)
    return {"selected": selected, "prediction": prediction, "radius": r, "p_a_lower": p_a, "p_b_upper": p_b}


# --------------------------------------------------------------------------- test-set accuracy


def certified_accuracy_lower_bound(y_count, m: int, alpha: float, rho: float) -> np.ndarray:
    """Lower bound on the true certified accuracy that holds with probability >= 1 - rho over
    the randomness of CERTIFY run with failure rate alpha on each of m test images, of which
    ``y_count`` were certified correctly at the radius (Cohen et al. 2019, Theorem 5, Eq. 16):
    1/(1-alpha) (Y/m - alpha - sqrt(2 alpha (1-alpha) log(1/rho) / m) - log(1/rho) / (3m)),
    clipped at 0."""
    y = np.asarray(y_count, dtype=np.float64)
    if int(m) != m or m < 1:
        raise ValueError(f"m must be a positive integer, got {m}")
    if (y < 0).any() or (y > m).any():
        raise ValueError("y_count must lie in [0, m]")
    alpha = _alpha(alpha)
    if not 0 < rho < 1:
        raise ValueError(f"rho must lie in (0, 1), got {rho}")
    log_term = math.log(1 / rho)
    bound = (y / m - alpha - math.sqrt(2 * alpha * (1 - alpha) * log_term / m) - log_term / (3 * m)) / (1 - alpha)
    return np.maximum(bound, 0.0)
