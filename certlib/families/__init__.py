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

from typing import Any

from certlib.families.base import SAMPLINGS, CertifySettings, MonteCarloNoise, SmoothingNoise, Votes
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


def make_noise(method: str, sigma: float, **available: Any) -> SmoothingNoise:
    """The smoothing ``method`` at level sigma, constructed from the parameters its family takes
    (``parameters``) among those ``available``: q and seed (DSSN), k and dim (Zhang et al.'s
    families). The others are not its own and are left out; a shape k given to a family without
    one is refused (a spec's ``ks`` naming a family that ignores them)."""
    cls = family(method)
    if available.get("k") is not None and "k" not in cls.parameters:
        raise ValueError(f"{method} has no shape parameter k")
    own = {name: available[name] for name in cls.parameters if available.get(name) is not None}
    return cls(sigma, **own)


def with_certificate(certificate: str) -> list[str]:
    """The families that accept ``certificate``."""
    return [name for name, cls in FAMILIES.items() if certificate in cls.accepted_certificates]


__all__ = [
    "FAMILIES",
    "SAMPLINGS",
    "CertifySettings",
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
