"""The smoothing families behind one registry. Each family is one module (its noise, the engine
that counts its votes, its certificates and their norm, its parameters); adding one is a new
module and a line in ``FAMILIES``.

| family | module | paper |
|---|---|---|
| ``dssn`` | ``dssn.py`` | Levine & Feizi 2021, Sec. 4.1, Corollary 1 (exact) |
| ``ssn`` | ``ssn.py`` | Levine & Feizi 2021, Theorem 2 (Monte Carlo) |
| ``uniform`` | ``uniform.py`` | Lee et al. 2019, Yang et al. 2020; Voracek & Hein 2023 box certificates |
| ``gaussian`` | ``gaussian.py`` | Cohen et al. 2019, Theorem 1 |
| ``laplace`` | ``laplace.py`` | Teng et al. 2020; Zhang et al. 2020, Corollary 1 |
| ``zhang-l1``, ``zhang-l2``, ``zhang-linf`` | ``zhang.py`` | Zhang et al. 2020, Eq. 10, 11, 13; Theorem 1 |
"""

from __future__ import annotations

from certlib.families.base import MonteCarloNoise, SmoothingNoise, Votes
from certlib.families.dssn import DSSNNoise
from certlib.families.gaussian import GaussianNoise
from certlib.families.laplace import LaplaceNoise
from certlib.families.ssn import SplitIndependentNoise, split_center
from certlib.families.uniform import UniformNoise
from certlib.families.zhang import ZhangL1Noise, ZhangL2Noise, ZhangLinfNoise

FAMILIES: dict[str, type[SmoothingNoise]] = {
    cls.name: cls
    for cls in (
        GaussianNoise,
        UniformNoise,
        LaplaceNoise,
        SplitIndependentNoise,
        DSSNNoise,
        ZhangL1Noise,
        ZhangL2Noise,
        ZhangLinfNoise,
    )
}


def family(method: str) -> type[SmoothingNoise]:
    """The family called ``method``; ValueError naming the known ones otherwise."""
    if method not in FAMILIES:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[method]


def make_noise(
    method: str, sigma: float, *, q: int = 255, seed: int = 0, k: float | None = None, dim: int | None = None
) -> SmoothingNoise:
    """The smoothing ``method`` at level sigma on the 1/q grid (q and seed matter for DSSN); a
    shaped family (``shaped``) also takes its shape ``k`` (default 0) and the input dimension."""
    cls = family(method)
    if cls.shaped:
        return cls(sigma, q=q, seed=seed, k=0.0 if k is None else k, dim=dim)  # type: ignore[call-arg]
    if k is not None:
        raise ValueError(f"{method} has no shape parameter k")
    return cls(sigma, q=q, seed=seed)


def with_certificate(certificate: str) -> list[str]:
    """The families that accept ``certificate``."""
    return [name for name, cls in FAMILIES.items() if certificate in cls.certificates]


__all__ = [
    "FAMILIES",
    "DSSNNoise",
    "GaussianNoise",
    "LaplaceNoise",
    "MonteCarloNoise",
    "SmoothingNoise",
    "SplitIndependentNoise",
    "UniformNoise",
    "ZhangL1Noise",
    "ZhangL2Noise",
    "ZhangLinfNoise",
    "Votes",
    "family",
    "make_noise",
    "split_center",
    "with_certificate",
]
