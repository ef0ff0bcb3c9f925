"""Broken, hostile and careless sweep specs (issue 26, items 3, 8, 9): every one is refused by
``certify submit-job`` and ``certify plan`` with one line and exit code 2, in bounded time and
memory, writing nothing and starting no Ray.

Each case runs in a child forked from a harness process (``python tests/test_hostile_specs.py``,
which imports the command line once; ``HARNESSES`` side by side share the cases), under a memory limit
(RLIMIT_AS) and a wall-clock timeout, in a directory of its own with a home directory of its
own; the Ray connections are replaced by an exit with code 99, so a spec that validates is
seen as accepted and never reaches a cluster. The same harness prints the table "tried / refused with one line /
accepted / traceback / resources used" (``python tests/test_hostile_specs.py --table``): run it
with ``PYTHONPATH`` at another checkout to count another version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import cluster  # noqa: F401 - before Ray's: it sets RAY_AUTH_MODE, which Ray's client reads once
from tests.helpers import FreshPython, StubDashboard

ROOT = Path(__file__).resolve().parents[1]
REACHED_RAY = 99  # the exit code of a child whose spec validated: it asked for a Ray connection
CRASHED = 70  # the exit code of a child whose command raised past the command line's error handling
LINE_LIMIT = 300  # "one line": at most this many characters
CASE_SECONDS = 30.0  # per case, on a loaded 2-core machine
CASE_MEMORY = 512 << 20  # address space a case may add to the harness's (RLIMIT_AS): the hard bound
CASE_PEAK_MB = 200  # resident memory a case may add to what it started with: the bound asserted
CASE_OUTPUT = 16 << 20  # bytes a case may write to its stdout or stderr files (RLIMIT_FSIZE)

BASE = {
    "name": "hostile",
    "output": "results/hostile",
    "dataset": {"name": "digits", "split": "test", "limit": 8},
    "models": {"path": "checkpoints/{method}-{sigma}.pt", "train": {"architecture": "small_cnn", "epochs": 1}},
    "methods": ["uniform"],
    "sigmas": [0.5],
    "certify": {"n0": 8, "n": 16},
    "radii": [0.0, 0.5],
    "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "shard_size": 8},
}
BASE_TEXT = yaml.safe_dump(BASE, sort_keys=False)

Builder = Callable[[Path], Path]  # writes a case's spec into its directory; returns the spec's path


# Harness processes side by side (the cases take half a minute one after the other): two where this
# pytest has the cores to itself, one where pytest-xdist's workers share them (each harness spends
# seconds importing before its first case).
HARNESSES = 2 if (os.cpu_count() or 1) >= 2 * int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) else 1


def text(content: str | bytes, name: str = "spec.yaml") -> Builder:
    def build(where: Path) -> Path:
        path = where / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    return build


def lazy(make: Callable[[Path], str | bytes]) -> Builder:
    """A spec whose text depends on its directory, or is too big to hold in the corpus: built in
    a child of the harness (``_built``)."""

    def build(where: Path) -> Path:
        return text(make(where))(where)

    LAZY.add(build)
    return build


LAZY: set[Builder] = set()


def changed(**changes) -> str:
    """BASE with dotted keys set (``certify__n=...`` is certify.n); ``...`` deletes the key."""
    spec = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = spec
        for key in parents:
            target = target.setdefault(key, {})
        if value is ...:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    return yaml.safe_dump(spec, sort_keys=False, width=10**9)


def replaced(old: str, new: str) -> str:
    assert old in BASE_TEXT, old
    return BASE_TEXT.replace(old, new, 1)


def raw(**values: str) -> str:
    """BASE with top-level keys given as YAML text (``raw(radii="[1, 2]")``), in BASE's order."""
    lines = []
    for key, value in BASE.items():
        given = values.pop(key, None)
        lines.append(f"{key}: {given}" if given is not None else yaml.safe_dump({key: value}).rstrip("\n"))
    return "\n".join(lines + [f"{key}: {value}" for key, value in values.items()]) + "\n"


def alias_bomb(levels: int = 9) -> str:
    """The billion laughs in one flow sequence: each item nine aliases of the one before."""
    items = ['&a0 "lol"'] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "[" + ", ".join(items) + "]"


