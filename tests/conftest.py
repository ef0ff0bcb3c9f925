"""Shared fixtures: the real data in ../shared/data (tests skip where it is absent) and small
classifiers written as torch modules."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from certlib.determinism import CUBLAS_WORKSPACE

# Before any CUDA work: cuBLAS reads it once, and the deterministic-training tests need it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10_DIR = SHARED_DATA / "cifar-10-batches-bin"
DSSN_PAPER_FILE = SHARED_DATA / "dssn-paper-cifar10" / "certificates.parquet"


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


class LookupTableClassifier(torch.nn.Module):
    """A base classifier on the 1/(4q) grid that DSSN's noisy copies live on: the class of a
    point is a table entry. Returns one-hot logits, so its argmax is unambiguous."""

    def __init__(self, table: torch.Tensor, q: int, num_classes: int):
        super().__init__()
        self.register_buffer("table", table.long())
        self.q = q
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.round(x.flatten(1) * 4 * self.q).long()
        base = 4 * self.q + 1
        cell = (z * base ** torch.arange(z.shape[1], device=z.device)).sum(1)
        return torch.nn.functional.one_hot(self.table[cell], self.num_classes).to(x.dtype)


def smooth_random_table(d: int, q: int, num_classes: int, rng: np.random.Generator, flip: float = 0.1) -> torch.Tensor:
    """Classes of all (4q+1)^d cells: a random linear score cut into bands, with a fraction
    ``flip`` of cells relabelled at random, so that smoothed predictions have real margins."""
    base = 4 * q + 1
    cells = np.arange(base**d)
    coords = np.stack([(cells // base**i) % base for i in range(d)], axis=1) / (4 * q)
    score = coords @ rng.normal(size=d)
    edges = np.quantile(score, np.linspace(0, 1, num_classes + 1)[1:-1])
    table = np.searchsorted(edges, score)
    flips = rng.random(len(cells)) < flip
    table[flips] = rng.integers(num_classes, size=flips.sum())
    return torch.from_numpy(table)


@pytest.fixture(scope="session", autouse=True)
def ray_token_of_the_tests():
    """Ray's token for every Ray the tests start or reach: a file of the session's own
    (RAY_AUTH_TOKEN_PATH), so that ``local_ray.start``, which makes the token file 0600, never
    touches the user's ~/.ray."""
    import secrets

    folder = Path(tempfile.mkdtemp(prefix="certify-test-token-"))
    token = folder / "auth_token"
    with os.fdopen(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(secrets.token_hex(32))
    previous = os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    try:
        yield token
    finally:
        if previous is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = previous
        shutil.rmtree(folder, ignore_errors=True)


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


def random_checkpoint(
    path: Path,
    dataset,
    method: str,
    sigma: float,
    seed: int,
    training: str = "standard",
    architecture: str = "small_cnn",
    poison: bool = False,
) -> Path:
    """A checkpoint of a randomly initialised model with a matching card (no training); with
    ``poison`` its weights are NaN, so that certifying it fails."""
    from certlib.checkpoints.checkpoint import ModelCard, save_checkpoint
    from certlib.families import make_noise
    from certlib.models import build_model

    torch.manual_seed(seed)
    model = build_model(architecture, dataset.num_classes, dataset.mean, dataset.std, dataset.input_shape)
    if poison:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    noise = make_noise(method, sigma, q=dataset.q, seed=seed)
    card = ModelCard.describing(architecture, dataset, noise, seed=seed, training=training, sigma=sigma)
    save_checkpoint(path, model, card)
    return path


@contextlib.contextmanager
def simulated_cluster(nodes: int, prefix: str, **head_args):
    """A Ray cluster of ``nodes`` simulated nodes in this process (``ray.cluster_utils``): a
    head without CPUs, and nodes with one CPU and one (fake) GPU each, every port chosen free
    and a temporary directory of its own, so that it runs beside any other Ray. Yields the
    cluster and its nodes; shuts Ray, the cluster and its directory down afterwards."""
    import ray
    import ray._private.utils
    from ray.cluster_utils import Cluster

    from cluster.client.local_ray import free_port

    ray._private.utils.write_ray_address = lambda *args, **kwargs: None  # leave /tmp/ray's pointer alone
    temp_dir = tempfile.mkdtemp(prefix=prefix)  # short: Ray's socket paths must fit 107 bytes
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "gcs_server_port": free_port(),
            "include_dashboard": False,
            "ray_client_server_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
            "temp_dir": temp_dir,
            **head_args,
        },
    )
    try:
        yield (
            cluster,
            [cluster.add_node(num_cpus=1, num_gpus=1, dashboard_agent_listen_port=free_port()) for _ in range(nodes)],
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
