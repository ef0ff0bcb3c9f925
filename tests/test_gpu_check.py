"""bench/gpu_check.py, the GPU acceptance run, kept from rotting where no GPU is: every step runs
end to end on the CPU at tiny sizes, and the GPU test selection holds every GPU test."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import GPU_TEST_MODULES, STEP_ORDER

ROOT = Path(__file__).resolve().parents[1]


def _requesting(tree: ast.Module, fixtures: set[str]) -> tuple[set[str], set[str]]:
    """(fixtures, tests) of a module that request one of ``fixtures``, directly or through a
    fixture of the module that does."""
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    wanted, tests = set(fixtures), set()
    for _ in range(3):  # fixtures built on fixtures built on `cuda`
        for function in functions:
            if {arg.arg for arg in function.args.args} & wanted:
                (tests if function.name.startswith("test_") else wanted).add(function.name)
    return wanted, tests


def test_every_gpu_test_is_in_the_gpu_selection():
    """A test that requests the `cuda` fixture (marked `gpu` by conftest) lives in one of the
    modules the GPU check runs."""
    conftest_fixtures, _ = _requesting(ast.parse((ROOT / "tests" / "conftest.py").read_text()), {"cuda"})
    outside = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        _, tests = _requesting(ast.parse(path.read_text()), conftest_fixtures)
        if tests and f"tests/{path.name}" not in GPU_TEST_MODULES:
            outside += [f"tests/{path.name}::{name}" for name in sorted(tests)]
    assert outside == []
    assert all((ROOT / module).is_file() for module in GPU_TEST_MODULES)


def test_the_gpu_check_runs_every_step_on_a_cpu(ray_session, train_model, tmp_path):
    """``--device cpu --quick`` without CIFAR-10 (random images): every step ends in its time
    limit, and what holds at any size holds (votes against float64 and the bare engine,
    deterministic resume, the GPU tests' outcome). Its rates are not asserted on. The check
    trains in its own processes (hence train_model), and its pipeline's job runs on the
    session's Ray (``--address``; its private start is test_local_ray_safety's subject)."""
    out = tmp_path / "out"
    command = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)]
    command += ["--address", ray_session.dashboard_url]
    command += ["--cifar", str(tmp_path / "no-cifar"), "--work", str(tmp_path / "work")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert [step["name"] for step in summary["steps"]] == list(STEP_ORDER)
    assert [step["status"] for step in summary["steps"]] == ["ok"] * len(STEP_ORDER), summary["steps"]
    exact = [row for step in summary["steps"] for row in step["rows"] if row["exact"]]
    assert len(exact) == 5 and all(row["ok"] for row in exact), exact  # 2 vote checks, resume, job votes, tests
    assert summary["meaningful"] is False
    report = (out / "gpu_check.md").read_text()
    assert "random images" in report and "| engine | forward ceiling" in report
    assert "===== pipeline: ok" in (out / "gpu_check.log").read_text()
