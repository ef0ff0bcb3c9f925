"""Monte Carlo radii are never above the exact value of their formula for the float inputs, and
within a tiny margin of it (so that a radius made trivially small fails too).

Box radii (Voracek & Hein 2023) are checked against the exact supremum in rational arithmetic,
written here from the paper's definitions (Theorem 2.8's overlap as a piecewise-linear function of
the L1 distance c; Prop. 2.5 is its case of reach 1 in every one of infinitely many coordinates);
uniform radii against fractions; Gaussian and Laplace radii against mpmath at 50 digits."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certlib import certificates as C
from certlib.certificates import rounding

TIGHT = 1e-12  # a radius may sit this far below the exact one, relative to 2 lambda + the radius
STEP = 2.0**-53  # the spacing of doubles in [1/2, 1)

P_GRID = [0.5 + STEP, 0.5 + 2 * STEP, 0.5 + 1e-12, 0.5 + 1e-6, 0.51, 0.55, 0.6, 0.625, 0.7, 0.75, 0.8]
P_GRID += [0.88, 0.9, 0.95, 0.97, 0.99, 0.999, 0.9978168866142979, 1 - 1e-9, 1 - 2 * STEP, 1 - STEP, 1.0]
LAM_GRID = [0.05, 0.3, 0.5 - STEP / 2, 0.5, 0.5 + STEP, 0.6, 0.75, 1 - STEP, 1.0, 1 + 2 * STEP]
LAM_GRID += [1.5, 2.0, 3.0, 3.8852889664714354, 5.0, 12 * math.sqrt(3), 50.0]
X_VALUES = [0.0, 2.0**-60, 1e-17, 0.1, 74 / 255, 0.25 - 2.0**-55, 0.25, 1 / 3, 0.5 - 2.0**-54, 0.5]
X_VALUES += [0.5 + STEP, 0.6, 2 / 3, 0.75, 1 - STEP, 1.0]


# --------------------------------------------------------------------------- the exact reference


def reaches_of(x: Iterable[float] | None) -> Iterable[Fraction]:
    """How far each coordinate can move inside [0, 1], largest first (Theorem 2.8's order);
    without an image, reach 1 in as many coordinates as needed (Prop. 2.5)."""
    if x is None:
        return itertools.repeat(Fraction(1))
    return sorted((max(Fraction(v), 1 - Fraction(v)) for v in x), reverse=True)


def overlap(c: Fraction, reaches: Iterable[Fraction], lam: Fraction) -> Fraction:
    """Theorem 2.8: the product of 1 - reach/(2 lam) (at least 0) over the T coordinates moved
    fully within distance c, times 1 - U/(2 lam) for the remainder U; the whole box past them."""
    value, spent = Fraction(1), Fraction(0)
    for reach in reaches:
        if spent + reach > c:
            return value * max(Fraction(0), 1 - (c - spent) / (2 * lam))
        value *= max(Fraction(0), 1 - reach / (2 * lam))
        spent += reach
    return value


def exact_supremum(tau: Fraction, lam: Fraction, reaches: Iterable[Fraction]) -> Fraction | float:
    """sup{c >= 0 : overlap(c) > tau}: the overlap is continuous, non-increasing and linear between
    the breakpoints, so find the first piece that ends at or below tau and solve it for tau."""
    value, spent = Fraction(1), Fraction(0)
    for reach in reaches:
        end = value * max(Fraction(0), 1 - reach / (2 * lam))
        if end <= tau:
            return spent + 2 * lam * (1 - tau / value)
        value, spent = end, spent + reach
    return math.inf


def target(p_a: float, p_b: float | None) -> Fraction:
    """Prop. 2.1 (binary) / 2.12 (multiclass): the overlap needed to keep the prediction."""
    if p_b is None:
        return Fraction(3, 2) - Fraction(p_a)
    return 1 - (Fraction(p_a) - Fraction(p_b)) / 2


def box(p_a, lam, p_b=None, x=None):
    return C.l1_box_radius(p_a, lam, p_b, x=x)


def check_box(radius: float, p_a: float, lam: float, p_b: float | None = None, x=None) -> None:
    exact = exact_supremum(target(p_a, p_b), Fraction(lam), reaches_of(x))
    context = (p_a, p_b, lam, None if x is None else list(x), radius, exact)
    assert not math.isnan(radius) and radius >= 0, context
    if exact == math.inf:  # +inf, or the last piece's finite line where P_d is within rounding of tau
        spent = sum(reaches_of(x), Fraction(0))
        assert radius == math.inf or Fraction(radius) >= spent - TIGHT * (2 * lam + spent), context
        return
    assert radius != math.inf and Fraction(radius) <= exact, context
    assert exact - Fraction(radius) <= TIGHT * (2 * lam + exact), context


# --------------------------------------------------------------------------- box: the reported cases


def test_grid_free_case_of_the_audit():
    """The exact supremum is 1 + 6 (1 - 0.75 / (5/6)) = 8/5; the double nearest to it is above."""
    assert exact_supremum(Fraction(3, 4), Fraction(3), reaches_of(None)) == Fraction(8, 5)
    radius = float(box(0.75, 3.0))
    assert Fraction(radius) < Fraction(8, 5) < Fraction(1.6)
    assert radius > 1.6 - 1e-12


def test_input_dependent_case_the_old_code_called_infinite():
    """x = 74/255 and lambda = 0.75: the factor of the one coordinate, in floats, lands above
    tau = 1.5 - p_A, which was the smallest double at or above its exact value: the old code
    certified the whole box, but the exact supremum is finite."""
    x, lam, p_a = np.array([74 / 255]), 0.75, 0.973202614379085
    reach = 1 - Fraction(x[0])
    assert 1 - reach / (2 * Fraction(lam)) <= target(p_a, None)  # the far corner is not certified
    exact = exact_supremum(target(p_a, None), Fraction(lam), reaches_of(x))
    assert exact != math.inf
    check_box(float(box(p_a, lam, x=x)), p_a, lam, x=x)


def test_review_case_below_five():
    """Exact supremum 4.99999999999999665 (the closed form landed on 5.0)."""
    for x in (None, np.zeros(64)):
        check_box(float(box(0.9978168866142979, 3.8852889664714354, x=x)), 0.9978168866142979, 3.8852889664714354)


def test_the_reference_solves_the_overlap_equation():
    """The reference against Theorem 2.8's overlap itself: tau at the supremum, above it before."""
    for x, lam, p_a in [(None, 3.0, 0.75), ([0.4, 0.6], 1.0, 0.88), ([0.1, 0.5, 0.9], 0.6, 0.7), ([0.0], 0.5, 0.9)]:
        tau, lam_q = target(p_a, None), Fraction(lam)
        exact = exact_supremum(tau, lam_q, reaches_of(x))
        assert overlap(exact, reaches_of(x), lam_q) == tau
        assert overlap(exact * (1 - Fraction(1, 10**9)), reaches_of(x), lam_q) > tau
        assert overlap(exact * (1 + Fraction(1, 10**9)), reaches_of(x), lam_q) < tau
    assert exact_supremum(Fraction(1, 2), Fraction(20), reaches_of([0.5, 0.5])) == math.inf  # 0.9875^2 > 1/2
    assert overlap(Fraction(5), reaches_of([0.5, 0.5]), Fraction(20)) == Fraction(79, 80) ** 2


# --------------------------------------------------------------------------- box: dense grids


@pytest.mark.parametrize("lam", LAM_GRID)
def test_grid_free_radius_on_a_dense_grid(lam):
    for p_a, radius in zip(P_GRID, box(np.array(P_GRID), lam)):
        check_box(float(radius), p_a, lam)
    pairs = [(a, b) for a in [3 * 2.0**-1074, 1e-9, 0.3, 0.5, 0.75, 0.999, 1.0] for b in [0.0, 1e-300, 0.1, 0.29]]
    pairs += [(a, math.nextafter(a, 0)) for a in (0.3, 0.75, 1.0)] + [(a, 1 - a) for a in P_GRID]
    pairs = [(a, b) for a, b in pairs if a > b]
    p_a, p_b = np.array(pairs).T
    for (a, b), radius in zip(pairs, box(p_a, lam, p_b)):
        check_box(float(radius), a, lam, b)


def test_input_dependent_radius_on_a_dense_grid():
    shuffle = random.Random(0)
    images = [(v,) for v in X_VALUES] + list(itertools.combinations_with_replacement(X_VALUES, 2))
    images += [tuple(shuffle.choice(X_VALUES) for _ in range(d)) for d in (3, 4) for _ in range(40)]
    for lam in [0.3, 0.5, 0.6, 0.75, 1.0, 1.7, 5.0, 20.0]:
        for d in (1, 2, 3, 4):
            rows = [(x, p) for x in images if len(x) == d for p in (0.5 + STEP, 0.6, 0.75, 0.88, 0.97, 1.0)]
            radii = box(np.array([p for _, p in rows]), lam, x=np.array([x for x, _ in rows]))
            for (x, p), radius in zip(rows, radii):
                check_box(float(radius), p, lam, x=x)


def nearby_doubles(value: Fraction) -> list[float]:
    nearest = float(value)
    return [math.nextafter(nearest, -math.inf), nearest, math.nextafter(nearest, math.inf)]


def test_input_dependent_radius_where_the_far_corner_is_at_the_target():
    """tau within an ulp or two of the overlap left after moving every coordinate fully, P_d:
    +inf only where P_d > tau exactly, else a finite radius at most the exact one."""
    cases = 0
    for d in (1, 2, 3, 4):
        images = itertools.combinations_with_replacement(X_VALUES[::2] + [0.03, 0.97], d)
        for x in itertools.islice(images, 0, None, 2 * d - 1):
            for lam in (0.75, 2.5, 7.25):
                whole = overlap(Fraction(d), reaches_of(x), Fraction(lam))
                taus = [t for t in nearby_doubles(whole) if 0.5 <= t < 1]
                for tau in taus:  # binary (p_A = 1.5 - tau) and multiclass (p_B = 0, p_A = 2 - 2 tau), exact
                    check_box(float(box(1.5 - tau, lam, x=np.array(x))), 1.5 - tau, lam, x=x)
                    check_box(float(box(2 - 2 * tau, lam, 0.0, x=np.array(x))), 2 - 2 * tau, lam, 0.0, x=x)
                    cases += 1
    assert cases > 200


x_values = st.one_of(st.floats(0.0, 1.0), st.sampled_from(X_VALUES))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.floats(0.5, 1.0), st.sampled_from(P_GRID)),
    st.one_of(st.none(), st.floats(0.0, 0.5)),
    st.one_of(st.floats(0.05, 60.0), st.sampled_from(LAM_GRID)),
    st.one_of(st.none(), st.lists(x_values, min_size=1, max_size=4)),
)
def test_box_radius_never_above_the_exact_supremum(p_a, p_b, lam, x):
    radius = float(box(p_a, lam, p_b, x=None if x is None else np.array(x)))
    if (p_a <= 0.5) if p_b is None else (p_a <= p_b):
        assert math.isnan(radius)
        return
    check_box(radius, p_a, lam, p_b, x=x)


