"""A sweep's plan run on Ray: the actor pool, the queue, retries, failure records, progress.

``run_sweep`` connects to Ray, sizes the units (``resolve_shard_size``), reads the plan
(``cluster.plan``) and runs it. Units whose Parquet file exists and validates are skipped, so a
cancelled or crashed job resumes where it stopped. A worker process that dies mid-unit is
replaced and the unit retried (at most ``resources.max_retries`` times); a unit that raises
fails alone and its error is recorded under ``<output>.job/failures/``; the rest of the job still
completes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter, deque
from pathlib import Path

import ray
from ray.exceptions import RayError, RayTaskError

from certlib.atomic import Locked, atomic_write, owned_lock
from certlib.rows import leftover_files
from cluster.job.pool import Pool, PoolError, Slot, Task
from cluster.plan import (
    ModelKey,
    Plan,
    SweepConflict,
    calibration_architecture,
    known_shard_size,
    measured_shard_size,
    model_keys,
    passes_per_image,
    plan_sweep,
    select_images,
    with_shard_size,
)
from cluster.progress import Metrics, Progress, TrainingState, describe_progress, write_progress
from cluster.record import PROGRESS_PREFIX, failures_dir, sweep_file, writer_lock
from cluster.spec import Sweep

PROGRESS_EVERY = 5.0  # seconds between progress lines in the log
PROGRESS_FILE_EVERY = 1.0  # at least this far apart, the progress file also follows each finished call
PROGRESS_JSON_EVERY = 30.0  # seconds between machine-readable progress records (for `certify status`)


# --------------------------------------------------------------------------- failure records


def _failure_name(task: Task) -> str:
    return task.unit.unit_id if task.unit else f"train-{task.key.slug}"


def _record_failure(sweep: Sweep, task: Task, error: str) -> None:
    folder = failures_dir(sweep.output)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"task": task.name, "attempts": task.attempts + 1, "error": error}
    (folder / f"{_failure_name(task)}.json").write_text(json.dumps(record, indent=2))


def _clear_failure(sweep: Sweep, task: Task) -> None:
    (failures_dir(sweep.output) / f"{_failure_name(task)}.json").unlink(missing_ok=True)


def _error_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__


# --------------------------------------------------------------------------- starting a run


def resolve_shard_size(sweep: Sweep, num_images: int, pool: Pool, log=print) -> Sweep:
    """``sweep`` with an integer shard size (``cluster.plan.sizing``): the spec's or an earlier
    run's, else one from the rate a worker measures here."""
    known = known_shard_size(sweep)
    if known is not None:
        return with_shard_size(sweep, known[0])
    keys = model_keys(sweep)
    architecture = calibration_architecture(sweep)
    slot = pool.assign(Task("certify", keys[0]), {"certify"})
    if slot is None:
        raise SweepConflict("resources: no certification worker fits in the cluster's resources")
    rate = float(ray.get(slot.actor.calibrate.options(name="calibrate").remote(architecture)))
    size = measured_shard_size(sweep, num_images, rate, pool.capacity("certify"))
    passes = sum(passes_per_image(sweep, k) for k in keys) / len(keys)
    log(
        f"shard size {size} images (a worker evaluates {rate:,.0f} samples/s of {architecture}; "
        f"{passes:,.0f} samples per image)"
    )
    return with_shard_size(sweep, size)


def run_sweep(sweep: Sweep, job_id: str, log=print) -> Progress:
    """Run every pending unit of ``sweep`` on a pool of Ray actors; returns the final progress.
    Connects to the running Ray cluster (or the one this process already initialised). One job
    at a time writes a results directory: it holds the directory's writer lock throughout (a
    second job is refused with one line naming the first), and removes the temporary files a
    killed worker may have left there."""
    owner = (
        f"job {job_id} (process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})"
    )
    try:
        with owned_lock(writer_lock(sweep.output), owner):
            return _locked_run(sweep, job_id, log)
    except Locked as held:
        raise SweepConflict(f"output: {sweep.output} is being written by {held}; wait for it to end") from None


def _locked_run(sweep: Sweep, job_id: str, log) -> Progress:
    if not ray.is_initialized():
        # Workers' own lines stay in their log files (the dashboard shows them): forwarded, they
        # reached the driver's log late, after the closing table. What they report comes back
        # in their results and the training polls.
        ray.init(address="auto", log_to_driver=False)
    Path(sweep.output).mkdir(parents=True, exist_ok=True)
    for leftover in leftover_files(sweep.output):
        leftover.unlink(missing_ok=True)
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
    # The spec in the job record: `certify table` takes its radii from it, a resume its shard size.
    atomic_write(sweep_file(sweep.output), lambda handle: handle.write(sweep.to_json().encode()))
    plan = plan_sweep(sweep, len(images), log)
    progress = plan.progress()
    log(
        f"sweep {sweep.name}: {len(images)} images x {len(plan.models)} configurations = {plan.total_images} rows; "
        f"{plan.skipped} units already done, {len(plan.pending)} to run, {len(plan.to_train)} models to train"
    )
    return sweep, plan, progress


