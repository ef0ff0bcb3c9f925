"""Voting engines: exact DSSN votes and Monte Carlo counts, checked against independent
naive loops, closed-form smoothed probabilities, and for invariance to batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from certlib.certificates import dssn_radius
from certlib.data import load_cifar10, load_digits
from certlib.engine.cascade import EXACT_TIE
from certlib.engine.voting import dssn_votes, monte_carlo_counts
from certlib.families import DSSNNoise, GaussianNoise, LaplaceNoise, SplitIndependentNoise, UniformNoise
from certlib.smooth import Smooth
from tests.helpers import random_cnn


def naive_dssn_votes(model, images, noise, num_classes):
    """One image and one offset at a time, in float64, with the engine's documented tie rule."""
    model64 = model.double()
    votes = np.zeros((len(images), num_classes), dtype=np.int64)
    for i, image in enumerate(images):
        x_int = torch.round(image.double() * noise.q).int().flatten()[None, :]
        for s in range(noise.levels):
            noisy = noise.copies(x_int, torch.tensor([s])).double().view(1, *image.shape)
            logits = model64(noisy)[0]
            top = logits.max()
            votes[i, int((logits >= top - EXACT_TIE * (1 + top.abs())).nonzero()[0])] += 1
    model.float()
    return votes


@pytest.fixture(scope="module")
def cifar_images(cifar10_dir):
    ds = load_cifar10(cifar10_dir, "test")
    return ds.pixels(range(6))


def test_dssn_votes_match_a_naive_per_image_loop():
    ds = load_digits("test")
    model = random_cnn(1)
    noise = DSSNNoise(0.25, q=16, seed=3)  # L = 13, lambda < 0.5
    images = ds.pixels(range(5))
    votes = dssn_votes(model, images, noise, 10, batch_size=64)
    assert (votes.sum(1) == noise.levels).all()
    np.testing.assert_array_equal(votes, naive_dssn_votes(model, images, noise, 10))
    assert (votes > 0).sum() > len(images), "predictions should vary across offsets"


def test_dssn_votes_are_batch_and_grouping_invariant(cifar_images):
    """Same images in different groupings and batch sizes: votes equal bit for bit."""
    model = random_cnn(3)
    noise = DSSNNoise(0.25, q=255, seed=0)  # L = 220
    reference = dssn_votes(model, cifar_images, noise, 10, batch_size=512)
    for batch_size in (1, 37, 220, 1000, 4096):
        np.testing.assert_array_equal(dssn_votes(model, cifar_images, noise, 10, batch_size=batch_size), reference)
    regrouped = np.concatenate([dssn_votes(model, cifar_images[i : i + 1], noise, 10, batch_size=97) for i in range(6)])
    np.testing.assert_array_equal(regrouped, reference)
    reversed_order = dssn_votes(model, cifar_images.flip(0), noise, 10, batch_size=300)
    np.testing.assert_array_equal(reversed_order[::-1], reference)


def test_exact_ties_go_to_the_lower_class_whatever_the_batch():
    class Tied(torch.nn.Module):
        def forward(self, x):
            s = x.flatten(1).sum(1, keepdim=True)
            return torch.cat([torch.zeros_like(s), s, s, s - 1], dim=1)  # classes 1 and 2 always tie

    images = load_digits("test").pixels(range(3))
    noise = DSSNNoise(1.0, q=16)
    for batch_size in (1, 5, 1000):
        votes = dssn_votes(Tied(), images, noise, 4, batch_size=batch_size)
        assert (votes[:, 1] == noise.levels).all()


def test_dssn_smooth_certify_end_to_end():
    images = load_digits("test").pixels(range(4))
    model = random_cnn(1)
    result = Smooth(model, DSSNNoise(0.5, q=16), 10).certify(images)
    prediction, radius = dssn_radius(result["votes"], DSSNNoise(0.5, q=16).levels, 16)
    np.testing.assert_array_equal(result["prediction"], prediction)
    np.testing.assert_array_equal(result["radius"], radius)


