"""The upper bounds of a sweep spec's values, and the readers that apply them: beyond a bound a
run cannot finish, or a value overflows the column or the arithmetic that holds it. (Every
integer of a spec is also at most 2**53: ``fields.LARGEST_INTEGER``.) Each refusal is one
``SpecError`` line naming the field."""

from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Any

from certlib.data import DATASETS
from certlib.families import family
from cluster.spec.fields import SpecError, integer, number, shown, string
from cluster.spec.loading import MAX_SPEC_BYTES

# n0 and n are forward passes per image: 10**12 is more than a day per image at 10**7 samples/s
# (a fast GPU on CIFAR-10's smallest network), far inside the Int64 vote columns.
MAX_SAMPLES = 10**12
# A batch holds batch_size x input values (certification and training): many CUDA kernels index
# with 32-bit integers, and 2**31 values are 8 GiB of float32 before the first activation.
MAX_BATCH_VALUES = 2**31
# Images are in [0, 1]. The noisy input is computed in the cascade's first precision, and fp16
# (its first level on GPUs) holds at most 65,504: noise of sigma 1,000 reaches that in its far
# tails (Laplace: about 15 scales at float32's smallest uniform draws). The published grids stop
# at 4; DSSN's L = 2 sqrt(3) sigma q forward passes per image stay below 10**6.
MAX_SIGMA = 1000.0
MAX_IMAGES = 10**9  # every, start, limit, shard_size, heldout_limit: no dataset here has 10**7 images
MAX_EPOCHS = 100_000  # the papers train 90 to 120; 10**5 epochs of digits (1,437 images) take days
# A worker runs on one node: no node has 4,096 CPUs (the largest two-socket servers have 768
# hardware threads) or more than 16 GPUs, and `certify plan` hands cpus_per_worker to torch's
# set_num_threads, a C int.
MAX_CPUS = 4096
MAX_GPUS = 16
MAX_WORKERS = 100_000  # a cap per kind; Ray clusters hold a few thousand nodes
MAX_RETRIES = 100  # each attempt reruns its unit: a failure repeated 100 times is not chance
FLOAT32_MAX = 3.4028234663852886e38  # lr, weight_decay, stability_weight: the training step is float32
# Every configuration (method x sigma x k x seed x training x models.sigmas) is a model to read or
# train and certify: the published grids have at most a few hundred, and validating reads each
# model's card.
MAX_CONFIGURATIONS = 10_000
# The validated spec as JSON: what the job ships to its driver and writes to <output>.job/.
MAX_SPEC_JSON = 4 * MAX_SPEC_BYTES


def image_count(value: Any, where: str, minimum: int) -> int:
    """A count or index of images (every, start, limit, shard_size, heldout_limit)."""
    return integer(value, where, minimum, MAX_IMAGES)


def batch_size(value: Any, where: str, dataset: str) -> int:
    """A batch of images of ``dataset``: at most MAX_BATCH_VALUES input values."""
    values = math.prod(DATASETS[dataset].input_shape)
    return integer(value, where, 1, MAX_BATCH_VALUES // values)


def sigma_value(value: Any, where: str) -> float:
    """A noise level: positive, at most MAX_SIGMA."""
    return number(value, where, positive=True, maximum=MAX_SIGMA)


def output_path(value: Any) -> str:
    """The results directory: a path whose last part is a name of its own, so never a
    filesystem root, ``.``, ``..`` or a path ending in them (its job record ``<output>.job``
    sits beside it). Where it lands against the files here: ``cluster.plan.resolve_paths``."""
    output = string(value, "output")
    if PurePosixPath(output).name in ("", ".."):
        raise SpecError(
            f"output: {shown(output)} is a filesystem root, the current directory or one above it; "
            "give the results a directory of their own"
        )
    return output


def check_grid(
    methods: tuple[str, ...], sigmas: tuple, ks: tuple, seeds: tuple, training: tuple, models_sigmas: tuple | None
) -> None:
    """At most MAX_CONFIGURATIONS models x sigmas: methods (shaped ones once per k) x sigmas x
    seeds x training (x ``models_sigmas``, the models' own sigmas, where given)."""
    shaped = sum(len(ks) if "k" in family(m).parameters else 1 for m in methods)
    configurations = shaped * len(sigmas) * len(seeds) * len(training) * len(models_sigmas or (None,))
    if configurations > MAX_CONFIGURATIONS:
        raise SpecError(
            f"sigmas: the grid holds {configurations:,} configurations (methods x sigmas x ks x seeds x training"
            f"{' x models.sigmas' if models_sigmas else ''}), more than the {MAX_CONFIGURATIONS:,} a sweep may have"
        )


def check_json_size(spec_json: str) -> None:
    """The validated spec as JSON (what ships to the driver) holds at most MAX_SPEC_JSON bytes."""
    size = len(spec_json.encode())
    if size > MAX_SPEC_JSON:
        raise SpecError(f"spec: {size:,} bytes as JSON, more than the {MAX_SPEC_JSON:,} a spec may have")
