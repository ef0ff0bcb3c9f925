"""Smoothing noises: parametrisation by sigma, sampling laws, the DSSN offset convention and
the refusal of bad parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from certlib.data import quantize
from certlib.families import (
    FAMILIES,
    DSSNNoise,
    GaussianNoise,
    LaplaceNoise,
    SplitIndependentNoise,
    UniformNoise,
    make_noise,
    split_center,
)
from certlib.families.base import CertifySettings, Votes


@pytest.mark.parametrize("cls", [GaussianNoise, UniformNoise, LaplaceNoise])
def test_additive_noises_have_standard_deviation_sigma(cls):
    noise = cls(0.7)
    x = torch.full((200, 1, 10, 10), 0.5)
    eps = (noise.sample(x, torch.Generator().manual_seed(0)) - x).flatten()
    assert float(eps.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(eps.std()) == pytest.approx(0.7, rel=0.02)


def test_parametrisation_by_sigma():
    assert UniformNoise(1.0).lam == pytest.approx(math.sqrt(3))
    assert SplitIndependentNoise(1.0).lam == pytest.approx(math.sqrt(3))
    assert LaplaceNoise(1.0).b == pytest.approx(1 / math.sqrt(2))
    d = DSSNNoise(1.0)
    assert d.levels == 883 and d.lam == 883 / 510 and d.lam <= math.sqrt(3)


def test_uniform_and_laplace_laws():
    x = torch.zeros(40_000)
    u = UniformNoise(0.5).sample(x, torch.Generator().manual_seed(1)).numpy()
    lam = 0.5 * math.sqrt(3)
    assert stats.kstest(u, stats.uniform(-lam, 2 * lam).cdf).pvalue > 1e-3
    lap = LaplaceNoise(0.5).sample(x, torch.Generator().manual_seed(2)).numpy()
    assert stats.kstest(lap, stats.laplace(scale=0.5 / math.sqrt(2)).cdf).pvalue > 1e-3


def test_ssn_at_lambda_half_is_affine_uniform():
    """Levine & Feizi Eq. 23: at lambda = 0.5, x~ = (x + eps)/2 + 1/4 with eps ~ U(-1/2, 1/2)."""
    noise = SplitIndependentNoise(0.5 / math.sqrt(3))
    x = 0.3
    samples = noise.sample(torch.full((40_000,), x), torch.Generator().manual_seed(3)).numpy()
    assert stats.kstest(samples, stats.uniform(x / 2, 0.5).cdf).pvalue > 1e-3


def test_split_center_reduces_to_eq_7_for_lambda_at_least_half():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(10_000, generator=g, dtype=torch.float64)
    for lam in (0.5, 0.9, 3.0):
        s = torch.rand(10_000, generator=g, dtype=torch.float64) * 2 * lam
        expected = (torch.clamp(s, max=1) + (x > s).double()) / 2
        torch.testing.assert_close(split_center(x, s, 2 * lam), expected)


def test_ssn_below_half_splits_into_several_pieces():
    """lambda < 0.5: a point's noisy value is the center of a piece of length <= 2 lambda."""
    noise = SplitIndependentNoise(0.1)
    x = torch.rand(5000, generator=torch.Generator().manual_seed(5))
    out = noise.sample(x, torch.Generator().manual_seed(6))
    assert float((out - x).abs().max()) <= noise.lam + 1e-6
    assert ((out >= 0) & (out <= 1)).all()


def test_sampling_is_a_function_of_the_generator():
    x = torch.rand(4, 3, 8, 8)
    for name in FAMILIES:
        noise = make_noise(name, 0.5, q=255)
        xq = torch.round(x * 255) / 255
        a = noise.sample(xq, torch.Generator().manual_seed(11))
        b = noise.sample(xq, torch.Generator().manual_seed(11))
        assert torch.equal(a, b)


def test_dssn_offset_vector_is_the_papers():
    noise = DSSNNoise(0.5, q=255, seed=2)
    np.testing.assert_array_equal(noise.offset_vector(3072), np.random.RandomState(2).randint(441, size=3072))


def test_dssn_training_sample_is_one_of_the_exact_copies():
    noise = DSSNNoise(0.25, q=255, seed=1)
    x = torch.randint(0, 256, (6, 3, 4, 4)).float() / 255
    sample = noise.sample(x, torch.Generator().manual_seed(0)).flatten(1)
    x_int = quantize(x, 255).flatten(1)
    for i in range(6):
        copies = noise.copies(x_int[i].repeat(noise.levels, 1), torch.arange(noise.levels))
        assert (copies == sample[i]).all(dim=1).any()


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bad_sigma_is_refused(name, sigma):
    with pytest.raises(ValueError, match="sigma"):
        make_noise(name, sigma)


def test_dssn_refuses_fewer_than_one_offset_and_bad_q():
    with pytest.raises(ValueError, match="L >= 1"):
        DSSNNoise(0.001, q=255)
    with pytest.raises(ValueError, match="q must"):
        DSSNNoise(0.5, q=0)
    with pytest.raises(ValueError, match="unknown method"):
        make_noise("gauss", 0.5)
    with pytest.raises(ValueError, match="'box' certificate does not apply to dssn"):
        DSSNNoise(0.5, q=16).certify(Votes(np.array([[27, 0]])), CertifySettings(certificate="box"))
    with pytest.raises(ValueError, match="binary only"):
        LaplaceNoise(0.5).certified_radius(0.9, 0.05)
