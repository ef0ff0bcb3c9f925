"""Beyond one machine: a sweep on a Ray cluster of a head (no CPUs, as on a real cluster) and
three worker nodes with their own CPUs and a fake GPU each (``ray.cluster_utils.Cluster``,
all on this machine), one of which dies mid-job. The job completes with every row exactly
once, and the units finished before the node died are not recomputed.

The cluster runs in a subprocess: this test session's own Ray stays connected, and the
cluster's ports are all chosen free, so a Ray the user runs is not disturbed either.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from certlib.analysis import load_results

NODES, LIMIT, SHARD = 3, 48, 4


def scenario(workdir: str) -> None:
    """Run in a subprocess: the cluster, the sweep, the node's death; writes result.json."""
    import ray
    import ray._private.utils

    from certlib.data import load_digits
    from certlib.rows import existing_shards
    from cluster.job.executor import run_sweep
    from cluster.plan import model_keys
    from cluster.spec import parse_spec
    from tests.helpers import random_checkpoint, simulated_cluster

    work = Path(workdir)
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    with simulated_cluster(NODES, "certify-mn-", _system_config=health) as (cluster, nodes):
        ray.init(address=cluster.address, log_to_driver=False)
        sweep = parse_spec(
            {
                "name": "multinode",
                "output": str(work / "out"),
                "dataset": {"name": "digits", "limit": LIMIT},
                "models": {"path": str(work / "models" / "{method}-{training}-{sigma}-{seed}.pt")},
                "methods": ["uniform"],
                "sigmas": [0.5],
                "certify": {"n0": 16, "n": 20_000},
                "resources": {"cpus_per_worker": 1, "shard_size": SHARD, "max_retries": 2},
            }
        )
        digits = load_digits("test")
        for key in model_keys(sweep):
            random_checkpoint(key.checkpoint(sweep), digits, key.method, key.sigma, key.seed)
        lines: list[str] = []
        outcome: dict = {}
        runner = threading.Thread(
            target=lambda: outcome.setdefault("progress", run_sweep(sweep, "multinode", lines.append))
        )
        runner.start()
        deadline = time.time() + 300
        while len(existing_shards(sweep.output)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        before = {str(p): p.stat().st_mtime_ns for p in existing_shards(sweep.output)}
        cluster.remove_node(nodes[0], allow_graceful=False)
        runner.join(timeout=600)
        after = {str(p): p.stat().st_mtime_ns for p in existing_shards(sweep.output)}
        progress = outcome["progress"]
        result = {
            "failures": progress.failures,
            "before": before,
            "after": after,
            "lines": lines,
            "nodes_alive": sum(1 for n in ray.nodes() if n["Alive"]),
        }
        (work / "result.json").write_text(json.dumps(result))


def test_a_worker_node_dies_mid_job_and_only_its_units_are_recomputed(tmp_path):
    code = f"from tests.test_multinode import scenario; scenario({str(tmp_path)!r})"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert not result["failures"], result["failures"]
    assert result["nodes_alive"] == NODES  # the head and the two worker nodes left
    df = load_results(tmp_path / "out")
    assert len(df) == LIMIT and sorted(df["image_index"]) == sorted(set(df["image_index"]))  # every row, exactly once
    before, after = result["before"], result["after"]
    assert len(before) >= 2 and len(after) == LIMIT // SHARD
    assert all(after[path] == mtime for path, mtime in before.items()), (
        "a unit finished before the node died was recomputed"
    )
    retried = [line for line in result["lines"] if line.startswith("worker died during")]
    assert 1 <= len(retried) <= 1 + NODES, result[
        "lines"
    ]  # the removed node's running unit (and any replaced start-up)
