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
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayError, RayTaskError

from certlib.atomic import atomic_write
from certlib.checkpoint import read_card
from cluster.jobs import PROGRESS_PREFIX
from cluster.pool import Pool, PoolError, Slot, Task
from cluster.progress import Metrics, Progress, describe_progress, write_progress
from certlib.rows import existing_shards, shard_config, shard_state
from cluster.spec import ModelKey, SpecError, Sweep, Unit, expand, model_keys, unit_parameters
from cluster.worker import select_images

SPEC_VARIABLE = "CERTIFY_SPEC_B64"  # the job's validated sweep, base64 JSON, in its environment
PROGRESS_EVERY = 5.0  # seconds between progress lines in the log
PROGRESS_JSON_EVERY = 30.0  # seconds between machine-readable progress records (for `certify status`)
FAILURES_DIR = "_failures"
SWEEP_FILE = "_sweep.json"


class SweepConflict(ValueError):
    """The output directory or the models cannot serve this sweep; one line naming why."""


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
    expected = {u.path(sweep): u for u in units}
    keys = set(model_keys(sweep))
    for path in existing_shards(sweep.output):
        if path not in expected:
            if ModelKey(**shard_config(sweep.output, path)) in keys:
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


# Automatic shard size: each unit long enough that its fixed cost (a driver round trip, its
# Parquet write, the engine's spot check) is noise, short enough that a lost worker loses
# little, and enough units per worker that the last ones finish together.
MIN_UNIT_SECONDS, MAX_UNIT_SECONDS, UNITS_PER_WORKER = 60.0, 600.0, 8


def choose_shard_size(num_images: int, models: int, passes_per_image: float, samples_per_second: float,
                      workers: int) -> int:
    """Images per unit: a unit lasts total / (workers x UNITS_PER_WORKER), kept within
    [MIN_UNIT_SECONDS, MAX_UNIT_SECONDS], at the measured ``samples_per_second`` of one worker."""
    image_seconds = passes_per_image / max(samples_per_second, 1e-9)
    total = num_images * models * image_seconds
    unit_seconds = min(MAX_UNIT_SECONDS, max(MIN_UNIT_SECONDS, total / (max(1, workers) * UNITS_PER_WORKER)))
    return int(min(num_images, max(1, round(unit_seconds / image_seconds))))