# --------------------------------------------------------------------------- uniform


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(0.5, 1.0), st.sampled_from(P_GRID)), st.floats(0.0, 1.0), st.floats(1e-3, 1e3))
def test_uniform_radius_never_above_the_exact_value(p_a, p_b, lam):
    binary, multiclass = float(C.l1_uniform_radius(p_a, lam)), float(C.l1_uniform_radius(p_a, lam, p_b))
    if p_a > 0.5:  # the largest double at or below 2 lam (p_A - 1/2)
        exact = 2 * Fraction(lam) * (Fraction(p_a) - Fraction(1, 2))
        assert Fraction(binary) <= exact < Fraction(math.nextafter(binary, math.inf))
    if p_a > p_b:  # at most two ulps below lam (p_A - p_B)
        exact = Fraction(lam) * (Fraction(p_a) - Fraction(p_b))
        assert 0 <= Fraction(multiclass) <= exact
        assert exact - Fraction(multiclass) <= 4 * STEP * exact + Fraction(2.0**-1074)


def test_uniform_radius_on_a_dense_grid():
    for lam in LAM_GRID:
        radius = C.l1_uniform_radius(np.array(P_GRID), lam)
        for p_a, r in zip(P_GRID, radius):
            exact = 2 * Fraction(lam) * (Fraction(p_a) - Fraction(1, 2))
            assert Fraction(float(r)) <= exact < Fraction(math.nextafter(float(r), math.inf))
    # Rounded to nearest, 2 * 1.5 * (0.9 - 0.5) and 1.0 * (0.7 - 0.1) land above the exact value.
    assert C.l1_uniform_radius(0.9, 1.5) == 1.2 < 2 * 1.5 * (0.9 - 0.5)
    assert Fraction(1.2) < 3 * (Fraction(0.9) - Fraction(1, 2)) < Fraction(2 * 1.5 * (0.9 - 0.5))
    assert C.l1_uniform_radius(0.7, 1.0, 0.1) < 0.6 == 1.0 * (0.7 - 0.1)
    assert Fraction(0.7) - Fraction(0.1) < Fraction(0.6)


