"""Training base classifiers under a smoothing noise, the way the papers did.

* ``standard``: cross-entropy on noisy inputs (Cohen et al. 2019, Appendix F), one fresh noise
  draw per example per step; for DSSN one random offset s_base per example with the seed's
  fixed v (Levine & Feizi 2021, Appendix B).
* ``stability`` (Li et al. 2019): cross-entropy on one noisy copy plus
  C * KL(f(x + d1) || f(x + d2)) between the predictions on two noisy copies, C = 6
  (Voracek & Hein 2023, Section 3.1).

The configuration and its per-dataset paper defaults are ``certlib.training.config``'s.

Training is resumable at epoch granularity: the state after each epoch is written atomically
next to the output (``<out>.state``), and all randomness of epoch e comes from a generator
seeded by (seed, e). Reproducibility: on a CPU, runs and interrupted-then-resumed runs give
bit-identical weights. On a GPU they do with ``deterministic=True`` (deterministic cuDNN and
cuBLAS kernels, on the same GPU model and software); by default cuDNN autotunes its kernels,
some of which sum in a varying order, so weights agree in distribution, not in their bits.

Speed (``certlib.training.step``, ``certlib.training.batches``): a split that fits on the device (CIFAR-10)
lives there and batches are gathered, cropped, flipped and noised on it; on a GPU the whole
step is replayed as a CUDA graph. A split that does not fit (ImageNet) is decoded by DataLoader
worker processes into pinned memory. Nothing inside an epoch waits for the device: the loss
and accuracy are summed there and read once per epoch.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from certlib.atomic import atomic_write
from certlib.checkpoints.checkpoint import ModelCard, save_checkpoint
from certlib.data import QuantizedDataset
from certlib.determinism import deterministic_kernels
from certlib.engine.voting import stream_seed
from certlib.families import SmoothingNoise, make_noise
from certlib.models import build_model
from certlib.training.batches import LoadedBatches, ResidentBatches, fits_on_device
from certlib.training.config import ResolvedConfig, TrainConfig, json_config
from certlib.training.step import GraphedStep, TrainStep

# Random-stream stages of stream_seed (0 and 1 are certification's selection and estimation).
_TRAIN_STREAM, _HELDOUT_STREAM = 2, 3


def _accuracy(model, data: QuantizedDataset, noise: SmoothingNoise | None, device, batch_size: int, seed: int) -> float:
    generator = torch.Generator(device=device).manual_seed(stream_seed(seed, 0, _HELDOUT_STREAM, 0))
    correct = torch.zeros((), dtype=torch.int64, device=device)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            stop = min(start + batch_size, len(data))
            values = data.grid_values(range(start, stop)).to(device)
            x = values.to(torch.float32) / data.q if noise is None else noise.sample_grid(values, data.q, generator)
            correct += (model(x).argmax(1) == data.labels[start:stop].to(device)).sum()
    return int(correct) / max(1, len(data))


def _progress(epoch: int, epochs: int, done: int, total: int) -> None:
    if sys.stderr.isatty():
        filled = int(30 * done / total)
        sys.stderr.write(f"\repoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
        sys.stderr.flush()


def _batches(
    cfg: ResolvedConfig, train_set: QuantizedDataset, device: torch.device, step: TrainStep
) -> tuple[ResidentBatches | LoadedBatches, GraphedStep | None]:
    """The epoch's batch source and, where it pays, the step as a CUDA graph (module docstring)."""
    resident = fits_on_device(train_set, device) if cfg.data == "auto" else cfg.data == "device"
    if resident and train_set.values is None:
        raise ValueError(
            "data: 'device' needs the split in memory; an image folder streams through DataLoader "
            "workers (data: auto or loader)"
        )
    graphed = runs_as_graph(cfg.cuda_graph, device.type, resident, step.noise)
    if not resident:
        workers = max(1, torch.get_num_threads()) if cfg.loader_workers is None else cfg.loader_workers
        return LoadedBatches(train_set, device, cfg.batch_size, workers), None
    batches = ResidentBatches(train_set, device, cfg.batch_size)
    return batches, (GraphedStep(step, batches) if graphed and batches.full_batches else None)


