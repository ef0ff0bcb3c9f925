"""Uniform smoothing (Lee et al. 2019, Yang et al. 2020): additive uniform noise on
[-lambda, lambda]^d; L1 certificates, plain and box-constrained (Voracek & Hein 2023)."""

from __future__ import annotations

import math

from certlib import certificates
from certlib.families.base import MonteCarloNoise, uniform_like


class BoxCertified(MonteCarloNoise):
    """A family with independent coordinates and a 1/(2 lambda)-Lipschitz smoothed classifier:
    besides the plain L1 radius it takes Voracek & Hein's box-constrained ones (``box``:
    Prop. 2.5, ``box_input``: Theorem 2.8 with the images; Theorem 2.11 extends them to
    independent splitting noise)."""

    accepted_certificates = ("standard", "box", "box_input")

    def __init__(self, sigma: float):
        super().__init__(sigma)
        self.lam = self.sigma * math.sqrt(3)

    @property
    def scale(self) -> float:
        return self.lam

    def certified_radius(self, p_a_lower, p_b_upper=None):
        return certificates.l1_uniform_radius(p_a_lower, self.lam, p_b_upper)

    def radius_function(self, certificate, x):
        self.refuse_certificate(certificate)
        if certificate == "standard":
            return self.certified_radius
        if certificate == "box_input" and x is None:
            raise ValueError("the box_input certificate needs the images x")
        image = x if certificate == "box_input" else None
        return lambda p_a, p_b: certificates.l1_box_radius(p_a, self.lam, p_b, x=image)

    def describe(self):
        return {**super().describe(), "lambda": self.lam}


class UniformNoise(BoxCertified):
    """Additive uniform noise on [-lambda, lambda]^d, lambda = sigma * sqrt(3)."""

    name = "uniform"
    norm = "l1"

    def sample(self, x, generator=None):
        return x + (2 * uniform_like(x, generator) - 1) * self.lam