# --------------------------------------------------------------------------- Gaussian and Laplace


def exact_quantile(p: float) -> mpmath.mpf:
    """Phi^-1(p) at 50 digits: the root of the normal CDF, solved in the lower tail, where the
    CDF is small and keeps its relative precision (1 - p is exact for p in [1/2, 1])."""
    if p > 0.5:
        return -exact_quantile(1 - p)
    with mpmath.workdps(50):
        level = mpmath.log(mpmath.mpf(p))  # in logs: far in the tail the CDF itself is ~1e-300
        start = -math.sqrt(-2 * math.log(p)) if p < 0.1 else 0.0
        root = mpmath.findroot(lambda t: mpmath.log(mpmath.ncdf(t)) - level, start)
        assert abs(mpmath.ncdf(root) / p - 1) < 1e-40
        return root


G_GRID = [0.5 + k * STEP for k in (1, 2, 3)] + [0.5 + 1e-15, 0.5 + 1e-12, 0.5 + 1e-9, 0.5 + 1e-6, 0.501]
G_GRID += [0.55, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95, 0.99, 0.999, 1 - 1e-6, 1 - 1e-9, 1 - 1e-12, 1 - 1e-15]
G_GRID += [1 - k * STEP for k in (3, 2, 1)]
SCALES = [1e-3, 0.12, 0.25, 0.5, 1.0, 3.5, 1e3]


