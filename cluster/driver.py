"""The job's driver: which units are done, the actor pool, retries, progress.

Run by Ray as the entrypoint of a submitted job (``python -m cluster.driver``), or in-process by
``run_sweep``. Units whose Parquet file exists and validates are skipped, so a cancelled or
crashed job resumes where it stopped. A worker process that dies mid-unit is replaced and the
unit retried (at most ``resources.max_retries`` times); a unit that raises fails alone and its
error is recorded under ``<output>/_failures/``; the rest of the job still completes.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from certlib.atomic import atomic_write
from certlib.checkpoint import read_card
from cluster.results import existing_shards, shard_path, shard_state
from cluster.spec import ModelKey, Sweep, SpecError, Unit, expand, model_keys, unit_parameters
from cluster.worker import UnitRunner, select_images

PROGRESS_PREFIX = "[certify-progress] "
SPEC_VARIABLE = "CERTIFY_SPEC_B64"  # the job's validated sweep, base64 JSON, in its environment
PROGRESS_EVERY = 5.0  # seconds between progress lines in the log
PROGRESS_JSON_EVERY = 30.0  # seconds between machine-readable progress records (for `certify status`)
FAILURES_DIR = "_failures"
SWEEP_FILE = "_sweep.json"


class SweepConflict(ValueError):
    """The output directory or the models cannot serve this sweep; one line naming why."""


@dataclass
class Task:
    kind: str  # "train" or "certify"
    key: ModelKey
    unit: Unit | None = None
    attempts: int = 0

    @property
    def name(self) -> str:
        return self.unit.unit_id if self.unit else f"train {self.key.label}"


@dataclass
class Plan:
    pending: list[Unit]
    to_train: list[ModelKey]
    skipped: int
    total_images: int
    images_per_model: int


def plan_sweep(sweep: Sweep, num_images: int, log=print) -> Plan:
    """Which units must run and which models must be trained first.

    Refuses an output directory holding shards this sweep would not write (another shard size
    or image selection) or shards computed with other parameters: mixing them would duplicate
    or corrupt results.
    """
    units = expand(sweep, num_images)
    expected = {shard_path(sweep.output, u): u for u in units}
    keys = set(model_keys(sweep))
    for path in existing_shards(sweep.output):
        if path not in expected:
            parts = dict(p.split("=", 1) for p in path.relative_to(sweep.output).parts[:-1])
            mine = any(k.method == parts["method"] and k.training == parts["training"] and repr(k.sigma) == parts["sigma"]
                       and str(k.seed) == parts["seed"] for k in keys)
            if mine:
                raise SweepConflict(f"output: {path} was written with another shard size or image selection; "
                                    "use a new output directory")
    weights = {}
    for key in keys:
        checkpoint = key.checkpoint(sweep)
        weights[key] = read_card(checkpoint).weights_sha256 if checkpoint.is_file() else None
    pending, skipped = [], 0
    for path, unit in expected.items():
        sha = weights[unit.model]
        if sha is None:
            if path.exists():
                raise SweepConflict(f"output: {path} was computed with a model that is no longer at models.path; "
                                    "use a new output directory")
            state = "missing"
        else:
            state = shard_state(path, unit_parameters(sweep, unit, sha), unit.size)
        if state == "valid":
            skipped += 1
        elif state == "computed with other parameters":
            raise SweepConflict(f"output: {path} holds results computed with other parameters or another model "
                                "(image selection, certification settings or weights); use a new output directory")
        else:
            if state != "missing":
                log(f"recomputing {unit.unit_id}: its file {state}")
            pending.append(unit)
    to_train = []
    for key in dict.fromkeys(u.model for u in pending):
        if weights[key] is None:
            if sweep.models.train is None:
                raise SweepConflict(f"models.path: no checkpoint {key.checkpoint(sweep)} for {key.label}, "
                                    "and no models.train section to train it")
            to_train.append(key)
    return Plan(pending, to_train, skipped, num_images * len(keys), num_images)


@dataclass
class Progress:
    """Images certified out of the total, per model and overall, with rate and ETA."""

    total: int
    done: int
    by_model: dict[str, list[int]]
    units_total: int
    units_done: int = 0
    units_failed: int = 0
    models_to_train: int = 0
    models_trained: int = 0
    started: float = field(default_factory=time.time)
    images_this_run: int = 0
    failures: list[str] = field(default_factory=list)

    def snapshot(self) -> dict:
        elapsed = max(time.time() - self.started, 1e-9)
        rate = self.images_this_run / elapsed
        remaining = self.total - self.done
        return {
            "images_done": self.done, "images_total": self.total, "images_per_second": round(rate, 3),
            "eta_seconds": round(remaining / rate, 1) if rate > 0 else None,
            "units_done": self.units_done, "units_total": self.units_total, "units_failed": self.units_failed,
            "models_trained": self.models_trained, "models_to_train": self.models_to_train,
            "elapsed_seconds": round(elapsed, 1), "by_model": self.by_model,
        }


def describe_progress(snap: dict) -> str:
    """One human line: images, rate, ETA, units, failures, trained models."""
    eta = snap["eta_seconds"]
    eta = "?" if eta is None else f"{int(eta) // 60}m{int(eta) % 60:02d}s"
    return (f"progress: {snap['images_done']}/{snap['images_total']} images "
            f"({100 * snap['images_done'] / max(snap['images_total'], 1):.1f}%), {snap['images_per_second']:.1f} images/s, "
            f"ETA {eta}, units {snap['units_done']}/{snap['units_total']} ({snap['units_failed']} failed), "
            f"models trained {snap['models_trained']}/{snap['models_to_train']}")


class _Metrics:
    """Progress as Ray metrics (visible in the dashboard's metrics view with Prometheus)."""

    def __init__(self, job_id: str):
        from ray.util.metrics import Gauge

        self.tags = {"job": job_id}
        self.done = Gauge("certify_images_done", "images certified so far", tag_keys=("job",))
        self.total = Gauge("certify_images_total", "images to certify", tag_keys=("job",))
        self.failed = Gauge("certify_units_failed", "units that failed", tag_keys=("job",))
        self.rate = Gauge("certify_images_per_second", "certification rate", tag_keys=("job",))

    def update(self, snap: dict) -> None:
        self.done.set(snap["images_done"], tags=self.tags)
        self.total.set(snap["images_total"], tags=self.tags)
        self.failed.set(snap["units_failed"], tags=self.tags)
        self.rate.set(snap["images_per_second"], tags=self.tags)


def _worker_count(sweep: Sweep, tasks: int) -> tuple[int, float]:
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0)
    per_gpu = sweep.resources.gpus_per_worker
    per_gpu = (1.0 if gpus else 0.0) if per_gpu == "auto" else float(per_gpu)
    if per_gpu > gpus:
        raise SweepConflict(f"resources.gpus_per_worker: {per_gpu} GPUs per worker, but the cluster has {gpus:g}")
    capacity = int(gpus // per_gpu) if per_gpu else int(resources.get("CPU", 1) // sweep.resources.cpus_per_worker)
    if capacity < 1:
        raise SweepConflict(f"resources.cpus_per_worker: {sweep.resources.cpus_per_worker:g} CPUs per worker, "
                            f"but the cluster has {resources.get('CPU', 0):g}")
    workers = sweep.resources.workers
    # More workers than fit would wait for resources forever, holding their units.
    workers = capacity if workers == "auto" else min(int(workers), capacity)
    return max(1, min(workers, tasks)), per_gpu


def _failure_name(task: Task) -> str:
    k = task.key
    return task.unit.unit_id if task.unit else f"train-{k.method}-{k.training}-s{k.sigma}-seed{k.seed}"


def _record_failure(sweep: Sweep, task: Task, error: str) -> None:
    folder = Path(sweep.output) / FAILURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    record = {"task": task.name, "attempts": task.attempts + 1, "error": error}
    (folder / f"{_failure_name(task)}.json").write_text(json.dumps(record, indent=2))


def _clear_failure(sweep: Sweep, task: Task) -> None:
    (Path(sweep.output) / FAILURES_DIR / f"{_failure_name(task)}.json").unlink(missing_ok=True)


def _error_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__


def run_sweep(sweep: Sweep, job_id: str, log=print) -> Progress:
    """Run every pending unit of ``sweep`` on a pool of Ray actors; returns the final progress.
    Connects to the running Ray cluster (or the one this process already initialised)."""
    if not ray.is_initialized():
        ray.init(address="auto", log_to_driver=True)
    Path(sweep.output).mkdir(parents=True, exist_ok=True)
    images = select_images(sweep)
    # The spec beside its results: `certify table` takes its radii from it.
    atomic_write(Path(sweep.output) / SWEEP_FILE, lambda handle: handle.write(sweep.to_json().encode()))
    plan = plan_sweep(sweep, len(images), log)
    by_model: dict[str, list[int]] = {k.label: [plan.images_per_model, plan.images_per_model] for k in model_keys(sweep)}
    for unit in plan.pending:
        by_model[unit.model.label][0] -= unit.size
    progress = Progress(total=plan.total_images, done=plan.total_images - sum(u.size for u in plan.pending),
                        by_model=by_model, units_total=plan.skipped + len(plan.pending), units_done=plan.skipped,
                        models_to_train=len(plan.to_train))
    log(f"sweep {sweep.name}: {len(images)} images x {len(by_model)} configurations = {plan.total_images} rows; "
        f"{plan.skipped} units already done, {len(plan.pending)} to run, {len(plan.to_train)} models to train")
    if not plan.pending:
        return progress

    training = set(plan.to_train)
    queue: deque[Task] = deque(Task("train", k) for k in plan.to_train)
    waiting: dict[ModelKey, list[Task]] = {k: [] for k in training}
    for unit in plan.pending:
        task = Task("certify", unit.model, unit)
        (waiting[unit.model] if unit.model in training else queue).append(task)

    workers, gpus = _worker_count(sweep, len(plan.to_train) + len(plan.pending))
    cpus = sweep.resources.cpus_per_worker
    actor_class = ray.remote(UnitRunner).options(num_cpus=cpus, num_gpus=gpus)
    sweep_json = sweep.to_json()

    def new_actor():
        return actor_class.remote(sweep_json, job_id, max(1, int(cpus)))

    actors = [new_actor() for _ in range(workers)]
    log(f"{workers} workers ({cpus:g} CPU, {gpus:g} GPU each)")
    idle = list(range(workers))
    in_flight: dict[ray.ObjectRef, tuple[int, Task]] = {}
    metrics = _Metrics(job_id)
    last_report = last_json = 0.0

    def fail(task: Task, error: str) -> None:
        progress.failures.append(f"{task.name}: {error}")
        _record_failure(sweep, task, error)
        log(f"FAILED {task.name}: {error}" + (f" (after {task.attempts + 1} attempts)" if task.attempts else ""))
        if task.kind == "train":
            for orphan in waiting.pop(task.key, []):
                fail(orphan, f"its model could not be trained ({error})")
        else:
            progress.units_failed += 1

    while queue or in_flight:
        while idle and queue:
            slot, task = idle.pop(), queue.popleft()
            method = actors[slot].train if task.kind == "train" else actors[slot].certify
            in_flight[method.remote(task.key if task.kind == "train" else task.unit)] = (slot, task)
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=PROGRESS_EVERY)
        for ref in ready:
            slot, task = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except RayTaskError as err:  # the unit itself raised: deterministic, no retry
                fail(task, _error_line(err))
            except RayError as err:  # the worker process or its node died, or the result was lost: retry
                ray.kill(actors[slot], no_restart=True)
                actors[slot] = new_actor()
                if task.attempts >= sweep.resources.max_retries:
                    fail(task, f"worker died ({_error_line(err)})")
                else:
                    task.attempts += 1
                    log(f"worker died during {task.name}; retrying (attempt {task.attempts + 1})")
                    queue.appendleft(task)
            else:
                _clear_failure(sweep, task)
                if task.kind == "train":
                    progress.models_trained += 1
                    log(f"trained {task.key.label} in {result['seconds']:.1f} s "
                        f"(held-out clean {100 * result['clean_accuracy']:.2f}%, noisy {100 * result['noisy_accuracy']:.2f}%)")
                    queue.extend(waiting.pop(task.key, []))
                else:
                    progress.done += result["images"]
                    progress.images_this_run += result["images"]
                    progress.units_done += 1
                    progress.by_model[result["model"]][0] += result["images"]
            idle.append(slot)
        now, finished = time.time(), not (queue or in_flight)
        if now - last_report >= PROGRESS_EVERY or finished:
            snap = progress.snapshot()
            metrics.update(snap)
            log(describe_progress(snap))
            last_report = now
            if now - last_json >= PROGRESS_JSON_EVERY or finished:
                log(PROGRESS_PREFIX + json.dumps(snap))
                last_json = now
    for actor in actors:
        ray.kill(actor, no_restart=True)
    return progress


