"""Certificates against independent computations: closed forms, brute-force minimisation,
statsmodels/scipy, and the papers' worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from certlib import certificates as C
from certlib.families import CertifySettings, Votes, make_noise

probs = st.floats(0.0, 1.0, allow_nan=False)
lams = st.floats(0.05, 20.0, allow_nan=False)


# --------------------------------------------------------------------------- DSSN radius


def test_dssn_radius_hand_checked():
    # top 6 vs 2 (class 2 > class 0): floor((6 - 2 - 0)/2) = 2; q = 4 -> 0.5
    assert C.dssn_radius([6, 1, 2, 1], 10, 4) == (0, 0.5)
    # top class 2 vs class 0 (lower index wins ties): floor((5 - 3 - 1)/2) = 0
    assert C.dssn_radius([3, 0, 5], 8, 255) == (2, 0.0)
    # exact tie: the lower index wins, radius 0 (only x itself)
    assert C.dssn_radius([4, 4], 8, 255) == (0, 0.0)
    # all votes on one class
    assert C.dssn_radius([0, 9], 9, 3) == (1, 4 / 3)  # floor((9 - 0 - 1)/2) = 4
    assert C.dssn_radius([9, 0], 9, 3) == (0, 4 / 3)  # floor(9/2) = 4
    assert C.dssn_radius([7], 7, 255) == (0, math.inf)  # one class only: the prediction cannot change


@given(st.lists(st.integers(0, 50), min_size=2, max_size=6), st.data())
def test_dssn_radius_properties(votes, data):
    levels = sum(votes)
    if levels == 0:
        return
    prediction, radius = C.dssn_radius(votes, levels, 255)
    assert votes[prediction] == max(votes) and prediction == votes.index(max(votes))
    k = round(radius * 255)
    # Definition: the top class still wins (tie rule included) when k votes move to any class...
    for b, vb in enumerate(votes):
        if b != prediction:
            assert votes[prediction] - k > vb + k or (votes[prediction] - k == vb + k and prediction < b)
    # ...and k is the largest such integer.
    assert any(
        not (votes[prediction] - k - 1 > vb + k + 1 or (votes[prediction] - k - 1 == vb + k + 1 and prediction < b))
        for b, vb in enumerate(votes)
        if b != prediction
    )
    # Monotone: moving a vote from another class to the top class never shrinks the radius.
    donors = [b for b, vb in enumerate(votes) if b != prediction and vb > 0]
    if donors:
        b = data.draw(st.sampled_from(donors))
        moved = list(votes)
        moved[b] -= 1
        moved[prediction] += 1
        assert C.dssn_radius(moved, levels, 255)[1] >= radius


@pytest.mark.parametrize(
    "votes,levels,message",
    [
        ([3, 4], 8, "sum to"),
        ([-1, 9], 8, "non-negative"),
        ([1.5, 6.5], 8, "integer"),
        ([4, 4], 0, "levels"),
        ([[4, 4, 0]], 8, None),
        ([np.nan, 8], 8, "integer"),
    ],
)
def test_dssn_radius_rejects_bad_votes(votes, levels, message):
    if message is None:
        C.dssn_radius(votes, levels)
        return
    with pytest.raises(ValueError, match=message):
        C.dssn_radius(votes, levels)


# --------------------------------------------------------------------------- Clopper-Pearson


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (99_000, 100_000), (64, 64)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_one_sided_convention(k, n, alpha):
    low, high = C.clopper_pearson_lower(k, n, alpha), C.clopper_pearson_upper(k, n, alpha)
    central = proportion_confint(k, n, alpha=2 * alpha, method="beta")
    if 0 < k:
        assert low == pytest.approx(central[0], rel=1e-12)
        # Independent: the lower bound p solves P[Binomial(n, p) >= k] = alpha.
        assert stats.binom.sf(k - 1, n, low) == pytest.approx(alpha, rel=1e-6)
    else:
        assert low == 0
    if k < n:
        assert high == pytest.approx(central[1], rel=1e-12)
        assert stats.binom.cdf(k, n, high) == pytest.approx(alpha, rel=1e-6)
    else:
        assert high == 1
    assert low <= k / n <= high


def test_clopper_pearson_rejects_bad_input():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        C.clopper_pearson_lower(11, 10, 0.001)
    with pytest.raises(ValueError, match="alpha"):
        C.clopper_pearson_upper(1, 10, 0.7)


# --------------------------------------------------------------------------- uniform / SSN L1


def test_l1_uniform_radius_closed_forms():
    assert C.l1_uniform_radius(0.9, 2.0) == pytest.approx(2 * 2.0 * 0.4)
    assert C.l1_uniform_radius(0.6, 1.5, 0.3) == pytest.approx(1.5 * 0.3)
    assert np.isnan(C.l1_uniform_radius(0.5, 1.0))
    assert np.isnan(C.l1_uniform_radius(0.3, 1.0, 0.3))
    # binary = multiclass with p_B = 1 - p_A
    assert C.l1_uniform_radius(0.8, 1.3) == pytest.approx(C.l1_uniform_radius(0.8, 1.3, 0.2))


@given(probs, probs, lams)
def test_l1_uniform_radius_properties(p_a, p_b, lam):
    r = C.l1_uniform_radius(p_a, lam)
    assert np.isnan(r) == (p_a <= 0.5)
    assert np.isnan(r) or 0 <= r <= lam
    rm = C.l1_uniform_radius(p_a, lam, p_b)
    assert np.isnan(rm) == (p_a <= p_b)
    assert C.l1_uniform_radius(min(1.0, p_a + 0.01), lam) >= r or np.isnan(r)


@pytest.mark.parametrize(
    "bad", [dict(p_a_lower=1.2, lam=1.0), dict(p_a_lower=0.9, lam=0.0), dict(p_a_lower=np.nan, lam=1.0)]
)
def test_l1_uniform_radius_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        C.l1_uniform_radius(**bad)


# --------------------------------------------------------------------------- box constraints


def overlap_piecewise(c: float, lam: float) -> float:
    """Prop. 2.5's exact piecewise bound, with each factor clipped at 0."""
    full, frac = math.floor(c), c - math.floor(c)
    return max(0.0, 1 - 1 / (2 * lam)) ** full * max(0.0, 1 - frac / (2 * lam))


