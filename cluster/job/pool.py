"""The executor's Ray actors: training workers and certification workers, created while the
cluster's CPUs and GPUs allow, re-counted as nodes join or leave.

A certification worker holds up to CERTIFY_DEPTH calls at once, so that the unit queued next
has its images loaded while the current one runs and starts the moment it ends (no driver
round trip between units); a training run fills its device, so training workers hold one.
Calls are named after the model (``certify <label>``, ``train <label>``): the Ray dashboard's
job page counts them by name and state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import ray

from certlib.training.config import TrainConfig, TrainSettings, step_flops
from cluster.job.worker import Worker
from cluster.plan import ModelKey, Unit
from cluster.spec import Sweep

# A training step below about this many floating-point operations does not fill a GPU: a
# WRN-40-2 step at batch 256 (5.03e11, step_flops) ran 1.9x the images/s of one at batch 64
# under a CUDA graph on an H100 (31.5k vs 16.7k, issue 11), so units that small share a GPU
# (at most MAX_PACKED each).
FILL_STEP_FLOPS = 5.1e11
MAX_PACKED = 4
CERTIFY_DEPTH = 2
DEPTH = {"train": 1, "certify": CERTIFY_DEPTH}


class PoolError(ValueError):
    """The cluster cannot hold one worker as the spec asks; one line naming why."""


def training_gpu_share(sweep: Sweep) -> float:
    """GPUs per training worker: the spec's ``resources.gpus_per_train_worker``, or for ``auto``
    1/k with k = FILL_STEP_FLOPS / (the costliest training step of the sweep), 1 <= k <= MAX_PACKED."""
    setting = sweep.resources.gpus_per_train_worker
    if setting != "auto":
        return float(setting)
    settings = dataclasses.asdict(sweep.models.train or TrainSettings())
    flops = max(
        step_flops(
            TrainConfig(
                dataset=sweep.dataset.name, method=sweep.methods[0], sigma=sweep.sigmas[0], training=mode, **settings
            )
        )
        for mode in sweep.training
    )
    return 1.0 / max(1, min(MAX_PACKED, int(FILL_STEP_FLOPS // flops)))


@dataclass
class Task:
    kind: str  # "train" or "certify"
    key: ModelKey
    unit: Unit | None = None
    attempts: int = 0

    @property
    def name(self) -> str:
        return self.unit.unit_id if self.unit else f"train {self.key.label}"


@dataclass(eq=False)
class Slot:
    kind: str  # "train" or "certify"
    actor: Any  # a Ray actor handle of cluster.job.worker.Worker
    tasks: list[Task] = field(default_factory=list)  # in the order the worker runs them
    model: ModelKey | None = None  # the model of its latest call: kept loaded by the worker

    @property
    def room(self) -> bool:
        return len(self.tasks) < DEPTH[self.kind]


class Pool:
    """Workers of two kinds within the cluster's resources. A task goes to an idle worker of its
    kind (one holding its model first), or of the other kind where both kinds need the same
    resources (one actor class runs both: on CPUs it saves starting a process), else to a new
    worker where resources allow (after retiring idle workers of a kind with nothing queued),
    else behind a busy worker's current call."""

    def __init__(self, sweep: Sweep, job_id: str):
        self.gpus, self.cpus = self._totals()
        certify_gpus = sweep.resources.gpus_per_worker
        certify_gpus = (1.0 if self.gpus else 0.0) if certify_gpus == "auto" else float(certify_gpus)
        train_gpus = training_gpu_share(sweep) if self.gpus and sweep.models.train is not None else 0.0
        for key, need in (("gpus_per_worker", certify_gpus), ("gpus_per_train_worker", train_gpus)):
            if need > self.gpus:
                raise PoolError(f"resources.{key}: {need:g} GPUs per worker, but the cluster has {self.gpus:g}")
        cpus = sweep.resources.cpus_per_worker
        if cpus > self.cpus:
            raise PoolError(f"resources.cpus_per_worker: {cpus:g} CPUs per worker, but the cluster has {self.cpus:g}")
        self.need = {"train": (cpus, train_gpus), "certify": (cpus, certify_gpus)}
        self.cap = 10**9 if sweep.resources.workers == "auto" else int(sweep.resources.workers)
        threads = max(1, int(cpus))
        self.factory = {
            kind: ray.remote(Worker).options(num_cpus=c, num_gpus=g, max_concurrency=2 * CERTIFY_DEPTH + 2)
            for kind, (c, g) in self.need.items()
        }
        self.args = (sweep.to_json(), job_id, threads)
        self.slots: list[Slot] = []

    @staticmethod
    def _totals() -> tuple[float, float]:
        resources = ray.cluster_resources()
        return resources.get("GPU", 0.0), resources.get("CPU", 0.0)

    def describe(self) -> str:
        return ", ".join(f"{kind}: {c:g} CPU, {g:g} GPU per worker" for kind, (c, g) in self.need.items())

    def _used(self) -> tuple[float, float]:
        return (sum(self.need[s.kind][0] for s in self.slots), sum(self.need[s.kind][1] for s in self.slots))

    def _fits(self, kind: str) -> bool:
        cpus, gpus = self.need[kind]
        used_cpus, used_gpus = self._used()
        count = sum(1 for s in self.slots if s.kind == kind)
        return count < self.cap and used_cpus + cpus <= self.cpus + 1e-9 and used_gpus + gpus <= self.gpus + 1e-9

    def _new(self, kind: str) -> Slot:
        slot = Slot(kind, self.factory[kind].remote(*self.args))
        self.slots.append(slot)
        return slot

    def assign(self, task: Task, queued_kinds: set[str]) -> Slot | None:
        """A worker for ``task`` (see the class), or None: it waits."""
        same_needs = {kind for kind, need in self.need.items() if need == self.need[task.kind]}
        idle = [s for s in self.slots if not s.tasks and s.kind in same_needs]
        if idle:
            slot = min(idle, key=lambda s: (s.model != task.key, s.kind != task.kind))
            slot.kind = task.kind
            return slot
        if not self._fits(task.kind):
            for spare in [s for s in self.slots if not s.tasks and s.kind not in queued_kinds]:
                self.retire(spare)
                if self._fits(task.kind):
                    break
        if self._fits(task.kind) or not self.slots:
            return self._new(task.kind)
        busy = [s for s in self.slots if s.kind == task.kind and s.room]
        return next((s for s in busy if s.model == task.key), busy[0] if busy else None)

    def submit(self, slot: Slot, task: Task) -> ray.ObjectRef:
        slot.tasks.append(task)
        slot.model = task.key
        if task.kind == "train":
            return slot.actor.train.options(name=f"train {task.key.label}").remote(task.key)
        return slot.actor.certify.options(name=f"certify {task.key.label}").remote(task.unit)

    def retire(self, slot: Slot) -> None:
        ray.kill(slot.actor, no_restart=True)
        self.slots.remove(slot)

    def refresh(self) -> list[Task]:
        """Re-read the cluster's CPUs and GPUs (nodes join and leave). Where it shrank below what
        the workers hold, the newest workers are retired, idle ones first; returns the tasks
        they held, to queue again (they did not run, or ran on a node that is gone)."""
        self.gpus, self.cpus = self._totals()
        orphans: list[Task] = []
        while self.slots:
            used_cpus, used_gpus = self._used()
            if used_cpus <= self.cpus + 1e-9 and used_gpus <= self.gpus + 1e-9:
                break
            slot = min(reversed(self.slots), key=lambda s: len(s.tasks))
            orphans.extend(slot.tasks)
            self.retire(slot)
        return orphans

    def capacity(self, kind: str) -> int:
        """How many workers of ``kind`` the cluster holds at once."""
        cpus, gpus = self.need[kind]
        fit = [math.floor(self.cpus / cpus + 1e-9)] + ([math.floor(self.gpus / gpus + 1e-9)] if gpus else [])
        return max(1, min([self.cap, *fit]))

    def shutdown(self) -> None:
        for slot in list(self.slots):
            self.retire(slot)
