"""The authors' published per-image CIFAR-10 outputs (the raw numbers behind Table 1 of
Levine & Feizi 2021) reproduced by certlib's certificates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from certlib.certificates import dssn_radius, l1_uniform_radius
from certlib.families import DSSNNoise
from tests.helpers import RADII, TABLE_1


def test_levels_follow_the_authors_convention(dssn_paper):
    rows = dssn_paper[dssn_paper.method == "dssn"][["sigma", "lambda", "levels"]].drop_duplicates()
    for sigma, _, levels in rows.itertuples(index=False):
        noise = DSSNNoise(sigma, q=255)
        assert noise.levels == levels
        assert noise.lam == levels / 510


def test_dssn_radius_reproduces_all_published_dssn_rows(dssn_paper):
    dssn = dssn_paper[dssn_paper.method == "dssn"]
    assert len(dssn) == 300_000
    for levels, group in dssn.groupby("levels"):
        votes = np.stack(group.votes.to_numpy()).astype(np.int64)
        prediction, radius = dssn_radius(votes, int(levels), 255)
        published = group.radius_l1_published.to_numpy()
        # The published radii were computed in float32: the integer numerators k match exactly.
        np.testing.assert_array_equal(np.rint(radius * 255), np.rint(published * 255))
        np.testing.assert_allclose(radius, published, rtol=0, atol=1e-6)


def test_uniform_radius_reproduces_published_monte_carlo_rows(dssn_paper):
    mc = dssn_paper[dssn_paper.method != "dssn"]
    assert len(mc) == 600_000
    radius = np.concatenate(
        [l1_uniform_radius(g.prob_lower_published.to_numpy(), lam, None) for lam, g in mc.groupby("lambda", sort=False)]
    )
    published = np.concatenate([g.radius_l1_published.to_numpy() for _, g in mc.groupby("lambda", sort=False)])
    certified = published > 0
    np.testing.assert_allclose(radius[certified], published[certified], rtol=0, atol=1e-6)  # float32 in the paper
    assert np.isnan(radius[~certified]).all(), "a non-positive published radius must be an abstention"


def envelope(frame: pd.DataFrame) -> list[tuple[float, float, float]]:
    """Best certified accuracy over sigma at each radius, with the clean accuracy and sigma of
    the configuration achieving it (ties to the smaller sigma)."""
    out = []
    for r in RADII:
        best = max(
            ((g.certified_at(r), g.clean, sigma) for sigma, g in frame.items()),
            key=lambda t: (round(t[0], 8), -t[2]),
        )
        out.append(best)
    return out


class _SigmaResult:
    def __init__(self, correct: np.ndarray, radius: np.ndarray, clean_correct: np.ndarray):
        self.correct, self.radius = correct, radius
        self.clean = 100 * clean_correct.mean()

    def certified_at(self, r: float) -> float:
        return 100 * (self.correct & (self.radius >= r)).mean()


def test_table_1_envelope_reproduced(dssn_paper):
    for (method, training), expected in TABLE_1.items():
        subset = dssn_paper[(dssn_paper.method == method) & (dssn_paper.training == training)]
        per_sigma = {}
        for sigma, g in subset.groupby("sigma"):
            votes = np.stack(g.votes.to_numpy()).astype(np.int64)
            labels = g.label.to_numpy()
            if method == "dssn":
                prediction, radius = dssn_radius(votes, int(g.levels.iloc[0]), 255)
                per_sigma[sigma] = _SigmaResult(prediction == labels, radius, prediction == labels)
            else:  # Monte Carlo: clean accuracy is the n0 selection's (Yang et al.'s convention)
                selected = votes.argmax(axis=1)
                radius = l1_uniform_radius(g.prob_lower_published.to_numpy(), float(g["lambda"].iloc[0]))
                per_sigma[sigma] = _SigmaResult(
                    selected == labels, np.nan_to_num(radius, nan=-np.inf), selected == labels
                )
        got = envelope(per_sigma)
        for r, (acc, clean, sigma), (e_acc, e_clean, e_sigma) in zip(RADII, got, expected):
            assert acc == pytest.approx(e_acc, abs=0.005), (method, training, r)
            assert clean == pytest.approx(e_clean, abs=0.005), (method, training, r)
            assert sigma == e_sigma, (method, training, r)