def brute_force_min_overlap(x: np.ndarray, c: float, lam: float, steps: int = 60) -> float:
    """min over y in [0,1]^d with ||y - x||_1 <= c of prod_i max(0, 1 - |y_i - x_i|/(2 lam)),
    by enumerating a grid of y (d <= 3); the overlap of two l_inf balls of radius lam."""
    axes = np.meshgrid(*[np.linspace(0, 1, steps + 1)] * len(x), indexing="ij")
    delta = np.abs(np.stack([a.ravel() for a in axes], axis=1) - x)
    inside = delta.sum(axis=1) <= c + 1e-12
    return float(np.prod(np.clip(1 - delta[inside] / (2 * lam), 0, None), axis=1).min())


def test_voracek_hein_example_2_9():
    """x = (0.4, 0.6), lambda = 1, h(x) = 0.88: radius 0.8 certified by Theorem 2.8, not by Cor. 2.4."""
    x = np.array([0.4, 0.6])
    assert C.l1_uniform_radius(0.88, 1.0) < 0.8
    assert C.l1_box_radius(0.88, 1.0, x=x) >= 0.8
    # the overlap at c = 0.8: 0.63 with box constraints (Theorem 2.8), 0.6 without (Prop. 2.2)
    assert brute_force_min_overlap(x, 0.8, 1.0, steps=100) == pytest.approx(0.63, abs=1e-9)


@pytest.mark.parametrize("lam", [0.3, 0.5, 0.75, 1.0, 2.5, 6.0])
@pytest.mark.parametrize("p_a", [0.55, 0.7, 0.88, 0.97, 0.999])
def test_box_radius_grid_free_is_the_exact_piecewise_bound(lam, p_a):
    r = float(C.l1_box_radius(p_a, lam))
    tau = 1.5 - p_a
    assert overlap_piecewise(r, lam) == pytest.approx(tau, abs=1e-9)  # tight at the radius
    assert overlap_piecewise(r + 1e-6, lam) < tau  # and nothing larger holds
    assert r >= C.l1_uniform_radius(p_a, lam) - 1e-12
    if 2 * lam > 1 and p_a > 0.5:  # Cor. 2.7's closed form is the looser relaxation
        assert r >= math.log(1.5 - p_a) / math.log(1 - 1 / (2 * lam)) - 1e-12


