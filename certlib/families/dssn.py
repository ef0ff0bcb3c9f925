"""DSSN: deterministic smoothing with splitting noise (Levine & Feizi 2021, Section 4.1 and
Corollary 1 general case, Eq. 46-49): votes over all L splitting offsets, counted exactly, and
an exact L1 certificate."""

from __future__ import annotations

import math

import numpy as np
import torch

from certlib import certificates
from certlib.data import quantize
from certlib.engine.voting import dssn_votes
from certlib.families.base import SmoothingNoise, Votes

SEQUENTIAL_REFUSAL = "sequential sampling is for Monte Carlo families: dssn counts every vote exactly, once"


class DSSNNoise(SmoothingNoise):
    """On the 1/q grid, the number of splitting offsets is L = floor(2 * lambda * q) with
    lambda = sigma * sqrt(3), computed as the authors' code does; the certificate uses the
    effective ``lam`` = L / (2q). The fixed offset vector is
    ``v = numpy.random.RandomState(seed).randint(L, size=d)`` over the input flattened in
    C x H x W order, and offset s_base in {0, ..., L-1} splits coordinate i at
    s_i = ((v_i + s_base) mod L + 0.5) / q. Every noisy value is a multiple of 1/(4q), computed
    in integers and rounded once to the output dtype, so copies are exact and device-independent.

    Training draws one random offset per image (``sample``); certification enumerates all L
    (``copies``). A model is certified with the v (seed) and q it was trained with.
    """

    name = "dssn"
    norm = "l1"
    exact = True
    parameters = ("q", "seed")
    card_keys = ("seed", "q")

    def __init__(self, sigma: float, *, q: int = 255, seed: int = 0):
        super().__init__(sigma)
        if int(q) != q or q < 1:
            raise ValueError(f"q must be a positive integer, got {q}")
        self.q = int(q)
        self.seed = int(seed)
        self.levels = int(2 * (self.sigma * math.sqrt(3)) * self.q)
        if self.levels < 1:
            raise ValueError(
                f"sigma={self.sigma} gives L = floor(2*lambda*q) = {self.levels} splitting offsets at q={self.q}; "
                f"DSSN needs L >= 1 (sigma >= {1 / (2 * math.sqrt(3) * self.q):.4g})"
            )
        self.lam = self.levels / (2 * self.q)
        self._offsets: dict[tuple[int, str], torch.Tensor] = {}

    @property
    def scale(self) -> float:
        return self.lam

    def offset_vector(self, d: int) -> np.ndarray:
        """The fixed vector v in {0, ..., L-1}^d (Levine & Feizi Appendix B)."""
        return np.random.RandomState(self.seed).randint(self.levels, size=d)

    def _offsets_on(self, d: int, device: torch.device) -> torch.Tensor:
        key = (d, str(device))
        if key not in self._offsets:
            self._offsets[key] = torch.from_numpy(self.offset_vector(d).astype(np.int32)).to(device)
        return self._offsets[key]

    def copies(self, x_int: torch.Tensor, s_base: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Noisy copies x~ for pairs (image, offset).

        ``x_int``: (B, d) int grid values x * q (see ``quantize``); ``s_base``: (B,) offsets in
        {0, ..., L-1}. Returns (B, d) values in [0, 1] of ``dtype``.
        """
        L = self.levels
        t = (self._offsets_on(x_int.shape[1], x_int.device)[None, :] + s_base[:, None].to(torch.int32)) % L
        # In units of 1/q the splits sit at t + 0.5 + k*L; the piece holding integer x ends at the
        # first split >= x, i.e. at k = ceil((x - t) / L).
        k = torch.div(x_int - t + (L - 1), L, rounding_mode="floor")
        upper2 = torch.clamp(2 * (k * L + t) + 1, max=2 * self.q)  # in units of 1/(2q)
        lower2 = torch.clamp(2 * ((k - 1) * L + t) + 1, min=0)
        return (upper2 + lower2).to(dtype) / (4 * self.q)

    def sample(self, x, generator=None):
        """Training-time noise: one random offset s_base per image (Levine & Feizi Appendix B)."""
        return self._random_copies(quantize(x, self.q), generator, x.dtype)

    def sample_grid(self, values, q, generator=None):
        if q != self.q:
            raise ValueError(f"DSSN noise built for q={self.q} cannot sample images on the 1/{q} grid")
        return self._random_copies(values, generator, torch.float32)

    def _random_copies(self, grid: torch.Tensor, generator, dtype) -> torch.Tensor:
        s_base = torch.randint(self.levels, (grid.shape[0],), generator=generator, device=grid.device)
        return self.copies(grid.flatten(1).to(torch.int32), s_base, dtype).view(grid.shape)

    def count(self, cascade, images, indices, settings, stats=None):
        if settings.sequential:
            raise ValueError(SEQUENTIAL_REFUSAL)
        return Votes(dssn_votes(cascade, images, self, cascade.num_classes, stats=stats))

    def certify(self, votes, settings, x=None):
        """Exact prediction and L1 radius (``certificates.dssn_radius``, inclusive): no alpha,
        no abstention, against every other class (``multiclass`` does not apply)."""
        self.refuse_certificate(settings.certificate)
        if settings.sequential:
            raise ValueError(SEQUENTIAL_REFUSAL)
        prediction, radius = certificates.dssn_radius(votes.counts, self.levels, self.q)
        nan = np.full(len(prediction), np.nan)
        return {
            "selected": prediction,
            "prediction": prediction,
            "radius": radius,
            "p_a_lower": nan,
            "p_b_upper": nan,
            "certificate": settings.certificate,
            "multiclass": None,
            "sampling": None,
        }

    def passes_per_image(self, settings):
        return self.levels

    def depends_on(self, settings):
        return {}  # exact: none of the Monte Carlo parameters matter

    def describe(self):
        return {**super().describe(), "lambda": self.lam, "levels": self.levels, "q": self.q, "seed": self.seed}
