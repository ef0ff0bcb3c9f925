"""Beyond one machine: a sweep on a Ray cluster of a head (no CPUs, as on a real cluster) and
two worker nodes with their own CPUs and a fake GPU each (``ray.cluster_utils.Cluster``,
all on this machine), one of which dies mid-job. The job completes with every row exactly
once, and the units finished before the node died are not recomputed.

The cluster's ports are all chosen free, so a Ray the user runs is not disturbed, and this
process reconnects to the session's Ray afterwards (the ``ray_cluster`` fixture).
"""

from __future__ import annotations

import threading
import time

import ray

from certlib.analysis import load_results
from certlib.data import load_digits
from certlib.rows import existing_shards
from cluster.job.executor import run_sweep
from cluster.plan import model_keys
from cluster.spec import parse_spec
from tests.helpers import random_checkpoint

# Six units for two workers holding two calls each: whenever two shards are done, the node that
# dies still has a unit in flight.
NODES, LIMIT, SHARD = 2, 24, 4


def test_a_worker_node_dies_mid_job_and_only_its_units_are_recomputed(ray_cluster, tmp_path):
    cluster, nodes = ray_cluster(
        NODES, _system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    )
    sweep = parse_spec(
        {
            "name": "multinode",
            "output": str(tmp_path / "out"),
            "dataset": {"name": "digits", "limit": LIMIT},
            "models": {"path": str(tmp_path / "models" / "{method}-{training}-{sigma}-{seed}.pt")},
            "methods": ["uniform"],
            "sigmas": [0.5],
            "certify": {"n0": 16, "n": 10_000},
            "resources": {"cpus_per_worker": 1, "shard_size": SHARD, "max_retries": 2},
        }
    )
    for key in model_keys(sweep):
        random_checkpoint(key.checkpoint(sweep), load_digits("test"), key.method, key.sigma, key.seed)
    lines: list[str] = []
    outcome: dict = {}
    runner = threading.Thread(
        target=lambda: outcome.setdefault("progress", run_sweep(sweep, "multinode", lines.append))
    )
    runner.start()
    deadline = time.time() + 300
    while len(existing_shards(sweep.output)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    before = {p: p.stat().st_mtime_ns for p in existing_shards(sweep.output)}
    cluster.remove_node(nodes[0], allow_graceful=False)
    runner.join(timeout=600)
    after = {p: p.stat().st_mtime_ns for p in existing_shards(sweep.output)}
    assert not outcome["progress"].failures, outcome["progress"].failures
    assert sum(1 for n in ray.nodes() if n["Alive"]) == NODES  # the head and the worker node left
    df = load_results(tmp_path / "out")
    assert len(df) == LIMIT and sorted(df["image_index"]) == sorted(set(df["image_index"]))  # every row, exactly once
    assert len(before) >= 2 and len(after) == LIMIT // SHARD
    assert all(after[path] == mtime for path, mtime in before.items()), (
        "a unit finished before the node died was recomputed"
    )
    retried = [line for line in lines if line.startswith("worker died during")]
    assert 1 <= len(retried) <= 1 + NODES, lines  # the removed node's running unit (and any replaced start-up)
