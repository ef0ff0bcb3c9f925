"""Sequential Monte Carlo counting: the estimation samples of many images in flight at full
batch, each image stopped as soon as its counts settle the question asked of it.

The n0 selection samples are drawn as in fixed-n CERTIFY (``voting.monte_carlo_counts``). Then,
round by round, every image still in flight contributes its next blocks of ``MC_BLOCK``
estimation samples, drawn from the same random streams as fixed-n sampling ((seed, image,
stage, block): an image's samples are the same whichever batch they ride in), enough blocks
each that a round fills at least ``ROUND_BATCHES`` batches however few images remain: a device
never sees a batch of one image's leftovers. The counts are read back once per round; ``stop``
is then asked at each block boundary of each image in order, and an image is retired with its
counts at the first boundary where it says stop (or at the cap ``n``). The blocks drawn past
that boundary are discarded, so an image's counts depend only on its own samples and on
``stop``: not on the batch size, the round sizes or the other images of the unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Unpack

import numpy as np
import torch

from certlib.engine.cascade import EngineOptions
from certlib.engine.voting import MC_BLOCK, SampledNoise, _Tally, make_cascade, monte_carlo_counts, stream_seed

ROUND_BATCHES = 4  # batches per round at least: the counts are read back once per round
# stop(counts (m, C), selected (m,)) -> (m,) bool: whether each image may stop with these counts
StopRule = Callable[[np.ndarray, np.ndarray], np.ndarray]


@torch.inference_mode()
def sequential_counts(
    classifier,
    images: torch.Tensor,
    indices,
    noise: SampledNoise,
    num_classes: int,
    *,
    n0: int,
    n: int,
    seed: int,
    stop: StopRule,
    stats: dict[str, int] | None = None,
    **engine: Unpack[EngineOptions],
) -> tuple[np.ndarray, np.ndarray]:
    """(selection counts from n0 samples, estimation counts at each image's stopping time),
    each (N, num_classes): the estimation samples of image i are the first blocks of its
    stream up to the first block boundary where ``stop`` says so, at most ``n`` samples. The
    engine options and ``stats`` are ``monte_carlo_counts``'s; ``stats`` also counts the
    estimation samples drawn and discarded past a stopping boundary ("discarded")."""
    cascade = make_cascade(classifier, images, num_classes, **engine)
    selection, _ = monte_carlo_counts(cascade, images, indices, noise, num_classes, n0=n0, n=1, seed=seed, stats=stats)
    selected = selection.argmax(axis=1)  # ties to the lower class index, as CERTIFY selects
    indices = [int(i) for i in indices]
    images = images.to(cascade.device, torch.float32)
    blocks = math.ceil(int(n) / MC_BLOCK)
    counts = np.zeros((len(images), num_classes), dtype=np.int64)
    done = np.zeros(len(images), dtype=np.int64)  # blocks counted so far, per image
    active = list(range(len(images)))
    while active:
        per_image = max(1, math.ceil(ROUND_BATCHES * cascade.batch_size / (len(active) * MC_BLOCK)))
        plan = [(j, b) for j in active for b in range(done[j], min(blocks, done[j] + per_image))]
        tally = _Tally(cascade, len(plan), tuple(images.shape[1:]))
        for row, (j, b) in enumerate(plan):
            size = min(MC_BLOCK, int(n) - b * MC_BLOCK)
            generator = torch.Generator(device=cascade.device).manual_seed(stream_seed(seed, indices[j], 1, b))
            noisy = noise.sample(images[j].unsqueeze(0).expand(size, *images[j].shape), generator)
            tally.add(noisy, torch.full((size,), row, device=cascade.device))
        by_block = tally.result(stats)
        active = _settle(plan, by_block, counts, done, selected, blocks, stop, stats)
    return selection, counts


def _settle(plan, by_block, counts, done, selected, blocks, stop: StopRule, stats) -> list[int]:
    """Add each image's round of blocks to its counts one boundary at a time, retiring it at the
    first boundary where ``stop`` says so or at the cap; the images still in flight."""
    rows_of: dict[int, list[int]] = {}
    for row, (j, _) in enumerate(plan):
        rows_of.setdefault(j, []).append(row)
    still = []
    for j, rows in rows_of.items():
        running = counts[j] + np.cumsum(by_block[rows], axis=0)  # counts at each boundary of the round
        settled = stop(running, np.full(len(rows), selected[j]))
        settled[-1] |= done[j] + len(rows) >= blocks
        first = int(np.argmax(settled)) if settled.any() else len(rows) - 1
        counts[j] = running[first]
        done[j] += first + 1
        if stats is not None:
            stats["discarded"] = stats.get("discarded", 0) + int(by_block[rows[first + 1 :]].sum())
        if not settled.any():
            still.append(j)
    return still