def runs_as_graph(cuda_graph: bool | str, device_type: str, resident: bool, noise: SmoothingNoise) -> bool:
    """Whether the step is replayed as a CUDA graph: ``auto`` where it can be (a CUDA device, the
    split on it, a noise drawn on the device: a graph would replay one host draw every step);
    ``true`` refused with one line where it cannot."""
    possible = device_type == "cuda" and resident
    if cuda_graph is True and not possible:
        raise ValueError("cuda_graph: true needs a CUDA device and the training split on it (data: auto or device)")
    if cuda_graph is True and not noise.graph_capturable:
        raise ValueError(f"cuda_graph: true cannot train with {noise.name} noise, drawn on the host; use auto or false")
    return cuda_graph is not False and possible and noise.graph_capturable


def _run_epoch(
    step: TrainStep,
    batches: ResidentBatches | LoadedBatches,
    graphed: GraphedStep | None,
    epoch: int,
    epochs: int,
    total: int,
) -> None:
    """Every step of one epoch (its order set by ``batches.start_epoch``); returns without
    waiting for the device."""
    if isinstance(batches, LoadedBatches):
        done = 0
        for values, labels in batches.batches():
            step(values, labels)
            done += len(labels)
            _progress(epoch, epochs, done, total)
        return
    for i in range(batches.full_batches):
        graphed.replay() if graphed is not None else step(*batches.next_batch())
        if i % 50 == 0:
            _progress(epoch, epochs, (i + 1) * batches.batch_size, total)
    last = batches.last_batch()
    if last is not None:
        step(*last)
    _progress(epoch, epochs, total, total)


def _save_state(state_path: Path, config_json: str, epochs_done: int, model, optimizer, scheduler) -> None:
    """The resume point after an epoch, written atomically."""
    state = {
        "config": config_json,
        "epoch": epochs_done,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    atomic_write(state_path, lambda handle: torch.save(state, handle))


def _load_state(state_path: Path, config_json: str, device, model, optimizer, scheduler) -> int:
    """Epochs already done by an interrupted run of this configuration (its state restored)."""
    if not state_path.is_file():
        return 0
    state = torch.load(state_path, map_location=device, weights_only=True)
    if state["config"] != config_json:
        raise ValueError(f"{state_path} belongs to a different training configuration; remove it to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"])


def _build(cfg: ResolvedConfig, train_set: QuantizedDataset, device: torch.device):
    """The model, its SGD optimizer and cosine schedule, as the papers train them."""
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.architecture, train_set.num_classes, train_set.mean, train_set.std, train_set.input_shape
    ).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return model, optimizer, scheduler


def _epoch(
    cfg: ResolvedConfig, epoch: int, step: TrainStep, batches, graphed, generator: torch.Generator, scheduler, size: int
) -> dict:
    """One epoch (its randomness seeded by (seed, epoch)); returns its metrics."""
    started = time.perf_counter()
    step.model.train()
    if graphed is not None:
        graphed.capture()  # before seeding: the graph bakes in this epoch's learning rate
    generator.manual_seed(stream_seed(cfg.seed, epoch, _TRAIN_STREAM, 0))
    order = torch.randperm(size, generator=generator, device=generator.device)
    batches.start_epoch(order)
    _run_epoch(step, batches, graphed, epoch, cfg.epochs, size)
    total_loss, correct = step.read_metrics()  # the epoch's one wait for the device
    scheduler.step()
    lr = step.optimizer.param_groups[0]["lr"]  # the next epoch's, as logged since the first version
    seconds = time.perf_counter() - started
    return {
        "epoch": epoch + 1,
        "epochs": cfg.epochs,
        "loss": total_loss / size,
        "train_accuracy": correct / size,
        "lr": lr,
        "images": size,
        "seconds": seconds,
        "images_per_second": size / seconds,
    }


def _step(
    cfg: ResolvedConfig,
    model,
    optimizer,
    noise: SmoothingNoise,
    train_set: QuantizedDataset,
    generator: torch.Generator,
) -> TrainStep:
    """The training step of ``cfg``'s mode, primed for the split's input shape."""
    step = TrainStep(
        model,
        optimizer,
        noise,
        train_set.q,
        generator,
        training=cfg.training,
        stability_weight=cfg.stability_weight,
        crop_padding=cfg.crop_padding,
        flip=cfg.flip,
        amp=cfg.amp,
        channels_last=cfg.channels_last,
    )
    step.prime(train_set.input_shape)
    model.train()
    return step