def recorded_shard_size(output: str | Path) -> int | None:
    """The shard size an earlier run of this output directory resolved (its _sweep.json)."""
    try:
        size = json.loads((Path(output) / SWEEP_FILE).read_text())["resources"]["shard_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return size if isinstance(size, int) else None


def passes_per_image(sweep: Sweep, key: ModelKey) -> int:
    """Forward passes one image costs: DSSN's L noisy copies, or Monte Carlo's n0 + n."""
    return key.noise(sweep).passes_per_image(sweep.certify.n0, sweep.certify.n)


def resolve_shard_size(sweep: Sweep, num_images: int, pool: Pool, log=print) -> Sweep:
    """``sweep`` with an integer shard size: the spec's, the one an earlier run of the same
    output chose, or one chosen from a worker's measured rate (``choose_shard_size``)."""
    if sweep.resources.shard_size != "auto":
        return sweep
    size = recorded_shard_size(sweep.output)
    keys = model_keys(sweep)
    if size is None:
        existing = [k.checkpoint(sweep) for k in keys if k.checkpoint(sweep).is_file()]
        architecture = read_card(existing[0]).architecture if existing else sweep.models.train.architecture
        slot = pool.assign(Task("certify", keys[0]), {"certify"})
        rate = ray.get(slot.actor.calibrate.options(name="calibrate").remote(architecture))
        passes = sum(passes_per_image(sweep, k) for k in keys) / len(keys)
        size = choose_shard_size(num_images, len(keys), passes, rate, pool.capacity("certify"))
        log(f"shard size {size} images (a worker evaluates {rate:,.0f} samples/s of {architecture}; "
            f"{passes:,.0f} samples per image)")
    return dataclasses.replace(sweep, resources=dataclasses.replace(sweep.resources, shard_size=size))


def run_sweep(sweep: Sweep, job_id: str, log=print) -> Progress:
    """Run every pending unit of ``sweep`` on a pool of Ray actors; returns the final progress.
    Connects to the running Ray cluster (or the one this process already initialised)."""
    if not ray.is_initialized():
        ray.init(address="auto", log_to_driver=True)
    Path(sweep.output).mkdir(parents=True, exist_ok=True)
    try:
        pool = Pool(sweep, job_id)
    except PoolError as err:
        raise SweepConflict(str(err)) from None
    try:
        return _run(sweep, job_id, pool, log)
    finally:
        pool.shutdown()


def _start(sweep: Sweep, pool: Pool, log) -> tuple[Sweep, Plan, Progress]:
    images = select_images(sweep)
    sweep = resolve_shard_size(sweep, len(images), pool, log)
    # The spec beside its results: `certify table` takes its radii from it, a resume its shard size.
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
    return sweep, plan, progress


class _Run:
    """One execution of a plan: the queue, the calls in flight, retries and progress."""

    def __init__(self, sweep: Sweep, job_id: str, pool: Pool, plan: Plan, progress: Progress, log):
        self.sweep, self.job_id, self.pool, self.progress, self.log = sweep, job_id, pool, progress, log
        training = set(plan.to_train)
        self.queue: deque[Task] = deque(Task("train", k) for k in plan.to_train)
        self.waiting: dict[ModelKey, list[Task]] = {k: [] for k in training}
        for unit in plan.pending:
            task = Task("certify", unit.model, unit)
            (self.waiting[unit.model] if unit.model in training else self.queue).append(task)
        self.in_flight: dict[ray.ObjectRef, tuple[Slot, Task]] = {}
        progress.training = {k.label: {"state": "queued"} for k in plan.to_train}
        progress.train_slots = pool.capacity("train")

    def fail(self, task: Task, error: str) -> None:
        progress = self.progress
        progress.failures.append(f"{task.name}: {error}")
        _record_failure(self.sweep, task, error)
        self.log(f"FAILED {task.name}: {error}" + (f" (after {task.attempts + 1} attempts)" if task.attempts else ""))
        if task.kind == "train":
            progress.training[task.key.label]["state"] = "failed"
            for orphan in self.waiting.pop(task.key, []):
                self.fail(orphan, f"its model could not be trained ({error})")
        else:
            progress.units_failed += 1

    def dispatch(self) -> None:
        pending = list(self.queue)
        self.queue.clear()
        left = Counter(task.kind for task in pending)  # queued tasks per kind, this one included
        blocked: set[str] = set()  # kinds that found no worker: the rest of them wait too
        for task in pending:
            slot = None if task.kind in blocked else self.pool.assign(task, {kind for kind, n in left.items() if n})
            left[task.kind] -= 1
            if slot is None:
                blocked.add(task.kind)
                self.queue.append(task)
                continue
            if task.kind == "train":
                self.progress.training[task.key.label]["state"] = "training"
            self.in_flight[self.pool.submit(slot, task)] = (slot, task)

    def requeue(self, tasks: list[Task]) -> None:
        """Tasks whose worker is gone: their calls dropped, queued again ahead of the rest."""
        self.drop_calls(tasks)
        for task in tasks:
            if task.kind == "train":
                self.progress.training[task.key.label]["state"] = "queued"
        self.queue.extendleft(reversed(tasks))

    def drop_calls(self, tasks: list[Task]) -> None:
        gone = {id(t) for t in tasks}
        self.in_flight = {ref: st for ref, st in self.in_flight.items() if id(st[1]) not in gone}

    def worker_died(self, slot: Slot, err: BaseException) -> None:
        """Its running task counts an attempt (and fails past max_retries); the calls queued
        behind it had not started and go back to the queue as they were."""
        running, *behind = slot.tasks
        if slot in self.pool.slots:
            self.pool.retire(slot)
        if running.attempts >= self.sweep.resources.max_retries:
            self.drop_calls([running])
            self.fail(running, f"worker died ({_error_line(err)})")
        else:
            running.attempts += 1
            self.log(f"worker died during {running.name}; retrying (attempt {running.attempts + 1})")
            behind.insert(0, running)
        self.requeue(behind)
        self.requeue(self.pool.refresh())

    def finish(self, ref: ray.ObjectRef) -> None:
        slot, task = self.in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except RayTaskError as err:  # the unit itself raised: deterministic, no retry
            slot.tasks.remove(task)
            self.fail(task, _error_line(err))
            return
        except RayError as err:  # the worker process or its node died, or the result was lost: retry
            self.worker_died(slot, err)
            return
        slot.tasks.remove(task)
        _clear_failure(self.sweep, task)
        progress = self.progress
        if task.kind == "train":
            progress.models_trained += 1
            info = progress.training[task.key.label]
            info["state"] = "done"
            if "epochs" in info:  # the last poll may have seen an earlier epoch
                info["epoch"] = info["epochs"]
            self.log(f"trained {task.key.label} in {result['seconds']:.1f} s (held-out clean "
                     f"{100 * result['clean_accuracy']:.2f}%, noisy {100 * result['noisy_accuracy']:.2f}%)")
            self.queue.extend(self.waiting.pop(task.key, []))
        else:
            progress.done += result["images"]
            progress.images_this_run += result["images"]
            progress.units_done += 1
            progress.by_model[result["model"]][0] += result["images"]


def _run(sweep: Sweep, job_id: str, pool: Pool, log) -> Progress:
    sweep, plan, progress = _start(sweep, pool, log)
    if not plan.pending:
        write_progress(sweep.output, job_id, progress.snapshot(), "finished")
        return progress
    run = _Run(sweep, job_id, pool, plan, progress, log)
    log(f"workers ({pool.describe()})")
    metrics = Metrics(job_id)
    last_report = last_json = 0.0
    while run.queue or run.in_flight:
        run.dispatch()
        ready, _ = ray.wait(list(run.in_flight), num_returns=1, timeout=PROGRESS_EVERY)
        for ref in ready:
            if ref in run.in_flight:  # a dead worker's other calls were dropped with it
                run.finish(ref)
        now, finished = time.time(), not (run.queue or run.in_flight)
        if now - last_report >= PROGRESS_EVERY or finished:
            run.requeue(pool.refresh())  # nodes come and go
            _poll_training(pool, progress)
            snap = progress.snapshot()
            metrics.update(snap)
            write_progress(sweep.output, job_id, snap, "running" if not finished else
                           ("failed" if progress.failures else "finished"))
            log(describe_progress(snap))
            last_report = now
            if now - last_json >= PROGRESS_JSON_EVERY or finished:
                log(PROGRESS_PREFIX + json.dumps(snap))
                last_json = now
    return progress


def _poll_training(pool: Pool, progress: Progress) -> None:
    """The latest epoch metrics of every model in training (a quick call answered beside the
    training run); a worker that does not answer within a second is asked again next time."""
    asked = {slot.actor.training_progress.options(name="training progress").remote(): slot.tasks[0].key.label
             for slot in pool.slots if slot.kind == "train" and slot.tasks}
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
