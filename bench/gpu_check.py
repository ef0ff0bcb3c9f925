"""The GPU acceptance run in one command (issue 28): every GPU path of the product measured
against its target on one H100/H200 in at most 8 minutes, printed as one table with PASS/FAIL
and written as JSON and Markdown into ``--out``.

    python3 bench/gpu_check.py --out $OUT                     # the GPU machine, after the staging below
    python bench/gpu_check.py --device cpu --quick --out /tmp/gpu-check   # anywhere: every step, tiny sizes

On the GPU machine. First, here: ``../shared/tools/gpu-stage`` (writes .gpu/a, .gpu/b, .gpu/c,
git-ignored). Then three device ``run`` calls back to back from a bare machine (it keeps /tmp
only ~30 s between calls; 64 MiB travel per call, so Ray's wheel comes in two halves):

  1. carry [".gpu/a"]:  bash .gpu/a/unpack.sh
     Ray's wheel, first half, and the first 7,000 CIFAR-10 test images -> /tmp/gpu-stage.
  2. carry [".gpu/b"]:  source .gpu/b/unpack.sh
     Ray's wheel, second half, and the dependencies of ray[default] the machine lacks,
     installed into /tmp/gpu-site; writes /tmp/gpu-stage/env.sh (PYTHONPATH, CIFAR).
  3. carry [".gpu/c"], timeout_s 600:  source /tmp/gpu-stage/env.sh && bash .gpu/c/unpack.sh &&
     python3 bench/gpu_check.py --out $OUT --work /tmp/gpu-check
     The first 1,200 images of each training batch (6,000), then this check (<= 8 minutes).

$OUT brings back gpu_check.md, gpu_check.json and gpu_check.log (each step's output). While the
machine is still up (a call within ~30 s), ``source /tmp/gpu-stage/env.sh && python3
bench/gpu_check.py --out $OUT --work /tmp/gpu-check --steps engine,tests`` reruns steps on the
model the first run trained. bench/NOTES.md ("The GPU acceptance run") has the device budget.

Steps (``STEP_ORDER``), each in a process of its own under its own time limit (``Sizes.limits``,
cut to what is left of ``--budget``), so that a hung CUDA call stops only its step; a step that
fails or runs out of time is reported in one line and the others still run:
  model        WRN-40-2 trained with DSSN noise (sigma 1.0) on the staged training images
  engine       forward ceilings; DSSN precision auto at sigma 0.25/1.0 vs 200,000 samples/s and 0.8 of
               the best ceiling; samples per cascade level; votes against float64 (0 differences)
  monte-carlo  Gaussian CERTIFY n = 100,000 s/image (<= 0.5 s); zhang-l2/zhang-linf vs Gaussian (<= 1.2x)
  training     CUDA-graph step images/s (>= 15,000, batch 256) vs eager; deterministic resume bit-equal
  pipeline     `certify submit-job --wait`, 2,000 test images on a private local Ray (or the one at
               --address) vs the bare engine: end-to-end and driver-only ratios (driver >= 0.95),
               votes bit for bit
  sequential   sequential vs fixed-n certification: samples per image, samples/s
  tests        pytest over GPU_TEST_MODULES (pytest-xdist where installed): all pass
Without CIFAR-10 (``--cifar`` lacks the binary files) the run writes random CIFAR-shaped images
and says so. On a CPU, with ``--quick`` or on random images the rates and times are not
meaningful and print in parentheses; votes, bits and test outcomes count at any size. Exit
status 0: no step failed and no counted target was missed. Benchmarks never assert on timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.gpu_engine import engine_step, monte_carlo_step, sequential_step  # noqa: E402
from bench.gpu_steps import (  # noqa: E402
    FULL,
    PROGRESS,
    QUICK,
    Context,
    Row,
    model_step,
    pipeline_step,
    training_step,
)
from bench.suite import DEFAULT_CIFAR  # noqa: E402

# The GPU test selection: these modules whole on a GPU. Every test that requests the `cuda`
# fixture (marked `gpu` by tests/conftest.py) is in one of them (tests/test_gpu_check.py checks).
GPU_TEST_MODULES = (
    "tests/test_cascade.py",  # the precision cascade; host synchronizations of the GPU engine
    "tests/test_voting.py",  # the engine's votes: batch, grouping and precision invariance
    "tests/test_dssn_exactness.py",
    "tests/test_noise.py",
    "tests/test_zhang.py",  # Zhang et al.'s device samplers
    "tests/test_sequential.py",
    "tests/test_train.py",  # the training step: CUDA graph, no host waits, deterministic resume
    "tests/test_sweep.py",  # sweeps through Ray, the workers on the GPU
    "tests/test_multinode.py",
)
STEP_ORDER = ("model", "engine", "monte-carlo", "training", "pipeline", "sequential", "tests")
STEP_FLOOR_SECONDS = 20.0  # time kept for each later step; a step offered less is skipped
BUDGET_SECONDS = {"full": 465.0, "quick": 280.0}  # the 8 minutes (full); 5 minutes on a CPU (quick)
LOG_TAIL_BYTES = 200_000  # of each step's output in gpu_check.log


def tests_step(ctx: Context) -> list[Row]:
    """pytest over GPU_TEST_MODULES (on a CPU only its `gpu`-marked tests, which skip there: the
    selection's plumbing at no cost), in parallel with pytest-xdist where it is installed."""
    import importlib.util

    report, log = ctx.work / "tests.xml", ctx.work / "pytest.log"
    for stale in (report, log):  # of an earlier run in the same --work
        stale.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        *GPU_TEST_MODULES,
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
    ]
    if not ctx.gpu:
        command += ["-m", "gpu"]
    elif importlib.util.find_spec("xdist") is not None:  # whole modules per process: module fixtures built once
        workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
        command += ["-n", workers, "--maxprocesses", workers, "--dist", "loadfile"]  # past pyproject's cap
    env = dict(os.environ)
    if not ctx.synthetic:  # the CIFAR-10 tests read the staged images there (tests/helpers.py)
        env["CERTIFY_TEST_CIFAR10"] = str(ctx.cifar)
    ctx.progress(f"pytest over {len(GPU_TEST_MODULES)} modules")
    status, seconds = run_bounded(command, ctx.limit - 30, log, env=env, cwd=ROOT)
    print(log.read_text()[-LOG_TAIL_BYTES:])
    if not report.is_file():
        return [Row("pytest, the GPU selection", f"stopped after {seconds:.0f} s", "all pass", False, exact=True)]
    cases = ElementTree.parse(report).getroot().iter("testcase")
    outcome: Counter[str] = Counter()
    failed, skipped = [], Counter()
    for case in cases:
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        outcome[kind] += 1
        if kind in ("failure", "error"):
            failed.append(f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}")
        elif kind == "skipped":
            skipped[next(c for c in case if c.tag == "skipped").get("message", "")[:80]] += 1
    bad = outcome["failure"] + outcome["error"]
    scope = f"{len(GPU_TEST_MODULES)} modules" + ("" if ctx.gpu else ", gpu-marked only")
    return [
        Row(
            f"pytest, the GPU selection ({scope}, {seconds:.0f} s): failed or errors",
            f"{bad} ({outcome['passed']} passed, {outcome['skipped']} skipped)",
            "0",
            bad == 0 and status == 0,
            exact=True,
            note=", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else ""),
        ),
        Row("pytest: skipped, by reason", "; ".join(f"{n} x {reason}" for reason, n in skipped.most_common(4)) or "-"),
    ]


