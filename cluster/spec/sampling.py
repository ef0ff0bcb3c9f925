"""The checks sequential sampling adds to a spec (``certify.sampling: sequential``)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from certlib.data import DATASETS
from certlib.families import family, make_noise
from cluster.spec.fields import SpecError

if TYPE_CHECKING:
    from cluster.spec import Sweep


def check_sampling(sweep: Sweep) -> None:
    """Sequential sampling: Monte Carlo families only, a radius grid each configuration can
    stop on within the cap ``certify.n`` (checked where the family's radius is cheap; Zhang et
    al.'s curves are checked by the worker that builds them), ``epsilon`` only with it."""
    certify = sweep.certify
    if certify.sampling != "sequential":
        if certify.epsilon is not None:
            raise SpecError("certify.epsilon: a precision target for sampling: sequential only")
        return
    exact = [m for m in sweep.methods if family(m).exact]
    if exact:
        raise SpecError(
            f"certify.sampling: {exact[0]} counts exact votes; sequential sampling is for Monte Carlo methods"
        )
    info = DATASETS[sweep.dataset.name]
    for method, sigma in itertools.product(sweep.methods, sweep.sigmas):
        if "k" in family(method).parameters:
            continue
        noise = make_noise(method, sigma, q=info.q)
        try:
            noise.stop_rule(sweep.certify_settings(noise, 0), info.num_classes)  # type: ignore[attr-defined]
        except ValueError as err:
            raise SpecError(f"certify.n: {err}") from None
