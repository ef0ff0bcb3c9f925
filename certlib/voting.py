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
goes to the lower class index. Outside the band the fast argmax is kept: it is the float64
network's too while the band exceeds twice the evaluation's error. Measured on a CPU (WRN-40-2,
relative to 1 + |top logit|): fp32 at most 4e-7 against the 1e-4 band, bf16 at most 1.2e-2
against 1e-1 (``python bench/suite.py`` prints this check for its device). Every engine call
re-checks it on its first samples and refuses to count votes where it fails; TF32 matmuls
(errors ~1e-3) are switched off while voting for that reason. The votes of an image are thus
the same whatever the batch size, grouping or worker. ``precision`` (fp32 by default; bf16 and
fp16 run the fast path under autocast) is part of the classifier and recorded with results;
``enable_deterministic_kernels`` additionally makes CUDA runs bit-for-bit repeatable.

Engine options (both engines): ``precision`` "fp32" | "bf16" | "fp16" (fp16 on CUDA only);
``compile`` runs the fast path through ``torch.compile`` for one static batch shape, short
batches padded (the first call compiles: ~25 s for WRN-40-2 on a CPU, cached on disk after);
its float32 logits stay within the fp32 band of float64, so the votes are those of the eager
engine. ``stats``, a dict, is incremented with the samples evaluated per precision ("fp32",
"fp64", ...): how many predictions the near-tie band sent to a higher precision.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import numpy as np
import torch

from certlib.noise import DSSNNoise, SmoothingNoise, quantize

# Near-tie band per evaluation precision, relative to 1 + |top logit|, and the precision a
# prediction inside the band is re-evaluated in. Each band is at least 4x twice the worst error
# against float64 measured on a trained WRN-40-2 (bench/NOTES.md): fp32 4e-7, bf16 1.2e-2; fp16
# (not measurable on a CPU) is set from its 3 more mantissa bits than bf16.
TIE_TOLERANCE = {"bf16": 1e-1, "fp16": 2e-2, "fp32": 1e-4}
REFINE = {"bf16": "fp32", "fp16": "fp32", "fp32": "fp64"}
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
EXACT_TIE = 1e-9  # float64 margin under which two logits count as tied
BAND_CHECK_SAMPLES = 8  # samples of each engine call whose fast logits are checked against float64
MC_BLOCK = 1024  # samples per random-stream block; part of the stream's definition


