"""The shape of the code the README's map describes: no smoothing family is named outside its
own module and the registry, and functions and modules stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

from certlib.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(path for package in ("certlib", "cluster") for path in (ROOT / package).rglob("*.py"))
FAMILY_MODULES = ROOT / "certlib" / "families"
MAX_FUNCTION_LINES, MAX_CLASS_LINES, MAX_MODULE_LINES = 60, 150, 400


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


def test_each_registry_line_tells_its_familys_class():
    """The registry imports no family (``certify table`` starts without torch): each line's class,
    module, norm and exactness are the class's own, and every family class has a line."""
    from certlib.families import ENTRIES, SmoothingNoise

    for method, entry in ENTRIES.items():
        cls = FAMILIES[method]
        assert (cls.name, cls.__name__, cls.__module__, cls.norm, cls.exact) == (
            method,
            entry.cls,
            f"certlib.families.{entry.module}",
            entry.norm,
            entry.exact,
        )

    def concrete(cls: type) -> set[type]:
        return {c for sub in cls.__subclasses__() for c in {sub} | concrete(sub) if "name" in vars(c)}

    assert concrete(SmoothingNoise) == set(FAMILIES.values())


def test_functions_and_modules_stay_small():
    too_long = []
    for path in SOURCES:
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            limit = {ast.FunctionDef: MAX_FUNCTION_LINES, ast.AsyncFunctionDef: MAX_FUNCTION_LINES}.get(type(node))
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else limit
            if limit is not None and (lines := node.end_lineno - node.lineno + 1) > limit:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert too_long == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.Module, modules: set[str]) -> set[str]:
    """The project modules ``tree`` imports, at any depth (a function's import is an edge too),
    except those only a type checker reads (``if TYPE_CHECKING:``)."""
    checking_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in checking_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found & modules


def test_no_import_circle():
    """The modules' import graph (every import, at any depth) has no cycle: each layer and
    folder can be read knowing only what it imports."""
    modules = {_module_name(path): path for path in SOURCES}
    graph = {name: _imported(ast.parse(path.read_text()), set(modules)) - {name} for name, path in modules.items()}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    assert cycles == []


def test_the_math_floor_imports_no_torch_and_no_registry(fresh_python):
    """``certlib.certificates`` is numpy and the papers only: importing it (and computing a
    radius) loads neither torch nor the family registry."""
    script = (
        "import sys; from certlib import certificates; certificates.l1_laplace_radius(0.9, 0.5); "
        "print(sorted(m for m in ('torch', 'certlib.families', 'ray') if m in sys.modules))"
    )
    done = fresh_python.run(script)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_no_package_folder_holds_more_than_ten_modules():
    crowded = {
        str(folder.relative_to(ROOT)): count
        for folder in {path.parent for path in SOURCES}
        if (count := sum(1 for p in folder.glob("*.py") if p.name != "__init__.py")) > 10
    }
    assert crowded == {}


def test_test_modules_share_through_helpers_only():
    """A test module imports what it shares with others from ``tests.helpers`` (fixtures come
    from conftest by name): importing another test module or conftest would run or re-collect
    that module's tests' set-up wherever it is imported."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            offenders += [
                f"tests/{path.name}:{node.lineno} imports {name}"
                for name in names
                if name.startswith(("tests.test_", "tests.conftest"))
            ]
    assert offenders == []
