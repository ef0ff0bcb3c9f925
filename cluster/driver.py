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
import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayError, RayTaskError

from certlib.atomic import atomic_write
from certlib.checkpoint import read_card
from cluster.results import existing_shards, shard_path, shard_state
from certlib.train import TrainConfig, TrainSettings, step_flops
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
    """Images certified out of the total, per model and overall, and the models still to train,
    with rates and an ETA that counts both."""

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
    # Per model to train: {"state": queued|training|done|failed} plus, once an epoch is done,
    # the worker's latest epoch metrics and when they arrived ("reported").
    training: dict[str, dict] = field(default_factory=dict)
    train_slots: int = 1

    def training_seconds_left(self, now: float) -> float | None:
        """Wall time the remaining training needs on ``train_slots`` parallel workers; None
        while no model has finished an epoch to measure it by."""
        running, queued, per_model = [], 0, []
        for info in self.training.values():
            if "epoch" in info:
                epoch_seconds = info["images"] / max(info["images_per_second"], 1e-9)
                per_model.append(info["epochs"] * epoch_seconds)
            if info["state"] == "queued":
                queued += 1
            elif info["state"] == "training":
                if "epoch" not in info:
                    queued += 1  # started, not measured yet: counted as a whole model
                else:
                    left = (info["epochs"] - info["epoch"]) * info["images"] / max(info["images_per_second"], 1e-9)
                    running.append(max(0.0, left - (now - info["reported"])))
        if not running and not queued:
            return 0.0
        if queued and not per_model:
            return None
        whole = sum(per_model) / len(per_model) if per_model else 0.0
        return (sum(running) + queued * whole) / max(1, self.train_slots)

    def snapshot(self) -> dict:
        now = time.time()
        elapsed = max(now - self.started, 1e-9)
        rate = self.images_this_run / elapsed
        remaining = self.total - self.done
        certify_left = 0.0 if remaining == 0 else (remaining / rate if rate > 0 else None)
        training_left = self.training_seconds_left(now)
        eta = None if certify_left is None or training_left is None else training_left + certify_left
        training = {}
        for label, info in self.training.items():
            entry = {"state": info["state"]}
            if "epoch" in info:
                left = (info["epochs"] - info["epoch"]) * info["images"] / max(info["images_per_second"], 1e-9)
                entry |= {"epoch": info["epoch"], "epochs": info["epochs"],
                          "images_per_second": round(info["images_per_second"], 1),
                          "eta_seconds": round(max(0.0, left - (now - info["reported"])), 1) if info["state"] == "training" else 0.0}
            training[label] = entry
        return {
            "images_done": self.done, "images_total": self.total, "images_per_second": round(rate, 3),
            "eta_seconds": None if eta is None else round(eta, 1),
            "training_eta_seconds": None if training_left is None else round(training_left, 1),
            "units_done": self.units_done, "units_total": self.units_total, "units_failed": self.units_failed,
            "models_trained": self.models_trained, "models_to_train": self.models_to_train,
            "elapsed_seconds": round(elapsed, 1), "by_model": self.by_model, "training": training,
        }


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def describe_progress(snap: dict) -> str:
    """One human line: images, rate, ETA (training included), units, failures, trained models."""
    training = snap.get("training", {})
    running = sum(1 for t in training.values() if t["state"] == "training")
    train_part = f"models trained {snap['models_trained']}/{snap['models_to_train']}"
    if snap["models_trained"] < snap["models_to_train"]:
        train_part += f" ({running} training, training ETA {format_seconds(snap.get('training_eta_seconds'))})"
    return (f"progress: {snap['images_done']}/{snap['images_total']} images "
            f"({100 * snap['images_done'] / max(snap['images_total'], 1):.1f}%), {snap['images_per_second']:.1f} images/s, "
            f"ETA {format_seconds(snap['eta_seconds'])}, units {snap['units_done']}/{snap['units_total']} "
            f"({snap['units_failed']} failed), {train_part}")


def describe_training(label: str, entry: dict) -> str:
    """One line per model to train: its state, epoch, images/s and ETA."""
    if "epoch" not in entry:
        return f"{label}: {entry['state']}"
    line = f"{label}: {entry['state']}, epoch {entry['epoch']}/{entry['epochs']}, {entry['images_per_second']:,.0f} images/s"
    return line + (f", ETA {format_seconds(entry['eta_seconds'])}" if entry["state"] == "training" else "")


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