@pytest.mark.parametrize(
    "images,message",
    [
        (torch.full((1, 1, 8, 8), 0.51), "grid"),
        (torch.full((1, 1, 8, 8), 1.25), r"\[0, 1\]"),
        (torch.full((1, 1, 8, 8), float("nan")), "NaN"),
    ],
)
def test_dssn_votes_reject_bad_images(images, message):
    with pytest.raises(ValueError, match=message):
        dssn_votes(random_cnn(1), images, DSSNNoise(0.5, q=16), 10)


def test_nan_logits_are_refused():
    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 3), float("nan"))

    images = load_digits("test").pixels(range(2))
    with pytest.raises(ValueError, match="NaN"):
        dssn_votes(Broken(), images, DSSNNoise(0.5, q=16), 3)
    with pytest.raises(ValueError, match="NaN"):
        monte_carlo_counts(Broken(), images, [0, 1], UniformNoise(0.5), 3, n0=4, n=10, seed=0)


# --------------------------------------------------------------------------- Monte Carlo


def test_monte_carlo_counts_invariant_to_batching_and_grouping(cifar_images):
    model = random_cnn(3, seed=1)
    indices = [10, 11, 12, 13, 14, 15]
    for noise in (GaussianNoise(0.5), UniformNoise(0.5), LaplaceNoise(0.5), SplitIndependentNoise(0.5)):
        c0, c = monte_carlo_counts(model, cifar_images, indices, noise, 10, n0=64, n=400, seed=7, batch_size=512)
        assert (c0.sum(1) == 64).all() and (c.sum(1) == 400).all()
        for batch_size in (96, 2048):
            b0, b = monte_carlo_counts(
                model, cifar_images, indices, noise, 10, n0=64, n=400, seed=7, batch_size=batch_size
            )
            np.testing.assert_array_equal(b0, c0)
            np.testing.assert_array_equal(b, c)
        g0, g = monte_carlo_counts(
            model, cifar_images[3:5], indices[3:5], noise, 10, n0=64, n=400, seed=7, batch_size=999
        )
        np.testing.assert_array_equal(g, c[3:5])
        np.testing.assert_array_equal(g0, c0[3:5])
        _, other_seed = monte_carlo_counts(model, cifar_images[:2], indices[:2], noise, 10, n0=64, n=400, seed=8)
        assert not np.array_equal(other_seed, c[:2])  # the same n: only the seed differs


