"""The smoothed classifier g around a base classifier f: one object, the papers' procedures
visible (Cohen et al. 2019 CERTIFY; Levine & Feizi 2021 DSSN), built from the voting engines
and the certificate functions."""

from __future__ import annotations

import numpy as np
import torch

from certlib import certificates
from certlib.cascade import Cascade
from certlib.noise import DSSNNoise, SmoothingNoise
from certlib.voting import dssn_votes, make_cascade, monte_carlo_counts


class Smooth:
    """g(x) = the class the base classifier ``model`` returns most often under ``noise``.

    ``model`` maps pixel-scale images (B, C, H, W) in [0, 1] to logits (B, num_classes); or it
    is a ``Cascade`` around such a model, built once and reused across calls (a worker's). The
    engine options (``batch_size``, ``device``, ``precision``, ``compile``; see
    ``certlib.cascade``) build the cascade of a plain module; they change speed, never a vote.
    """

    ABSTAIN = certificates.ABSTAIN

    def __init__(self, model: torch.nn.Module | Cascade, noise: SmoothingNoise, num_classes: int,
                 *, batch_size: int | None = None, device: torch.device | str | None = None, precision: str | None = None,
                 compile: bool | str | None = None):
        self.model = model
        self.noise = noise
        self.num_classes = int(num_classes)
        self.options = dict(batch_size=batch_size, device=device, precision=precision, compile=compile)

    def certify(self, images: torch.Tensor, indices=None, *, n0: int = 64, n: int = 100_000,
                alpha: float = 0.001, seed: int = 0, multiclass: bool = False) -> dict[str, np.ndarray]:
        """Predictions and certified radii (in ``noise.norm``, pixel scale) for a batch of images.

        DSSN (exact): votes over all L offsets; prediction = argmax (ties to the lower index),
        radius from ``certificates.dssn_radius`` (inclusive). Monte Carlo: CERTIFY with n0
        selection and n estimation samples at one-sided level alpha; prediction -1 and radius
        NaN where it abstains. ``indices`` (dataset indices, default 0..N-1) seed the random
        streams. Returns arrays keyed prediction, selected, radius, votes (DSSN) or
        counts_selection/counts (Monte Carlo), p_a_lower, p_b_upper.
        """
        indices = np.arange(len(images)) if indices is None else np.asarray(indices)
        cascade = make_cascade(self.model, images, self.num_classes, **self.options)
        if isinstance(self.noise, DSSNNoise):
            votes = dssn_votes(cascade, images, self.noise, self.num_classes)
            prediction, radius = certificates.dssn_radius(votes, self.noise.levels, self.noise.q)
            nan = np.full(len(votes), np.nan)
            return {"prediction": prediction, "selected": prediction, "radius": radius, "votes": votes,
                    "p_a_lower": nan, "p_b_upper": nan}
        counts0, counts = monte_carlo_counts(cascade, images, indices, self.noise, self.num_classes, n0=n0, n=n, seed=seed)
        result = certificates.monte_carlo_certify(counts0, counts, alpha, self.noise.certified_radius, multiclass)
        return {**result, "counts_selection": counts0, "counts": counts}
