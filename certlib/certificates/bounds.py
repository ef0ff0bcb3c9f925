"""Confidence bounds from counts: one-sided Clopper-Pearson bounds on a binomial proportion
(fixed n), Cohen et al.'s Theorem 5 bound on a test set's certified accuracy, and the empirical
Bernstein bound on a mean that the dual certificate (``dual.threshold``) uses."""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import special

from certlib.certificates.inputs import counts, level


def _two_sided_beta(k: np.ndarray, n: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """statsmodels' two-sided Clopper-Pearson interval at level 1 - 2*alpha: each end is a
    one-sided (1 - alpha) bound."""
    # Imported here: statsmodels takes a second to import, and most processes never compute a
    # Clopper-Pearson bound (job drivers, `certify` commands, workers certifying DSSN).
    from statsmodels.stats.proportion import proportion_confint

    return proportion_confint(k, n, alpha=2 * level(alpha), method="beta")


def clopper_pearson_lower(k, n, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from k of n
    (Cohen et al. 2019, Appendix C: ``proportion_confint(k, n, alpha=2*alpha, method="beta")[0]``)."""
    k, n = counts(k, n)
    low = _two_sided_beta(k, n, alpha)[0]
    return np.where(k == 0, 0.0, low)


def clopper_pearson_upper(k, n, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion from k of n."""
    k, n = counts(k, n)
    high = _two_sided_beta(k, n, alpha)[1]
    return np.where(k == n, 1.0, high)


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
    alpha = level(alpha)
    if not 0 < rho < 1:
        raise ValueError(f"rho must lie in (0, 1), got {rho}")
    log_term = math.log(1 / rho)
    bound = (y / m - alpha - math.sqrt(2 * alpha * (1 - alpha) * log_term / m) - log_term / (3 * m)) / (1 - alpha)
    return np.maximum(bound, 0.0)


@functools.lru_cache(maxsize=8)
def clopper_pearson_upper_table(n: int, level: float) -> np.ndarray:
    """U[c]: the one-sided (1 - level) Clopper-Pearson upper bound on a proportion after c
    successes in n trials, for c = 0..n (Clopper & Pearson 1934: the (1 - level) quantile of
    Beta(c + 1, n - c); 1 at c = n). Read-only."""
    successes = np.arange(n)
    table = np.append(special.betaincinv(successes + 1.0, n - successes, 1.0 - level), 1.0)
    table.flags.writeable = False
    return table


def empirical_bernstein_width(variance: np.ndarray, n: int, level: float) -> np.ndarray:
    """How far the mean of n i.i.d. variables in [0, 1] may lie above their sample mean with
    probability <= level, given their unbiased sample variance (Maurer & Pontil 2009, Theorem 4):
    sqrt(2 V ln(2/level) / n) + 7 ln(2/level) / (3 (n - 1))."""
    log_term = math.log(2 / level)
    return np.sqrt(2 * variance * log_term / n) + 7 * log_term / (3 * (n - 1))
