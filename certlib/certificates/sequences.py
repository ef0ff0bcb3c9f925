"""Anytime-valid confidence sequences for a Bernoulli mean: bounds on p_A (and p_B) that hold
at every sample size at once, so a certification may stop whenever the samples say so and
still certify at its level (sequential Monte Carlo certification).

The sequence is Robbins' beta-binomial mixture (Robbins 1970, "Statistical methods related to
the law of the iterated logarithm", Sec. 3; Howard, Ramdas, McAuliffe & Sekhon 2021,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", Sec. 3.2 and Prop. 5): for
every p0 the mixture of likelihood ratios

    M_t(p0) = integral (p / p0)^S_t ((1 - p) / (1 - p0))^(t - S_t) dPi(p)
            = sum_k w_k B(a_k + S_t, b_k + t - S_t) / B(a_k, b_k) / (p0^S_t (1 - p0)^(t - S_t))

is a nonnegative martingale with mean 1 when p0 is the true mean, so by Ville's inequality
P(exists t: M_t(p) >= 1/alpha) <= alpha, and {p0 : M_t(p0) < 1/alpha} is a confidence sequence.
log M_t is convex in p0 with its minimum at S_t / t, so the sequence is an interval [L_t, U_t],
found by bisection; each end holds at level alpha at any stopping time, however chosen.

The mixing prior Pi (``PRIOR``) puts a third of its weight on Beta(1, 1) and two thirds on Beta
priors piling up near p = 1 (Beta(1, 0.1), Beta(1, 0.001)): certification's images mostly
have p_A near 1, where the uniform prior alone pays log(t + 1) and the near-one components
almost nothing. Measured at alpha = 0.001 (``bench/sequential.py`` prints the comparison): an
image with p_A = 1 needs 5,748 samples to certify p* = Phi(3) = 0.99865 with this prior,
12,557 with the uniform prior, 8,921 with Jeffreys' prior and 5,213 with a fixed-n
Clopper-Pearson bound (which is not valid under optional stopping); at p_A = 0.95, p* = 0.9
the three priors need 663-697 samples against Clopper-Pearson's 328. Waudby-Smith & Ramdas'
betting sequences (2023) are tighter for interior means but need a search over the mean per
image; this mixture's bounds are closed-form in (S_t, t), which is what lets stored counts be
re-certified later.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.special import betaln, logsumexp

from certlib.certificates.inputs import level

# (weight, a, b) of each Beta(a, b) component of the mixing prior (module docstring).
PRIOR = ((1 / 3, 1.0, 1.0), (1 / 3, 1.0, 0.1), (1 / 3, 1.0, 0.001))
_BISECTIONS = 64  # halvings of [0, 1]: below double precision
# log M_t must clear log(1/alpha) by this much to reject: the rounding of the sums, a few ulps of
# numbers below ~1e6, is far under it, so a bound is never moved past the exact one.
_LOG_MARGIN = 1e-9


def _counts(successes, trials) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(successes, dtype=np.float64)
    t = np.broadcast_to(np.asarray(trials, dtype=np.float64), s.shape)
    if (t < 1).any() or (s < 0).any() or (s > t).any() or (np.mod(s, 1) != 0).any() or (np.mod(t, 1) != 0).any():
        raise ValueError("counts must be integers with 0 <= successes <= trials and trials >= 1")
    return s, t


def _log_evidence(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """log of the prior's part of M_t (the sum over components), per (s, t)."""
    terms = [math.log(w) + betaln(a + s, b + t - s) - betaln(a, b) for w, a, b in PRIOR]
    return logsumexp(np.stack(terms), axis=0)