# A training step below about this many floating-point operations does not fill a GPU: a
# WRN-40-2 step at batch 256 (5.03e11, step_flops) ran 1.9x the images/s of one at batch 64
# under a CUDA graph on an H100 (31.5k vs 16.7k, issue 11), so units that small share a GPU
# (at most MAX_PACKED each).
FILL_STEP_FLOPS = 5.1e11
MAX_PACKED = 4


def training_gpu_share(sweep: Sweep) -> float:
    """GPUs per training worker: the spec's ``resources.gpus_per_train_worker``, or for ``auto``
    1/k with k = FILL_STEP_FLOPS / (the costliest training step of the sweep), 1 <= k <= MAX_PACKED."""
    setting = sweep.resources.gpus_per_train_worker
    if setting != "auto":
        return float(setting)
    settings = dataclasses.asdict(sweep.models.train or TrainSettings())
    flops = max(step_flops(TrainConfig(dataset=sweep.dataset.name, method="gaussian", sigma=1.0, training=mode, **settings))
                for mode in sweep.training)
    return 1.0 / max(1, min(MAX_PACKED, int(FILL_STEP_FLOPS // flops)))


@dataclass
class _Slot:
    kind: str  # "train" or "certify"
    actor: object
    task: Task | None = None


class _Pool:
    """Ray actors of two kinds, created while the cluster's GPUs and CPUs allow: training
    workers (a share of a GPU each, several per GPU when a step does not fill one) and
    certification workers. A task waits for an idle worker of its kind; an idle worker whose
    kind has no queued work makes room for the other kind."""

    def __init__(self, sweep: Sweep, job_id: str):
        resources = ray.cluster_resources()
        self.gpus, self.cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
        certify_gpus = sweep.resources.gpus_per_worker
        certify_gpus = (1.0 if self.gpus else 0.0) if certify_gpus == "auto" else float(certify_gpus)
        train_gpus = training_gpu_share(sweep) if self.gpus and sweep.models.train is not None else 0.0
        for key, need in (("gpus_per_worker", certify_gpus), ("gpus_per_train_worker", train_gpus)):
            if need > self.gpus:
                raise SweepConflict(f"resources.{key}: {need:g} GPUs per worker, but the cluster has {self.gpus:g}")
        cpus = sweep.resources.cpus_per_worker
        if cpus > self.cpus:
            raise SweepConflict(f"resources.cpus_per_worker: {cpus:g} CPUs per worker, but the cluster has {self.cpus:g}")
        self.need = {"train": (cpus, train_gpus), "certify": (cpus, certify_gpus)}
        self.cap = 10**9 if sweep.resources.workers == "auto" else int(sweep.resources.workers)
        threads = max(1, int(cpus))
        # Two threads per actor: the driver asks a training worker for its epoch metrics mid-run.
        self.factory = {kind: ray.remote(UnitRunner).options(num_cpus=c, num_gpus=g, max_concurrency=2)
                        for kind, (c, g) in self.need.items()}
        self.args = (sweep.to_json(), job_id, threads)
        self.slots: list[_Slot] = []

    def describe(self) -> str:
        return ", ".join(f"{kind}: {c:g} CPU, {g:g} GPU per worker" for kind, (c, g) in self.need.items())

    def _fits(self, kind: str) -> bool:
        cpus, gpus = self.need[kind]
        used_cpus = sum(self.need[s.kind][0] for s in self.slots)
        used_gpus = sum(self.need[s.kind][1] for s in self.slots)
        count = sum(1 for s in self.slots if s.kind == kind)
        return count < self.cap and used_cpus + cpus <= self.cpus + 1e-9 and used_gpus + gpus <= self.gpus + 1e-9

    def _new(self, kind: str) -> _Slot:
        slot = _Slot(kind, self.factory[kind].remote(*self.args))
        self.slots.append(slot)
        return slot

    def idle(self, task: Task, queued_kinds: set[str]) -> _Slot | None:
        """An idle worker for ``task``: an existing one, a new one where resources allow, or one
        made room for by retiring idle workers of a kind with nothing queued."""
        slot = next((s for s in self.slots if s.kind == task.kind and s.task is None), None)
        if slot is None and not self._fits(task.kind):
            for spare in [s for s in self.slots if s.task is None and s.kind not in queued_kinds]:
                self.retire(spare)
                if self._fits(task.kind):
                    break
        if slot is None and (self._fits(task.kind) or not self.slots):
            slot = self._new(task.kind)
        return slot

    def retire(self, slot: _Slot) -> None:
        ray.kill(slot.actor, no_restart=True)
        self.slots.remove(slot)

    def replace(self, slot: _Slot) -> None:
        """A new worker in place of one whose process died."""
        ray.kill(slot.actor, no_restart=True)
        slot.actor, slot.task = self.factory[slot.kind].remote(*self.args), None

    def capacity(self, kind: str) -> int:
        """How many workers of ``kind`` the cluster holds at once."""
        cpus, gpus = self.need[kind]
        fit = [math.floor(self.cpus / cpus + 1e-9)] + ([math.floor(self.gpus / gpus + 1e-9)] if gpus else [])
        return max(1, min([self.cap, *fit]))

    def shutdown(self) -> None:
        for slot in list(self.slots):
            self.retire(slot)


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

    pool = _Pool(sweep, job_id)
    log(f"workers ({pool.describe()})")
    progress.training = {k.label: {"state": "queued"} for k in plan.to_train}
    progress.train_slots = pool.capacity("train")
    in_flight: dict[ray.ObjectRef, _Slot] = {}
    metrics = _Metrics(job_id)
    last_report = last_json = 0.0

    def fail(task: Task, error: str) -> None:
        progress.failures.append(f"{task.name}: {error}")
        _record_failure(sweep, task, error)
        log(f"FAILED {task.name}: {error}" + (f" (after {task.attempts + 1} attempts)" if task.attempts else ""))
        if task.kind == "train":
            progress.training[task.key.label]["state"] = "failed"
            for orphan in waiting.pop(task.key, []):
                fail(orphan, f"its model could not be trained ({error})")
        else:
            progress.units_failed += 1

    def dispatch() -> None:
        pending = list(queue)
        queue.clear()
        left = Counter(task.kind for task in pending)  # queued tasks per kind, this one included
        blocked: set[str] = set()  # kinds that found no worker: the rest of them wait too
        for task in pending:
            slot = None if task.kind in blocked else pool.idle(task, {kind for kind, n in left.items() if n})
            left[task.kind] -= 1
            if slot is None:
                blocked.add(task.kind)
                queue.append(task)
                continue
            slot.task = task
            if task.kind == "train":
                progress.training[task.key.label]["state"] = "training"
                in_flight[slot.actor.train.remote(task.key)] = slot
            else:
                in_flight[slot.actor.certify.remote(task.unit)] = slot

    def finish(slot: _Slot, ref: ray.ObjectRef) -> None:
        task, slot.task = slot.task, None
        try:
            result = ray.get(ref)
        except RayTaskError as err:  # the unit itself raised: deterministic, no retry
            fail(task, _error_line(err))
        except RayError as err:  # the worker process or its node died, or the result was lost: retry
            pool.replace(slot)
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
                info = progress.training[task.key.label]
                info["state"] = "done"
                if "epochs" in info:  # the last poll may have seen an earlier epoch
                    info["epoch"] = info["epochs"]
                log(f"trained {task.key.label} in {result['seconds']:.1f} s "
                    f"(held-out clean {100 * result['clean_accuracy']:.2f}%, noisy {100 * result['noisy_accuracy']:.2f}%)")
                queue.extend(waiting.pop(task.key, []))
            else:
                progress.done += result["images"]
                progress.images_this_run += result["images"]
                progress.units_done += 1
                progress.by_model[result["model"]][0] += result["images"]

    while queue or in_flight:
        dispatch()
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=PROGRESS_EVERY)
        for ref in ready:
            finish(in_flight.pop(ref), ref)
        now, finished = time.time(), not (queue or in_flight)
        if now - last_report >= PROGRESS_EVERY or finished:
            _poll_training(pool, progress)
            snap = progress.snapshot()
            metrics.update(snap)
            log(describe_progress(snap))
            last_report = now
            if now - last_json >= PROGRESS_JSON_EVERY or finished:
                log(PROGRESS_PREFIX + json.dumps(snap))
                last_json = now
    pool.shutdown()
    return progress


def _poll_training(pool: _Pool, progress: Progress) -> None:
    """The latest epoch metrics of every model in training (a quick call to its worker's
    second thread); a worker that does not answer within a second is asked again next time."""
    asked = {slot.actor.training_progress.remote(): slot.task.key.label
             for slot in pool.slots if slot.kind == "train" and slot.task is not None}
    if not asked:
        return
    ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=1.0)
    for ref in ready:
        try:
            latest = ray.get(ref)
        except RayError:
            continue
        info = progress.training[asked[ref]]
        if latest is not None and info["state"] == "training":
            info.update(latest)


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
