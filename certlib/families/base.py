"""What every smoothing family implements, and the Monte Carlo path four of them share.

A family is a noise class; an instance is one configured smoothing (its ``sigma``, and for
DSSN also ``q`` and ``seed``). The family owns everything that differs between families:

* the noise: ``sample`` (training, and Monte Carlo certification), or an exact enumeration;
* which engine counts its votes (``count``): Monte Carlo sampling or exact enumeration;
* its certificates (``certify``, ``certificates``) and the norm of their radii (``norm``);
* what of the certification settings determines its rows (``settings``: a shard's identity);
* what a model card must match besides method and sigma (``card_keys``);
* its parameters' validation (the constructor raises ValueError).

Conventions shared by every family:

* Images are in pixel scale [0, 1], shape (B, C, H, W) (any trailing shape works);
  normalization to the network's statistics happens inside the model, after the noise.
* Every family is parametrised by ``sigma`` as in the papers: Gaussian sigma is the standard
  deviation; uniform and splitting noise use lambda = sigma * sqrt(3) (the half-width whose
  uniform distribution has standard deviation sigma); Laplace uses the scale b = sigma / sqrt(2).
* ``sample(x, generator)`` returns one noisy copy of every image in ``x`` on x's device, drawing
  all randomness from ``generator`` so that streams can be derived from (seed, image index).
* Radii are in the family's ``norm``, pixel scale; NaN (prediction -1) where it abstains.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from certlib import certificates
from certlib.engine.cascade import Cascade
from certlib.engine.voting import monte_carlo_counts

RadiusFunction = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


def check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    return sigma


def uniform_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) draws shaped like ``x``, on its device and dtype."""
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@dataclass(frozen=True)
class Votes:
    """What an engine counted for N images: ``counts`` (N, C), the votes over all copies
    (exact) or the n estimation samples (Monte Carlo); ``selection`` (N, C), the n0 selection
    samples (Monte Carlo only)."""

    counts: np.ndarray
    selection: np.ndarray | None = None


class SmoothingNoise(ABC):
    """The interface every smoothing family implements (module docstring)."""

    name: ClassVar[str]
    norm: ClassVar[str]  # "l1", "l2" or "linf": the norm of the certified radius
    exact: ClassVar[bool] = False  # votes enumerated exactly: no Monte Carlo parameters, no alpha
    certificates: ClassVar[tuple[str, ...]] = ("standard",)  # what ``certify(certificate=...)`` accepts
    binary_only: ClassVar[str] = ""  # why it has no multiclass certificate (empty: it has one)
    card_keys: ClassVar[tuple[str, ...]] = ()  # card fields a model must match besides method and sigma
    shaped: ClassVar[bool] = False  # takes a shape k and the input dimension (Zhang et al.'s families)
    # The row columns its smoothing is rebuilt from (``rows.stored_noise``): rows re-certified
    # together must agree on every one of them.
    row_parameters: ClassVar[tuple[str, ...]] = ("sigma",)

    def __init__(self, sigma: float, *, q: int = 255, seed: int = 0):
        self.sigma = check_sigma(sigma)

    @property
    @abstractmethod
    def scale(self) -> float:
        """The noise's own scale parameter (Gaussian sigma, Laplace b, lambda otherwise)."""

    @abstractmethod
    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One noisy copy of each image of ``x`` (pixel scale [0, 1])."""

    def sample_grid(self, values: torch.Tensor, q: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One noisy float32 copy of each image given by its integer grid values (pixel value
        = value / q), as training draws them: no check that the values lie on the grid and
        no host synchronization, so it can run inside a CUDA graph."""
        return self.sample(values.to(torch.float32) / q, generator)

    @abstractmethod
    def count(
        self,
        cascade: Cascade,
        images: torch.Tensor,
        indices: Sequence[int],
        *,
        n0: int,
        n: int,
        seed: int,
        stats: dict[str, int] | None = None,
    ) -> Votes:
        """The base classifier's votes on ``images`` (dataset ``indices`` seed random streams)."""

    @abstractmethod
    def certify(
        self,
        votes: Votes,
        *,
        alpha: float,
        multiclass: bool = False,
        certificate: str = "standard",
        x: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Predictions and radii from votes: arrays selected, prediction (-1 = abstain), radius,
        p_a_lower, p_b_upper, and ``certificate``, the name stored in the rows. ``x`` (N, d)
        pixel-scale images, for input-dependent certificates."""

    @abstractmethod
    def passes_per_image(self, n0: int, n: int) -> int:
        """Forward passes one image costs."""

    @abstractmethod
    def settings(self, *, n0: int, n: int, alpha: float, multiclass: bool) -> dict[str, Any]:
        """The certification settings its rows depend on: part of a shard's identity."""

    def describe(self) -> dict[str, Any]:
        """The parameters that define this smoothing, for result rows and model cards."""
        return {"method": self.name, "sigma": self.sigma}

    def refuse_certificate(self, certificate: str) -> None:
        if certificate not in self.certificates:
            raise ValueError(
                f"the {certificate!r} certificate does not apply to {self.name} rows "
                f"(theirs: {', '.join(self.certificates)})"
            )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "method")
        return f"{type(self).__name__}({params})"


class MonteCarloNoise(SmoothingNoise):
    """A family certified by Cohen et al. 2019's CERTIFY: n0 selection and n estimation samples
    per image (``voting.monte_carlo_counts``), a one-sided Clopper-Pearson bound at level alpha,
    and the family's radius function of (p_a_lower, p_b_upper or None)."""

    @abstractmethod
    def certified_radius(self, p_a_lower, p_b_upper=None) -> np.ndarray:
        """Radius in ``self.norm`` from probability bounds; NaN where it must abstain."""

    def radius_function(self, certificate: str, x: np.ndarray | None) -> RadiusFunction:
        """The radius of ``certificate`` (one of ``certificates``) as a function of the bounds."""
        self.refuse_certificate(certificate)
        return self.certified_radius

    def count(self, cascade, images, indices, *, n0, n, seed, stats=None):
        selection, counts = monte_carlo_counts(
            cascade, images, indices, self, cascade.num_classes, n0=n0, n=n, seed=seed, stats=stats
        )
        return Votes(counts, selection)

    def certify(self, votes, *, alpha, multiclass=False, certificate="standard", x=None):
        if votes.selection is None:
            raise ValueError(f"{self.name}: Monte Carlo certification needs the n0 selection counts")
        if multiclass and self.binary_only:
            raise ValueError(self.binary_only)
        result = certificates.monte_carlo_certify(
            votes.selection, votes.counts, alpha, self.radius_function(certificate, x), multiclass
        )
        suffix = "" if certificate == "standard" else f"_{certificate}"
        return {**result, "certificate": ("multiclass" if multiclass else "binary") + suffix}

    def passes_per_image(self, n0, n):
        return int(n0) + int(n)

    def settings(self, *, n0, n, alpha, multiclass):
        return {"n0": n0, "n": n, "alpha": alpha, "multiclass": multiclass}