def _run(sweep: Sweep, job_id: str, pool: Pool, log) -> Progress:
    sweep, plan, progress = _start(sweep, pool, log)
    if not plan.pending:
        write_progress(sweep.output, job_id, progress.snapshot(), "finished")
        return progress
    run = _Run(sweep, job_id, pool, plan, progress, log)
    log(f"workers ({pool.describe()})")
    run.loop()
    return progress


# --------------------------------------------------------------------------- the run loop


class _Run:
    """One execution of a plan: the queue, the calls in flight, retries and progress."""

    def __init__(self, sweep: Sweep, job_id: str, pool: Pool, plan: Plan, progress: Progress, log):
        self.sweep, self.job_id, self.pool, self.progress, self.log = sweep, job_id, pool, progress, log
        # The models to train first, then the units whose model exists; the others wait for theirs.
        self.queue: deque[Task] = deque(Task("train", k) for k in plan.to_train)
        self.queue.extend(Task("certify", unit.model, unit) for unit in plan.ready)
        self.waiting: dict[ModelKey, list[Task]] = {
            key: [Task("certify", unit.model, unit) for unit in units] for key, units in plan.waiting.items()
        }
        self.in_flight: dict[ray.ObjectRef, tuple[Slot, Task]] = {}
        progress.train_slots = pool.capacity("train")
        self.last_report = self.last_json = self.last_file = 0.0

    def loop(self) -> None:
        """Dispatch, collect and report until no task is queued or in flight."""
        self.metrics = Metrics(self.job_id)
        while self.queue or self.in_flight:
            self.dispatch()
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=PROGRESS_EVERY)
            for ref in ready:
                if ref in self.in_flight:  # a dead worker's other calls were dropped with it
                    self.finish(ref)
            now, finished = time.time(), not (self.queue or self.in_flight)
            if now - self.last_report >= PROGRESS_EVERY or finished:
                self.report(now, finished)
            elif ready and now - self.last_file >= PROGRESS_FILE_EVERY:
                # `certify status` (and whatever reads the file) sees a unit as it lands, not up to 5 s later.
                write_progress(self.sweep.output, self.job_id, self.progress.snapshot(), "running")
                self.last_file = now

    def report(self, now: float, finished: bool) -> None:
        """Re-count the cluster, then progress to the job record, the metrics and the log."""
        self.requeue(self.pool.refresh())  # nodes come and go
        _poll_training(self.pool, self.progress)
        snap = self.progress.snapshot()
        self.metrics.update(snap)
        write_progress(
            self.sweep.output,
            self.job_id,
            snap,
            "running" if not finished else ("failed" if self.progress.failures else "finished"),
        )
        self.log(describe_progress(snap))
        self.last_report = self.last_file = now
        if now - self.last_json >= PROGRESS_JSON_EVERY or finished:
            self.log(PROGRESS_PREFIX + json.dumps(snap))
            self.last_json = now

    def fail(self, task: Task, error: str) -> None:
        progress = self.progress
        progress.failures.append(f"{task.name}: {error}")
        _record_failure(self.sweep, task, error)
        self.log(f"FAILED {task.name}: {error}" + (f" (after {task.attempts + 1} attempts)" if task.attempts else ""))
        if task.kind == "train":
            progress.training[task.key.label]["state"] = TrainingState.FAILED
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
                self.progress.training[task.key.label]["state"] = TrainingState.TRAINING
            self.in_flight[self.pool.submit(slot, task)] = (slot, task)

    def requeue(self, tasks: list[Task]) -> None:
        """Tasks whose worker is gone: their calls dropped, queued again ahead of the rest."""
        self.drop_calls(tasks)
        for task in tasks:
            if task.kind == "train":
                self.progress.training[task.key.label]["state"] = TrainingState.QUEUED
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
        if task.kind == "train":
            self.trained(task, result)
        else:
            self.certified(result)

    def trained(self, task: Task, result: dict) -> None:
        """A model is trained: its units join the queue."""
        self.progress.models_trained += 1
        info = self.progress.training[task.key.label]
        info["state"] = TrainingState.DONE
        if "epochs" in info:  # the last poll may have seen an earlier epoch
            info["epoch"] = info["epochs"]
        self.log(
            f"trained {task.key.label} in {result['seconds']:.1f} s (held-out clean "
            f"{100 * result['clean_accuracy']:.2f}%, noisy {100 * result['noisy_accuracy']:.2f}%)"
        )
        self.queue.extend(self.waiting.pop(task.key, []))

    def certified(self, result: dict) -> None:
        progress = self.progress
        progress.done += result["images"]
        progress.images_this_run += result["images"]
        progress.units_done += 1
        progress.by_model[result["model"]][0] += result["images"]


def _poll_training(pool: Pool, progress: Progress) -> None:
    """The latest epoch metrics of every model in training (a quick call answered beside the
    training run); a worker that does not answer within a second is asked again next time."""
    asked = {
        slot.actor.training_progress.options(name="training progress").remote(): slot.tasks[0].key.label
        for slot in pool.slots
        if slot.kind == "train" and slot.tasks
    }
    if not asked:
        return
    ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=1.0)
    for ref in ready:
        try:
            latest = ray.get(ref)
        except RayError:
            continue
        info = progress.training[asked[ref]]
        if latest is not None and info["state"] == TrainingState.TRAINING:
            info.update(latest)
