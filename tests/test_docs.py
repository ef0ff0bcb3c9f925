"""Every code block of README.md and docs/*.md runs, in order, as a user would paste it (issue
29): shell blocks in bash with ``certify`` on the path, Python blocks in one namespace per
document, YAML blocks parsed. They run in a scratch directory holding the project's ``jobs/``,
whose quickstart is cut to 20 images, 1 epoch and n = 200 (same keys, minutes less), against
the test session's Ray (RAY_ADDRESS): the tour's job trains, certifies and leaves the results
the later blocks read.

A block that cannot run here says why in an HTML comment on the line before it, ``<!-- not run:
needs a cluster -->`` (or a GPU, CIFAR-10, a downloaded checkpoint, installing): it is checked
for syntax only (``bash -n``, ``compile``, ``yaml.safe_load``). Output blocks (``text``) are
not code."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]*) -->\n)?^```(?P<lang>\w*)\n(?P<body>.*?)^```", re.S | re.M)
LANGUAGES = {"bash", "python", "yaml", "text"}
# A shell block runs as bash with `certify` being this checkout's CLI in this interpreter.
SHELL_PRELUDE = 'set -euo pipefail\ncertify() { "$CERTIFY_PYTHON" -m cluster.cli "$@"; }\n'
# The README's first block: the scratch fixture runs it, and the README's test does not run it again.
QUICKSTART_RUN = "certify submit-job jobs/quickstart.yaml --wait\n"


def blocks(document: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, why it is not run) of each fenced block, in order."""
    return [(m["lang"], m["body"], m["why"]) for m in BLOCK.finditer(document.read_text())]


def scratch_quickstart(directory: Path) -> None:
    """The project's jobs/ under ``directory``, its quickstart cut to minutes of CPU: two of its
    three sigmas (what the documents filter on: 0.5, and more than one), both seeds (``--seeds``),
    one worker of each kind (each started worker costs seconds of CPU importing torch)."""
    shutil.copytree(ROOT / "jobs", directory / "jobs")
    spec = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    spec["sigmas"] = [0.25, 0.5]
    spec["dataset"]["limit"] = 20
    spec["models"]["train"]["epochs"] = 1
    spec["certify"]["n"] = 200
    spec["resources"]["shard_size"] = 10
    spec["resources"]["workers"] = 1
    (directory / "jobs" / "quickstart.yaml").write_text(yaml.safe_dump(spec))


def check_syntax(language: str, code: str) -> None:
    if language == "bash":
        subprocess.run(["bash", "-n"], input=code, text=True, check=True)
    elif language == "python":
        compile(code, "<block>", "exec")
    elif language == "yaml":
        yaml.safe_load(code)


def test_every_block_names_its_language_and_a_reason_where_it_is_not_run():
    for document in DOCUMENTS:
        for language, code, why in blocks(document):
            assert language in LANGUAGES, (document.name, language, code[:80])
            assert why is None or why.startswith("needs "), (document.name, why)
            check_syntax(language, code)


def run_shell(code: str, directory: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", SHELL_PRELUDE + code], cwd=directory, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def scratch(ray_session, trains_in_ray_job, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The scratch directory and environment, with the quickstart's results already there (as
    the README's tour leaves them), so each document's blocks run on their own."""
    directory = tmp_path_factory.mktemp("docs")
    scratch_quickstart(directory)
    env = {**os.environ, "RAY_ADDRESS": ray_session.dashboard_url, "CERTIFY_PYTHON": sys.executable}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = run_shell(QUICKSTART_RUN, directory, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return directory, env


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_the_documents_code_runs(document, scratch, train_model, monkeypatch):
    """``train_model``: the documents train models (and mark the test so)."""
    directory, env = scratch
    monkeypatch.chdir(directory)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for language, code, why in blocks(document):
        if why is not None or language == "text" or code == QUICKSTART_RUN:
            continue
        if language == "bash":
            done = run_shell(code, directory, env)
            assert done.returncode == 0, f"{document.name}:\n{code}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        elif language == "python":
            exec(compile(code, f"<{document.name}>", "exec"), namespace)  # noqa: S102 - the documents' own code
        else:
            yaml.safe_load(code)


def _within(shown: object, actual: object) -> bool:
    """Whether every key and value ``shown`` is ``actual``'s (recursively)."""
    if isinstance(shown, dict):
        return isinstance(actual, dict) and all(k in actual and _within(v, actual[k]) for k, v in shown.items())
    return shown == actual


def test_the_scratch_fixture_runs_the_readmes_first_block():
    runs = [code for language, code, why in blocks(ROOT / "README.md") if language == "bash" and why is None]
    assert runs[0] == QUICKSTART_RUN


def test_the_readme_shows_the_quickstarts_own_spec():
    """The tour's YAML is an excerpt of jobs/quickstart.yaml: it cannot drift from it."""
    shown = next(yaml.safe_load(code) for language, code, _ in blocks(ROOT / "README.md") if language == "yaml")
    assert _within(shown, yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text()))