def merge_bomb(levels: int = 8) -> str:
    """Merge keys (``<<``) of mappings that alias the one before, nine times each."""
    maps = ["&m0 {" + ", ".join(f"k{j}: {j}" for j in range(9)) + "}"]
    maps += [f"&m{i} {{" + ", ".join(f"x{j}: *m{i - 1}" for j in range(9)) + "}" for i in range(1, levels + 1)]
    return "{<<: [" + ", ".join(maps) + "], n0: 8, n: 16}"


def big_radii(count: int) -> str:
    """BASE with ``count`` radii 0, 0.0001, ... as the block list ``yaml.safe_dump`` writes,
    written directly: PyYAML's emitter takes 12 s over a million."""
    return raw(radii="\n" + "\n".join(f"- {round(0.0001 * i, 4)!r}" for i in range(count)))


HUGE = "HUGE_PLACEHOLDER"


def huge(text: str, **changes) -> str:
    """``changed(**changes)`` with ``text`` (plain characters) where the value ``HUGE`` stands:
    PyYAML's emitter takes 0.4 s over a megabyte."""
    spec = changed(**changes)
    assert spec.count(HUGE) == 1
    return spec.replace(HUGE, text)


def directory(where: Path) -> Path:
    (where / "spec.yaml").mkdir()
    return where / "spec.yaml"


def missing(where: Path) -> Path:
    return where / "missing.yaml"


def nested_block(levels: int) -> str:
    return BASE_TEXT + "deep:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(levels)) + " " * levels + " x\n"


_BIG_STRING = "x" * 500_000