STEPS = {
    "model": model_step,
    "engine": engine_step,
    "monte-carlo": monte_carlo_step,
    "training": training_step,
    "pipeline": pipeline_step,
    "sequential": sequential_step,
    "tests": tests_step,
}


def run_bounded(
    command: list[str], seconds: float, log: Path, env: dict | None = None, cwd: Path | None = None
) -> tuple[int | None, float]:
    """Run ``command`` in a process group of its own, its output appended to ``log``, for at
    most ``seconds``; then interrupt the group (SIGINT: Python's KeyboardInterrupt, so that
    ``finally`` blocks and pytest's teardown stop the Ray instances they started) and kill it
    20 s later. Returns (exit status, None when it was stopped; wall seconds)."""
    began = time.perf_counter()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        try:
            return process.wait(timeout=max(1.0, seconds)), time.perf_counter() - began
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - began
        finally:  # also when this process is interrupted itself
            for sig, grace in ((signal.SIGINT, 20.0), (signal.SIGKILL, 5.0)):
                if process.poll() is not None:
                    break
                os.killpg(process.pid, sig)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    continue


# --------------------------------------------------------------------------- data


def missing_cifar(folder: Path) -> list[str]:
    """Which of CIFAR-10's binary test and training files ``folder`` lacks (the staged subset
    counts as CIFAR-10)."""
    names = ["test_batch.bin"] + [f"data_batch_{i}.bin" for i in range(1, 6)]
    return [name for name in names if not (folder / name).is_file()]


