"""Voting engines: the hot loops that evaluate the base classifier on noisy copies of many
images at once and count its predictions per class, on any torch device.

* ``dssn_votes``: exact DSSN votes, all L offsets of every image (Levine & Feizi 2021, Sec. 4.1).
* ``monte_carlo_counts``: Cohen et al.'s two-step CERTIFY sampling, n0 selection samples and n
  estimation samples per image, from random streams derived from (seed, image index).

Images x offsets (or images x samples) are packed into large device batches; noisy copies are
generated on the device and votes accumulate there.

Batch invariance. A network's logits can change in the last bits with the batch shape (the
kernels block their reductions differently), which could flip a prediction whose two top logits
are nearly equal. So a prediction whose top-two margin is within the near-tie band of its
precision (``TIE_TOLERANCE``, relative) is re-evaluated in the next precision (bf16/fp16 ->
fp32 -> a float64 copy of the network), where a margin under ``EXACT_TIE`` counts as a tie and
goes to the lower class index. Outside the band the fast argmax is kept: float32 logits of the
same input differ across batch shapes by ~1e-8 (measured, WRN-40-2 on CPU), three orders of
magnitude inside the fp32 band, so the argmax there is the float64 network's too. TF32 matmuls
(errors ~1e-3) are switched off while voting for that reason. The votes of an image are thus
the same whatever the batch size, grouping or worker. ``precision`` (fp32 by default; bf16 and
fp16 run the fast path under autocast) is part of the classifier and recorded with results;
``enable_deterministic_kernels`` additionally makes CUDA runs bit-for-bit repeatable.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import numpy as np
import torch

from certlib.noise import DSSNNoise, SmoothingNoise, quantize

# Near-tie band per evaluation precision, relative to 1 + |top logit|, and the precision a
# prediction inside the band is re-evaluated in. float32 logits differ across batch shapes by
# ~1e-8 (measured); bfloat16 (8-bit mantissa) and float16 by up to ~1e-2 and ~1e-3.
TIE_TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2, "fp32": 1e-5}
REFINE = {"bf16": "fp32", "fp16": "fp32", "fp32": "fp64"}
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
EXACT_TIE = 1e-9  # float64 margin under which two logits count as tied
MC_BLOCK = 1024  # samples per random-stream block; part of the stream's definition


def enable_deterministic_kernels() -> None:
    """Force deterministic kernels (cuDNN, cuBLAS, scatter) and full float32 matmuls on CUDA,
    so that repeated runs give bit-identical logits. Call before the first CUDA operation."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_batch_size(device: torch.device, sample_numel: int) -> int:
    """Forward batch size sized to the device, rounded down to a power of two: about 2^24 input
    values per batch on a GPU; about 2^17 on a CPU, where batches beyond ~32 CIFAR images fall
    out of cache and run slower (measured: WRN-40-2, 2 cores)."""
    budget = 2**24 if torch.device(device).type == "cuda" else 2**17
    size = max(1, budget // max(1, sample_numel))
    return 1 << (size.bit_length() - 1)


def _model_device(model: torch.nn.Module, fallback: torch.device) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device(fallback)


class _VoteCounter:
    """Evaluates the base classifier on noisy batches and accumulates per-row class counts."""

    def __init__(self, model: torch.nn.Module, rows: int, num_classes: int, batch_size: int, device,
                 precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if precision == "fp16" and torch.device(device).type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
        self.model = model
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.precision = precision
        self.device_type = torch.device(device).type
        self.counts = torch.zeros(rows * num_classes, dtype=torch.int64, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_size = 0
        self._model64: torch.nn.Module | None = None

    def add(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        self._pending.append((x, rows))
        self._pending_size += len(x)
        while self._pending_size >= self.batch_size:
            self._flush(self.batch_size)

    def result(self) -> np.ndarray:
        while self._pending_size:
            self._flush(min(self._pending_size, self.batch_size))
        return self.counts.view(-1, self.num_classes).cpu().numpy()

    def _flush(self, size: int) -> None:
        if len(self._pending) == 1:  # the DSSN engine adds whole batches: no copy needed
            xs, rows = self._pending[0]
        else:
            xs = torch.cat([x for x, _ in self._pending])
            rows = torch.cat([r for _, r in self._pending])
        self._pending = [(xs[size:], rows[size:])] if len(xs) > size else []
        self._pending_size = len(xs) - size
        prediction = self._predict(xs[:size], self.precision)
        # unique + assignment rather than index_add_: CUDA's deterministic mode refuses atomic adds.
        cells, votes = torch.unique(rows[:size] * self.num_classes + prediction, return_counts=True)
        self.counts[cells] += votes

    def _predict(self, x: torch.Tensor, precision: str) -> torch.Tensor:
        """argmax of the logits in ``precision``; predictions inside its near-tie band are
        re-evaluated in the next precision (bf16/fp16 -> fp32 -> fp64)."""
        if precision == "fp64":
            return self._exact_prediction(x)
        with torch.autocast(self.device_type, dtype=PRECISIONS[precision], enabled=precision != "fp32"):
            logits = self.model(x)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}, expected (batch, {self.num_classes})")
        logits = logits.float()
        top2 = logits.topk(2, dim=1).values if self.num_classes > 1 else logits.repeat(1, 2)
        near_tie = top2[:, 0] - top2[:, 1] <= TIE_TOLERANCE[precision] * (1 + top2[:, 0].abs())
        any_near_tie, not_finite = torch.stack([near_tie.any(), ~torch.isfinite(logits).all()]).tolist()
        if not_finite:
            raise ValueError("the model returned NaN or infinite logits on noisy inputs; refusing to count votes")
        prediction = logits.argmax(dim=1)  # first maximum: ties go to the lower class index
        if any_near_tie and self.num_classes > 1:
            idx = near_tie.nonzero().squeeze(1)
            prediction[idx] = self._predict(x[idx], REFINE[precision])
        return prediction

    def _exact_prediction(self, x: torch.Tensor) -> torch.Tensor:
        if self._model64 is None:  # a torch.compile'd model keeps the plain module in _orig_mod
            self._model64 = copy.deepcopy(getattr(self.model, "_orig_mod", self.model)).double()
        logits = self._model64(x.double())
        top = logits.max(dim=1, keepdim=True).values
        tied = logits >= top - EXACT_TIE * (1 + top.abs())
        return tied.to(torch.uint8).argmax(dim=1)  # lowest class index within the tie


def _layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _prepare(model, images, batch_size, device):
    device = torch.device(device) if device is not None else _model_device(model, images.device)
    model.eval()
    # TF32's ~1e-3 relative error would exceed the fp32 band: float32 must mean float32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if images.ndim == 4:  # channels_last convolutions run 1.4x faster on CPU and use tensor cores on GPU
        model.to(memory_format=torch.channels_last)
    sample_shape = tuple(images.shape[1:])
    if batch_size is None:
        batch_size = default_batch_size(device, int(np.prod(sample_shape)))
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return device, sample_shape, int(batch_size)


@torch.inference_mode()
def dssn_votes(
    model: torch.nn.Module,
    images: torch.Tensor,
    noise: DSSNNoise,
    num_classes: int,
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Exact DSSN vote counts: the base classifier on all L = ``noise.levels`` noisy copies of
    each image (Levine & Feizi 2021, Section 4.1).

    ``images``: (N, C, H, W) float in [0, 1] on the 1/q grid (checked). Returns an int64 array
    (N, num_classes) whose rows sum to L. The votes are a pure function of (model weights,
    image, sigma, seed, q): images x offsets are packed into flat batches of ``batch_size``.
    """
    device, sample_shape, batch_size = _prepare(model, images, batch_size, device)
    x_int = quantize(images.to(device), noise.q).flatten(1)
    levels = noise.levels
    total = len(x_int) * levels
    counter = _VoteCounter(model, len(x_int), num_classes, batch_size, device, precision)
    for start in range(0, total, batch_size):
        pair = torch.arange(start, min(start + batch_size, total), device=device)
        rows = pair // levels
        noisy = noise.copies(x_int[rows], pair % levels)
        counter.add(_layout(noisy.view(-1, *sample_shape)), rows)
    return counter.result()


def stream_seed(seed: int, index: int, stage: int, block: int) -> int:
    """64-bit seed of one block of a Monte Carlo random stream, derived from the sweep seed, the
    image's dataset index, the stage (0 selection, 1 estimation) and the block number."""
    state = np.random.SeedSequence([int(seed), int(index), int(stage), int(block)]).generate_state(1, np.uint64)
    return int(state[0])


def _monte_carlo_blocks(images, indices, noise, n0, n, seed, device) -> Iterator[tuple[torch.Tensor, int, int]]:
    for j, (image, index) in enumerate(zip(images, indices)):
        for stage, count in ((0, n0), (1, n)):
            for block, start in enumerate(range(0, count, MC_BLOCK)):
                size = min(MC_BLOCK, count - start)
                generator = torch.Generator(device=device).manual_seed(stream_seed(seed, index, stage, block))
                batch = image.unsqueeze(0).expand(size, *image.shape)
                yield _layout(noise.sample(batch, generator)), j, stage


@torch.inference_mode()
def monte_carlo_counts(
    model: torch.nn.Module,
    images: torch.Tensor,
    indices,
    noise: SmoothingNoise,
    num_classes: int,
    *,
    n0: int,
    n: int,
    seed: int,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """Class counts of the base classifier under ``noise`` for Cohen et al.'s CERTIFY:
    (selection counts from n0 samples, estimation counts from n samples), each (N, num_classes).

    ``images``: (N, C, H, W) float in [0, 1]; ``indices``: their dataset indices. The noise of
    image i comes from blocks of ``MC_BLOCK`` samples whose generators are seeded by
    ``stream_seed(seed, indices[i], stage, block)``, so an image's counts do not depend on the
    other images, the batch size or the worker (they do depend on the device type, whose
    generators differ).
    """
    if isinstance(noise, DSSNNoise):
        raise ValueError("DSSN is deterministic: use dssn_votes, not Monte Carlo sampling")
    if int(n0) < 1 or int(n) < 1:
        raise ValueError(f"n0 and n must be >= 1, got n0={n0}, n={n}")
    indices = [int(i) for i in indices]
    if len(indices) != len(images):
        raise ValueError(f"{len(images)} images but {len(indices)} indices")
    device, _, batch_size = _prepare(model, images, batch_size, device)
    images = images.to(device)
    if not bool(torch.isfinite(images).all()) or float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError("image values must be finite and lie in [0, 1] (pixel scale)")
    counter = _VoteCounter(model, 2 * len(images), num_classes, batch_size, device, precision)
    for noisy, j, stage in _monte_carlo_blocks(images, indices, noise, int(n0), int(n), seed, device):
        counter.add(noisy, torch.full((len(noisy),), 2 * j + stage, device=device))
    counts = counter.result()
    return counts[0::2], counts[1::2]