def print_table(sweep: Sweep, log=print) -> None:
    """The sweep's best-certified-accuracy table (its own configurations only)."""
    from certlib.analysis import ANALYSIS_COLUMNS, best_certified_accuracy, format_envelope, load_results

    filters = {"method": list(sweep.methods), "training": list(sweep.training), "sigma": list(sweep.sigmas),
               "seed": list(sweep.seeds)}
    try:
        df = load_results(sweep.output, filters=filters, columns=ANALYSIS_COLUMNS)
    except (OSError, ValueError) as err:
        log(f"no table: {err}")
        return
    if len(df):
        log("best certified accuracy over sigma (certified % (clean % @ sigma)):")
        log(format_envelope(best_certified_accuracy(df, sweep.radii)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="certify: run a sweep as a Ray job's driver")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--spec-b64", default=os.environ.get(SPEC_VARIABLE),
                        help=f"the validated sweep as base64 JSON (default: ${SPEC_VARIABLE})")
    args = parser.parse_args(argv)
    if not args.spec_b64:
        parser.error(f"no sweep: pass --spec-b64 or set {SPEC_VARIABLE}")
    try:
        sweep = Sweep.from_json(base64.b64decode(args.spec_b64).decode())
        progress = run_sweep(sweep, args.job_id, log=lambda line: print(line, flush=True))
    except (SpecError, SweepConflict, FileNotFoundError) as err:
        print(f"error: {err}", flush=True)
        return 2
    if progress.failures:
        print("the table covers the images certified so far: some units failed", flush=True)
    print_table(sweep, log=lambda line: print(line, flush=True))
    if progress.failures:
        print(f"{len(progress.failures)} task(s) failed:", flush=True)
        for line in progress.failures:
            print(f"  {line}", flush=True)
        return 1
    print(f"done: {progress.done} of {progress.total} rows in {sweep.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