def synthetic_cifar(folder: Path, test_images: int, train_images: int) -> Path:
    """Random CIFAR-10-shaped images (and labels) in the binary format, so that every step runs
    where no CIFAR-10 is at hand: ``test_images`` test records, ``train_images`` training
    records spread over the five batch files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_batch = -(-train_images // 5)
    for name, rows in [("test_batch.bin", test_images)] + [(f"data_batch_{i}.bin", per_batch) for i in range(1, 6)]:
        records = rng.integers(0, 256, size=(rows, 3073), dtype=np.uint8)
        records[:, 0] %= 10  # the label byte
        records.tofile(folder / name)
    return folder


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class StepResult:
    name: str
    status: str  # ok, error, timeout or skipped
    seconds: float
    limit: float
    rows: list[Row]
    error: str = ""


def one_step(args: argparse.Namespace) -> None:
    """``--step NAME``: run one step in this process and write its rows as JSON."""
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    ctx = Context(device, sizes, args.cifar, args.synthetic, args.work, args.limit, args.address)
    rows = STEPS[args.step](ctx)
    name = torch.cuda.get_device_name(device) if ctx.gpu else f"CPU ({torch.get_num_threads()} threads)"
    result = {"device": name, "rows": [dataclasses.asdict(row) for row in rows]}
    (args.work / f"{args.step}.json").write_text(json.dumps(result))


def last_line(log: Path, prefix: str = "") -> str:
    """The last non-empty line of ``log`` that starts with ``prefix`` (without it), cut to 300."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip().startswith(prefix)]
    return lines[-1].strip().removeprefix(prefix).strip()[:300] if lines else "no output"