# name -> (builder, what it tries). Broken specs: each must be refused with one line.
BROKEN: dict[str, Builder] = {
    # the file itself
    "missing-file": missing,
    "a-directory": directory,
    "empty-file": text(""),
    "comments-only": text("# nothing here\n"),
    "top-level-list": text("- name\n- output\n"),
    "top-level-scalar": text("hello\n"),
    "unclosed-bracket": text("name: [unclosed\n"),
    "tab-indentation": text("name: x\n\tdataset: y\n"),
    "random-bytes": text(random.Random(0).randbytes(4096)),
    "utf-16": text(BASE_TEXT.encode("utf-16")),
    "nul-byte": text(b"name: a\x00b\n" + BASE_TEXT.encode()),
    "two-documents": text(BASE_TEXT + "---\n" + BASE_TEXT),
    "python-tag": text(replaced("name: hostile", "name: !!python/object/apply:os.system ['echo pwned']")),
    "unknown-tag": text(replaced("name: hostile", "name: !custom hostile")),
    "long-tag": text(replaced("name: hostile", "name: !" + "t" * 100_000 + " hostile")),
    # size and shape
    "10-mb-of-comments": lazy(lambda _: BASE_TEXT + ("#" * 1000 + "\n") * 10_000),
    "10-mb-of-radii": lazy(lambda _: big_radii(1_000_000)),
    "100-mb-of-comments": lazy(lambda _: BASE_TEXT + ("#" * 1000 + "\n") * 100_000),
    "a-megabyte-of-comments-then-an-unknown-key": lazy(
        lambda _: BASE_TEXT + ("#" * 999 + "\n") * 1040 + "colour: blue\n"
    ),
    "130k-values": lazy(lambda _: raw(radii="[" + ",".join(map(str, range(130_000))) + "]")),
    "deep-flow-nesting": lazy(lambda _: raw(radii="[" * 100_000 + "]" * 100_000)),
    "deep-block-nesting": lazy(lambda _: nested_block(400)),
    "alias-bomb-in-name": text(raw(name=alias_bomb(9))),
    "alias-bomb-in-a-nested-value": text(raw(certify="{n0: 8, n: 16, precision: " + alias_bomb(9) + "}")),
    "alias-bomb-by-merge-keys": text(raw(certify=merge_bomb(8))),
    "recursive-alias": text(raw(radii="&r [*r]")),
    "undefined-alias": text(raw(name="*nothing")),
    "aliased-500-kb-string": lazy(lambda _: raw(sigmas=f"[&s '{_BIG_STRING}'" + ", *s" * 1000 + "]")),
    "duplicate-top-level-key": text(BASE_TEXT + "name: other\n"),
    "duplicate-nested-key": text(replaced("  n: 16", "  n: 16\n  n: 100000")),
    "duplicate-key-in-flow-mapping": text(raw(dataset="{name: digits, name: cifar10, limit: 8}")),
    # numbers
    "integer-of-5000-digits": text(replaced("  n: 16", "  n: " + "9" * 5000)),
    "sigma-10**400": text(changed(sigmas=[10**400])),
    "models-sigmas-10**400": text(changed(models__sigmas=[10**400])),
    "alpha-10**400": text(changed(certify__alpha=10**400)),
    "lr-10**400": text(changed(models__train__lr=10**400)),
    "cpus-per-worker-10**400": text(changed(resources__cpus_per_worker=10**400)),
    "gpus-per-worker-10**400": text(changed(resources__gpus_per_worker=10**400)),
    "n-10**400": text(changed(certify__n=10**400)),
    "n-beyond-int64": text(changed(certify__n=10**19)),
    "n-2**62": text(changed(certify__n=2**62)),
    "n0-beyond-int64": text(changed(certify__n0=10**19)),
    "certify-batch-size-10**12": text(changed(certify__batch_size=10**12)),
    "train-batch-size-10**12": text(changed(models__train__batch_size=10**12)),
    "cpus-per-worker-1e300": text(changed(resources__cpus_per_worker=1e300)),
    "gpus-per-worker-1e300": text(changed(resources__gpus_per_worker=1e300)),
    "gpus-per-train-worker-2": text(changed(resources__gpus_per_train_worker=2)),
    "workers-10**30": text(changed(resources__workers=10**30)),
    "shard-size-10**30": text(changed(resources__shard_size=10**30)),
    "max-retries-10**30": text(changed(resources__max_retries=10**30)),
    "every-10**30": text(changed(dataset__every=10**30)),
    "start-10**30": text(changed(dataset__start=10**30)),
    "limit-10**30": text(changed(dataset__limit=10**30)),
    "epochs-10**30": text(changed(models__train__epochs=10**30)),
    "heldout-limit-10**30": text(changed(models__train__heldout_limit=10**30)),
    "crop-padding-10**9": text(changed(models__train__crop_padding=10**9)),
    "loader-workers-10**9": text(changed(models__train__loader_workers=10**9)),
    "dssn-sigma-1e20": text(changed(methods=["dssn"], sigmas=[1e20])),
    "uniform-sigma-1e300": text(changed(sigmas=[1e300])),
    "gaussian-sigma-1e10": text(changed(methods=["gaussian"], sigmas=[1e10])),
    "lr-1e300": text(changed(models__train__lr=1e300)),
    "sigma-inf": text(replaced("- 0.5\n", "- .inf\n")),
    "sigma-nan": text(replaced("- 0.5\n", "- .nan\n")),
    "radius-nan": text(changed(radii=[float("nan")])),
    "radius-negative": text(changed(radii=[-1.0])),
    "alpha-0": text(changed(certify__alpha=0)),
    "alpha-0.7": text(changed(certify__alpha=0.7)),
    "seed-2**32": text(changed(seeds=[2**32])),
    "seed-negative": text(changed(seeds=[-1])),
    "grid-of-160000-configurations": text(
        changed(sigmas=[round(0.01 + 0.001 * i, 3) for i in range(400)], seeds=list(range(400)))
    ),
    "sigmas-a-string": text(changed(sigmas="0.5")),
    "sigmas-a-boolean": text(changed(sigmas=[True])),
    # names
    "name-with-trailing-newline": text(changed(name="rev\n")),
    "name-upper-case": text(changed(name="Rev")),
    "name-an-integer": text(changed(name=5)),
    "name-null": text(changed(name=None)),
    "name-binary": text(replaced("name: hostile", "name: !!binary aGVsbG8=")),
    "name-a-date": text(replaced("name: hostile", "name: 2001-01-01")),
    "name-of-1-mb": lazy(lambda _: huge("a" * 1_000_000, name=HUGE)),
    "value-of-1-mb": lazy(lambda _: huge("p" * 1_000_000, certify__precision=HUGE)),
    "key-of-1-mb": lazy(lambda _: BASE_TEXT + "? " + "k" * 1_000_000 + "\n: 1\n"),  # as PyYAML writes long keys
    # output
    "output-root": text(changed(output="/")),
    "output-double-slash": text(changed(output="//")),
    "output-root-by-dots": text(changed(output="/tmp/..")),
    "output-dot": text(changed(output=".")),
    "output-dot-dot": text(changed(output="..")),
    "output-two-up": text(changed(output="../..")),
    "output-trailing-dot-dot": text(changed(output="results/..")),
    "output-the-current-directory": lazy(lambda where: changed(output=str(where))),
    "output-home-above-here": text(changed(output="~")),
    "output-empty": text(changed(output="")),
    "output-nul": text(changed(output="res\x00ults")),
    "output-newline": text(changed(output="results\n")),
    "output-the-spec-file": text(changed(output="spec.yaml")),
    "output-under-a-file": text(changed(output="spec.yaml/out")),
    # paths and templates
    "template-width-bomb": text(changed(models__path="checkpoints/{sigma:>1000000000}.pt")),
    "template-nested-width": text(changed(models__path="checkpoints/{sigma:>{seed}}.pt", seeds=[999_999_999])),
    "template-attribute": text(changed(models__path="checkpoints/{method.__class__}-{sigma}.pt")),
    "template-unknown-field": text(changed(models__path="checkpoints/{nope}.pt")),
    "template-empty": text(changed(models__path="")),
    "path-of-5000-characters": text(changed(models__path="c/" + "d" * 5000 + "/{sigma}.pt")),
    "dataset-root-for-digits": text(changed(dataset__root="/data")),
    "dataset-unknown": text(changed(dataset__name="mnist")),
    "dataset-split-unknown": text(changed(dataset__split="validation")),
    # everything else
    "unknown-key": text(changed(colour="blue")),
    "unknown-nested-key": text(changed(certify__colour="blue")),
    "missing-output": text(changed(output=...)),
    "models-null": text(changed(models=None)),
    "resources-a-list": text(changed(resources=[])),
    "method-unknown": text(changed(methods=["gauss"])),
    "methods-empty": text(changed(methods=[])),
    "methods-duplicate": text(changed(methods=["uniform", "uniform"])),
    "training-unknown": text(changed(training=["adversarial"])),
    "precision-unknown": text(changed(certify__precision="fp8")),
    "compile-yes": text(changed(certify__compile="yes")),
    "multiclass-laplace": text(changed(methods=["laplace"], certify__multiclass=True)),
    "ks-without-a-shaped-method": text(changed(ks=[1.0])),
}

