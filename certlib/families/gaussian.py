"""Gaussian smoothing (Cohen et al. 2019): additive isotropic N(0, sigma^2 I); L2 certificates."""

from __future__ import annotations

import torch

from certlib import certificates
from certlib.families.base import MonteCarloNoise


class GaussianNoise(MonteCarloNoise):
    """Additive isotropic Gaussian noise N(0, sigma^2 I); radius of Cohen et al. Theorem 1."""

    name = "gaussian"
    norm = "l2"

    @property
    def scale(self) -> float:
        return self.sigma

    def sample(self, x, generator=None):
        return x + self.sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def certified_radius(self, p_a_lower, p_b_upper=None):
        return certificates.l2_gaussian_radius(p_a_lower, self.sigma, p_b_upper)