def run_steps(args: argparse.Namespace, names: list[str], sizes, budget: float) -> tuple[list[StepResult], str]:
    """Each step in a child process under its limit; (the results, the device's name)."""
    deadline = time.perf_counter() + budget
    results, device_name = [], args.device
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # a step's last lines reach its log even when it is killed
    for i, name in enumerate(names):
        later = STEP_FLOOR_SECONDS * (len(names) - i - 1)
        limit = min(sizes.limits[name], deadline - time.perf_counter() - later)
        if limit < STEP_FLOOR_SECONDS:
            results.append(StepResult(name, "skipped", 0.0, limit, [], "no time left in --budget"))
            print(f"{name}: skipped (no time left in --budget)", flush=True)
            continue
        log, out = args.work / f"{name}.log", args.work / f"{name}.json"
        for stale in (log, out):  # of an earlier run in the same --work
            stale.unlink(missing_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--device", args.device]
        command += ["--cifar", str(args.cifar), "--work", str(args.work), "--limit", f"{limit:.0f}"]
        command += ["--quick"] * args.quick + ["--synthetic"] * args.synthetic
        command += ["--address", args.address] if args.address else []
        status, seconds = run_bounded(command, limit, log, env=env, cwd=ROOT)
        if status == 0 and out.is_file():
            found = json.loads(out.read_text())
            device_name = found["device"]
            results.append(StepResult(name, "ok", seconds, limit, [Row(**row) for row in found["rows"]]))
        elif status is None:
            error = f"stopped after its {limit:.0f} s limit, in: {last_line(log, PROGRESS)}"
            results.append(StepResult(name, "timeout", seconds, limit, [], error))
        else:
            results.append(StepResult(name, "error", seconds, limit, [], last_line(log)))
        print(f"{name}: {results[-1].status} in {seconds:.0f} s (limit {limit:.0f} s)", flush=True)
    return results, device_name


def verdict(row: Row, meaningful: bool) -> str:
    if row.ok is None:
        return "INFO"
    word = "PASS" if row.ok else "FAIL"
    return word if meaningful or row.exact else f"({word})"


def markdown(title: str, results: list[StepResult], meaningful: bool) -> str:
    lines = [f"# {title}", "", "| step | figure | measured | target | result | note |", "|---|---|---:|---|---|---|"]
    for result in results:
        if result.status != "ok":
            cell = "SKIP" if result.status == "skipped" else "ERROR"
            lines.append(f"| {result.name} | the step: {result.status} | {result.error} | | {cell} | |")
        for row in result.rows:
            cells = [result.name, row.figure, row.measured, row.target, verdict(row, meaningful), row.note]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines.append("")
    lines.append("Steps: " + "; ".join(f"{r.name} {r.status} {r.seconds:.0f} s of {r.limit:.0f}" for r in results))
    if not meaningful:
        lines.append("Rates and times in parentheses are not meaningful (CPU, --quick sizes or random images).")
    return "\n".join(lines) + "\n"


def failed(results: list[StepResult], meaningful: bool) -> bool:
    return any(r.status in ("error", "timeout") for r in results) or any(
        row.ok is False and (meaningful or row.exact) for r in results for row in r.rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.md, gpu_check.json and gpu_check.log")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every step in a few minutes")
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR, help="CIFAR-10 binary folder ($CIFAR)")
    parser.add_argument("--steps", default=",".join(STEP_ORDER), help="which steps, in this order")
    parser.add_argument("--budget", type=float, help="seconds for all steps (default 465; quick 280)")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument(
        "--address", help="dashboard of a running Ray for the pipeline step's job (default: a private one it starts)"
    )
    parser.add_argument("--step", choices=STEP_ORDER, help=argparse.SUPPRESS)  # one step, in a child process
    parser.add_argument("--limit", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        return one_step(args)
    if args.out is None:
        parser.error("--out is required")
    names = [name.strip() for name in args.steps.split(",")]
    if unknown := sorted(set(names) - set(STEP_ORDER)):
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEP_ORDER)}")
    began = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    args.work = args.work or Path(tempfile.mkdtemp(prefix="certify-gpu-check-"))
    args.work.mkdir(parents=True, exist_ok=True)
    missing = missing_cifar(args.cifar)
    args.synthetic = bool(missing)
    if missing:
        print(
            f"CIFAR-10 incomplete at {args.cifar} (no {', '.join(missing)}): every step runs on random "
            "CIFAR-shaped images instead (figures not meaningful)"
        )
        train_images = max(sizes.model_images, sizes.determinism_images)
        args.cifar = synthetic_cifar(args.work / "cifar-synthetic", 5_000 + max(sizes.heldout, 64), train_images)
    meaningful = args.device.startswith("cuda") and not args.quick and not args.synthetic
    budget = args.budget or BUDGET_SECONDS["quick" if args.quick else "full"]
    results, device_name = run_steps(args, names, sizes, budget)
    wall = time.perf_counter() - began
    title = (
        f"GPU check: {device_name}, torch {torch.__version__}, {'quick' if args.quick else 'full'} sizes"
        f"{', random images' if args.synthetic else ''}, {wall:.0f} s"
    )
    report = markdown(title, results, meaningful)
    print("\n" + report)
    write_outputs(args.out, report, results, meaningful, title, wall, args.work)
    sys.exit(1 if failed(results, meaningful) else 0)


def write_outputs(
    out: Path, report: str, results: list[StepResult], meaningful: bool, title: str, wall: float, work: Path
) -> None:
    """gpu_check.md (the table), gpu_check.json (the same, with each figure's fields) and
    gpu_check.log (each step's output, its last LOG_TAIL_BYTES) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(report)
    summary = {
        "title": title,
        "meaningful": meaningful,
        "wall_seconds": round(wall, 1),
        "steps": [dataclasses.asdict(r) | {"verdicts": [verdict(row, meaningful) for row in r.rows]} for r in results],
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    with open(out / "gpu_check.log", "w") as log:
        for r in results:
            path = work / f"{r.name}.log"
            text = path.read_text(errors="replace")[-LOG_TAIL_BYTES:] if path.is_file() else ""
            log.write(f"===== {r.name}: {r.status}, {r.seconds:.0f} s of {r.limit:.0f}\n{text}\n")


if __name__ == "__main__":
    main()
