"""Shared fixtures: the real data in ../shared/data (tests skip where it is absent) and the
session's Ray instance. What tests share that is not a fixture is in ``tests/helpers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from certlib.determinism import CUBLAS_WORKSPACE
from tests.helpers import CIFAR10_DIR, DSSN_PAPER_FILE

# Before any CUDA work: cuBLAS reads it once, and the deterministic-training tests need it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    if not (CIFAR10_DIR / "test_batch.bin").is_file():
        pytest.skip(f"CIFAR-10 binary version not found at {CIFAR10_DIR}")
    return CIFAR10_DIR


@pytest.fixture(scope="session")
def dssn_paper() -> pandas.DataFrame:  # noqa: F821
    if not DSSN_PAPER_FILE.is_file():
        pytest.skip(f"the DSSN paper's per-image results are not at {DSSN_PAPER_FILE}")
    import pandas as pd

    return pd.read_parquet(DSSN_PAPER_FILE)


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray instance for the whole test session (2 CPUs, dashboard on
    127.0.0.1 for the Job Submission API), on ports and in a directory of its own: a Ray the
    user already runs (the quickstart leaves one up) is neither attached to nor disturbed.
    Yields its ``LocalRay`` (gcs_address, dashboard_url); this process is connected to it."""
    ray = pytest.importorskip("ray")
    from cluster.client import local_ray

    instance = local_ray.start(num_cpus=2, private=True, object_store_bytes=1 << 30)
    try:
        ray.init(address=instance.gcs_address, log_to_driver=False)
        yield instance
    finally:
        ray.shutdown()
        local_ray.stop(instance)