def _heldout(cfg: ResolvedConfig, heldout_set: QuantizedDataset) -> QuantizedDataset:
    """The first ``heldout_limit`` images of the held-out split (all where None)."""
    if cfg.heldout_limit is None:
        return heldout_set
    return heldout_set.subset(np.arange(min(len(heldout_set), cfg.heldout_limit)))


def _card(
    cfg: ResolvedConfig, noise: SmoothingNoise, train_set: QuantizedDataset, heldout: str, clean: float, noisy: float
) -> ModelCard:
    return ModelCard.describing(
        cfg.architecture,
        train_set,
        noise,
        seed=cfg.seed,
        training=cfg.training,
        sigma=cfg.sigma,
        hyperparameters=dataclasses.asdict(cfg),
        epochs_done=cfg.epochs,
        clean_accuracy=clean,
        noisy_accuracy=noisy,
        heldout=heldout,
    )


def train_model(
    config: TrainConfig,
    out_path: str | Path,
    train_set: QuantizedDataset,
    heldout_set: QuantizedDataset,
    *,
    device: torch.device | str | None = None,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[dict], None] | None = None,
) -> ModelCard:
    """Train a base classifier under ``config``'s noise and write its checkpoint to ``out_path``.

    Resumes from ``<out_path>.state`` when an earlier run of the same configuration was
    interrupted. ``on_epoch`` receives each epoch's metrics (epoch, epochs, loss,
    train_accuracy, lr, images, seconds, images_per_second). Returns the model card written with
    the weights, including the clean and noisy accuracy on ``heldout_set`` (at most
    ``heldout_limit`` images). ``config.deterministic`` gives bit-identical weights on a GPU too
    (module docstring); the process's kernel settings are restored afterwards.
    """
    cfg = config.resolved()
    if train_set.name != cfg.dataset or heldout_set.name != cfg.dataset:
        raise ValueError(f"config is for {cfg.dataset!r} but the data is {train_set.name!r}/{heldout_set.name!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_path = Path(out_path)
    state_path = out_path.with_name(out_path.name + ".state")
    noise = make_noise(cfg.method, cfg.sigma, q=train_set.q, seed=cfg.seed)
    config_json = json_config(cfg)

    with deterministic_kernels(cfg.deterministic):
        model, optimizer, scheduler = _build(cfg, train_set, device)
        start_epoch = _load_state(state_path, config_json, device, model, optimizer, scheduler)
        if start_epoch:
            log(f"resuming {out_path.name} after epoch {start_epoch}/{cfg.epochs}")
        generator = torch.Generator(device=device)
        step = _step(cfg, model, optimizer, noise, train_set, generator)
        batches, graphed = _batches(cfg, train_set, device, step)
        for epoch in range(start_epoch, cfg.epochs):
            metrics = _epoch(cfg, epoch, step, batches, graphed, generator, scheduler, len(train_set))
            _save_state(state_path, config_json, epoch + 1, model, optimizer, scheduler)
            if sys.stderr.isatty():
                sys.stderr.write("\n")
            log(
                f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['loss']:.4f}  noisy train acc "
                f"{100 * metrics['train_accuracy']:.2f}%  lr {metrics['lr']:.4g}  "
                f"{metrics['images_per_second']:.0f} img/s"
            )
            if on_epoch is not None:
                on_epoch(metrics)
        del graphed, batches  # frees the graph's memory pool and the resident split

        heldout = _heldout(cfg, heldout_set)
        clean = _accuracy(model, heldout, None, device, 4 * cfg.batch_size, cfg.seed)
        noisy = _accuracy(model, heldout, noise, device, 4 * cfg.batch_size, cfg.seed)
    card = _card(cfg, noise, train_set, f"{heldout_set.split}[:{len(heldout)}]", clean, noisy)
    log(f"held-out {card.heldout}: clean accuracy {100 * clean:.2f}%, noisy accuracy {100 * noisy:.2f}%")
    card = save_checkpoint(out_path, model.to(memory_format=torch.contiguous_format), card)
    state_path.unlink(missing_ok=True)  # the run is complete: its resume state is no longer needed
    return card
