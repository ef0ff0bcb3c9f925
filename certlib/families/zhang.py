"""Zhang et al. 2020's non-Gaussian smoothing families (Sec. 4.2-4.3), certified with their dual
certificate (Theorem 1, Eq. 6; ``certificates.zhang_radius``):

* ``zhang-l1``: pi0(z) ∝ ||z||_1^-k exp(-||z||_1 / b), b = sigma / sqrt(2) (Eq. 10; k = 0 is
  the ``laplace`` family at the same sigma);
* ``zhang-l2``: pi0(z) ∝ ||z||_2^-k exp(-||z||_2^2 / (2 sigma^2)) (Eq. 11; k = 0 is Gaussian);
* ``zhang-linf``: pi0(z) ∝ ||z||_inf^-k exp(-||z||_2^2 / (2 sigma^2)) (Eq. 13), L-infinity radii.

The shape k in [0, d - 0.05] (d the input dimension) moves the radius distribution toward zero. The
samplers are exact: the radial part is drawn from its one-dimensional law (the same as the
certificate's, ``certlib.certificates.dual``) with a numpy generator seeded from the torch
generator (torch's gamma sampler takes no generator), the direction on the device. The
certificate is binary and holds with probability 1 - alpha - ``DELTA``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from certlib.certificates import dual
from certlib.families.base import MonteCarloNoise

DELTA = 0.001  # failure probability of the radius curve (added to alpha)
CURVE_SAMPLES = 100_000  # samples of pi0 behind the radius curve
CURVE_SEED = 0  # their stream


def _truncated_normal(u: torch.Tensor, t: torch.Tensor, sigma: float) -> torch.Tensor:
    """``dual.truncated_normal`` on the device: erf near the center, the lower
    tail's ndtri beyond sigma."""
    s = sigma * math.sqrt(2)
    central = s * torch.special.erfinv((2 * u - 1) * torch.special.erf(t / s))
    edge = torch.special.ndtr(-t / sigma)
    return torch.where(t < sigma, central, sigma * torch.special.ndtri(edge + u * (1 - 2 * edge)))


class ZhangNoise(MonteCarloNoise):
    """The part the three families share: the shape k, the input dimension and the certificate."""

    parameters = ("k", "dim")
    multiclass_refusal = "the dual certificate of Zhang et al. is binary (Theorem 1 with p_B = 1 - p_A)"
    graph_capturable = False  # the radii are drawn on the host (``_radial``)

    def __init__(self, sigma: float, *, k: float = 0.0, dim: int | None = None):
        super().__init__(sigma)
        self.k = float(k)
        if not (math.isfinite(self.k) and self.k >= 0):
            raise ValueError(f"k must be a finite number >= 0, got {k}")
        if dim is not None and not self.k <= dim - dual.K_GAP:
            raise ValueError(
                f"k must be at most the input dimension d = {dim} less {dual.K_GAP} (the density "
                f"needs k < d; nearer d its radii underflow float64), got {k}"
            )
        self.dim = dim

    @property
    def scale(self) -> float:
        """sigma (Eq. 11 and 13); Eq. 10's b overrides it."""
        return self.sigma

    def _numpy_rng(self, generator: torch.Generator | None) -> np.random.Generator:
        """A host generator derived from ``generator``'s state. A CUDA generator's seed and
        Philox offset are known on the host (no synchronization; the offset moves with every
        draw on the device); a CPU generator gives a draw."""
        if generator is not None and generator.device.type == "cuda":
            return np.random.default_rng([generator.initial_seed(), generator.get_offset()])
        return np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))

    def _radial(self, count: int, d: int, generator, device) -> torch.Tensor:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A graph would replay the host draw: every step the same radii.
            raise RuntimeError(f"{self.name} draws its radii on the host; train with cuda_graph: false")
        rng = self._numpy_rng(generator)
        return torch.from_numpy(dual.RADII[self.norm](self.k, self.scale, d, count, rng)).to(device)

    def certified_radius(self, p_a_lower, p_b_upper=None):
        if p_b_upper is not None:
            raise ValueError(f"{self.multiclass_refusal}: pass no p_b_upper")
        if self.dim is None:
            raise ValueError(f"{self.name} needs the input dimension d to certify")
        return dual.zhang_radius(
            p_a_lower,
            norm=self.norm,
            k=self.k,
            scale=self.scale,
            dim=self.dim,
            n=CURVE_SAMPLES,
            delta=DELTA,
            seed=CURVE_SEED,
        )

    def certify(self, votes, settings, x=None):
        return {**super().certify(votes, settings, x), "delta": DELTA}

    def depends_on(self, settings):
        # Everything the radius curve depends on, so that a change recomputes the shards.
        curve = {"curve_samples": CURVE_SAMPLES, "curve_seed": CURVE_SEED, "curve_bound": dual.BOUND}
        return {**super().depends_on(settings), "delta": DELTA, **curve}

    def describe(self):
        return {**super().describe(), "k": self.k, "scale": self.scale}


class ZhangL1Noise(ZhangNoise):
    """Eq. 10: radius ||z||_1 ~ Gamma(d - k, b), direction uniform on the L1 sphere (normalized
    exponentials with random signs)."""

    name = "zhang-l1"
    norm = "l1"

    @property
    def scale(self) -> float:
        return self.sigma / math.sqrt(2)

    def sample(self, x, generator=None):
        flat = x.flatten(1)
        radius = self._radial(len(flat), flat.shape[1], generator, x.device).to(x.dtype)
        e = torch.empty_like(flat).exponential_(generator=generator)
        sign = torch.where(torch.rand(flat.shape, generator=generator, device=x.device) < 0.5, -1.0, 1.0)
        z = radius[:, None] * sign * e / e.sum(dim=1, keepdim=True)
        return x + z.view_as(x)


class ZhangL2Noise(ZhangNoise):
    """Eq. 11: radius sqrt(2 sigma^2 Gamma((d - k)/2)), direction uniform on the sphere."""

    name = "zhang-l2"
    norm = "l2"

    def sample(self, x, generator=None):
        flat = x.flatten(1)
        radius = self._radial(len(flat), flat.shape[1], generator, x.device).to(x.dtype)
        g = torch.randn(flat.shape, generator=generator, device=x.device, dtype=x.dtype)
        z = radius[:, None] * g / g.norm(dim=1, keepdim=True)
        return x + z.view_as(x)


class ZhangLinfNoise(ZhangNoise):
    """Eq. 13: t = ||z||_inf from its one-dimensional law; one coordinate (uniform, random sign)
    at +-t, the others N(0, sigma^2) truncated to [-t, t] (``_truncated_normal``)."""

    name = "zhang-linf"
    norm = "linf"

    def sample(self, x, generator=None):
        flat = x.flatten(1).double()
        rows, d = flat.shape
        t = self._radial(rows, d, generator, x.device).double()[:, None]
        u = torch.rand(flat.shape, generator=generator, device=x.device, dtype=torch.float64)
        z = torch.minimum(torch.maximum(_truncated_normal(u, t, self.sigma), -t), t)
        peak = torch.randint(d, (rows, 1), generator=generator, device=x.device)
        sign = torch.where(torch.rand((rows, 1), generator=generator, device=x.device) < 0.5, -1.0, 1.0).double()
        z = z.scatter(1, peak, sign * t)
        return x + z.to(x.dtype).view_as(x)
