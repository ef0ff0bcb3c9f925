"""Training base classifiers under a smoothing noise, the way the papers did.

* ``standard``: cross-entropy on noisy inputs (Cohen et al. 2019, Appendix F), one fresh noise
  draw per example per step; for DSSN one random offset s_base per example with the seed's
  fixed v (Levine & Feizi 2021, Appendix B).
* ``stability`` (Li et al. 2019): cross-entropy on one noisy copy plus
  C * KL(f(x + d1) || f(x + d2)) between the predictions on two noisy copies, C = 6
  (Voracek & Hein 2023, Section 3.1).

Defaults follow Levine & Feizi Table 2 / Voracek & Hein 3.1: SGD, lr 0.1, Nesterov momentum
0.9, weight decay 1e-4, cosine annealing, batch 64; CIFAR-10: WRN-40-2, 120 epochs, random crop
and horizontal flip; ImageNet: ResNet-50, 30 epochs. Every knob can be overridden.

Training is resumable at epoch granularity: the state after each epoch is written atomically
next to the output (``<out>.state``), and all randomness of epoch e comes from generators
seeded by (seed, e), so an interrupted run that resumes ends with the same weights as an
uninterrupted one (bit for bit on a CPU).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from certlib.atomic import atomic_write
from certlib.checkpoint import ModelCard, save_checkpoint
from certlib.data import QuantizedDataset
from certlib.models import build_model
from certlib.noise import DSSNNoise, SmoothingNoise, make_noise
from certlib.voting import stream_seed

TRAINING_MODES = ("standard", "stability")
# Random-stream stages of stream_seed (0 and 1 are certification's selection and estimation).
_TRAIN_STREAM, _HELDOUT_STREAM = 2, 3

# Per dataset: architecture, epochs and augmentation (crop padding in pixels, horizontal flip).
PAPER_DEFAULTS = {
    "cifar10": {"architecture": "wrn40_2", "epochs": 120, "crop_padding": 4, "flip": True},
    "imagenet": {"architecture": "resnet50", "epochs": 30, "crop_padding": 16, "flip": True},
    "digits": {"architecture": "small_cnn", "epochs": 30, "crop_padding": 1, "flip": False},
}


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """The training knobs (hyper-parameters and augmentation) shared by every run of a sweep.
    None means the dataset's paper default (PAPER_DEFAULTS)."""

    architecture: str | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    stability_weight: float = 6.0
    crop_padding: int | None = None
    flip: bool | None = None
    amp: bool = False
    channels_last: bool = False
    heldout_limit: int | None = 1000


