"""Cohen et al. 2019's CERTIFY from the two count vectors of the n0 selection and n estimation
samples, with a family's radius function."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from certlib.certificates.bounds import clopper_pearson_lower, clopper_pearson_upper
from certlib.certificates.inputs import level
from certlib.certificates.sequences import sequence_lower, sequence_upper

ABSTAIN = -1


def probability_bounds(
    counts, selected, alpha: float, multiclass: bool, sequential: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """(p_A lower bound, p_B upper bound or None) from the estimation ``counts`` (N, C) of the
    ``selected`` classes c_A. Fixed n: Clopper-Pearson; binary at level alpha, multiclass with
    alpha split between p_A and the runner-up class c_B (Voracek & Hein Algorithm 1).
    Sequential (counts at a data-dependent stopping time): the anytime-valid mixture sequence
    (``sequences.confidence_sequence``); multiclass splits alpha/2 for p_A and alpha/2 over the
    C - 1 other classes (the runner-up is chosen by the data at a data-dependent time, so every
    other class is bounded and the largest upper bound taken)."""
    c = np.atleast_2d(np.asarray(counts, dtype=np.int64))
    rows = np.arange(len(c))
    n = c.sum(axis=1)
    top = c[rows, selected]
    if not sequential:
        if not multiclass:
            return clopper_pearson_lower(top, n, alpha), None
        others = c.copy()
        others[rows, selected] = -1
        runner_up = others.argmax(axis=1)
        return clopper_pearson_lower(top, n, alpha / 2), clopper_pearson_upper(c[rows, runner_up], n, alpha / 2)
    if not multiclass:
        return sequence_lower(top, n, alpha), None
    classes = c.shape[1]
    upper = sequence_upper(c, n[:, None], alpha / (2 * max(1, classes - 1)))
    upper[rows, selected] = 0.0
    return sequence_lower(top, n, alpha / 2), upper.max(axis=1)


def monte_carlo_certify(
    counts_selection,
    counts_estimation,
    alpha: float,
    radius: Callable[..., np.ndarray],
    multiclass: bool = False,
    sequential: bool = False,
) -> dict[str, np.ndarray]:
    """Cohen et al. 2019 CERTIFY (Appendix C.2) from the two count vectors.

    The n0 selection counts pick the class c_A (ties to the lower index); the n estimation
    counts bound its probability (``probability_bounds``): binary, p_A_lower at level alpha and
    p_B = 1 - p_A (implicit); multiclass, p_A_lower and p_B_upper with alpha split between
    them. ``sequential``: the estimation counts were stopped adaptively, so the bounds are the
    anytime-valid sequence's, not Clopper-Pearson's (which optional stopping would
    invalidate). ``radius(p_a_lower, p_b_upper_or_None)`` is the noise's certificate. Where it
    returns NaN the prediction is ABSTAIN.

    Returns arrays: selected (c_A, the n0 choice, also for clean accuracy), prediction
    (c_A or -1), radius (NaN on abstain), p_a_lower, p_b_upper (NaN in binary mode), n (the
    estimation samples of each image).
    """
    c0 = np.atleast_2d(np.asarray(counts_selection, dtype=np.int64))
    c = np.atleast_2d(np.asarray(counts_estimation, dtype=np.int64))
    if c0.shape != c.shape:
        raise ValueError(f"selection counts {c0.shape} and estimation counts {c.shape} differ in shape")
    alpha = level(alpha)
    selected = c0.argmax(axis=1)
    p_a, p_b = probability_bounds(c, selected, alpha, multiclass, sequential)
    r = np.asarray(radius(p_a, p_b), dtype=np.float64)
    prediction = np.where(np.isnan(r), ABSTAIN, selected)
    p_b = np.full(len(c), np.nan) if p_b is None else p_b
    return {
        "selected": selected,
        "prediction": prediction,
        "radius": r,
        "p_a_lower": p_a,
        "p_b_upper": p_b,
        "n": c.sum(axis=1),
    }
