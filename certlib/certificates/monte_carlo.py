"""Cohen et al. 2019's CERTIFY from the two count vectors of the n0 selection and n estimation
samples, with a family's radius function."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from certlib.certificates.bounds import clopper_pearson_lower, clopper_pearson_upper
from certlib.certificates.inputs import level

ABSTAIN = -1


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
    alpha = level(alpha)
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
