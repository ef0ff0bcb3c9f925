"""Running one unit: certify a shard of images and write its rows (or train a missing model,
``cluster.job.training``).

``UnitRunner`` holds what a worker process keeps between units (the selected images, the last
model); the driver runs it as a Ray actor, one model replica per GPU (or CPU). All the math is
certlib's.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cluster import collector_paused

with collector_paused():  # a worker process imports all this first: cluster.collector_paused says why
    import numpy as np
    import pyarrow as pa
    import torch

    import certlib
    from certlib.checkpoints.checkpoint import ModelCard, load_checkpoint
    from certlib.data import QuantizedDataset
    from certlib.determinism import enable_deterministic_kernels
    from certlib.engine.cascade import Cascade
    from certlib.engine.throughput import forward_throughput
    from certlib.engine.voting import make_cascade
    from certlib.rows import certification_rows, write_shard
    from certlib.smooth import Smooth
    from cluster.job.training import ModelTrainer
    from cluster.plan import ModelKey, Unit, select_images, unit_parameters
    from cluster.spec import Sweep


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def assigned_device(gpu_ids: Sequence[str]) -> torch.device:
    """The device of a Ray worker that Ray assigned the GPUs ``gpu_ids``: CUDA where it was
    given one (Ray made exactly those visible; a GPU resource declared on a node without one
    runs on the CPU), else the CPU. Ray no longer hides a node's GPUs from a worker it gave
    none (ray-project/ray#54868): such a worker hides them itself, before anything starts
    CUDA, so that ``gpus_per_worker: 0`` means the CPU on a GPU node too and never a GPU
    outside Ray's accounting."""
    if not gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class UnitRunner:
    """Executes the units of one sweep in one process, on ``device`` (default: CUDA where this
    process sees a GPU, else the CPU)."""

    def __init__(self, sweep_json: str, job_id: str, threads: int = 1, device: torch.device | None = None):
        self.sweep = Sweep.from_json(sweep_json)
        self.job_id = job_id
        torch.set_num_threads(max(1, int(threads)))
        if self.sweep.certify.deterministic:
            enable_deterministic_kernels()
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._images: QuantizedDataset | None = None
        self._model: tuple[str, Cascade, ModelCard] | None = None
        self.trainer = ModelTrainer(self.sweep, self.device)

    @property
    def images(self) -> QuantizedDataset:
        if self._images is None:
            self._images = select_images(self.sweep)
        return self._images

    def _cascade(self, model: torch.nn.Module, num_classes: int, input_shape, **override: Any) -> Cascade:
        """``model`` behind the precision cascade the sweep's engine options describe."""
        engine = {**self.sweep.certify.engine(), **override}
        return make_cascade(model, torch.empty(0, *input_shape), num_classes, device=self.device, **engine)

    def _load(self, key: ModelKey) -> tuple[Cascade, ModelCard]:
        """The model of ``key`` behind its precision cascade, kept across this worker's units:
        the folded and compiled network, the float64 reference and the spot check are paid by
        the first unit of each model only."""
        path = str(key.checkpoint(self.sweep))
        if self._model is None or self._model[0] != path:
            self._model = None  # free the previous replica before loading the next
            model, card = load_checkpoint(
                path,
                device=self.device,
                override=self.sweep.models.override_card,
                trust_code=self.sweep.models.trust_code,
                **key.expected_card(self.sweep),
            )
            self._model = (path, self._cascade(model, card.num_classes, card.input_shape), card)
        return self._model[1], self._model[2]

    def pixels(self, unit: Unit) -> torch.Tensor:
        """The unit's images, pixel scale [0, 1] (decoded here for ImageNet-style datasets)."""
        return self.images.pixels(np.arange(unit.start, unit.stop))

    def certify(self, unit: Unit) -> dict:
        """Certify the unit's images and write its Parquet shard atomically."""
        table, summary = self.compute(unit, self.pixels(unit))
        self.write(unit, table)
        return summary

    def compute(self, unit: Unit, images: torch.Tensor) -> tuple[pa.Table, dict]:
        """The unit's result rows (not yet written) and a summary for the driver."""
        sweep, key = self.sweep, unit.model
        cascade, card = self._load(key)
        noise = key.noise(sweep)
        rows = np.arange(unit.start, unit.stop)
        settings = sweep.certify_settings(noise, key.seed)
        started = time.perf_counter()
        result = Smooth(cascade, noise, card.num_classes).certify_with(images, self.images.indices[rows], settings)
        seconds = time.perf_counter() - started
        table = certification_rows(
            noise,
            result,
            settings,
            indices=self.images.indices[rows],
            labels=self.images.labels.numpy()[rows],
            training=key.training,
            seed=key.seed,
            job_id=self.job_id,
            unit_id=unit.unit_id,
            dataset=sweep.dataset.name,
            split=sweep.dataset.split,
            q=sweep.q,
            seconds=seconds / len(rows),
            precision=cascade.name,
            batch_size=cascade.batch_size,
            worker_host=socket.gethostname(),
            device=device_name(self.device),
            model_sha256=card.weights_sha256,
            training_noise=card.method,
            training_sigma=card.sigma,
            library_version=certlib.__version__,
        )
        return table, {"unit_id": unit.unit_id, "model": key.label, "images": len(rows), "seconds": seconds}

    def write(self, unit: Unit, table: pa.Table) -> None:
        sha = table.column("model_sha256")[0].as_py()
        write_shard(unit.path(self.sweep), table, unit_parameters(self.sweep, unit, sha))

    def calibrate(self, architecture: str, seconds: float = 1.0) -> float:
        """Forward samples per second of ``architecture`` (random weights: speed does not depend
        on them) on this worker's device, through the sweep's precision and batch size, not
        compiled; sizes the units when the spec leaves ``shard_size`` to ``auto``."""
        ds = self.images
        measured = forward_throughput(
            architecture,
            ds.num_classes,
            ds.mean,
            ds.std,
            ds.input_shape,
            device=self.device,
            engine=self.sweep.certify.engine(),
            seconds=seconds,
            trust_code=self.sweep.models.trust_code,
        )
        return measured.per_second


class Worker:
    """The Ray actor around a ``UnitRunner``: an asyncio actor whose calls overlap where that
    is free. The device runs one unit at a time (one thread); the images of the unit queued
    next are loaded, and the rows of the unit just computed written, on a second thread
    meanwhile. A certify call still returns only once its shard is on disk, so the driver
    never counts a unit whose rows a crash could lose."""

    def __init__(self, sweep_json: str, job_id: str, threads: int = 1):
        import ray  # in the actor's process; the module itself imports without Ray (`certify plan`)

        gc.freeze()  # the actor's process: what its imports built lives as long (cluster.collector_paused)
        device = assigned_device(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
        self.runner = UnitRunner(sweep_json, job_id, threads, device)
        self.device = ThreadPoolExecutor(1, thread_name_prefix="device")
        self.io = ThreadPoolExecutor(1, thread_name_prefix="io")
        self.io.submit(lambda: self.runner.images)  # the selection loads while the first call is on its way

    async def _on(self, executor: ThreadPoolExecutor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def certify(self, unit: Unit) -> dict:
        images = await self._on(self.io, self.runner.pixels, unit)
        table, summary = await self._on(self.device, self.runner.compute, unit, images)
        await self._on(self.io, self.runner.write, unit, table)
        return summary

    async def train(self, key: ModelKey) -> dict:
        return await self._on(self.device, self.runner.trainer.train, key)

    async def calibrate(self, architecture: str) -> float:
        return await self._on(self.device, self.runner.calibrate, architecture)

    async def training_progress(self) -> dict | None:
        return self.runner.trainer.progress()
