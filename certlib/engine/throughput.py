"""How fast this device runs a sweep's two kinds of work, measured in a second or two:
forward samples per second of a certification engine, and images per second of a training run.

Both measure a randomly initialised network (speed does not depend on the weights) on inputs
of the dataset's shape. The certification worker sizes its units with ``forward_throughput``
(``resources.shard_size: auto``); ``certify plan`` estimates a sweep's time with both.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from certlib.checkpoints.weights import build_architecture
from certlib.data import DATASETS, QuantizedDataset
from certlib.determinism import deterministic_kernels
from certlib.engine.cascade import EngineOptions
from certlib.engine.voting import make_cascade
from certlib.families import make_noise
from certlib.training.batches import ResidentBatches
from certlib.training.config import ResolvedConfig, TrainConfig

# The training run's own builders, so that the measured step is the one a run takes (resident
# split, CUDA graph where it applies, amp, channels_last).
from certlib.training.train import _batches, _build, _step

TRAIN_BATCHES = 4  # full batches in the synthetic training split: a graph's warm-up takes 3
PROBE_BATCHES = (4, 8)  # two small training steps: a step costs about a fixed time plus a time per image


@dataclass(frozen=True)
class Throughput:
    """A measured rate: ``per_second`` forward samples (certification) or training images per
    second; the ``batch_size`` and ``mode`` (precision levels, CUDA graph) it ran with, on
    ``device``; ``seconds``, the wall time the measurement took, the model's build included."""

    per_second: float
    batch_size: int
    mode: str
    device: str
    seconds: float


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed_rate(run: Callable[[], None], sync: Callable[[], None], seconds: float) -> float:
    """Calls of ``run`` per second of wall time, after one warm-up call (kernels chosen, memory
    allocated). The calls go in chunks sized to the rate seen so far, the device waited for
    after each chunk: queued work is never counted as done, and the measurement ends close to
    ``seconds`` (at least one timed call)."""
    run()
    sync()
    calls, chunk, started = 0, 1, time.perf_counter()
    while True:
        for _ in range(chunk):
            run()
        sync()
        calls += chunk
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return calls / elapsed
        # What the remaining time holds at the rate so far, at most doubling: a first call
        # slower than the rest must not make one chunk overshoot by much.
        chunk = max(1, min(2 * calls, int(calls * (seconds - elapsed) / elapsed)))


def forward_throughput(
    architecture: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    input_shape: Sequence[int],
    *,
    device: torch.device,
    engine: EngineOptions,
    seconds: float = 1.0,
    trust_code: Iterable[str] = (),
) -> Throughput:
    """Forward samples per second of ``architecture`` on ``device`` through the engine options'
    precision (the cascade's first level) and batch size (default: sized to the device), not
    compiled: what a certification worker evaluates per second, before any near-tie
    re-evaluation by the cascade's later levels."""
    started = time.perf_counter()
    # Imported architectures (torchvision:, timm:, factory:) too: the units of a sweep over
    # imported models are sized by their own speed. A factory's only where trust_code names it.
    model = build_architecture(
        architecture, num_classes, list(mean), list(std), list(input_shape), trust_code=trust_code
    ).to(device)
    options: EngineOptions = {**engine, "device": device, "compile": False}
    cascade = make_cascade(model, torch.empty(0, *input_shape), num_classes, **options)
    x = torch.rand(cascade.batch_size, *input_shape, device=device)

    def forward() -> None:
        cascade.logits(cascade.levels[0], x)

    calls = timed_rate(forward, _synchronizer(device), seconds)
    return Throughput(
        calls * cascade.batch_size, cascade.batch_size, cascade.name, device.type, time.perf_counter() - started
    )


def _synthetic_split(dataset: str, size: int, generator: torch.Generator) -> QuantizedDataset:
    """``size`` random images of ``dataset``'s shape on its grid, with random labels."""
    info = DATASETS[dataset]
    values = torch.randint(0, info.q + 1, (size, *info.input_shape), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, info.num_classes, (size,), generator=generator)
    names = [str(c) for c in range(info.num_classes)]
    return QuantizedDataset(dataset, "train", values, labels, info.q, names, info.mean, info.std)


def _training_rate(cfg: ResolvedConfig, device: torch.device, seconds: float) -> tuple[float, str]:
    """Images per second of ``cfg``'s training step on a random resident split, and how it ran."""
    with torch.random.fork_rng(devices=[]), deterministic_kernels(cfg.deterministic):
        data = _synthetic_split(cfg.dataset, TRAIN_BATCHES * cfg.batch_size, torch.Generator().manual_seed(0))
        model, optimizer, _ = _build(cfg, data, device)
        noise = make_noise(cfg.method, cfg.sigma, q=data.q, seed=cfg.seed)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        step = _step(cfg, model, optimizer, noise, data, generator)
        batches, graphed = _batches(cfg, data, device, step)
        if not isinstance(batches, ResidentBatches):  # data: device (training_throughput)
            raise TypeError("the synthetic training split must be resident on the device")
        if graphed is not None:
            graphed.capture()
        order = torch.arange(len(data), device=device)
        position = 0

        def one_step() -> None:
            nonlocal position
            if position % batches.full_batches == 0:  # rewind the split's cursor: a new epoch
                batches.start_epoch(order)
            if graphed is not None:
                graphed.replay()
            else:
                step(*batches.next_batch())
            position += 1

        def wait() -> None:
            step.read_metrics()  # the host reads the summed loss: waits for the device

        steps = timed_rate(one_step, wait, seconds)
    mode = ("bf16 autocast" if step.amp else "fp32") + (", CUDA graph" if graphed is not None else "")
    return steps * cfg.batch_size, mode


def training_throughput(config: TrainConfig, *, device: torch.device, seconds: float = 1.0) -> Throughput:
    """Training images per second of ``config``'s step (its architecture, batch size, training
    mode, noise, amp) on ``device``, from a few steps on a random split of the dataset's shape
    held on the device, as a run holds CIFAR-10 (and as a CUDA graph on a GPU, unless
    ``cuda_graph: false``). A split decoded by DataLoader workers (ImageNet) trains at most this
    fast: the decoding is not measured. Global random state is left as it was.

    A step of the full batch that could take longer than ``seconds`` (WRN-40-2 on a CPU core:
    about 10 s at batch 64) is not run: one step at each of PROBE_BATCHES gives a step's fixed
    cost and its cost per image, and the full step's time is extrapolated from them (``mode``
    says so)."""
    started = time.perf_counter()
    cfg = dataclasses.replace(config, data="device").resolved()
    small, large = PROBE_BATCHES
    if cfg.batch_size > large:
        t_small = small / _training_rate(dataclasses.replace(cfg, batch_size=small), device, 0.0)[0]
        rate, mode = _training_rate(dataclasses.replace(cfg, batch_size=large), device, 0.0)
        t_large = large / rate
        if t_large * cfg.batch_size / large > seconds:  # at most this long, as a step's fixed cost is in t_large
            per_image = (t_large - t_small) / (large - small)
            # A busy machine can time the smaller step slower: then the larger one's cost per image.
            step = t_large + per_image * (cfg.batch_size - large) if per_image > 0 else t_large * cfg.batch_size / large
            mode += f", extrapolated from batches {small} and {large}"
            return Throughput(cfg.batch_size / step, cfg.batch_size, mode, device.type, time.perf_counter() - started)
    rate, mode = _training_rate(cfg, device, seconds)
    return Throughput(rate, cfg.batch_size, mode, device.type, time.perf_counter() - started)
