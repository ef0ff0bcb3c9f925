"""The smoothing families behind one registry. Each family is one module (its noise, the engine
that counts its votes, its certificates and their norm, its parameters); adding one is a new
module and a line in ``ENTRIES``.

The registry itself imports no family: what reading results needs of one (its radius's norm,
whether it is exact: ``traits``) is written in its line, and a family's module (torch, the
engines) is imported when its class is first asked for, so that ``certify table`` and ``plot``
start without torch. tests/test_code_shape.py checks each line against its class.

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

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # the names below, imported on first use (``__getattr__``)
    from certlib.families.base import SAMPLINGS, CertifySettings, MonteCarloNoise, SmoothingNoise, Votes
    from certlib.families.dssn import DSSNNoise
    from certlib.families.gaussian import GaussianNoise
    from certlib.families.laplace import LaplaceNoise
    from certlib.families.ssn import SplitIndependentNoise, split_center
    from certlib.families.uniform import UniformNoise
    from certlib.families.zhang import ZhangL1Noise, ZhangL2Noise, ZhangLinfNoise


class Entry(NamedTuple):
    """A family's line in the registry: where its class is, and its ``traits``."""

    module: str
    cls: str
    norm: str  # "l1", "l2" or "linf": the norm of its radii (the class's ``norm``)
    exact: bool  # votes enumerated exactly (the class's ``exact``)


ENTRIES: dict[str, Entry] = {
    "gaussian": Entry("gaussian", "GaussianNoise", "l2", False),
    "uniform": Entry("uniform", "UniformNoise", "l1", False),
    "laplace": Entry("laplace", "LaplaceNoise", "l1", False),
    "ssn": Entry("ssn", "SplitIndependentNoise", "l1", False),
    "dssn": Entry("dssn", "DSSNNoise", "l1", True),
    "zhang-l1": Entry("zhang", "ZhangL1Noise", "l1", False),
    "zhang-l2": Entry("zhang", "ZhangL2Noise", "l2", False),
    "zhang-linf": Entry("zhang", "ZhangLinfNoise", "linf", False),
}

# Names served by another module of this package than a family's own: the shared base and helpers.
_ELSEWHERE = {
    "SAMPLINGS": "base",
    "CertifySettings": "base",
    "MonteCarloNoise": "base",
    "SmoothingNoise": "base",
    "Votes": "base",
    "split_center": "ssn",
}


def __getattr__(name: str) -> Any:
    """``FAMILIES`` and the classes, imported on first use and kept (PEP 562)."""
    if name == "FAMILIES":
        value: Any = {method: getattr(_module(e.module), e.cls) for method, e in ENTRIES.items()}
    elif name in _ELSEWHERE:
        value = getattr(_module(_ELSEWHERE[name]), name)
    elif (entry := next((e for e in ENTRIES.values() if e.cls == name), None)) is not None:
        value = getattr(_module(entry.module), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def _module(name: str) -> Any:
    return importlib.import_module(f"{__name__}.{name}")


def traits(method: str) -> Entry:
    """The registry's line of ``method`` (its norm and exactness), without importing the family:
    what tables and plots need. ValueError naming the known ones otherwise."""
    if method not in ENTRIES:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(ENTRIES)}")
    return ENTRIES[method]


def family(method: str) -> type[SmoothingNoise]:
    """The family called ``method``; ValueError naming the known ones otherwise."""
    entry = traits(method)
    cls: type[SmoothingNoise] = getattr(_module(entry.module), entry.cls)
    return cls


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
    return [name for name in ENTRIES if certificate in family(name).accepted_certificates]


__all__ = [
    "ENTRIES",
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
    "traits",
    "with_certificate",
]