@dataclass(frozen=True)
class TrainConfig(TrainSettings):
    """One training run: the settings plus what the model is for. ``seed`` seeds the weights,
    the data order, the noise and, for DSSN, the offset vector v."""

    dataset: str
    method: str
    sigma: float
    seed: int = 0
    training: str = "standard"

    def resolved(self) -> "TrainConfig":
        """A copy with the dataset's paper defaults filled in, validated."""
        if self.dataset not in PAPER_DEFAULTS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {sorted(PAPER_DEFAULTS)}")
        if self.training not in TRAINING_MODES:
            raise ValueError(f"training must be one of {TRAINING_MODES}, got {self.training!r}")
        defaults = PAPER_DEFAULTS[self.dataset]
        cfg = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        for name in ("epochs", "batch_size"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if not cfg.lr > 0 or cfg.weight_decay < 0 or cfg.stability_weight < 0:
            raise ValueError("lr must be > 0; weight_decay and stability_weight >= 0")
        return cfg


def stability_loss(logits_1: torch.Tensor, logits_2: torch.Tensor, targets: torch.Tensor, weight: float) -> torch.Tensor:
    """Stability training loss (Li et al. 2019; Voracek & Hein Sec. 3.1), batch mean:
    -log f(x + d1)_y + weight * KL(f(x + d1) || f(x + d2)), f the softmax of the logits."""
    log_p1, log_p2 = F.log_softmax(logits_1, dim=1), F.log_softmax(logits_2, dim=1)
    kl = (log_p1.exp() * (log_p1 - log_p2)).sum(dim=1)
    return F.nll_loss(log_p1, targets) + weight * kl.mean()


def augment(x: torch.Tensor, generator: torch.Generator, padding: int, flip: bool) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip, per image; values stay on
    the dataset's grid (padding is 0, a grid value)."""
    b, c, h, w = x.shape
    if padding:
        padded = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        mirrored = torch.rand(b, generator=generator, device=x.device) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    return x


def _accuracy(model, data: QuantizedDataset, noise: SmoothingNoise | None, device, batch_size: int, seed: int) -> float:
    generator = torch.Generator(device=device).manual_seed(stream_seed(seed, 0, _HELDOUT_STREAM, 0))
    correct = 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            x = data.pixels(range(start, min(start + batch_size, len(data)))).to(device)
            if noise is not None:
                x = noise.sample(x, generator)
            correct += int((model(x).argmax(1).cpu() == data.labels[start:start + len(x)]).sum())
    return correct / max(1, len(data))


def _progress(epoch: int, epochs: int, done: int, total: int) -> None:
    if sys.stderr.isatty():
        filled = int(30 * done / total)
        sys.stderr.write(f"\repoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
        sys.stderr.flush()


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
    interrupted. ``on_epoch`` receives each epoch's metrics (epoch, loss, train_accuracy, lr,
    images_per_second). Returns the model card written with the weights, including the clean
    and noisy accuracy on ``heldout_set`` (at most ``heldout_limit`` images).
    """
    cfg = config.resolved()
    if train_set.name != cfg.dataset or heldout_set.name != cfg.dataset:
        raise ValueError(f"config is for {cfg.dataset!r} but the data is {train_set.name!r}/{heldout_set.name!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_path = Path(out_path)
    state_path = out_path.with_name(out_path.name + ".state")
    noise = make_noise(cfg.method, cfg.sigma, q=train_set.q, seed=cfg.seed)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.architecture, train_set.num_classes, train_set.mean, train_set.std, train_set.input_shape).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    start_epoch = 0
    config_json = json_config(cfg)
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state["config"] != config_json:
            raise ValueError(f"{state_path} belongs to a different training configuration; remove it to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        log(f"resuming {out_path.name} after epoch {start_epoch}/{cfg.epochs}")

    labels = train_set.labels.to(device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs):
        generator = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, epoch, _TRAIN_STREAM, 0))
        order = torch.randperm(len(labels), generator=generator, device=device)
        model.train()
        started, total_loss, correct = time.perf_counter(), 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            # Per batch from the dataset: an ImageNet split does not fit in memory, let alone on the GPU.
            values = train_set.grid_values(idx.cpu()).to(device)
            x = augment(values.float() / train_set.q, generator, cfg.crop_padding, cfg.flip)
            y = labels[idx]
            with autocast:
                noisy = noise.sample(x, generator)
                if cfg.channels_last:
                    noisy = noisy.contiguous(memory_format=torch.channels_last)
                logits = model(noisy)
                if cfg.training == "stability":
                    loss = stability_loss(logits, model(noise.sample(x, generator)), y, cfg.stability_weight)
                else:
                    loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            _progress(epoch, cfg.epochs, start + len(idx), len(order))
        scheduler.step()
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "epochs": cfg.epochs, "loss": total_loss / len(order),
                   "train_accuracy": correct / len(order), "lr": optimizer.param_groups[0]["lr"],
                   "images_per_second": len(order) / seconds}
        state = {"config": config_json, "epoch": epoch + 1, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        atomic_write(state_path, lambda handle: torch.save(state, handle))
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['loss']:.4f}  noisy train acc {100 * metrics['train_accuracy']:.2f}%  "
            f"lr {metrics['lr']:.4g}  {metrics['images_per_second']:.0f} img/s")
        if on_epoch is not None:
            on_epoch(metrics)

    heldout = heldout_set if cfg.heldout_limit is None else heldout_set.subset(np.arange(min(len(heldout_set), cfg.heldout_limit)))
    eval_batch = 4 * cfg.batch_size
    clean = _accuracy(model, heldout, None, device, eval_batch, cfg.seed)
    noisy = _accuracy(model, heldout, noise, device, eval_batch, cfg.seed)
    described = noise.describe()
    card = ModelCard(
        architecture=cfg.architecture, dataset=cfg.dataset, class_names=list(train_set.class_names),
        input_shape=list(train_set.input_shape), mean=list(train_set.mean), std=list(train_set.std), q=train_set.q,
        method=cfg.method, sigma=cfg.sigma, lam=described.get("lambda"),
        levels=noise.levels if isinstance(noise, DSSNNoise) else None, seed=cfg.seed, training=cfg.training,
        hyperparameters=dataclasses.asdict(cfg), epochs_done=cfg.epochs, clean_accuracy=clean, noisy_accuracy=noisy,
        heldout=f"{heldout_set.split}[:{len(heldout)}]",
    )
    log(f"held-out {card.heldout}: clean accuracy {100 * clean:.2f}%, noisy accuracy {100 * noisy:.2f}%")
    card = save_checkpoint(out_path, model.to(memory_format=torch.contiguous_format), card)
    state_path.unlink(missing_ok=True)  # the run is complete: its resume state is no longer needed
    return card



def json_config(cfg: TrainConfig) -> str:
    """The configuration as canonical JSON: a resumed run must match it exactly."""
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)