def assert_below_and_close(radius: float, exact, scale) -> None:
    with mpmath.workdps(50):
        assert mpmath.mpf(radius) <= exact, (radius, exact)
        assert exact - mpmath.mpf(radius) <= 1e-9 * scale, (radius, exact)


def test_gaussian_radius_never_above_mpmath():
    for sigma in SCALES:
        for p, r in zip(G_GRID, C.l2_gaussian_radius(np.array(G_GRID), sigma)):
            exact = sigma * exact_quantile(p)
            assert_below_and_close(float(r), exact, exact)
    pairs = [(a, b) for a in G_GRID[::3] + [0.3, 0.45] for b in [5e-324, 1e-300, 1e-12, 0.001, 0.1, 0.3, 1 - a]]
    pairs += [(a, math.nextafter(a, 0)) for a in (0.3, 0.5, 0.9)]
    pairs = [(a, b) for a, b in pairs if a > b]
    for sigma in (0.25, 1.0):
        radius = C.l2_gaussian_radius(np.array([a for a, _ in pairs]), sigma, np.array([b for _, b in pairs]))
        for (a, b), r in zip(pairs, radius):
            qa, qb = exact_quantile(a), exact_quantile(b)
            assert_below_and_close(float(r), sigma / 2 * (qa - qb), sigma / 2 * (abs(qa) + abs(qb)))
    assert C.l2_gaussian_radius(1.0, 0.5) == math.inf and C.l2_gaussian_radius(0.6, 0.5, 0.0) == math.inf


def test_laplace_radius_never_above_mpmath():
    for b in SCALES:
        for p, r in zip(G_GRID, C.l1_laplace_radius(np.array(G_GRID), b)):
            with mpmath.workdps(50):
                exact = -b * mpmath.log(2 * (1 - mpmath.mpf(p)))
            assert_below_and_close(float(r), exact, exact)
    assert C.l1_laplace_radius(1.0, 1.0) == math.inf


# --------------------------------------------------------------------------- directed rounding


finite = st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(finite, finite)
def test_directed_rounding_against_fractions(a, b):
    difference, product = float(rounding.sub_down(a, b)), float(rounding.mul_down(a, b))
    exact = Fraction(a) - Fraction(b)
    assert Fraction(difference) <= exact < Fraction(math.nextafter(difference, math.inf))
    exact = Fraction(a) * Fraction(b)
    if abs(exact) < 1e300:
        assert Fraction(product) <= exact
    if all(2.0**-400 < abs(v) < 2.0**400 for v in (a, b, a * b)):  # Dekker's product is exact here
        assert exact < Fraction(math.nextafter(product, math.inf))
