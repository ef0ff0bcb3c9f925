"""Training a sweep's missing model on a worker, with the sweep's ``models.train`` settings:
once per checkpoint even across jobs (a lock on its path), its latest epoch's metrics at hand
for the driver's progress."""

from __future__ import annotations

import dataclasses
import time

import torch

from certlib.atomic import exclusive_lock
from certlib.checkpoints.checkpoint import read_card
from certlib.data import DATASETS, load_dataset
from certlib.training.config import TrainConfig
from certlib.training.train import train_model
from cluster.plan import ModelKey, cannot_train
from cluster.spec import Sweep


class ModelTrainer:
    """Trains the models of one sweep in one worker process, one at a time."""

    def __init__(self, sweep: Sweep, device: torch.device):
        self.sweep, self.device = sweep, device
        self._epoch: dict | None = None  # the latest epoch metrics of the model in training

    def train(self, key: ModelKey) -> dict:
        """Train the model of ``key`` with the sweep's models.train settings; writes its checkpoint.

        Jobs that share a checkpoint path (the paper specs share the DSSN models) train it
        once: the first holds a lock on it, the others wait and then use its checkpoint."""
        sweep = self.sweep
        path = key.checkpoint(sweep)

        def log(line: str) -> None:
            print(f"[train {key.label}] {line}", flush=True)

        started = time.perf_counter()
        with exclusive_lock(path, on_wait=lambda: log(f"waiting: another process is training {path}")):
            if path.exists():
                card = read_card(path)
                log(f"{path} was trained meanwhile by another process; using it")
            else:
                if sweep.models.train is None:
                    raise cannot_train(sweep, key)
                settings = dataclasses.asdict(sweep.models.train)
                config = TrainConfig(
                    dataset=sweep.dataset.name,
                    method=key.training_noise(sweep),
                    sigma=key.model_sigma,
                    seed=key.seed,
                    training=key.training,
                    **settings,
                )
                heldout_split = DATASETS[sweep.dataset.name].heldout
                train_set = load_dataset(sweep.dataset.name, "train", sweep.dataset.root)
                heldout = load_dataset(sweep.dataset.name, heldout_split, sweep.dataset.root)
                self._epoch = None
                card = train_model(
                    config,
                    path,
                    train_set,
                    heldout,
                    device=self.device,
                    log=log,
                    on_epoch=lambda metrics: setattr(self, "_epoch", {**metrics, "reported": time.time()}),
                )
        return {
            "model": key.label,
            "seconds": time.perf_counter() - started,
            "clean_accuracy": card.clean_accuracy,
            "noisy_accuracy": card.noisy_accuracy,
        }

    def progress(self) -> dict | None:
        """The latest epoch's metrics (epoch, epochs, images, images_per_second, ...) and when
        they were reported, of the model this worker is training; answered from a second thread
        while ``train`` runs."""
        return self._epoch
