"""SSN: smoothing with independent splitting noise (Levine & Feizi 2021, Theorem 2 general
case, Eq. 26-29); L1 certificates as for uniform noise."""

from __future__ import annotations

import torch

from certlib.families.base import uniform_like
from certlib.families.uniform import BoxCertified


def split_center(x: torch.Tensor, s: torch.Tensor, period: float) -> torch.Tensor:
    """Center of the splitting sub-interval of [0, 1] that holds x (Levine & Feizi 2021,
    Theorem 2 general case, Eq. 27-28): [0, 1] is split at s + period * n for every integer n,
    and each coordinate is replaced by the middle of its piece, clipped to [0, 1].
    ``period`` is 2 * lambda."""
    upper_split = period * torch.ceil((x - s) / period) + s
    return (torch.clamp(upper_split, max=1.0) + torch.clamp(upper_split - period, min=0.0)) / 2


class SplitIndependentNoise(BoxCertified):
    """s_i ~ U(0, 2 lambda) i.i.d. per coordinate, lambda = sigma * sqrt(3), any lambda > 0
    including lambda < 0.5; the smoothed classifier is 1/(2 lambda)-Lipschitz in L1, so the
    uniform certificates apply (Voracek & Hein Theorem 2.11 for the box-constrained ones)."""

    name = "ssn"
    norm = "l1"

    def sample(self, x, generator=None):
        s = uniform_like(x, generator) * (2 * self.lam)
        return split_center(x, s, 2 * self.lam)
