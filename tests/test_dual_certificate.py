"""Zhang et al. 2020's dual certificate: k = 0 recovers the closed forms (Corollaries 1-2 and
the sqrt(d) of Gaussian l-infinity certification) to within the targets and never exceeds them,
the threshold's failure rate by simulation where the exact threshold is known, the bounds it is
built from against independent computations, the samplers against their laws, and the Monte
Carlo quantities against brute-force integration in two dimensions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import special, stats
from statsmodels.stats.proportion import proportion_confint

from certlib.certificates.bounds import clopper_pearson_upper_table, empirical_bernstein_width
from certlib.certificates.dual import (
    RADII,
    RADIUS_RATIO,
    log_ratio,
    radius_curve,
    sample_statistics,
    threshold,
    truncated_normal,
    zhang_radius,
)

N, DELTA = 20_000, 0.001
D = 3072


def closed_form(norm: str, p: np.ndarray, scale: float, dim: int) -> np.ndarray:
    if norm == "l1":  # Laplace, Zhang et al. Corollary 1 (Teng et al.)
        return -scale * np.log(2 * (1 - p))
    radius = scale * stats.norm.ppf(p)  # Gaussian, Corollary 2 (Cohen et al.)
    return radius / math.sqrt(dim) if norm == "linf" else radius  # the l2 ball of radius sqrt(d) r


@pytest.mark.parametrize("norm, scale, dim", [("l1", 0.5, D), ("l2", 0.5, D), ("linf", 0.25, 64)])
def test_k_zero_meets_the_radius_targets_and_never_exceeds_the_closed_forms(norm, scale, dim):
    """At n = 100,000 curve samples and delta = 0.001 (the families' settings): at least 0.9 of
    the closed form for p in [0.55, 0.999], 0.8 at 0.9999, never above it."""
    p = np.concatenate([np.linspace(0.55, 0.999, 60), [0.9999]])
    radius = zhang_radius(p, norm=norm, k=0.0, scale=scale, dim=dim, n=100_000, delta=DELTA)
    ratio = radius / closed_form(norm, p, scale, dim)
    assert (ratio <= 1).all(), ratio.max()
    assert (ratio[:-1] >= 0.9).all() and ratio[-1] >= 0.8, ratio


def test_a_radius_rounds_down_by_less_than_one_percent():
    """The curve's radius against a continuous search of the same bound: the grid loses less
    than 1 - 1/RADIUS_RATIO of the radius."""
    statistics = sample_statistics("l2", 0.0, 1.0, D, N, seed=0)

    def at(r: float) -> float:
        return threshold(log_ratio(statistics, r, norm="l2", k=0.0, scale=1.0, dim=D), DELTA)

    for p in (0.55, 0.7, 0.9, 0.99):
        low, high = 1e-4, 5.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if at(middle) < p else (low, middle)
        on_grid = zhang_radius(p, norm="l2", k=0.0, scale=1.0, dim=D, n=N, delta=DELTA)
        assert low / RADIUS_RATIO <= on_grid <= low, (p, on_grid, low)


def exact_threshold(norm: str, r: float, scale: float) -> float:
    """The p_A at which Theorem 1 with the exact distribution of R reaches 1/2, for k = 0: the
    Neyman-Pearson thresholds of Gaussian (Cohen et al.) and Laplace (Teng et al.) smoothing."""
    return float(stats.norm.cdf(r / scale)) if norm == "l2" else 1 - math.exp(-r / scale) / 2


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_the_threshold_fails_at_most_at_rate_delta(norm):
    """2,000 independent curves of 400 samples at delta = 0.2, at three radii: the fraction of
    thresholds below the exact one is at most delta plus three standard errors (Laplace's R has
    atoms: the bounds hold for any distribution). No threshold of 10,000 curves per radius fell
    below the exact one when this was written; thresholds without their widths fail about half
    of the time (the next test), far above the 0.227 this allows."""
    delta, curves, samples = 0.2, 2_000, 400
    rng = np.random.default_rng(11)
    for r in (0.2, 1.0, 2.5):
        exact = exact_threshold(norm, r, 1.0)
        z1 = rng.standard_normal((curves, samples)) if norm == "l2" else rng.laplace(0, 1.0, (curves, samples))
        logs = r * z1 - r * r / 2 if norm == "l2" else np.abs(z1) - np.abs(z1 - r)
        failures = np.mean([threshold(row, delta) < exact for row in logs])
        assert failures <= delta + 3 * math.sqrt(delta * (1 - delta) / curves), (r, failures)


def test_the_thresholds_are_tight_enough_to_fail_when_their_widths_are_dropped():
    """The simulation above can fail: the same thresholds with the bounds' widths removed (the
    empirical estimate) fall below the exact threshold about half of the time."""
    rng = np.random.default_rng(12)
    logs = 1.0 * rng.standard_normal((1000, 400)) - 0.5
    exact = exact_threshold("l2", 1.0, 1.0)
    lam = np.exp(np.linspace(-1, 6, 2000))
    empirical = [np.min((0.5 + np.maximum(lam[:, None] - np.exp(row), 0).mean(1)) / lam) for row in logs]
    assert 0.3 < np.mean(np.array(empirical) < exact) < 0.7
    assert np.mean([threshold(row, 0.2) < exact for row in logs]) < 0.2


def test_clopper_pearson_table_against_statsmodels():
    table = clopper_pearson_upper_table(1000, 1e-4)
    for count in (0, 1, 17, 500, 999):
        expected = proportion_confint(count, 1000, alpha=2e-4, method="beta")[1]
        assert table[count] == pytest.approx(expected, rel=1e-9)
    assert table[1000] == 1.0 and not table.flags.writeable


def test_empirical_bernstein_width_covers_at_its_level():
    """Beta(0.5, 4) variables in [0, 1], 30 per sample: the mean exceeds the sample mean plus the
    width in at most level + 3 standard errors of 40,000 samples."""
    rng = np.random.default_rng(13)
    level, trials, n = 0.05, 40_000, 30
    y = rng.beta(0.5, 4, (trials, n))
    width = empirical_bernstein_width(y.var(axis=1, ddof=1), n, level)
    misses = np.mean(0.5 / 4.5 > y.mean(axis=1) + width)
    assert misses <= level + 3 * math.sqrt(level * (1 - level) / trials)


def test_curve_is_monotone_read_only_and_certifies_zero_above_one_half():
    radii, thresholds = radius_curve("l2", 100.0, 0.25, D, N, DELTA, 0)
    assert (np.diff(radii) > 0).all() and (np.diff(thresholds) >= 0).all() and (thresholds > 0.5).all()
    assert not radii.flags.writeable and not thresholds.flags.writeable
    p = np.array([0.3, 0.5, np.nextafter(0.5, 1), thresholds[0], np.nextafter(thresholds[0], 1), 1.0])
    radius = zhang_radius(p, norm="l2", k=100.0, scale=0.25, dim=D, n=N, delta=DELTA)
    assert np.isnan(radius[:2]).all() and (radius[2:4] == 0).all() and radius[4] == radii[0]
    assert radius[5] == radii[-1]


def test_the_radius_grid_does_not_depend_on_the_samples():
    """The grid is a lattice fixed before sampling (``radius_curve``'s argument needs it): two
    seeds' curves share their radii up to where the shorter one stops."""
    a, _ = radius_curve("l2", 0.0, 0.5, 64, 2000, DELTA, 0)
    b, _ = radius_curve("l2", 0.0, 0.5, 64, 2000, DELTA, 1)
    common = min(len(a), len(b))
    assert common > 1000 and np.array_equal(a[:common], b[:common])


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_log_ratio_keeps_its_digits_where_z_nears_the_shift(norm):
    """d = 1, z_1 within 1e-8 of r, k = 0.9: against mpmath at 50 digits (the norm plus its
    change cancelled there, an error of 0.05 in log R for l2)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    k, scale, r = 0.9, 1.0, 0.3
    z1 = np.array([r * (1 + 1e-8), r * (1 - 1e-7), -0.7])
    statistics = {"z1": z1, "rest": np.zeros(3), "norm": np.abs(z1), "square": z1**2}
    computed = log_ratio(statistics, r, norm=norm, k=k, scale=scale, dim=1)
    for value, z in zip(computed, z1):
        z, rr = mpmath.mpf(float(z)), mpmath.mpf(r)
        if norm == "l1":
            exact = -k * mpmath.log(abs(z - rr) / abs(z)) - (abs(z - rr) - abs(z)) / scale
        else:
            exact = -k / 2 * mpmath.log((z - rr) ** 2 / z**2) - (rr**2 - 2 * rr * z) / (2 * scale**2)
        assert abs(value - float(exact)) < 1e-12, (norm, float(z), value, float(exact))


def test_at_k_zero_log_ratio_is_the_closed_form_even_at_the_shift():
    """Laplace and Gaussian (k = 0): log R is the exponent's change alone, also where z is
    delta* or 0 (a norm factor there would be 0 * inf)."""
    r, scale = 0.3, 0.8
    z1 = np.array([r, 0.0, -0.7, 1.9])
    statistics = {"z1": z1, "rest": np.zeros(4), "norm": np.abs(z1), "square": z1**2, "sum": z1}
    laplace = log_ratio(statistics, r, norm="l1", k=0.0, scale=scale, dim=1)
    gauss = log_ratio(statistics, r, norm="l2", k=0.0, scale=scale, dim=1)
    gauss_linf = log_ratio(statistics, r, norm="linf", k=0.0, scale=scale, dim=1)
    assert np.allclose(laplace, -(np.abs(z1 - r) - np.abs(z1)) / scale, rtol=0, atol=1e-15)
    assert np.allclose(gauss, -((z1 - r) ** 2 - z1**2) / (2 * scale**2), rtol=0, atol=1e-15)
    assert np.array_equal(gauss_linf, gauss) and np.isfinite(laplace).all()


@pytest.mark.parametrize("norm, k", [("l2", 0.0), ("l1", 0.0), ("linf", 0.0)])
def test_samplers_follow_their_laws_at_k_zero(norm, k):
    """k = 0: Laplace coordinates and Gamma radius (l1); Gaussian coordinates and chi-square
    norm (l2); the maximum of d |N(0, sigma^2)| and a Gaussian sum (l-infinity)."""
    s = sample_statistics(norm, k, 0.7, 10, 20_000, seed=1)
    if norm == "l1":
        tests = [(s["z1"], stats.laplace(scale=0.7).cdf), (s["norm"], stats.gamma(10, scale=0.7).cdf)]
    elif norm == "l2":
        tests = [(s["z1"], stats.norm(scale=0.7).cdf), (s["square"] / 0.49, stats.chi2(10).cdf)]
    else:
        tests = [
            (s["t"], lambda t: (2 * stats.norm.cdf(t / 0.7) - 1) ** 10),
            (s["sum"], stats.norm(scale=0.7 * math.sqrt(10)).cdf),
        ]
    for sample, cdf in tests:
        assert stats.kstest(sample, cdf).pvalue > 1e-3


def linf_radius_cdf(k: float, sigma: float, d: int):
    """The distribution function of ||z||_inf for z ~ Eq. 13, integrated numerically from its
    density t^-k exp(-t^2 / 2sigma^2) (2 Phi(t / sigma) - 1)^(d-1) in log t (trapezoids on a
    uniform grid of s = log t, which resolves the power law at 0 whatever k)."""
    s = np.linspace(math.log(sigma * 1e-300), math.log(15 * sigma), 400_001)
    t = np.exp(s)
    # 2 Phi(x) - 1 = erf(x / sqrt2), which keeps its digits near 0.
    log_f = -k * s - t**2 / (2 * sigma**2) + (d - 1) * np.log(special.erf(t / (sigma * math.sqrt(2)))) + s
    f = np.exp(log_f - log_f.max())
    cumulative = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2 * np.diff(s))])
    return lambda x: np.interp(x, t, cumulative / cumulative[-1])


@pytest.mark.parametrize("k, d", [(4.0, 10), (9.95, 10), (768.0, 3072), (2816.0, 3072), (3071.95, 3072)])
def test_linf_radius_sampler_follows_its_law_for_every_k(k, d):
    """The rejection sampler of ||z||_inf against the numerically integrated law, also with k
    at its bound d - 0.05, where the density piles up at 0, without a floating-point warning
    (nor in the statistics drawn around it: d - 1 truncated normals per draw, so fewer draws)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_statistics("linf", k, 0.25, d, 2_000, seed=2)
        t = RADII["linf"](k, 0.25, d, 20_000, np.random.default_rng(2))
    assert stats.kstest(t, linf_radius_cdf(k, 0.25, d)).pvalue > 1e-3


@pytest.mark.parametrize("t", [1e-12, 1e-6, 0.5, 3.0])
def test_truncated_normal_follows_its_law_down_to_tiny_widths(t):
    """Against scipy's truncated normal (uniform on [-t, t] where t is far below sigma, which the
    tail formula collapsed to 0 below t ~ 1e-8 sigma)."""
    u = np.random.default_rng(3).random(20_000)
    z = truncated_normal(u, np.full_like(u, t), 1.0)
    law = stats.uniform(-t, 2 * t) if t < 1e-5 else stats.truncnorm(-t, t)
    assert np.abs(z).max() <= t and stats.kstest(z, law.cdf).pvalue > 1e-3


def brute_force_density(norm: str, k: float, scale: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if norm == "l1":
        s = np.abs(a) + np.abs(b)
        return s**-k * np.exp(-s / scale)
    if norm == "l2":
        s = np.hypot(a, b)
        return s**-k * np.exp(-(s**2) / (2 * scale**2))
    return np.maximum(np.abs(a), np.abs(b)) ** -k * np.exp(-(a**2 + b**2) / (2 * scale**2))


def brute_force(
    norm: str, k: float, scale: float, r: float, lams: tuple[float, ...]
) -> list[tuple[float, float, float]]:
    """In two dimensions on a grid offset from the singularity at 0, with delta* = (r, 0) or
    (r, r), for each lambda: D(lambda) = integral (lambda pi0(z) - pi0(z - delta*))_+ dz, and the
    two sides of the symmetry the threshold uses, E[R 1{R <= lambda}] and P(R >= 1/lambda)."""
    h = 0.01
    axis = np.arange(-12 * scale, 12 * scale, h) + h / 2
    x, y = np.meshgrid(axis, axis, indexing="ij")
    shift = (r, 0.0) if norm != "linf" else (r, r)
    base = brute_force_density(norm, k, scale, x, y)
    moved = brute_force_density(norm, k, scale, x - shift[0], y - shift[1])
    total = base.sum()
    ratio = moved / base
    return [
        (
            float(np.maximum(lam * base - moved, 0).sum() / total),
            float(moved[ratio <= lam].sum() / total),
            float(base[ratio >= 1 / lam].sum() / total),
        )
        for lam in lams
    ]


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_monte_carlo_quantities_agree_with_numeric_integration_in_two_dimensions(norm):
    """D(lambda) from the samples against the integral, and E[R 1{R <= lambda}] = P(R >= 1/lambda)
    (pi0's symmetry, which the threshold's tail form rests on) on the grid."""
    k, scale, r = 0.5, 1.0, 0.6
    s = sample_statistics(norm, k, scale, 2, 200_000, seed=3)
    ratio = np.exp(log_ratio(s, r, norm=norm, k=k, scale=scale, dim=2))
    # Not lambda = 1: R = 1 on a line of the grid (x + y = r for l-infinity), split by rounding.
    lams = (0.5, 1.3, 2.0)
    for lam, (discrepancy, truncated_mean, upper_mass) in zip(lams, brute_force(norm, k, scale, r, lams)):
        estimate = np.maximum(lam - ratio, 0)
        assert abs(estimate.mean() - discrepancy) < 5 * estimate.std() / math.sqrt(len(ratio)) + 2e-3, lam
        assert truncated_mean == pytest.approx(upper_mass, abs=2e-3), lam


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        zhang_radius(0.9, norm="l3", k=0, scale=1, dim=4)
    with pytest.raises(ValueError, match=r"k must lie in \[0, d - 0.05\]"):
        zhang_radius(0.9, norm="l2", k=3.99, scale=1, dim=4)
    with pytest.raises(ValueError, match="p_lower"):
        zhang_radius(1.5, norm="l2", k=0, scale=1, dim=4)
    for bad in ({"dim": 3.5}, {"dim": 4.0}, {"n": 1000.5}, {"n": True}):
        with pytest.raises(ValueError, match="must be an integer"):
            zhang_radius(0.9, **{"norm": "l2", "k": 0, "scale": 1, "dim": 4, **bad})