@pytest.mark.parametrize("x", [[0.0, 0.0], [0.4, 0.6], [0.1, 0.5, 0.9], [1.0, 0.3, 0.2]])
@pytest.mark.parametrize("lam", [0.6, 1.0, 1.7])
def test_box_radius_input_dependent_against_brute_force(x, lam):
    x = np.array(x)
    for p_a in (0.6, 0.75, 0.9):
        r = float(C.l1_box_radius(p_a, lam, x=x))
        tau = 1.5 - p_a
        if math.isinf(r):  # the certified ball covers the whole box
            assert brute_force_min_overlap(x, len(x), lam) >= tau
            continue
        assert brute_force_min_overlap(x, r, lam) >= tau - 1e-9  # the certified radius holds
        assert brute_force_min_overlap(x, r + 0.05, lam) < tau  # and is (nearly) tight
        assert r >= C.l1_box_radius(p_a, lam) - 1e-12 >= C.l1_uniform_radius(p_a, lam) - 1e-12


def test_box_radius_at_a_corner_equals_the_grid_free_bound():
    """Theorem 2.8 with x at a corner of the box (every coordinate can move by 1) is Prop. 2.5."""
    p = np.array([0.6, 0.8, 0.95, 0.999])
    np.testing.assert_allclose(
        C.l1_box_radius(p, 2.0, x=np.zeros((4, 3072))),
        C.l1_box_radius(p, 2.0),
        rtol=1e-12,
    )


@settings(max_examples=300)
@given(probs, probs, lams)
def test_box_radius_never_below_plain(p_a, p_b, lam):
    for pb in (None, p_b):
        plain, box = C.l1_uniform_radius(p_a, lam, pb), C.l1_box_radius(p_a, lam, pb)
        assert np.isnan(plain) == np.isnan(box)
        assert np.isnan(box) or box >= plain - 1e-9


def test_box_radius_multiclass_and_refusals():
    # lambda < 0.5: the box bound is the plain one
    assert C.l1_box_radius(0.6, 0.4, 0.3) == pytest.approx(C.l1_uniform_radius(0.6, 0.4, 0.3))
    assert np.isnan(C.l1_box_radius(0.3, 2.0, 0.35))
    # Box radii hold for independent coordinates only (Theorem 2.11): the families guard it.
    dssn = make_noise("dssn", 0.5, q=255)
    with pytest.raises(ValueError, match="'box' certificate does not apply to dssn"):
        dssn.certify(Votes(np.array([[200, 1]])), CertifySettings(certificate="box"))
    with pytest.raises(ValueError, match="pixel scale"):
        C.l1_box_radius(0.9, 2.0, x=np.array([1.5, 0.2]))


# --------------------------------------------------------------------------- Gaussian L2, Laplace L1


def test_l2_gaussian_radius():
    assert C.l2_gaussian_radius(0.9, 0.5) == pytest.approx(0.5 * stats.norm.ppf(0.9))
    assert C.l2_gaussian_radius(0.9, 0.5) == pytest.approx(C.l2_gaussian_radius(0.9, 0.5, 0.1))
    assert C.l2_gaussian_radius(0.7, 1.0, 0.2) == pytest.approx((stats.norm.ppf(0.7) - stats.norm.ppf(0.2)) / 2)
    assert np.isnan(C.l2_gaussian_radius(0.5, 1.0)) and np.isnan(C.l2_gaussian_radius(0.4, 1.0, 0.45))


