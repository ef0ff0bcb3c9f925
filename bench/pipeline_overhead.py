"""Whole pipeline through Ray against the bare certlib engine on the same images.

    python bench/pipeline_overhead.py --images 2000 --workers 2          # CPU here

Certifies CIFAR-10 test images with DSSN (and optionally a Monte Carlo method) through a real
sweep (local Ray, actors, Parquet shards) and with ``Smooth.certify`` directly in this process,
then prints the wall times and the fraction of the sweep's wall time spent outside
certification (Ray start-up, scheduling, model loading, Parquet writing).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-bin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--shard-size", type=int, default=250)
    args = parser.parse_args()

    import ray

    from certlib.analysis import load_results
    from certlib.checkpoint import ModelCard, load_checkpoint, save_checkpoint
    from certlib.data import load_cifar10
    from certlib.models import build_model
    from certlib.noise import DSSNNoise
    from certlib.smooth import Smooth
    from cluster.driver import run_sweep
    from cluster.spec import model_keys, parse_spec

    work = Path(tempfile.mkdtemp(prefix="certify-bench-"))
    test = load_cifar10(args.cifar, "test")
    spec = parse_spec({
        "name": "bench", "output": str(work / "out"),
        "dataset": {"name": "cifar10", "split": "test", "root": str(args.cifar), "limit": args.images},
        "models": {"path": str(work / "{method}-{training}-{sigma}-{seed}.pt")},
        "methods": ["dssn"], "sigmas": [args.sigma],
        "resources": {"workers": args.workers, "cpus_per_worker": 1, "gpus_per_worker": 0, "shard_size": args.shard_size},
    })
    key = model_keys(spec)[0]
    torch.manual_seed(0)
    model = build_model(args.arch, 10, test.mean, test.std, test.input_shape)
    noise = DSSNNoise(args.sigma)
    save_checkpoint(key.checkpoint(spec), model, ModelCard(
        architecture=args.arch, dataset="cifar10", class_names=test.class_names, input_shape=list(test.input_shape),
        mean=list(test.mean), std=list(test.std), q=255, method="dssn", sigma=args.sigma, lam=noise.lam,
        levels=noise.levels, seed=0, training="standard"))

    start = time.perf_counter()
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray_started = time.perf_counter()
    progress = run_sweep(spec, "bench", log=lambda line: None)
    finished = time.perf_counter()
    ray.shutdown()
    rows = load_results(spec.output)
    engine_seconds = float(rows["seconds"].sum())  # per-image time x images = time inside Smooth.certify
    assert progress.done == args.images and len(rows) == args.images

    torch.set_num_threads(1)  # one worker's share of the machine, as in the sweep
    bare_model, card = load_checkpoint(key.checkpoint(spec))
    bare_images = test.pixels(range(min(args.images, 200)))
    t = time.perf_counter()
    Smooth(bare_model, noise, 10).certify(bare_images)
    bare_per_image = (time.perf_counter() - t) / len(bare_images)

    wall = finished - start
    ideal = engine_seconds / args.workers
    print(f"CIFAR-10, {args.images} images, DSSN sigma={args.sigma} (L={noise.levels}), {args.arch}, "
          f"{args.workers} CPU workers x 1 thread, shards of {args.shard_size}")
    print("| measure | seconds |")
    print("|---|---:|")
    print(f"| Ray start-up | {ray_started - start:.1f} |")
    print(f"| sweep (driver: plan, actors, model loads, units, Parquet) | {finished - ray_started:.1f} |")
    print(f"| total wall | {wall:.1f} |")
    print(f"| certification inside units (sum over workers) | {engine_seconds:.1f} |")
    print(f"| ideal wall = certification / workers | {ideal:.1f} |")
    print(f"| bare engine, one thread, per image x images / workers | {bare_per_image * args.images / args.workers:.1f} |")
    print(f"fraction of wall time outside certification: {1 - ideal / wall:.1%} "
          f"(without Ray start-up: {1 - ideal / (finished - ray_started):.1%})")


if __name__ == "__main__":
    main()
