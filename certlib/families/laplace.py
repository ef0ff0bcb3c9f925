"""Laplace smoothing (Teng et al. 2020; Zhang et al. 2020 Corollary 1): additive i.i.d. Laplace
noise; binary L1 certificates."""

from __future__ import annotations

import math

import torch

from certlib import certificates
from certlib.families.base import MonteCarloNoise


class LaplaceNoise(MonteCarloNoise):
    """Additive i.i.d. Laplace noise of scale b = sigma / sqrt(2) (standard deviation sigma)."""

    name = "laplace"
    norm = "l1"
    multiclass_refusal = "the Laplace certificate is binary only (Zhang et al. Corollary 1)"

    def __init__(self, sigma: float):
        super().__init__(sigma)
        self.b = self.sigma / math.sqrt(2)

    @property
    def scale(self) -> float:
        return self.b

    def sample(self, x, generator=None):
        # The difference of two independent Exp(1) variables is Laplace(0, 1).
        e1 = torch.empty(x.shape, device=x.device, dtype=x.dtype).exponential_(generator=generator)
        e2 = torch.empty(x.shape, device=x.device, dtype=x.dtype).exponential_(generator=generator)
        return x + self.b * (e1 - e2)

    def certified_radius(self, p_a_lower, p_b_upper=None):
        if p_b_upper is not None:
            raise ValueError(f"{self.multiclass_refusal}: pass no p_b_upper")
        return certificates.l1_laplace_radius(p_a_lower, self.b)

    def describe(self):
        return {**super().describe(), "b": self.b}
