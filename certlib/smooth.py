"""The smoothed classifier g around a base classifier f: one object, the papers' procedures
visible (Cohen et al. 2019 CERTIFY; Levine & Feizi 2021 DSSN). The family of ``noise`` decides
how the votes are counted and certified; this class only ties the model to it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Unpack

import numpy as np
import torch

from certlib import certificates
from certlib.engine.cascade import Cascade, EngineOptions
from certlib.engine.voting import make_cascade
from certlib.families import CertifySettings, SmoothingNoise


class Smooth:
    """g(x) = the class the base classifier ``model`` returns most often under ``noise``.

    ``model`` maps pixel-scale images (B, C, H, W) in [0, 1] to logits (B, num_classes); or it
    is a ``Cascade`` around such a model, built once and reused across calls (a worker's). The
    engine options (``certlib.engine.cascade.EngineOptions``) build the cascade of a plain module; they
    change speed, never a vote.
    """

    ABSTAIN = certificates.ABSTAIN

    def __init__(
        self, model: torch.nn.Module | Cascade, noise: SmoothingNoise, num_classes: int, **engine: Unpack[EngineOptions]
    ):
        self.model = model
        self.noise = noise
        self.num_classes = int(num_classes)
        self.engine = engine

    def certify(
        self,
        images: torch.Tensor,
        indices=None,
        *,
        n0: int = 64,
        n: int = 100_000,
        alpha: float = 0.001,
        seed: int = 0,
        multiclass: bool = False,
        certificate: str = "standard",
        sampling: str = "fixed",
        radii: Sequence[float] = (),
        epsilon: float | None = None,
    ) -> dict[str, Any]:
        """Predictions and certified radii (in ``noise.norm``, pixel scale) for a batch of images.

        DSSN (exact): votes over all L offsets; prediction = argmax (ties to the lower index),
        radius from ``certificates.dssn_radius`` (inclusive). Monte Carlo: CERTIFY with n0
        selection and n estimation samples at one-sided level alpha; prediction -1 and radius
        NaN where it abstains. ``sampling="sequential"``: at most n estimation samples, each image
        stopped once its certificate at the table ``radii`` (pixel scale) is settled (or, with
        ``epsilon``, its radius within epsilon of the point estimate's), with anytime-valid
        bounds at level alpha (``certificates.sequences``): the radius is then the one of the
        bound at the stopping time. ``indices`` (dataset indices, default 0..N-1) seed the random
        streams. Returns arrays keyed selected, prediction, radius, p_a_lower, p_b_upper, n
        (Monte Carlo: the estimation samples used), votes (exact: over all L copies; Monte
        Carlo: the estimation samples), selection_votes (Monte Carlo: the n0 samples; None for
        exact families), and the ``certificate``, ``multiclass`` and ``sampling`` the rows store.
        """
        indices = np.arange(len(images)) if indices is None else np.asarray(indices)
        settings = CertifySettings(
            n0=n0,
            n=n,
            alpha=alpha,
            multiclass=multiclass,
            certificate=certificate,
            seed=seed,
            sampling=sampling,
            radii=tuple(float(r) for r in radii),
            epsilon=epsilon,
        )
        return self.certify_with(images, indices, settings)

    def certify_with(self, images: torch.Tensor, indices, settings: CertifySettings) -> dict[str, Any]:
        """``certify`` with its settings as one object (a sweep's worker holds them so)."""
        cascade = make_cascade(self.model, images, self.num_classes, **self.engine)
        votes = self.noise.count(cascade, images, np.asarray(indices), settings)
        result = self.noise.certify(votes, settings)
        return {**result, "votes": votes.counts, "selection_votes": votes.selection}
