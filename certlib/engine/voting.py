"""Voting engines: the hot loops that evaluate the base classifier on noisy copies of many
images at once and count its predictions per class, on any torch device.

* ``dssn_votes``: exact DSSN votes, all L offsets of every image (Levine & Feizi 2021, Sec. 4.1).
* ``monte_carlo_counts``: Cohen et al.'s two-step CERTIFY sampling, n0 selection samples and n
  estimation samples per image, from random streams derived from (seed, image index).

Images x offsets (or images x samples) are packed into flat batches of the cascade's batch size;
noisy copies are made on the device and evaluated through a precision cascade
(``certlib.engine.cascade``): each prediction comes from the first level whose margin clears its
near-tie band, so the votes are the float64 network's whatever the batch size, grouping,
worker, precision or compilation.

No host synchronization per batch. Votes accumulate in a device tensor; the samples inside a
level's band are appended to that level's successor queue on the device with fixed-shape
operations (a prefix sum gives their slots; the others land in scratch slots). The host only
knows an upper bound of each queue's length and reads the true lengths (one synchronization)
when a queue might overflow, about every ``QUEUE_BATCHES`` - 1 batches, or at the end. Full
queue batches are then evaluated at the next level, the rest at the end of the call.

Engine options (both engines): a ``Cascade`` built once (a worker keeps one per model) or a plain
module with ``batch_size``, ``device``, ``precision`` and ``compile`` to build one for this call.
``stats``, a dict, is incremented with the samples evaluated at each level ("fp16", "tf32",
"fp32", "fp64", ...): how many predictions each band sent on; and with "audited", the samples
the run-time audit also evaluated in float64.

Run-time audit. The cascade's spot check measures a level's error on a few samples of the
first image; a network whose rounding error depends on its input could pass it and then decide
other inputs wrongly outside the band. So every ``AUDIT_EVERY``-th sample a level decides (a
fixed stride over each level's stream of samples, so every image with that many samples is
audited) is also evaluated in float64, on the device without a synchronization; a decided vote
that differs stops the engine with one line naming the precision to use. It costs about
1/``AUDIT_EVERY`` of the samples at float64's price (``bench/audit.py`` measures it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, Unpack

import numpy as np
import torch

from certlib.data import quantize
from certlib.engine.cascade import LEVELS, NOT_FINITE, Cascade, EngineOptions, model_device

MC_BLOCK = 1024  # samples per random-stream block; part of the stream's definition
QUEUE_BATCHES = 4  # capacity of each refinement queue, in batches: a synchronization every 3 batches at most
# Audit stride per device type: float64 costs 2-3x float32 on a CPU, so 1/1024 of the samples
# costs about 0.3%; on a GPU about 17x the compiled fp16 level (H100), so 1/2048 costs about 0.8%.
AUDIT_EVERY = {"cuda": 2048, "cpu": 1024}
AUDIT_FAILED = (
    "{level} votes differed from the float64 network's on an audited sample outside the {level} near-tie band "
    "(this network's rounding error depends on its input more than the spot check saw); "
    "certify it with precision: fp64"
)


class EnumeratedNoise(Protocol):
    """What the exact engine needs of a noise: L = ``levels`` copies of each image on the 1/q grid."""

    levels: int
    q: int

    def copies(self, x_int: torch.Tensor, s_base: torch.Tensor, dtype: torch.dtype = ...) -> torch.Tensor: ...


class SampledNoise(Protocol):
    """What the Monte Carlo engine needs of a noise: random noisy copies."""

    exact: bool

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...


def default_batch_size(device: torch.device | str, sample_numel: int) -> int:
    """Forward batch size sized to the device, rounded down to a power of two: about 2^24 input
    values per batch on a GPU; about 2^17 on a CPU, where batches beyond ~32 CIFAR images fall
    out of cache and run slower (measured: WRN-40-2, 2 cores)."""
    budget = 2**24 if torch.device(device).type == "cuda" else 2**17
    size = max(1, budget // max(1, sample_numel))
    return 1 << (size.bit_length() - 1)


def make_cascade(
    classifier: torch.nn.Module | Cascade, images: torch.Tensor, num_classes: int, **engine: Unpack[EngineOptions]
) -> Cascade:
    """``classifier`` itself if it is a Cascade (whose options then stand), else a cascade for
    this call: on ``device`` (default: the model's), ``precision`` and ``compile`` default
    ``auto``, ``batch_size`` sized to the device."""
    if isinstance(classifier, Cascade):
        given = [k for k, v in engine.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: set these on the Cascade, not per call")
        if classifier.num_classes != num_classes:
            raise ValueError(f"the cascade has {classifier.num_classes} classes, the call {num_classes}")
        return classifier
    device = engine.get("device")
    device = torch.device(device) if device is not None else model_device(classifier, images.device)
    batch_size = engine.get("batch_size") or default_batch_size(device, int(np.prod(images.shape[1:])))
    compile = engine.get("compile")
    return Cascade(
        classifier,
        num_classes,
        batch_size,
        device=device,
        precision=engine.get("precision") or "auto",
        compile="auto" if compile is None else compile,
    )


class _Queue:
    """Samples waiting for one cascade level, on the device: ``capacity`` slots and one scratch
    slot per batch row for the samples not appended."""

    def __init__(self, capacity: int, batch_size: int, sample_shape: tuple[int, ...], device: torch.device):
        self.capacity = capacity
        self.x = torch.empty((capacity + batch_size, *sample_shape), device=device)
        self.rows = torch.empty(capacity + batch_size, dtype=torch.int64, device=device)
        self.length = torch.zeros((), dtype=torch.int64, device=device)  # the true length, on the device
        self.bound = 0  # what the host knows: an upper bound of ``length``, exact after a synchronization
        self._scratch = capacity + torch.arange(batch_size, device=device)

    def append(self, x: torch.Tensor, rows: torch.Tensor, selected: torch.Tensor) -> None:
        """Append the ``selected`` samples, in order, without reading anything back."""
        slot = torch.where(selected, self.length + selected.cumsum(0) - 1, self._scratch[: len(x)])
        self.x.index_put_((slot,), x)  # slots are distinct: deterministic, no atomics
        self.rows.index_put_((slot,), rows)
        self.length += selected.sum()
        self.bound += len(x)

    def keep_from(self, start: int) -> None:
        """Drop the first ``start`` samples (evaluated); move the rest to the front."""
        rest = self.bound - start
        self.x[:rest] = self.x[start : self.bound].clone()
        self.rows[:rest] = self.rows[start : self.bound].clone()
        self.length.fill_(rest)
        self.bound = rest


class _Tally:
    """Evaluates noisy batches through the cascade and counts the predictions per (row, class)
    on the device. Row ``rows`` (one past the last) absorbs the samples handed to a later level."""

    def __init__(self, cascade: Cascade, rows: int, sample_shape: tuple[int, ...]):
        self.cascade = cascade
        self.batch_size = cascade.batch_size
        self.num_classes = cascade.num_classes
        self.sample_shape = sample_shape
        self.handed_on = rows
        device = cascade.device
        self.counts = torch.zeros((rows + 1) * self.num_classes, dtype=torch.int64, device=device)
        self.ones = torch.ones(self.batch_size, dtype=torch.int64, device=device)
        self.not_finite = torch.zeros((), dtype=torch.bool, device=device)
        self.evaluated = dict.fromkeys(LEVELS, 0)
        self.audit_every = AUDIT_EVERY.get(device.type, AUDIT_EVERY["cpu"])
        self.audited = 0
        self.wrong = {level: torch.zeros((), dtype=torch.bool, device=device) for level in LEVELS}
        self.queues: dict[str, _Queue] = {}  # one per later level, once the spot check has fixed the levels
        self.checked = False
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_size = 0

    def add(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        self._pending.append((x, rows))
        self._pending_size += len(x)
        while self._pending_size >= self.batch_size:
            self._first_level(*self._take(self.batch_size))

    def result(self, stats: dict[str, int] | None = None) -> np.ndarray:
        """(rows, num_classes) counts, once every sample has been decided."""
        if self._pending_size:
            self._first_level(*self._take(self._pending_size))
        for level in self.cascade.levels[1:] if self.checked else ():
            self._synchronize()
            self._drain(level, final=True)
        self._synchronize()
        if stats is not None:
            for level, samples in self.evaluated.items():
                stats[level] = stats.get(level, 0) + samples
            stats["audited"] = stats.get("audited", 0) + self.audited
        return self.counts[: -self.num_classes].view(-1, self.num_classes).cpu().numpy()

    def _take(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._pending) == 1:  # the DSSN engine adds whole batches: no copy needed
            xs, rows = self._pending[0]
        else:
            xs = torch.cat([x for x, _ in self._pending])
            rows = torch.cat([r for _, r in self._pending])
        self._pending = [(xs[size:], rows[size:])] if len(xs) > size else []
        self._pending_size = len(xs) - size
        return xs[:size], rows[:size]

    def _first_level(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        if not self.checked:
            self.cascade.check(x)
            self.checked = True
            capacity = max(2, QUEUE_BATCHES) * self.batch_size  # a drained queue (< 1 batch) takes a batch
            self.queues = {
                level: _Queue(capacity, self.batch_size, self.sample_shape, self.cascade.device)
                for level in self.cascade.levels[1:]
            }
        self._evaluate(self.cascade.levels[0], x, rows)

    def _evaluate(self, level: str, x: torch.Tensor, rows: torch.Tensor) -> None:
        seen = self.evaluated[level]
        self.evaluated[level] += len(x)
        if level == "fp64":
            prediction, finite = self.cascade.exact_prediction(x)
            torch.logical_or(self.not_finite, ~finite, out=self.not_finite)
            self._count(rows, prediction)
            return
        logits = self.cascade.logits(level, x)
        prediction = logits.argmax(dim=1)  # the first maximum: ties go to the lower class index
        if self.num_classes == 1:
            self._count(rows, prediction)
            return
        top2 = logits.topk(2, dim=1).values
        near_tie = top2[:, 0] - top2[:, 1] <= self.cascade.band(level) * (1 + top2[:, 0].abs())
        near_tie |= ~torch.isfinite(logits).all(dim=1)  # an overflow (fp16) is for a wider type to decide
        self._count(torch.where(near_tie, self.handed_on, rows), prediction)
        self._audit(level, x, prediction, near_tie, seen)
        successor = self.cascade.levels[self.cascade.levels.index(level) + 1]
        queue = self.queues[successor]
        if queue.bound + len(x) > queue.capacity:
            self._synchronize()
            self._drain(successor)
        queue.append(x, rows, near_tie)

    def _audit(self, level: str, x: torch.Tensor, prediction: torch.Tensor, near_tie: torch.Tensor, seen: int) -> None:
        """The float64 prediction of every ``audit_every``-th sample of this level's stream
        (``seen`` samples came before ``x``): a decided one that differs marks the level wrong,
        read at the next synchronization."""
        first = (-seen) % self.audit_every
        if first >= len(x):
            return
        picked = torch.arange(first, len(x), self.audit_every, device=x.device)
        self.audited += len(picked)
        exact, _ = self.cascade.exact_prediction(x[picked])
        wrong = (~near_tie[picked] & (prediction[picked] != exact)).any()
        torch.logical_or(self.wrong[level], wrong, out=self.wrong[level])

    def _count(self, rows: torch.Tensor, prediction: torch.Tensor) -> None:
        # index_put_ with accumulate: integer sums, exact in any order, and deterministic on CUDA
        self.counts.index_put_((rows * self.num_classes + prediction,), self.ones[: len(rows)], accumulate=True)

    def _synchronize(self) -> None:
        """Read the queues' true lengths (and the finiteness flag) back: one host sync."""
        queues = list(self.queues.values())
        flags = [self.not_finite, *self.wrong.values()]
        values = torch.stack([q.length for q in queues] + [f.long() for f in flags]).tolist()
        lengths, not_finite, wrong = values[: len(queues)], values[len(queues)], values[len(queues) + 1 :]
        if not_finite:
            raise ValueError(NOT_FINITE)
        for level, failed in zip(self.wrong, wrong):
            if failed:
                raise RuntimeError(AUDIT_FAILED.format(level=level))
        for queue, length in zip(queues, lengths):
            queue.bound = length

    def _drain(self, level: str, final: bool = False) -> None:
        """Evaluate the queue of ``level`` in full batches (every sample when ``final``); its
        length must be known (after ``_synchronize``)."""
        queue = self.queues[level]
        start = 0
        while queue.bound - start >= self.batch_size or (final and queue.bound > start):
            size = min(self.batch_size, queue.bound - start)
            self._evaluate(level, queue.x[start : start + size], queue.rows[start : start + size])
            start += size
        if start:
            queue.keep_from(start)


@torch.inference_mode()
def dssn_votes(
    classifier: torch.nn.Module | Cascade,
    images: torch.Tensor,
    noise: EnumeratedNoise,
    num_classes: int,
    *,
    stats: dict[str, int] | None = None,
    **engine: Unpack[EngineOptions],
) -> np.ndarray:
    """Exact DSSN vote counts: the base classifier on all L = ``noise.levels`` noisy copies of
    each image (Levine & Feizi 2021, Section 4.1).

    ``images``: (N, C, H, W) float in [0, 1] on the 1/q grid (checked). Returns an int64 array
    (N, num_classes) whose rows sum to L. The votes are a pure function of (model weights,
    image, sigma, seed, q): images x offsets are packed into flat batches of ``batch_size``.
    See the module docstring for the engine options and ``stats``.
    """
    cascade = make_cascade(classifier, images, num_classes, **engine)
    sample_shape = tuple(images.shape[1:])
    x_int = quantize(images.to(cascade.device), noise.q).flatten(1)
    levels = noise.levels
    total = len(x_int) * levels
    tally = _Tally(cascade, len(x_int), sample_shape)
    for start in range(0, total, cascade.batch_size):
        pair = torch.arange(start, min(start + cascade.batch_size, total), device=cascade.device)
        rows = pair // levels
        tally.add(noise.copies(x_int[rows], pair % levels).view(-1, *sample_shape), rows)
    return tally.result(stats)


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
                yield noise.sample(batch, generator), j, stage


@torch.inference_mode()
def monte_carlo_counts(
    classifier: torch.nn.Module | Cascade,
    images: torch.Tensor,
    indices,
    noise: SampledNoise,
    num_classes: int,
    *,
    n0: int,
    n: int,
    seed: int,
    stats: dict[str, int] | None = None,
    **engine: Unpack[EngineOptions],
) -> tuple[np.ndarray, np.ndarray]:
    """Class counts of the base classifier under ``noise`` for Cohen et al.'s CERTIFY:
    (selection counts from n0 samples, estimation counts from n samples), each (N, num_classes).

    ``images``: (N, C, H, W) float in [0, 1]; ``indices``: their dataset indices. The noise of
    image i comes from blocks of ``MC_BLOCK`` samples whose generators are seeded by
    ``stream_seed(seed, indices[i], stage, block)``, so an image's counts do not depend on the
    other images, the batch size, the precision or the worker (they do depend on the device
    type, whose generators differ). Engine options and ``stats``: as for ``dssn_votes``.
    """
    if noise.exact:
        raise ValueError(f"{noise!r} is deterministic: use dssn_votes, not Monte Carlo sampling")
    if int(n0) < 1 or int(n) < 1:
        raise ValueError(f"n0 and n must be >= 1, got n0={n0}, n={n}")
    indices = [int(i) for i in indices]
    if len(indices) != len(images):
        raise ValueError(f"{len(images)} images but {len(indices)} indices")
    cascade = make_cascade(classifier, images, num_classes, **engine)
    images = images.to(cascade.device, torch.float32)  # the noisy samples and the queues are float32
    if not bool(torch.isfinite(images).all()) or float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError("image values must be finite and lie in [0, 1] (pixel scale)")
    tally = _Tally(cascade, 2 * len(images), tuple(images.shape[1:]))
    for noisy, j, stage in _monte_carlo_blocks(images, indices, noise, int(n0), int(n), seed, cascade.device):
        tally.add(noisy, torch.full((len(noisy),), 2 * j + stage, device=cascade.device))
    counts = tally.result(stats)
    return counts[0::2], counts[1::2]