# Specs that must be accepted: the base, a modest alias, and 20,000 radii (about 160 KB).
ACCEPTED: dict[str, Builder] = {
    "control-base": text(BASE_TEXT),
    "control-an-alias": text(raw(sigmas="&s [0.25, 0.5]", radii="*s")),
    "control-20000-radii": lazy(lambda _: big_radii(20_000)),
}

PLAN_ARGS = ["--rate", "1000000", "--train-rate", "10000", "--workers", "1", "--device", "cpu"]

# --------------------------------------------------------------------------- the harness


def _snapshot(*roots: Path) -> list[tuple[str, int]]:
    found = []
    for root in roots:
        for base, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(base) / name
                found.append((str(path), path.lstat().st_size if name in files else -1))
    return sorted(found)


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def _no_ray() -> None:
    """Every way the command line reaches Ray ends the child with REACHED_RAY."""
    from cluster.client import jobs, local_ray, submission

    def reached(*args, **kwargs):
        sys.stderr.write("reached Ray\n")
        sys.stderr.flush()
        os._exit(REACHED_RAY)

    submission.connect = reached
    jobs.connect = reached
    local_ray.start = reached


def _child(args: list[str], where: Path, home: Path, logs: Path, memory: int) -> None:
    # Its resident memory as it starts (a forked child counts the pages it shares with the
    # harness as its own, but not the files the harness maps): the baseline of its peak.
    logs.with_suffix(".rss").write_text(str(_resident_bytes()))
    os.chdir(where)
    os.environ["HOME"] = str(home)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "CERTIFY_DEBUG"):
        os.environ.pop(name, None)
    for fd, suffix in ((1, "out"), (2, "err")):
        out = os.open(logs.with_suffix("." + suffix), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + memory, resource.RLIM_INFINITY))
    resource.setrlimit(resource.RLIMIT_FSIZE, (CASE_OUTPUT, resource.RLIM_INFINITY))
    from cluster.cli import main

    code = 0
    try:
        main.main(args, prog_name="certify", standalone_mode=True)
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child reports everything as a crash
        traceback.print_exc()
        code = CRASHED
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _outcome(code: int | None, err: str, out: str, wrote: bool) -> str:
    if code is None:
        return "killed"
    if code == REACHED_RAY or code == 0:
        return "accepted"
    if "Traceback" in err or code not in (1, 2):
        return "traceback"
    lines = [line for line in (err + out).splitlines() if line.strip()]
    if code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) <= LINE_LIMIT and not wrote:
        return "refused"
    return "refused, not one line"


