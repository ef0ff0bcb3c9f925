"""Scaling of the pipeline over 1, 2, 4 and 8 simulated nodes (``ray.cluster_utils.Cluster``
on this machine: a head without CPUs and worker nodes of one CPU and one fake GPU each).

    python bench/scaling.py [--nodes 1 2 4 8] [--seconds-per-image 0.2] [--images 512]

Each node's device is simulated: a worker's engine call also sleeps ``--seconds-per-image``
per image (a ``worker_process_setup_hook`` patches it), so the walls measure the pipeline
(scheduling, driver round trips, images, Parquet writes, worker start-up) and not how many
cores this machine has; the rows themselves are real (a small CNN on the digits, a short
Monte Carlo run). Efficiency = (images x seconds per image / nodes) / wall. Benchmarks never
assert on timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECONDS_VARIABLE = "CERTIFY_SIMULATED_SECONDS_PER_IMAGE"


def simulated_device() -> None:
    """Worker setup hook: every unit's computation also takes the simulated device time."""
    from cluster.job.worker import UnitRunner

    seconds = float(os.environ[SECONDS_VARIABLE])
    compute = UnitRunner.compute

    def slow_compute(self, unit, images):
        started = time.perf_counter()
        result = compute(self, unit, images)
        time.sleep(max(0.0, seconds * unit.size - (time.perf_counter() - started)))
        return result

    UnitRunner.compute = slow_compute


def run(nodes: int, args, work: Path) -> float:
    import ray
    import ray._private.utils

    from certlib.data import load_digits
    from cluster.job.executor import run_sweep
    from cluster.plan import model_keys
    from cluster.spec import parse_spec
    from tests.helpers import random_checkpoint, simulated_cluster

    with simulated_cluster(nodes, "certify-sc-") as (cluster, _):
        ray.init(
            address=cluster.address,
            log_to_driver=False,
            runtime_env={
                "worker_process_setup_hook": "bench.scaling.simulated_device",
                "env_vars": {SECONDS_VARIABLE: str(args.seconds_per_image), "PYTHONPATH": str(ROOT)},
            },
        )
        sweep = parse_spec(
            {
                "name": "scaling",
                "output": str(work / f"out-{nodes}"),
                "dataset": {"name": "digits", "limit": args.images},
                "models": {"path": str(work / "models" / "{method}-{training}-{sigma}-{seed}.pt")},
                "methods": ["uniform"],
                "sigmas": [0.5],
                "certify": {"n0": 8, "n": 64},
                "resources": {"cpus_per_worker": 1, "shard_size": args.shard},
            }
        )
        key = model_keys(sweep)[0]
        if not key.checkpoint(sweep).exists():
            random_checkpoint(key.checkpoint(sweep), load_digits("test"), key.method, key.sigma, key.seed)
        started = time.perf_counter()
        progress = run_sweep(sweep, f"scaling-{nodes}", log=lambda line: None)
        wall = time.perf_counter() - started
        assert not progress.failures and progress.done == args.images, progress.failures
        return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds-per-image", type=float, default=0.2)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shard", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="certify-scaling-"))
    rows = []
    for nodes in args.nodes:
        wall = run(nodes, args, work)
        ideal = args.images * args.seconds_per_image / nodes
        rows.append(f"| {nodes} | {wall:.1f} | {ideal:.1f} | {ideal / wall:.2f} |")
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"# Pipeline scaling over simulated nodes: {args.images} images in units of {args.shard}, "
        f"{args.seconds_per_image} s of simulated device time per image\n"
    )
    print("| nodes | wall s | ideal s | efficiency |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