def _rejection(s: np.ndarray, t: np.ndarray, threshold: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Whether M_t(p0) >= 1/alpha (with the rounding margin), as a function of p0; what does not
    depend on p0 is computed once for the bisection's 2 x 64 calls."""
    has_successes, has_failures, failures = s > 0, t > s, t - s

    def rejected(p0: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            log_likelihood = np.where(has_successes, s * np.log(p0), 0.0) + np.where(
                has_failures, failures * np.log1p(-p0), 0.0
            )
        return threshold - log_likelihood >= _LOG_MARGIN

    return rejected


def confidence_sequence(successes, trials, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(L_t, U_t): the ends of the mixture confidence sequence (module docstring) after
    ``successes`` of ``trials`` Bernoulli outcomes, each an anytime-valid bound at level
    ``alpha`` (the two together at level alpha): P(exists t: p < L_t) <= alpha and
    P(exists t: p > U_t) <= alpha, whatever the stopping time. Vectorised; each end is
    rounded outward (the bisection keeps the end that was rejected)."""
    s, t = _counts(successes, trials)
    rejected = _rejection(s, t, _log_evidence(s, t) - math.log(1 / level(alpha)))
    estimate = s / t
    low, high = np.zeros_like(s), estimate.copy()  # low rejected (or 0), high not
    up_low, up_high = estimate.copy(), np.ones_like(s)  # up_high rejected (or 1), up_low not
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        below = rejected(middle)
        low, high = np.where(below, middle, low), np.where(below, high, middle)
        middle = (up_low + up_high) / 2
        above = rejected(middle)
        up_low, up_high = np.where(above, up_low, middle), np.where(above, middle, up_high)
    return low, up_high


def sequence_lower(successes, trials, alpha: float) -> np.ndarray:
    """The lower end L_t of ``confidence_sequence`` (level alpha, anytime-valid)."""
    return confidence_sequence(successes, trials, alpha)[0]


def sequence_upper(successes, trials, alpha: float) -> np.ndarray:
    """The upper end U_t of ``confidence_sequence`` (level alpha, anytime-valid)."""
    return confidence_sequence(successes, trials, alpha)[1]


# --------------------------------------------------------------------------- the stopping rule

Radius = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


def _levels(alpha: float, multiclass: bool, classes: int) -> tuple[float, float]:
    """The levels of p_A's sequence and of each other class's: multiclass splits alpha/2 for
    p_A and alpha/2 over the C - 1 others (``monte_carlo.probability_bounds``)."""
    return (alpha / 2, alpha / (2 * max(1, classes - 1))) if multiclass else (alpha, alpha)


def _radii(counts: np.ndarray, selected: np.ndarray, alpha: float, multiclass: bool, radius: Radius):
    """(pessimistic, optimistic) radius of each image: from the sequence's bounds on the side
    that shrinks the radius, and on the side that grows it; -inf where it abstains."""
    rows = np.arange(len(counts))
    n = counts.sum(axis=1)
    level_a, level_b = _levels(alpha, multiclass, counts.shape[1])
    low_a, high_a = confidence_sequence(counts[rows, selected], n, level_a)
    if multiclass:
        low_b, high_b = confidence_sequence(counts, n[:, None], level_b)
        low_b[rows, selected] = high_b[rows, selected] = 0.0
        pessimistic, optimistic = radius(low_a, high_b.max(axis=1)), radius(high_a, low_b.max(axis=1))
    else:
        pessimistic, optimistic = radius(low_a, None), radius(high_a, None)
    return np.nan_to_num(pessimistic, nan=-np.inf), np.nan_to_num(optimistic, nan=-np.inf)


def reachable_radii(radii, cap: int, alpha: float, multiclass: bool, classes: int, radius: Radius) -> np.ndarray:
    """The table ``radii`` an image could certify within ``cap`` samples (all of them on its
    class): the others are left out of the stopping rule, which would otherwise wait for them
    until the cap."""
    counts = np.zeros((1, max(2, classes)), dtype=np.int64)
    counts[0, 0] = cap
    best, _ = _radii(counts, np.zeros(1, dtype=np.int64), alpha, multiclass, radius)
    table = np.sort(np.asarray(radii, dtype=np.float64))
    return table[table <= best[0]]


def settled(
    counts,
    selected,
    *,
    alpha: float,
    multiclass: bool,
    radius: Radius,
    radii=(),
    epsilon: float | None = None,
) -> np.ndarray:
    """Whether each image may stop with its estimation ``counts`` (N, C) of the ``selected``
    classes: its certificate is settled at every table radius. The pessimistic radius (from
    the sequence's bounds at level alpha) already reaches every table radius of ``radii``
    (pixel scale, in the family's norm; give the reachable ones, ``reachable_radii``), or the
    optimistic one (the bounds' other ends) can no longer reach the next table radius above
    the pessimistic one, which includes an image that abstains even optimistically. With
    ``epsilon`` (a precision target, radii rather than table cells): stop once the pessimistic
    radius is within ``epsilon`` of the point estimate's radius, or abstains optimistically.
    Stopping this way keeps every bound valid: the sequence holds at any stopping time."""
    c = np.atleast_2d(np.asarray(counts, dtype=np.int64))
    selected = np.asarray(selected, dtype=np.int64)
    pessimistic, optimistic = _radii(c, selected, alpha, multiclass, radius)
    if epsilon is not None:
        rows, n = np.arange(len(c)), c.sum(axis=1)
        if multiclass:
            others = c.copy()
            others[rows, selected] = 0
            estimate = radius(c[rows, selected] / n, others.max(axis=1) / n)
        else:
            estimate = radius(c[rows, selected] / n, None)
        return (pessimistic >= np.nan_to_num(estimate, nan=-np.inf) - epsilon) | (optimistic == -np.inf)
    table = np.sort(np.asarray(radii, dtype=np.float64))
    passed = np.searchsorted(table, pessimistic, side="right")  # table[j] <= pessimistic for j < passed
    following = np.append(table, np.inf)[passed]
    return (passed == len(table)) | (optimistic < following)