def _built(build: Builder, where: Path) -> Path:
    """The case's spec. A lazy one is built in a child, so that the harness's own memory stays
    as it was and a case's peak memory is measured from the same baseline every time; the
    others write a text the corpus holds (a fork per case would double the harness's time)."""
    if build not in LAZY:
        return build(where)
    pid = os.fork()
    if pid == 0:
        try:
            (where.parent.parent / "spec-path").write_text(str(build(where)))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return Path((where.parent.parent / "spec-path").read_text())


def run_case(name: str, build: Builder, command: str, scratch: Path, seconds: float, memory: int) -> dict:
    home, logs = scratch / name / "home", scratch / name / "log"  # the user works in their home
    where = home / "work"
    where.mkdir(parents=True)
    spec = _built(build, where)
    args = [command, str(spec.relative_to(where))] + (PLAN_ARGS if command == "plan" else [])
    before = _snapshot(home)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _child(args, where, home, logs, memory)
        finally:
            os._exit(CRASHED)
    code, usage = None, None
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            code = None if code < 0 else code
            break
        if time.monotonic() - started > seconds:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.01)
    elapsed = time.monotonic() - started

    def read(suffix: str) -> tuple[str, int]:
        path = logs.with_suffix("." + suffix)
        size = path.stat().st_size if path.exists() else 0
        with open(path, "rb") if path.exists() else open(os.devnull, "rb") as f:
            return f.read(4096).decode("utf-8", "replace"), size

    (err, err_size), (out, out_size) = read("err"), read("out")
    wrote = _snapshot(home) != before
    start = logs.with_suffix(".rss")
    baseline = int(start.read_text()) if start.exists() and start.read_text() else 0
    peak = max(0, usage.ru_maxrss * 1024 - baseline) if usage is not None and baseline else 0
    shutil.rmtree(scratch / name, ignore_errors=True)
    return {
        "name": name,
        "command": command,
        "outcome": _outcome(code, err, out, wrote),
        "exit": code,
        "seconds": round(elapsed, 2),
        "memory_mb": round(peak / 2**20, 1),
        "wrote": wrote,
        "error_bytes": err_size + out_size,
        "first_line": next((line for line in (err + out).splitlines() if line.strip()), "")[:200],
    }


def harness(pairs: list[tuple[str, str]], seconds: float, memory: int) -> list[dict]:
    """Run the cases ``pairs`` (``certify <command>`` on case ``name``), each in a forked child
    (see the module)."""
    import importlib

    from certlib.data import load_dataset

    # What the commands import, imported once before forking: faster, and the allocators of
    # torch and pyarrow reserve their address space here rather than under a case's limit.
    for module in ("cluster.cli", "cluster.spec", "cluster.plan", "cluster.plan.estimate", "cluster.job.worker"):
        importlib.import_module(module)
    load_dataset("digits", "test")
    load_dataset("digits", "train")
    _no_ray()
    cases = {**BROKEN, **ACCEPTED}
    results = []
    with tempfile.TemporaryDirectory(prefix="certify-hostile-") as scratch:
        for index, (command, name) in enumerate(pairs):
            result = run_case(name, cases[name], command, Path(scratch) / str(index), seconds, memory)
            results.append(result)
    return results


def run_harness(pairs: list[tuple[str, str]], python: FreshPython) -> list[dict]:
    """The harness in fresh interpreters (this file as a script), ``HARNESSES`` of them side by
    side on shares of ``pairs`` (each case still alone in its own child): their results."""
    shares = [pairs[i::HARNESSES] for i in range(HARNESSES) if pairs[i::HARNESSES]]
    running = [python.start(__file__, "--pairs", json.dumps(share)) for share in shares]
    results = []
    for share, harness_process in zip(shares, running):
        out, err = harness_process.communicate(timeout=len(share) * (CASE_SECONDS + 5) + 120)
        assert harness_process.returncode == 0, err[-3000:]
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) == len(pairs), "a harness lost cases"
    return results