class Threshold(torch.nn.Module):
    """Two classes: 1 where the first pixel exceeds t (logits [0, x0 - t])."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, x):
        z = x.flatten(1)[:, :1] - self.t
        return torch.cat([torch.zeros_like(z), z], dim=1)


@pytest.mark.parametrize(
    "noise,true_p,true_radius",
    [
        # Gaussian, linear classifier (Cohen et al. Prop. 3-4): p = Phi(margin / sigma), radius = margin.
        (GaussianNoise(0.5), stats.norm.cdf(0.3 / 0.5), 0.3),
        # uniform on [-lam, lam]: p = (margin + lam) / (2 lam), and 2 lam (p - 1/2) = margin.
        (UniformNoise(0.5), (0.3 + 0.5 * math.sqrt(3)) / (2 * 0.5 * math.sqrt(3)), 0.3),
        # Laplace(b): p = 1 - exp(-margin / b) / 2, and -b log(2(1 - p)) = margin.
        (LaplaceNoise(0.5), 1 - 0.5 * math.exp(-0.3 / (0.5 / math.sqrt(2))), 0.3),
    ],
)
def test_monte_carlo_certify_on_closed_form_classifiers(noise, true_p, true_radius):
    """x0 = 0.8 and threshold 0.5: the smoothed probability and the exact robust radius are known."""
    images = torch.full((2, 1, 2, 2), 0.8)
    n = 20_000
    result = Smooth(Threshold(0.5), noise, 2).certify(images, [0, 1], n0=64, n=n, alpha=0.001, seed=0)
    p_hat = result["votes"][:, 1] / n
    se = math.sqrt(true_p * (1 - true_p) / n)
    assert np.all(np.abs(p_hat - true_p) < 5 * se)
    assert (result["prediction"] == 1).all()
    assert np.all(result["p_a_lower"] <= true_p)  # holds with probability 1 - alpha per image
    expected = noise.certified_radius(true_p - 4.5 * se)
    assert np.all(result["radius"] <= true_radius) and np.all(result["radius"] >= expected)


def test_monte_carlo_abstains_explicitly():
    images = torch.full((1, 1, 2, 2), 0.5)  # exactly on the threshold: p = 1/2
    result = Smooth(Threshold(0.5), UniformNoise(0.5), 2).certify(images, n0=64, n=2000)
    assert result["prediction"][0] == -1 and np.isnan(result["radius"][0])


def test_monte_carlo_refuses_dssn_and_bad_counts():
    images = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="deterministic"):
        monte_carlo_counts(Threshold(0.5), images, [0], DSSNNoise(0.5), 2, n0=1, n=1, seed=0)
    with pytest.raises(ValueError, match="n0"):
        monte_carlo_counts(Threshold(0.5), images, [0], UniformNoise(0.5), 2, n0=0, n=1, seed=0)


def test_votes_are_unchanged_under_deterministic_kernels():
    from certlib.determinism import deterministic_kernels

    images = load_digits("test").pixels(range(4))
    model = random_cnn(1, seed=3)
    noise = DSSNNoise(0.25, q=16, seed=1)
    expected = dssn_votes(model, images, noise, 10, batch_size=16)
    with deterministic_kernels(True):  # as a worker runs (enable_deterministic_kernels), then undone
        assert torch.are_deterministic_algorithms_enabled()
        np.testing.assert_array_equal(dssn_votes(model, images, noise, 10, batch_size=16), expected)
        counts = monte_carlo_counts(model, images, range(4), UniformNoise(0.25), 10, n0=8, n=64, seed=0)
        assert (counts[1].sum(1) == 64).all()
    assert not torch.are_deterministic_algorithms_enabled()


def test_compiled_engine_gives_the_eager_votes(cifar_images):
    """torch.compile changes the kernels (one static batch shape, the last batch padded), not
    the votes: its float32 logits stay inside the near-tie band of the float64 network."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = random_cnn(3, seed=4)
    noise = DSSNNoise(0.25, q=255, seed=2)  # 6 images x L = 220: the last batch of 300 is short
    for precision in ("fp32", "bf16"):
        eager = dssn_votes(model, cifar_images, noise, 10, batch_size=512, precision=precision)
        compiled = dssn_votes(model, cifar_images, noise, 10, batch_size=300, precision=precision, compile=True)
        np.testing.assert_array_equal(compiled, eager)
    eager = monte_carlo_counts(
        model, cifar_images, range(6), UniformNoise(0.25), 10, n0=16, n=500, seed=1, batch_size=512
    )
    compiled = monte_carlo_counts(
        model, cifar_images, range(6), UniformNoise(0.25), 10, n0=16, n=500, seed=1, batch_size=300, compile=True
    )
    for a, b in zip(compiled, eager):
        np.testing.assert_array_equal(a, b)
    assert counters["frames"]["ok"] > 0  # the network did go through torch.compile
    # Where torch's deterministic flag was set while inductor was not loaded (certlib.determinism),
    # the engine's before_compiling gives inductor the same flag.
    import torch._inductor.config as inductor

    from certlib.determinism import before_compiling, deterministic_kernels

    with deterministic_kernels(True):
        inductor.deterministic = False  # as setting torch's flag alone leaves it
        before_compiling()
        assert inductor.deterministic is True
    assert inductor.deterministic is torch.are_deterministic_algorithms_enabled() is False
