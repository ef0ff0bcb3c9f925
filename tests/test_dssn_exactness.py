"""DSSN is exact: brute-force enumeration on tiny quantized domains.

For every point x of [0,1]^d on the 1/q grid (d <= 3), the votes of a lookup-table classifier
over all L offsets give a certified radius; every grid point x' with ||x' - x||_1 <= radius
must receive the same smoothed prediction. The noisy copies are also checked against the
paper's formula (Eq. 47-48) computed independently in float64.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from certlib.certificates import dssn_radius
from certlib.engine.voting import dssn_votes
from certlib.families import DSSNNoise
from tests.helpers import LookupTableClassifier, smooth_random_table


def paper_noisy_copies(x: np.ndarray, v: np.ndarray, levels: int, q: int) -> np.ndarray:
    """Levine & Feizi Corollary 1 (general case), Eq. 46-48 with s_i = ((v_i + s) mod L + 0.5)/q,
    for all offsets s: returns (L, d) float64."""
    two_lam = levels / q
    out = []
    for s_base in range(levels):
        s = ((v + s_base) % levels + 0.5) / q
        upper = np.minimum(two_lam * np.ceil((x - s) / two_lam) + s, 1.0)
        lower = np.maximum(two_lam * np.ceil((x - s) / two_lam - 1) + s, 0.0)
        out.append((upper + lower) / 2)
    return np.array(out)


def sigma_for_levels(levels: int, q: int) -> float:
    """A sigma whose L = floor(2 sqrt(3) sigma q) equals ``levels``."""
    return (levels + 0.5) / (2 * math.sqrt(3) * q)


# (d, q, L): L < q means lambda < 0.5 (the general case with several splits per coordinate).
DOMAINS = [
    (1, 8, 3),
    (1, 8, 8),
    (1, 6, 13),
    (2, 5, 2),
    (2, 5, 4),
    (2, 4, 7),
    (2, 4, 11),
    (3, 3, 2),
    (3, 3, 5),
    (3, 4, 9),
]


@pytest.mark.parametrize("d,q,levels", DOMAINS)
def test_copies_match_paper_formula(d, q, levels):
    noise = DSSNNoise(sigma_for_levels(levels, q), q=q, seed=levels)
    assert noise.levels == levels and noise.lam == levels / (2 * q)
    v = noise.offset_vector(d)
    for x_int in itertools.product(range(q + 1), repeat=d):
        x = np.array(x_int, dtype=np.float64) / q
        expected = paper_noisy_copies(x, v, levels, q)
        got = noise.copies(torch.tensor([x_int] * levels, dtype=torch.int32), torch.arange(levels), torch.float64)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
        assert (got.numpy() * 4 * q == np.rint(got.numpy() * 4 * q)).all()  # exact multiples of 1/(4q)


def test_copies_match_lambda_at_least_half_formula():
    """For lambda >= 0.5 the general formula reduces to Eq. 14: (min(s_i, 1) + [x_i > s_i]) / 2."""
    q, levels = 255, 883
    noise = DSSNNoise(1.0, q=q, seed=3)
    assert noise.levels == levels
    rng = np.random.default_rng(0)
    x_int = torch.from_numpy(rng.integers(0, q + 1, size=(levels, 50)).astype(np.int32))
    s_base = torch.arange(levels)
    s = ((torch.from_numpy(noise.offset_vector(50))[None, :] + s_base[:, None]) % levels).double().add(0.5) / q
    x = x_int.double() / q
    expected = (torch.clamp(s, max=1) + (x > s).double()) / 2
    torch.testing.assert_close(noise.copies(x_int, s_base, torch.float64), expected, rtol=0, atol=1e-12)


def test_offset_marginals_are_uniform_on_half_steps():
    """Eq. 13/18: over the L offsets every coordinate's split s_i takes each of the L half-step
    values (j + 0.5)/q exactly once."""
    noise = DSSNNoise(0.5, q=255, seed=7)
    v = noise.offset_vector(64)
    splits = (v[None, :] + np.arange(noise.levels)[:, None]) % noise.levels
    assert (np.sort(splits, axis=0) == np.arange(noise.levels)[:, None]).all()


@pytest.mark.parametrize("d,q,levels", DOMAINS)
def test_brute_force_certificate_is_sound(d, q, levels):
    rng = np.random.default_rng(1000 * d + 10 * q + levels)
    num_classes = 3 if d > 1 else 2
    model = LookupTableClassifier(smooth_random_table(d, q, num_classes, rng), q, num_classes)
    noise = DSSNNoise(sigma_for_levels(levels, q), q=q, seed=int(rng.integers(100)))
    grid = np.array(list(itertools.product(range(q + 1), repeat=d)))
    images = torch.from_numpy(grid / q).float().view(len(grid), 1, 1, d)
    votes = dssn_votes(model, images, noise, num_classes, batch_size=7)
    assert (votes.sum(axis=1) == levels).all()

    # Independent votes: the paper's formula in float64 and the table, no torch engine involved.
    v = noise.offset_vector(d)
    for x_int, row in zip(grid, votes):
        copies = paper_noisy_copies(x_int / q, v, levels, q)
        classes = model(torch.from_numpy(copies)).argmax(1).numpy()
        np.testing.assert_array_equal(np.bincount(classes, minlength=num_classes), row)

    prediction, radius = dssn_radius(votes, levels, q)
    k = np.rint(radius * q).astype(int)
    distance = np.abs(grid[:, None, :] - grid[None, :, :]).sum(axis=2)  # L1 in units of 1/q
    changed = (distance <= k[:, None]) & (prediction[None, :] != prediction[:, None])
    assert not changed.any(), f"prediction changes within the certified radius of {grid[changed.any(1)][0]}"
    assert (k > 0).any(), "the certificate is trivially zero everywhere"


def test_brute_force_radius_is_not_loose_by_much():
    """On a 1-d domain the exact radius is attained: some point just beyond some radius flips."""
    q, levels, d = 8, 8, 1
    rng = np.random.default_rng(5)
    model = LookupTableClassifier(smooth_random_table(d, q, 2, rng, flip=0.0), q, 2)
    noise = DSSNNoise(sigma_for_levels(levels, q), q=q)
    grid = np.arange(q + 1)[:, None]
    votes = dssn_votes(model, torch.from_numpy(grid / q).float().view(-1, 1, 1, 1), noise, 2)
    prediction, radius = dssn_radius(votes, levels, q)
    k = np.rint(radius * q).astype(int)
    flips_just_beyond = [
        i for i in range(q + 1) for j in (i - k[i] - 1, i + k[i] + 1) if 0 <= j <= q and prediction[j] != prediction[i]
    ]
    assert flips_just_beyond