def table(results: list[dict]) -> str:
    """The Markdown table of the broken specs' outcomes per command."""
    header = "| command | tried | refused with one line | refused, not one line | accepted | traceback | killed |"
    header += " time, max / total | memory, max |"
    lines = [header, "|---|" + "---:|" * 8]
    for command in sorted({r["command"] for r in results}):
        mine = [r for r in results if r["command"] == command and r["name"] in BROKEN]
        count = {o: sum(r["outcome"] == o for r in mine) for o in ("refused", "refused, not one line")}
        count |= {o: sum(r["outcome"] == o for r in mine) for o in ("accepted", "traceback", "killed")}
        lines.append(
            f"| {command} | {len(mine)} | {count['refused']} | {count['refused, not one line']} | {count['accepted']} "
            f"| {count['traceback']} | {count['killed']} | {max(r['seconds'] for r in mine):.1f} s / "
            f"{sum(r['seconds'] for r in mine):.0f} s | {max(r['memory_mb'] for r in mine):.0f} MB |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the tests


def _check(results: list[dict], expected: str) -> None:
    wrong = [r for r in results if r["outcome"] != expected]
    assert not wrong, "\n".join(json.dumps(r) for r in wrong)
    heavy = [r for r in results if r["seconds"] > CASE_SECONDS or r["memory_mb"] > CASE_PEAK_MB]
    assert not heavy, heavy


@pytest.fixture(scope="module")
def corpus(fresh_python: FreshPython) -> list[dict]:
    """Every broken spec through both commands and every good one through ``submit-job``: one
    run of the harnesses for the three tests below."""
    pairs = [(command, name) for command in ("submit-job", "plan") for name in BROKEN]
    return run_harness(pairs + [("submit-job", name) for name in ACCEPTED], fresh_python)


def _of(corpus: list[dict], command: str, cases: dict[str, Builder]) -> list[dict]:
    found = [r for r in corpus if r["command"] == command and r["name"] in cases]
    assert len(found) == len(cases)
    return found


def test_every_broken_spec_is_refused_by_submit_job_with_one_line(corpus):
    _check(_of(corpus, "submit-job", BROKEN), "refused")


def test_every_broken_spec_is_refused_by_plan_with_one_line(corpus):
    _check(_of(corpus, "plan", BROKEN), "refused")


def test_good_specs_are_accepted_within_the_same_bounds(corpus):
    results = _of(corpus, "submit-job", ACCEPTED)
    _check(results, "accepted")
    assert all(r["first_line"] == "reached Ray" for r in results), results


# --------------------------------------------------------------------------- where the spec goes


def _cluster_spec(tmp_path: Path, **changes) -> dict:
    """A small spec of one imported model (a random small CNN) on 2 digits."""
    from certlib.data import load_digits
    from tests.helpers import random_checkpoint

    random_checkpoint(tmp_path / "models" / "uniform-0.5.pt", load_digits("test"), "uniform", 0.5, 0)
    spec = {
        "name": "route",
        "output": str(tmp_path / "out"),
        "dataset": {"name": "digits", "limit": 2},
        "models": {"path": str(tmp_path / "models" / "{method}-{sigma}.pt")},
        "methods": ["uniform"],
        "sigmas": [0.5],
        "certify": {"n0": 8, "n": 16, "batch_size": 16, "compile": False},
        "radii": [0.0, 0.5],
        "resources": {"workers": 1, "gpus_per_worker": 0, "shard_size": 2},
    }
    return spec | changes


def test_the_instance_certify_started_counts_as_local_by_its_record(tmp_path, monkeypatch):
    """Where its processes cannot be seen (no gcs_server in the process list), the instance
    certify started is still local: its record's temporary directory names its session."""
    import psutil

    from cluster.client import jobs, local_ray

    temp_dir = tmp_path / "certify-ray"
    (temp_dir / StubDashboard.SESSION).mkdir(parents=True)
    (temp_dir / "session_latest").symlink_to(temp_dir / StubDashboard.SESSION)
    monkeypatch.setattr(psutil, "process_iter", lambda attrs=None: iter(()))
    with StubDashboard() as dashboard:
        dashboard.admit(monkeypatch)
        monkeypatch.setattr(local_ray, "load_record", lambda: None)
        assert jobs.is_remote(dashboard.url)  # no Ray of its session here
        monkeypatch.setattr(local_ray, "load_record", lambda: types.SimpleNamespace(temp_dir=str(temp_dir)))
        assert not jobs.is_remote(dashboard.url)


def test_the_local_or_remote_decision_asks_the_cluster(ray_session, tmp_path, monkeypatch):
    """The documented workflow (`ray dashboard ray_cluster.yaml`, then --address
    http://127.0.0.1:8265 through the tunnel) is remote: /shared paths are not checked here and
    the entry point is the cluster's python. The Ray here is local under any of its names."""
    from cluster.cli import main
    from cluster.client import jobs, submission
    from cluster.record import spec_digest

    monkeypatch.chdir(tmp_path)
    port = ray_session.dashboard_url.rsplit(":", 1)[1]
    assert not jobs.is_remote(ray_session.dashboard_url)
    assert not jobs.is_remote(f"http://localhost:{port}")
    assert jobs.cluster_session(jobs.connect(ray_session.dashboard_url)) in jobs.local_sessions()
    shared = _cluster_spec(tmp_path, output="/shared/results/route", models={"path": "/shared/m/{sigma}.pt"})
    with StubDashboard() as tunnel:
        assert jobs.is_remote(tunnel.url)
        sweep, target = submission.validate(shared, tunnel.url)  # here /shared does not exist: not checked
        assert target.remote and sweep.output == "/shared/results/route"
        relative = yaml.safe_dump(_cluster_spec(tmp_path, output="out"))
        (tmp_path / "relative.yaml").write_text(relative)
        result = CliRunner().invoke(main, ["submit-job", "relative.yaml", "--address", tunnel.url])
        assert result.exit_code == 2 and "output: give an absolute path" in result.output, result.output
        (tmp_path / "shared.yaml").write_text(yaml.safe_dump(shared))
        result = CliRunner().invoke(main, ["submit-job", "shared.yaml", "--address", tunnel.url])
        assert result.exit_code == 0, result.output
        (job,) = tunnel.submitted
    assert job["entrypoint"].startswith("python -m cluster.job.driver --job-id certify-route-")
    assert "--spec-sha256 " in job["entrypoint"] and not job.get("runtime_env")  # a small spec: in the metadata
    assert spec_digest(job["metadata"]["spec"]) in job["entrypoint"]
    assert job["metadata"]["output"] == "/shared/results/route"
    # and the same spec on the Ray here is checked against the files here
    local = CliRunner().invoke(main, ["submit-job", "shared.yaml", "--address", ray_session.dashboard_url])
    assert local.exit_code == 2 and "models.path: no checkpoint /shared/m/0.5.pt" in local.output, local.output


def test_a_spec_beyond_the_environment_limit_reaches_the_driver(ray_session, tmp_path, monkeypatch):
    """20,000 radii: about 160 KB of JSON, over Linux's 128 KiB per environment string (the
    route before this one), shipped with the job as a package and read by a real driver."""
    from certlib.analysis import load_results
    from cluster import notebook
    from cluster.client import submission
    from cluster.record import METADATA_SPEC_BYTES

    monkeypatch.chdir(tmp_path)
    spec = _cluster_spec(tmp_path, radii=[round(0.0001 * i, 4) for i in range(20_000)])
    submitted = submission.submit(spec, ray_session.dashboard_url)
    assert len(submitted.sweep.to_json()) > max(128 << 10, METADATA_SPEC_BYTES)
    ending = submission.wait(submitted.client, submitted.job_id, lambda line: None, show_logs=False)
    log = submitted.client.get_job_logs(submitted.job_id)
    assert ending.succeeded, (ending.describe(), log[-3000:])
    assert "(at 64 of the spec's 20,000 radii and" in log  # the logged table stays readable
    assert len(load_results(tmp_path / "out")) == 2
    info = submitted.client.get_job_info(submitted.job_id)
    assert "spec" not in info.metadata and len(info.metadata["spec_sha256"]) == 64  # too large for it
    attached = notebook.attach(submitted.job_id, ray_session.dashboard_url)  # from <output>.job/sweep.json
    assert attached.sweep.radii == submitted.sweep.radii


def _job_metadata(monkeypatch, metadata: dict) -> None:
    """This process's environment as Ray's job supervisor sets it for a job's driver."""
    from cluster.record import JOB_CONFIG_VARIABLE

    monkeypatch.setenv(JOB_CONFIG_VARIABLE, json.dumps({"runtime_env": {}, "metadata": metadata}))


def test_the_driver_refuses_a_spec_package_that_is_not_its_own(tmp_path, monkeypatch, capsys):
    from cluster.job.driver import main
    from cluster.record import SPEC_PACKAGE, spec_digest, write_spec_package

    spec_json = '{"name": "x"}'
    monkeypatch.syspath_prepend(str(write_spec_package(spec_json, tmp_path).parent))
    monkeypatch.delitem(sys.modules, SPEC_PACKAGE, raising=False)
    _job_metadata(monkeypatch, {"spec": '{"name": "y"}'})  # the package is read first
    assert main(["--job-id", "j", "--spec-sha256", spec_digest(spec_json + " ")]) == 2
    assert "not the spec this job was submitted with" in capsys.readouterr().out
    assert main(["--job-id", "j", "--spec-sha256", spec_digest(spec_json)]) == 2  # found, read, then refused
    assert "output: missing" in capsys.readouterr().out


def test_the_driver_reads_a_small_spec_from_its_jobs_metadata(monkeypatch, capsys):
    """No package shipped (a small spec's job has no runtime environment): the copy in the
    job's metadata, which Ray hands the driver in its environment, checked the same way."""
    from cluster.job.driver import main
    from cluster.record import JOB_CONFIG_VARIABLE, SPEC_PACKAGE, spec_digest

    monkeypatch.delitem(sys.modules, SPEC_PACKAGE, raising=False)
    spec_json = '{"name": "x"}'
    _job_metadata(monkeypatch, {"spec": spec_json})
    assert main(["--job-id", "j", "--spec-sha256", spec_digest(spec_json + " ")]) == 2
    assert "the job's metadata: not the spec this job was submitted with" in capsys.readouterr().out
    _job_metadata(monkeypatch, {"spec": spec_json[:-1] + "\ud800}"})  # not UTF-8: another spec
    assert main(["--job-id", "j", "--spec-sha256", spec_digest(spec_json)]) == 2
    assert "the job's metadata: not the spec this job was submitted with" in capsys.readouterr().out
    _job_metadata(monkeypatch, {"spec": spec_json})
    assert main(["--job-id", "j", "--spec-sha256", spec_digest(spec_json)]) == 2  # found, read, then refused
    assert "output: missing" in capsys.readouterr().out
    for config in ({"metadata": {}}, {"metadata": {"spec": 7}}, "not json"):
        monkeypatch.setenv(JOB_CONFIG_VARIABLE, config if isinstance(config, str) else json.dumps(config))
        assert main(["--job-id", "j", "--spec-sha256", spec_digest(spec_json)]) == 2
        assert "error: no spec shipped with the job" in capsys.readouterr().out
    monkeypatch.delenv(JOB_CONFIG_VARIABLE)
    assert main(["--job-id", "j", "--spec-sha256", spec_digest(spec_json)]) == 2
    assert "error: no spec shipped with the job" in capsys.readouterr().out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", choices=["submit-job", "plan"], action="append")
    parser.add_argument("--cases", help="comma-separated case names (default: every broken spec)")
    parser.add_argument("--pairs", help="JSON list of [command, case name] (instead of --command, --cases)")
    parser.add_argument("--seconds", type=float, default=CASE_SECONDS)
    parser.add_argument("--memory", type=int, default=CASE_MEMORY)
    parser.add_argument("--table", action="store_true", help="print the table (and every case) instead of JSON")
    options = parser.parse_args()
    names = options.cases.split(",") if options.cases else list(BROKEN)
    pairs = [(command, name) for command in options.command or ["submit-job", "plan"] for name in names]
    results = []
    for result in harness(json.loads(options.pairs) if options.pairs else pairs, options.seconds, options.memory):
        results.append(result)
        if not options.table:
            print(json.dumps(result), flush=True)
    if options.table:
        for r in results:
            print(
                f"{r['command']:<10} {r['name']:<34} {r['outcome']:<22} {r['seconds']:>6.1f} s "
                f"{r['memory_mb']:>7.1f} MB  {r['first_line'][:90]!r}"
            )
        print(table(results))
