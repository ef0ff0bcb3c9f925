"""A sweep's progress as data: images and units done, models trained, rates and an ETA that
counts the training still to do, per model. The driver writes it to ``<output>.job/progress.json``
(atomically, every few seconds, and once more at the end), prints it in its log, and sets
Ray metrics from it; ``certify status`` reads it back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from certlib.atomic import atomic_write
from cluster.record import progress_file


class TrainingState(StrEnum):
    """Where a model to train stands (a string in the progress record)."""

    QUEUED = "queued"
    TRAINING = "training"
    DONE = "done"
    FAILED = "failed"


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
    # Per model to train: {"state": a TrainingState} plus, once an epoch is done,
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
            if info["state"] == TrainingState.QUEUED:
                queued += 1
            elif info["state"] == TrainingState.TRAINING:
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
                entry |= {
                    "epoch": info["epoch"],
                    "epochs": info["epochs"],
                    "images_per_second": round(info["images_per_second"], 1),
                    "eta_seconds": round(max(0.0, left - (now - info["reported"])), 1)
                    if info["state"] == TrainingState.TRAINING
                    else 0.0,
                }
            training[label] = entry
        return {
            "images_done": self.done,
            "images_total": self.total,
            "images_per_second": round(rate, 3),
            "eta_seconds": None if eta is None else round(eta, 1),
            "training_eta_seconds": None if training_left is None else round(training_left, 1),
            "units_done": self.units_done,
            "units_total": self.units_total,
            "units_failed": self.units_failed,
            "models_trained": self.models_trained,
            "models_to_train": self.models_to_train,
            "elapsed_seconds": round(elapsed, 1),
            "by_model": self.by_model,
            "training": training,
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
    running = sum(1 for t in training.values() if t["state"] == TrainingState.TRAINING)
    train_part = f"models trained {snap['models_trained']}/{snap['models_to_train']}"
    if snap["models_trained"] < snap["models_to_train"]:
        train_part += f" ({running} training, training ETA {format_seconds(snap.get('training_eta_seconds'))})"
    return (
        f"progress: {snap['images_done']}/{snap['images_total']} images "
        f"({100 * snap['images_done'] / max(snap['images_total'], 1):.1f}%), {snap['images_per_second']:.1f} images/s, "
        f"ETA {format_seconds(snap['eta_seconds'])}, units {snap['units_done']}/{snap['units_total']} "
        f"({snap['units_failed']} failed), {train_part}"
    )


def describe_training(label: str, entry: dict) -> str:
    """One line per model to train: its state, epoch, images/s and ETA."""
    if "epoch" not in entry:
        return f"{label}: {entry['state']}"
    line = f"{label}: {entry['state']}, epoch {entry['epoch']}/{entry['epochs']}"
    line += f", {entry['images_per_second']:,.0f} images/s"
    return line + (f", ETA {format_seconds(entry['eta_seconds'])}" if entry["state"] == TrainingState.TRAINING else "")


class Metrics:
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


def write_progress(output: str | Path, job_id: str, snap: dict, state: str) -> None:
    """``<output>.job/progress.json``: the snapshot, the job it belongs to, its state (running,
    finished, failed) and when it was written (seconds since the epoch)."""
    record = {"job_id": job_id, "state": state, "updated": round(time.time(), 3), **snap}
    atomic_write(progress_file(output), lambda handle: handle.write(json.dumps(record).encode()))