@given(st.floats(0.5001, 0.9999), st.floats(0.05, 5.0))
def test_laplace_radius_matches_zhang_corollary_1(p, b):
    """Zhang et al. Eq. 7: the lower bound 1 - e^(r/b)(1 - p) on the smoothed probability at
    distance r equals 1/2 exactly at the certified radius, and a 1-d half-space classifier
    (which attains the bound) flips there."""
    r = float(C.l1_laplace_radius(p, b))
    assert 1 - math.exp(r / b) * (1 - p) == pytest.approx(0.5, abs=1e-9)
    threshold = stats.laplace.ppf(1 - p, scale=b)  # f(z) = [z > threshold]: P = p at x = 0
    assert stats.laplace.sf(threshold + r, scale=b) == pytest.approx(0.5, abs=1e-9)


def test_laplace_radius_abstains():
    assert np.isnan(C.l1_laplace_radius(0.5, 1.0))


# --------------------------------------------------------------------------- Monte Carlo CERTIFY


def test_monte_carlo_certify_binary_and_multiclass():
    counts0 = np.array([[60, 4, 0], [10, 30, 24], [0, 0, 64]])
    counts = np.array([[9_900, 100, 0], [4_000, 3_000, 3_000], [0, 10, 9_990]])
    radius = lambda p_a, p_b: C.l1_uniform_radius(p_a, 1.0, p_b)  # noqa: E731
    binary = C.monte_carlo_certify(counts0, counts, 0.001, radius)
    assert binary["selected"].tolist() == [0, 1, 2]
    assert binary["prediction"].tolist() == [0, -1, 2]  # image 1: class 1 holds 30% only
    assert np.isnan(binary["radius"][1]) and np.isnan(binary["p_b_upper"]).all()
    assert binary["p_a_lower"][0] == pytest.approx(C.clopper_pearson_lower(9_900, 10_000, 0.001))
    multi = C.monte_carlo_certify(counts0, counts, 0.001, radius, multiclass=True)
    assert multi["p_a_lower"][0] == pytest.approx(C.clopper_pearson_lower(9_900, 10_000, 0.0005))
    assert multi["p_b_upper"][0] == pytest.approx(C.clopper_pearson_upper(100, 10_000, 0.0005))
    assert multi["p_b_upper"][2] == pytest.approx(C.clopper_pearson_upper(10, 10_000, 0.0005))
    assert multi["prediction"].tolist() == [0, -1, 2]


# --------------------------------------------------------------------------- Cohen Theorem 5


def test_certified_accuracy_lower_bound():
    m, alpha, rho = 500, 0.001, 0.001
    y = 300
    expected = (
        y / m - alpha - math.sqrt(2 * alpha * (1 - alpha) * math.log(1 / rho) / m) - math.log(1 / rho) / (3 * m)
    ) / (1 - alpha)
    assert C.certified_accuracy_lower_bound(y, m, alpha, rho) == pytest.approx(expected)
    assert C.certified_accuracy_lower_bound(y, m, alpha, rho) < y / m
    assert C.certified_accuracy_lower_bound(0, m, alpha, rho) == 0
    with pytest.raises(ValueError):
        C.certified_accuracy_lower_bound(600, m, alpha, rho)


def test_box_radius_never_rounds_above_the_supremum():
    """Found in review: the closed-form inversion landed on 5.0 where the exact supremum is
    4.99999999999999665 (60-digit arithmetic); the returned radius must stay below it."""
    assert C.l1_box_radius(0.9978168866142979, 3.8852889664714354) < 5.0
    assert C.l1_box_radius(0.9978168866142979, 3.8852889664714354, x=np.zeros(64)) < 5.0


@settings(max_examples=500)
@given(st.floats(0.5001, 0.99999), st.floats(0.55, 50.0))
def test_box_radius_bound_holds_at_the_returned_radius(p_a, lam):
    r = float(C.l1_box_radius(p_a, lam))
    full = math.floor(r)
    overlap = (1 - 1 / (2 * lam)) ** full * (1 - (r - full) / (2 * lam))
    if r > C.l1_uniform_radius(p_a, lam):  # above the plain radius the box bound holds exactly in floats
        assert overlap >= 1.5 - p_a
    else:  # at the plain radius itself, to rounding
        assert overlap >= 1.5 - p_a - 1e-12
