"""The shape of the code the README's map describes: no smoothing family is named outside its
own module and the registry, and functions and modules stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

from certlib.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(path for package in ("certlib", "cluster") for path in (ROOT / package).rglob("*.py"))
FAMILY_MODULES = ROOT / "certlib" / "families"
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 400


def _outside_families() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text())) for path in SOURCES if FAMILY_MODULES not in path.parents]


def test_no_family_name_is_compared_outside_the_families():
    names, classes = set(FAMILIES), {cls.__name__ for cls in FAMILIES.values()}
    offenders = []
    for path, tree in _outside_families():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                for part in (node.left, *node.comparators):
                    offenders += [
                        f"{path.relative_to(ROOT)}:{c.lineno} compares {c.value!r}"
                        for c in ast.walk(part)
                        if isinstance(c, ast.Constant) and c.value in names
                    ]
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("certlib.families"):
                offenders += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}" for a in node.names if a.name in classes
                ]
    assert offenders == []


def test_functions_and_modules_stay_small():
    too_long = []
    for path in SOURCES:
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert too_long == []
