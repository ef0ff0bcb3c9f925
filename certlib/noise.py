"""Smoothing noises: one small class per noise, one interface.

Conventions shared by every class here:

* Inputs are images in pixel scale [0, 1], shape (B, C, H, W) (any trailing shape works);
  normalization to the network's statistics happens inside the model, after the noise.
* Every noise is parametrised by ``sigma`` as in the papers: Gaussian sigma is the standard
  deviation; uniform and splitting noise use lambda = sigma * sqrt(3) (the half-width whose
  uniform distribution has standard deviation sigma); Laplace uses the scale b = sigma / sqrt(2).
* ``sample(x, generator)`` returns one noisy copy of every image in ``x`` on x's device, drawing
  all randomness from ``generator`` so that streams can be derived from (seed, image index).
* ``certified_radius(p_a_lower, p_b_upper=None)`` turns Monte Carlo probability bounds into a
  radius in the noise's norm (``norm``), NaN where nothing can be certified (abstain).

DSSN is deterministic: besides ``sample`` (used for training, one random offset per image) it
enumerates all ``levels`` noisy copies of an image exactly (``copies``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from certlib import certificates


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    return sigma


def _uniform(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class SmoothingNoise(ABC):
    """The interface every smoothing noise implements."""

    name: ClassVar[str]
    norm: ClassVar[str]  # "l1" or "l2": the norm of the certified radius

    def __init__(self, sigma: float):
        self.sigma = _check_sigma(sigma)

    @abstractmethod
    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One noisy copy of each image of ``x`` (pixel scale [0, 1])."""

    def sample_grid(self, values: torch.Tensor, q: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One noisy float32 copy of each image given by its integer grid values (pixel value
        = value / q), as training draws them: no check that the values lie on the grid and
        no host synchronization, so it can run inside a CUDA graph."""
        return self.sample(values.to(torch.float32) / q, generator)

    @abstractmethod
    def certified_radius(self, p_a_lower, p_b_upper=None) -> np.ndarray:
        """Radius in ``self.norm`` from probability bounds; NaN where it must abstain."""

    def describe(self) -> dict:
        """The parameters that define this smoothing, for result rows and model cards."""
        return {"method": self.name, "sigma": self.sigma}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "method")
        return f"{type(self).__name__}({params})"


class GaussianNoise(SmoothingNoise):
    """Additive isotropic Gaussian noise N(0, sigma^2 I) (Cohen et al. 2019); L2 certificates."""

    name = "gaussian"
    norm = "l2"

    def sample(self, x, generator=None):
        return x + self.sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def certified_radius(self, p_a_lower, p_b_upper=None):
        return certificates.l2_gaussian_radius(p_a_lower, self.sigma, p_b_upper)


class UniformNoise(SmoothingNoise):
    """Additive uniform noise on [-lambda, lambda]^d, lambda = sigma * sqrt(3)
    (Lee et al. 2019, Yang et al. 2020); L1 certificates."""

    name = "uniform"
    norm = "l1"

    def __init__(self, sigma: float):
        super().__init__(sigma)
        self.lam = self.sigma * math.sqrt(3)

    def sample(self, x, generator=None):
        return x + (2 * _uniform(x, generator) - 1) * self.lam

    def certified_radius(self, p_a_lower, p_b_upper=None):
        return certificates.l1_uniform_radius(p_a_lower, self.lam, p_b_upper)

    def describe(self):
        return {**super().describe(), "lambda": self.lam}


class LaplaceNoise(SmoothingNoise):
    """Additive i.i.d. Laplace noise of scale b = sigma / sqrt(2) (Teng et al. 2020,
    Zhang et al. 2020 Corollary 1); L1 certificates."""

    name = "laplace"
    norm = "l1"

    def __init__(self, sigma: float):
        super().__init__(sigma)
        self.b = self.sigma / math.sqrt(2)

    def sample(self, x, generator=None):
        # The difference of two independent Exp(1) variables is Laplace(0, 1).
        e1 = torch.empty(x.shape, device=x.device, dtype=x.dtype).exponential_(generator=generator)
        e2 = torch.empty(x.shape, device=x.device, dtype=x.dtype).exponential_(generator=generator)
        return x + self.b * (e1 - e2)

    def certified_radius(self, p_a_lower, p_b_upper=None):
        if p_b_upper is not None:
            raise ValueError("the Laplace certificate is binary only (Zhang et al. Corollary 1): pass no p_b_upper")
        return certificates.l1_laplace_radius(p_a_lower, self.b)

    def describe(self):
        return {**super().describe(), "b": self.b}


def split_center(x: torch.Tensor, s: torch.Tensor, period: float) -> torch.Tensor:
    """Center of the splitting sub-interval of [0, 1] that holds x (Levine & Feizi 2021,
    Theorem 2 general case, Eq. 27-28): [0, 1] is split at s + period * n for every integer n,
    and each coordinate is replaced by the middle of its piece, clipped to [0, 1].
    ``period`` is 2 * lambda."""
    upper_split = period * torch.ceil((x - s) / period) + s
    return (torch.clamp(upper_split, max=1.0) + torch.clamp(upper_split - period, min=0.0)) / 2


class SplitIndependentNoise(SmoothingNoise):
    """SSN with independent splitting noise: s_i ~ U(0, 2 lambda) i.i.d. per coordinate,
    lambda = sigma * sqrt(3), any lambda > 0 including lambda < 0.5 (Levine & Feizi 2021,
    Theorem 2 general case, Eq. 26-29); L1 certificates as for uniform noise (the smoothed
    classifier is 1/(2 lambda)-Lipschitz; Voracek & Hein Theorem 2.11 extends the box bounds)."""

    name = "ssn"
    norm = "l1"

    def __init__(self, sigma: float):
        super().__init__(sigma)
        self.lam = self.sigma * math.sqrt(3)

    def sample(self, x, generator=None):
        s = _uniform(x, generator) * (2 * self.lam)
        return split_center(x, s, 2 * self.lam)

    def certified_radius(self, p_a_lower, p_b_upper=None):
        return certificates.l1_uniform_radius(p_a_lower, self.lam, p_b_upper)

    def describe(self):
        return {**super().describe(), "lambda": self.lam}


def quantize(x: torch.Tensor, q: int) -> torch.Tensor:
    """Integer grid values x * q of images on the 1/q grid of [0, 1], as int32.

    Raises ValueError when a value lies outside [0, 1] or off the grid: DSSN's exactness
    (Levine & Feizi 2021, Corollary 1) holds on the quantized domain only.
    """
    if not torch.is_floating_point(x):
        raise ValueError(f"images must be a float tensor in [0, 1], got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"image values must lie in [0, 1] (pixel scale), got range [{lo:.4g}, {hi:.4g}]")
    scaled = x.double() * q
    grid = torch.round(scaled)
    off = float((scaled - grid).abs().max())
    if off > 1e-4:  # float32 stores i/q to within ~1e-5/q; anything further is off the grid
        raise ValueError(f"images are not on the 1/q grid for q={q}: a value is {off:.3g}/q away from it")
    return grid.to(torch.int32)


class DSSNNoise(SmoothingNoise):
    """Deterministic smoothing with splitting noise (Levine & Feizi 2021, Section 4.1 and
    Corollary 1 general case, Eq. 46-49).

    On the 1/q grid, the number of splitting offsets is L = floor(2 * lambda * q) with
    lambda = sigma * sqrt(3), computed as the authors' code does; the certificate uses the
    effective ``lam`` = L / (2q). The fixed offset vector is
    ``v = numpy.random.RandomState(seed).randint(L, size=d)`` over the input flattened in
    C x H x W order, and offset s_base in {0, ..., L-1} splits coordinate i at
    s_i = ((v_i + s_base) mod L + 0.5) / q. Every noisy value is a multiple of 1/(4q), computed
    in integers and rounded once to the output dtype, so copies are exact and device-independent.
    """

    name = "dssn"
    norm = "l1"

    def __init__(self, sigma: float, q: int = 255, seed: int = 0):
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

    def offset_vector(self, d: int) -> np.ndarray:
        """The fixed vector v in {0, ..., L-1}^d (Levine & Feizi Appendix B)."""
        return np.random.RandomState(self.seed).randint(self.levels, size=d)

    def _offsets_on(self, d: int, device: torch.device) -> torch.Tensor:
        key = (d, str(device))
        if key not in self._offsets:
            self._offsets[key] = torch.from_numpy(self.offset_vector(d).astype(np.int32)).to(device)
        return self._offsets[key]

    def copies(self, x_int: torch.Tensor, s_base: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
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

    def certified_radius(self, p_a_lower, p_b_upper=None):
        raise TypeError("DSSN certifies exactly from its votes: use certificates.dssn_radius(votes, levels, q)")

    def describe(self):
        return {**super().describe(), "lambda": self.lam, "levels": self.levels, "q": self.q, "seed": self.seed}


NOISES: dict[str, type[SmoothingNoise]] = {
    cls.name: cls for cls in (GaussianNoise, UniformNoise, LaplaceNoise, SplitIndependentNoise, DSSNNoise)
}


def make_noise(method: str, sigma: float, *, q: int = 255, seed: int = 0) -> SmoothingNoise:
    """The noise called ``method`` (one of NOISES) at level sigma; q and seed matter for DSSN only."""
    if method not in NOISES:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(NOISES)}")
    if method == DSSNNoise.name:
        return DSSNNoise(sigma, q=q, seed=seed)
    return NOISES[method](sigma)
