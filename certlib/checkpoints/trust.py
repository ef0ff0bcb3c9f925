"""Code only by consent. A model card whose architecture is ``factory:<package.module>:<function>``
names code: building that model imports the module (running its top level) and calls the
function. Nothing else a checkpoint holds runs code (``certlib.checkpoints.weights``), so this is
the one place a file can make this library run code, and it does so only for a module the user
trusted by name: ``models.trust_code: [package.module]`` in a sweep spec, ``trust_code=
("package.module",)`` in Python. A trusted name covers its submodules (``mypkg`` trusts
``mypkg.nets``: importing ``mypkg.nets`` runs ``mypkg/__init__.py`` too); there is no pattern
that trusts everything. A module of the standard library is never a network factory and is
refused even when named (``factory:os:fork`` would fork every worker).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable

SPEC_KEY = "models.trust_code"
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_FUNCTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHOWN = 80  # characters of a value quoted in a message


class UntrustedCode(ValueError):
    """A card names code the user did not trust (or a standard-library module); one line."""


def short(value: object) -> str:
    """``repr(value)``, at most about 80 characters of it."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def factory_module(architecture: str) -> str | None:
    """The module a ``factory:<package.module>:<function>`` architecture imports; None for the
    other architectures."""
    kind, _, target = architecture.partition(":")
    if kind != "factory":
        return None
    return target.partition(":")[0] or None


def factory_problem(architecture: str) -> str | None:
    """Why ``factory:...`` is not ``factory:<package.module>:<function>``; None where it is."""
    module, _, function = architecture.partition(":")[2].partition(":")
    if not _MODULE.fullmatch(module) or not _FUNCTION.fullmatch(function):
        return f"{short(architecture)} is not factory:<package.module>:<function>"
    return None


def standard_library(module: str) -> bool:
    """Whether ``module`` belongs to Python's standard library (or is built into it)."""
    top = module.partition(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


def module_problem(name: object) -> str | None:
    """Why ``name`` cannot be trusted (not a module name, a pattern, the standard library);
    None where it can."""
    if not isinstance(name, str) or not _MODULE.fullmatch(name):
        return f"must be a module name (package.module), got {short(name)}: consent names each module"
    if standard_library(name):
        return f"{name!r} is a module of the standard library, not a network factory"
    return None


def trusts(trust_code: Iterable[str], module: str) -> bool:
    """Whether ``module`` is one of the trusted names or a submodule of one."""
    return any(module == name or module.startswith(name + ".") for name in trust_code)


def require_consent(architecture: str, trust_code: Iterable[str], where: str = "") -> None:
    """Refuse (one line naming the module and the key that allows it) to build ``architecture``
    where it imports a module that ``trust_code`` does not name; nothing for the others."""
    module = factory_module(architecture)
    if module is None:
        return
    prefix = f"{where}: " if where else ""
    if standard_library(module):
        raise UntrustedCode(
            f"{prefix}architecture {short(architecture)} names {module!r}, a module of the standard library: "
            "a network factory is your own module (refused)"
        )
    if not trusts(trust_code, module):
        raise UntrustedCode(
            f"{prefix}architecture {short(architecture)} imports and runs the module {module!r}: refused "
            f"unless you trust it by name ({SPEC_KEY}: [{module}] in the spec, trust_code=[{module!r}] in Python)"
        )


def importable_from_here() -> None:
    """Look up a user's factory module in the current directory too, as ``python -m`` does, but
    after every installed package and the standard library (appended to ``sys.path``), so that a
    file of the current directory never shadows a module this library imports (``timm.py`` in a
    downloaded model's directory would otherwise run when ``--layout timm`` imports timm)."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.append(here)
