"""Certificates: pure, vectorised functions from votes, counts or probability bounds to
predictions and certified radii, one per paper equation. The math floor of the library: numpy,
scipy and statsmodels only (no torch, no family registry).

| module | holds |
|---|---|
| ``radii`` | closed-form radii: DSSN (exact), uniform/SSN, Gaussian, Laplace |
| ``box`` | Voracek & Hein 2023's box-constrained L1 radii |
| ``dual`` | Zhang et al. 2020's dual certificate for their families |
| ``bounds`` | Clopper-Pearson bounds, Cohen et al.'s Theorem 5 |
| ``monte_carlo`` | Cohen et al.'s CERTIFY from counts |
| ``rounding``, ``inputs`` | directed rounding, argument checks |

Conventions:

* Radii are in pixel scale (images in [0, 1]^d): an L1 radius r certifies every x' with
  ||x' - x||_1 <= r (DSSN: inclusive, by the tie rule) or < r (Monte Carlo, continuous domain).
* Abstain is explicit: a prediction of ``ABSTAIN`` (-1) and a radius of NaN. A radius function
  returns NaN wherever its bound cannot certify anything; it never returns a negative radius.
* ``alpha`` is always the one-sided failure probability of a bound.
* Predictions break ties toward the lower class index.
* A Monte Carlo radius is never above the exact value of its formula for the float inputs
  (p_a_lower, p_b_upper, lambda, sigma, b and x taken as exact reals), not even by an ulp: each
  closed form is lowered by a bound on its floating-point error. Rational ones are rounded toward
  -inf (error-free transformations: the binary plain uniform radius is the largest double at or
  below its exact value) or, where they sum and multiply many terms (``box``), lowered
  by first-order bounds on the rounding error; transcendental ones (Gaussian, Laplace) by a relative
  margin of 1e-12, some 1000 times the error of the library functions. +inf only where the exact
  radius is infinite. DSSN radii k/q are the nearest double instead (see ``dssn_radius``).

Zhang et al. 2020's dual certificate (``zhang_radius``) needs a Monte Carlo estimate behind a
precomputed radius curve (``dual``).
"""

from certlib.certificates.bounds import (
    certified_accuracy_lower_bound,
    clopper_pearson_lower,
    clopper_pearson_upper,
)
from certlib.certificates.box import l1_box_radius
from certlib.certificates.dual import zhang_radius
from certlib.certificates.monte_carlo import ABSTAIN, monte_carlo_certify
from certlib.certificates.radii import dssn_radius, l1_laplace_radius, l1_uniform_radius, l2_gaussian_radius

__all__ = [
    "ABSTAIN",
    "certified_accuracy_lower_bound",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "dssn_radius",
    "l1_box_radius",
    "l1_laplace_radius",
    "l1_uniform_radius",
    "l2_gaussian_radius",
    "monte_carlo_certify",
    "zhang_radius",
]
