"""What every smoothing family implements, and the Monte Carlo path four of them share.

A family is a noise class; an instance is one configured smoothing, constructed from its own
parameters: ``sigma``, and those it names in ``parameters`` (DSSN's ``q`` and ``seed``, Zhang et
al.'s ``k`` and input dimension ``dim``). The family owns everything that differs between
families:

* the noise: ``sample`` (training, and Monte Carlo certification), or an exact enumeration;
* which engine counts its votes (``count``): Monte Carlo sampling or exact enumeration;
* its certificates (``certify``, ``accepted_certificates``, ``multiclass_refusal``) and the
  norm of their radii (``norm``);
* what of the certification settings its rows depend on (``depends_on``: a shard's identity);
* what a model card must match besides method and sigma (``card_keys``);
* its parameters' validation (the constructor raises ValueError).

Counting and certifying read what they need from one ``CertifySettings``: DSSN's exact engine
reads only the certificate; Monte Carlo families read n0, n and the seed to count, alpha,
multiclass and the certificate to certify.

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
from certlib.certificates import sequences
from certlib.engine.cascade import Cascade
from certlib.engine.sequential import sequential_counts
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


SAMPLINGS = ("fixed", "sequential")


@dataclass(frozen=True)
class CertifySettings:
    """How to certify: ``n0`` selection and ``n`` estimation samples per image and the streams'
    ``seed`` (Monte Carlo), the one-sided level ``alpha``, binary or ``multiclass`` bounds, and
    the ``certificate`` (``standard``: each family's own; ``box``/``box_input``: Voracek & Hein's
    box-constrained radii where a family accepts them). ``sampling``: ``fixed`` (n samples,
    Clopper-Pearson) or ``sequential`` (at most n, each image stopped once its certificate at
    the table ``radii`` (pixel scale, the family's norm) is settled, or with ``epsilon`` once
    its radius is within epsilon of the point estimate's; anytime-valid bounds). Each family
    reads what it needs."""

    n0: int = 64
    n: int = 100_000
    alpha: float = 0.001
    multiclass: bool = False
    certificate: str = "standard"
    seed: int = 0
    sampling: str = "fixed"
    radii: tuple[float, ...] = ()
    epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")

    @property
    def sequential(self) -> bool:
        return self.sampling == "sequential"


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
    parameters: ClassVar[tuple[str, ...]] = ()  # its constructor's keyword parameters besides sigma
    accepted_certificates: ClassVar[tuple[str, ...]] = ("standard",)  # the ``CertifySettings.certificate``s it takes
    multiclass_refusal: ClassVar[str | None] = None  # why it has no multiclass certificate; None: it has one
    card_keys: ClassVar[tuple[str, ...]] = ()  # card fields a model must match besides method and sigma
    graph_capturable: ClassVar[bool] = True  # ``sample`` draws on the device only: a CUDA graph may replay it

    def __init__(self, sigma: float):
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
        indices: Sequence[int] | np.ndarray,
        settings: CertifySettings,
        stats: dict[str, int] | None = None,
    ) -> Votes:
        """The base classifier's votes on ``images`` (dataset ``indices`` seed random streams)."""

    @abstractmethod
    def certify(self, votes: Votes, settings: CertifySettings, x: np.ndarray | None = None) -> dict[str, Any]:
        """Predictions and radii from votes: arrays selected, prediction (-1 = abstain), radius,
        p_a_lower, p_b_upper, and what the rows store of how: ``certificate`` and ``multiclass``
        (None where it does not apply). ``x`` (N, d) pixel-scale images, for input-dependent
        certificates."""

    @abstractmethod
    def passes_per_image(self, settings: CertifySettings) -> int:
        """Forward passes one image costs."""

    @abstractmethod
    def depends_on(self, settings: CertifySettings) -> dict[str, Any]:
        """What of the certification settings its rows depend on: part of a shard's identity."""

    def describe(self) -> dict[str, Any]:
        """The parameters that define this smoothing, for result rows and model cards."""
        return {"method": self.name, "sigma": self.sigma}

    def refuse_certificate(self, certificate: str) -> None:
        if certificate not in self.accepted_certificates:
            raise ValueError(
                f"the {certificate!r} certificate does not apply to {self.name} rows "
                f"(theirs: {', '.join(self.accepted_certificates)})"
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
        """The radius of ``certificate`` (one of ``accepted_certificates``) as a function of the
        bounds."""
        self.refuse_certificate(certificate)
        return self.certified_radius

    def count(self, cascade, images, indices, settings, stats=None):
        counting = sequential_counts if settings.sequential else monte_carlo_counts
        extra = {"stop": self.stop_rule(settings, cascade.num_classes)} if settings.sequential else {}
        selection, counts = counting(
            cascade,
            images,
            indices,
            self,
            cascade.num_classes,
            n0=settings.n0,
            n=settings.n,
            seed=settings.seed,
            stats=stats,
            **extra,
        )
        return Votes(counts, selection)

    def stop_rule(self, settings: CertifySettings, classes: int):
        """When sequential sampling may stop an image (``certificates.sequences.settled``): its
        certificate settled at every table radius it can reach within the cap ``n``, or its
        radius within ``epsilon`` of the point estimate's. Refuses settings no image could
        stop early under (an empty grid, a cap too small for any of its radii)."""
        radius = self.radius_function(settings.certificate, None)
        radii = sequences.reachable_radii(
            settings.radii, settings.n, settings.alpha, settings.multiclass, classes, radius
        )
        if settings.epsilon is None and not len(radii):
            raise ValueError(
                f"sequential sampling: no radius of {list(settings.radii)} can be certified with {settings.n} samples "
                f"at alpha {settings.alpha} ({self.name}, sigma {self.sigma}); raise n or give smaller radii"
            )

        def stop(counts, selected):
            return sequences.settled(
                counts,
                selected,
                alpha=settings.alpha,
                multiclass=settings.multiclass,
                radius=radius,
                radii=radii,
                epsilon=settings.epsilon,
            )

        return stop

    def certify(self, votes, settings, x=None):
        if votes.selection is None:
            raise ValueError(f"{self.name}: Monte Carlo certification needs the n0 selection counts")
        if settings.multiclass and self.multiclass_refusal:
            raise ValueError(self.multiclass_refusal)
        radius = self.radius_function(settings.certificate, x)
        result = certificates.monte_carlo_certify(
            votes.selection, votes.counts, settings.alpha, radius, settings.multiclass, settings.sequential
        )
        return {
            **result,
            "certificate": settings.certificate,
            "multiclass": settings.multiclass,
            "sampling": settings.sampling,
        }

    def passes_per_image(self, settings):
        return int(settings.n0) + int(settings.n)

    def depends_on(self, settings):
        fixed = {"n0": settings.n0, "n": settings.n, "alpha": settings.alpha, "multiclass": settings.multiclass}
        if not settings.sequential:
            return fixed  # as before sequential sampling existed: earlier shards stay valid
        return {**fixed, "sampling": "sequential", "radii": list(settings.radii), "epsilon": settings.epsilon}
