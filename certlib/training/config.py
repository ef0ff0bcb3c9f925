"""What a training run is: the knobs shared by a sweep's runs (``TrainSettings``), one run's
configuration (``TrainConfig``) with the papers' per-dataset defaults, and the cost of its step.

Defaults follow Levine & Feizi Table 2 / Voracek & Hein 3.1: SGD, lr 0.1, Nesterov momentum
0.9, weight decay 1e-4, cosine annealing, batch 64; CIFAR-10: WRN-40-2, 120 epochs, random crop
and horizontal flip; ImageNet: ResNet-50, 30 epochs. Every knob can be overridden.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

import torch

from certlib.data import DATASETS
from certlib.models import build_model

TRAINING_MODES = ("standard", "stability")
DATA_PLACEMENTS = ("auto", "device", "loader")
# How a run executes, not what it computes: free to change between an interruption and its resume.
EXECUTION_SETTINGS = ("deterministic", "cuda_graph", "data", "loader_workers")

# Per dataset: architecture, epochs and augmentation (crop padding in pixels, horizontal flip).
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
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
    deterministic: bool = False
    cuda_graph: bool | str = "auto"
    data: str = "auto"
    loader_workers: int | None = None


@dataclass(frozen=True)
class TrainConfig(TrainSettings):
    """One training run: the settings plus what the model is for. ``seed`` seeds the weights,
    the data order, the noise and, for DSSN, the offset vector v."""

    dataset: str
    method: str
    sigma: float
    seed: int = 0
    training: str = "standard"

    def resolved(self) -> ResolvedConfig:
        """A copy with the dataset's paper defaults filled in, validated."""
        if self.dataset not in PAPER_DEFAULTS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {sorted(PAPER_DEFAULTS)}")
        if self.training not in TRAINING_MODES:
            raise ValueError(f"training must be one of {TRAINING_MODES}, got {self.training!r}")
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        defaults = {k: v for k, v in PAPER_DEFAULTS[self.dataset].items() if given[k] is None}
        cfg = ResolvedConfig(**{**given, **defaults})
        for name in ("epochs", "batch_size"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if not cfg.lr > 0 or cfg.weight_decay < 0 or cfg.stability_weight < 0:
            raise ValueError("lr must be > 0; weight_decay and stability_weight >= 0")
        if cfg.data not in DATA_PLACEMENTS:
            raise ValueError(f"data must be one of {DATA_PLACEMENTS}, got {cfg.data!r}")
        if cfg.cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be true, false or 'auto', got {cfg.cuda_graph!r}")
        if cfg.loader_workers is not None and cfg.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {cfg.loader_workers}")
        return cfg


@dataclass(frozen=True, kw_only=True)
class ResolvedConfig(TrainConfig):
    """A TrainConfig with the dataset's paper defaults filled in (``TrainConfig.resolved``)."""

    architecture: str = ""
    epochs: int = 0
    crop_padding: int = 0
    flip: bool = False


def step_flops(config: TrainConfig) -> float:
    """Floating-point operations of one training step of ``config`` (forward and backward, about
    3x the forward, for every noisy copy of every image of a batch)."""
    cfg = config.resolved()
    copies = 2 if cfg.training == "stability" else 1
    return 3.0 * forward_flops(cfg.architecture, cfg.dataset) * copies * cfg.batch_size


@functools.lru_cache(maxsize=64)
def forward_flops(architecture: str, dataset: str) -> float:
    """Floating-point operations of one image's forward pass through a built-in architecture,
    counted by torch's FlopCounterMode on a model built on the meta device (no memory, no
    data). Cached: a plan asks for every configuration of a sweep."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = DATASETS[dataset].input_shape
    with torch.device("meta"):
        model = build_model(architecture, DATASETS[dataset].num_classes, [0.5] * shape[0], [0.25] * shape[0], shape)
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, *shape))
    return float(counter.get_total_flops())


def json_config(cfg: TrainConfig) -> str:
    """What the run computes, as canonical JSON: a resumed run must match it exactly (the
    execution settings may differ)."""
    computed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_SETTINGS}
    return json.dumps(computed, sort_keys=True)