def enable_deterministic_kernels() -> None:
    """Force deterministic kernels (cuDNN, cuBLAS, scatter) and full float32 matmuls on CUDA,
    so that repeated runs give bit-identical logits. Call before the first CUDA operation."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    disable_tf32()


def disable_tf32() -> None:
    """Make float32 mean float32 on CUDA: TF32's ~1e-3 relative error would exceed the fp32
    near-tie band. The engines call it; call it before timing or compiling a model outside
    them (torch.compile guards on these flags, so changing them later recompiles)."""
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
                 precision: str = "fp32", compile: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if precision == "fp16" and torch.device(device).type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
        self.model = model
        # Compiled for one static batch shape (short batches are padded): a new shape would cost
        # a recompilation (~10 s for WRN-40-2 on a CPU). Refinements run the eager module.
        self.fast_model = torch.compile(model, dynamic=False) if compile else None
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.precision = precision
        self.device_type = torch.device(device).type
        self.counts = torch.zeros(rows * num_classes, dtype=torch.int64, device=device)
        self.evaluated = dict.fromkeys(("bf16", "fp16", "fp32", "fp64"), 0)  # samples per precision
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_size = 0
        self._model64: torch.nn.Module | None = None
        self._band_checked = False

    def add(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        self._pending.append((x, rows))
        self._pending_size += len(x)
        while self._pending_size >= self.batch_size:
            self._flush(self.batch_size)

    def result(self, stats: dict[str, int] | None = None) -> np.ndarray:
        while self._pending_size:
            self._flush(min(self._pending_size, self.batch_size))
        if stats is not None:
            for precision, samples in self.evaluated.items():
                stats[precision] = stats.get(precision, 0) + samples
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
        self.evaluated[precision] += len(x)
        if precision == "fp64":
            return self._exact_prediction(x)
        with torch.autocast(self.device_type, dtype=PRECISIONS[precision], enabled=precision != "fp32"):
            logits = self._fast_logits(x) if precision == self.precision else self.model(x)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}, expected (batch, {self.num_classes})")
        logits = logits.float()
        top2 = logits.topk(2, dim=1).values if self.num_classes > 1 else logits.repeat(1, 2)
        near_tie = top2[:, 0] - top2[:, 1] <= TIE_TOLERANCE[precision] * (1 + top2[:, 0].abs())
        any_near_tie, not_finite = torch.stack([near_tie.any(), ~torch.isfinite(logits).all()]).tolist()
        if not_finite:
            raise ValueError("the model returned NaN or infinite logits on noisy inputs; refusing to count votes")
        if not self._band_checked:
            self._check_band(x, logits, precision)
        prediction = logits.argmax(dim=1)  # first maximum: ties go to the lower class index
        if any_near_tie and self.num_classes > 1:
            idx = near_tie.nonzero().squeeze(1)
            prediction[idx] = self._predict(x[idx], REFINE[precision])
        return prediction

    def _fast_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_model is None:
            return self.model(x)
        size = len(x)
        if size < self.batch_size:
            x = _layout(torch.cat([x, x[:1].expand(self.batch_size - size, *x.shape[1:])]))
        return self.fast_model(x)[:size]

    def _check_band(self, x: torch.Tensor, logits: torch.Tensor, precision: str) -> None:
        """Spot check of the band's premise on this device, once per engine call: the first
        samples' logits against the float64 network's. A fast argmax outside the band equals the
        float64 one only while the band exceeds twice the evaluation's error (e.g. TF32 or
        Winograd kernels could break that)."""
        self._band_checked = True
        k = min(len(x), BAND_CHECK_SAMPLES)
        exact = self._exact_logits(x[:k])
        error = float(((logits[:k].double() - exact).abs().max(dim=1).values / (1 + exact.max(dim=1).values.abs())).max())
        if 2 * error > TIE_TOLERANCE[precision]:
            raise RuntimeError(f"{precision} logits on this device differ from the float64 network's by {error:.1e} (relative), "
                               f"more than half the near-tie band {TIE_TOLERANCE[precision]:.0e}: votes could depend on "
                               "the batching; refusing to count them")

    def _exact_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._model64 is None:  # a torch.compile'd model keeps the plain module in _orig_mod
            self._model64 = copy.deepcopy(getattr(self.model, "_orig_mod", self.model)).double()
        return self._model64(x.double())

    def _exact_prediction(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._exact_logits(x)
        top = logits.max(dim=1, keepdim=True).values
        tied = logits >= top - EXACT_TIE * (1 + top.abs())
        return tied.to(torch.uint8).argmax(dim=1)  # lowest class index within the tie


def _layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _prepare(model, images, batch_size, device):
    device = torch.device(device) if device is not None else _model_device(model, images.device)
    model.eval()
    disable_tf32()
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
    compile: bool = False,
    stats: dict[str, int] | None = None,
) -> np.ndarray:
    """Exact DSSN vote counts: the base classifier on all L = ``noise.levels`` noisy copies of
    each image (Levine & Feizi 2021, Section 4.1).

    ``images``: (N, C, H, W) float in [0, 1] on the 1/q grid (checked). Returns an int64 array
    (N, num_classes) whose rows sum to L. The votes are a pure function of (model weights,
    image, sigma, seed, q): images x offsets are packed into flat batches of ``batch_size``.
    See ``engine options`` in the module docstring for ``precision``, ``compile`` and ``stats``.
    """
    device, sample_shape, batch_size = _prepare(model, images, batch_size, device)
    x_int = quantize(images.to(device), noise.q).flatten(1)
    levels = noise.levels
    total = len(x_int) * levels
    counter = _VoteCounter(model, len(x_int), num_classes, batch_size, device, precision, compile)
    for start in range(0, total, batch_size):
        pair = torch.arange(start, min(start + batch_size, total), device=device)
        rows = pair // levels
        noisy = noise.copies(x_int[rows], pair % levels)
        counter.add(_layout(noisy.view(-1, *sample_shape)), rows)
    return counter.result(stats)


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
    compile: bool = False,
    stats: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Class counts of the base classifier under ``noise`` for Cohen et al.'s CERTIFY:
    (selection counts from n0 samples, estimation counts from n samples), each (N, num_classes).

    ``images``: (N, C, H, W) float in [0, 1]; ``indices``: their dataset indices. The noise of
    image i comes from blocks of ``MC_BLOCK`` samples whose generators are seeded by
    ``stream_seed(seed, indices[i], stage, block)``, so an image's counts do not depend on the
    other images, the batch size or the worker (they do depend on the device type, whose
    generators differ). ``precision``, ``compile``, ``stats``: as for ``dssn_votes``.
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
    counter = _VoteCounter(model, 2 * len(images), num_classes, batch_size, device, precision, compile)
    for noisy, j, stage in _monte_carlo_blocks(images, indices, noise, int(n0), int(n), seed, device):
        counter.add(noisy, torch.full((len(noisy),), 2 * j + stage, device=device))
    counts = counter.result(stats)
    return counts[0::2], counts[1::2]
