"""Fixtures, and the markers they give the tests that use them.

A test is marked by what it uses, never by hand: ``ray`` if it uses a Ray instance, ``training``
if it trains models, ``data`` if it reads ../shared/data, ``subprocess`` if it starts Python
interpreters of its own, ``gpu`` if it needs CUDA (MARKED_BY). The fast lane, ``pytest -m
"not ray and not training and not data and not subprocess"``, relies on the marks, so the
costliest are enforced: a test without ``ray`` that starts or connects to Ray, or one without
``training`` that runs the training loop, fails naming the fixture it lacks."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pytest

import cluster  # noqa: F401 - before any Ray import: it sets RAY_AUTH_MODE, which Ray reads once
from certlib import CUBLAS_WORKSPACE

# What the fixtures need is imported where they run: pytest-xdist's controller process loads this
# file too and runs no test (torch alone takes seconds to import).
if TYPE_CHECKING:
    import pandas as pd
    import torch

    from certlib.checkpoints.checkpoint import ModelCard
    from tests.helpers import FreshPython, TrainedModel

# Before any CUDA work: cuBLAS reads it once, and the deterministic-training tests need it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
# pytest-xdist runs a worker per core (at most 4): threads of torch's beyond a worker's share of
# the cores only contend, and spin while they wait (on 2 cores an eighth of the fast lane's CPU
# time). Set before torch is imported; the processes the tests start inherit it.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

# A test's Ray holds nothing worth a clean exit: its processes get this long after SIGTERM (where
# `certify stop` waits 5 s, which a Ray whose node died mid-job used up every time).
STOP_GRACE_SECONDS = 1.0

MARKED_BY = {
    "ray_session": "ray",
    "own_ray": "ray",
    "ray_cluster": "ray",
    "train_model": "training",
    "trained_digits_dssn": "training",
    "trains_in_ray_job": "training",
    "cifar10_dir": "data",
    "dssn_paper": "data",
    "fresh_python": "subprocess",
    "cuda": "gpu",
}


# Rough weights of what a test's marks say of its cost, summed per file: the order files run in.
MARK_COST = {"ray": 10, "training": 3, "subprocess": 3, "data": 1}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # fixturenames is the closure: a fixture built on cifar10_dir marks its users `data` too.
    for item in items:
        for marker in sorted({MARKED_BY[name] for name in getattr(item, "fixturenames", ()) if name in MARKED_BY}):
            item.add_marker(marker)
    # The costliest files first: pytest-xdist hands out whole files in this order (--dist loadfile
    # --no-loadscope-reorder), so the quick ones fill the end of the run and no worker is left
    # alone with a long file while the others have finished.
    cost: Counter[Path] = Counter()
    for item in items:
        cost[item.path] += sum(MARK_COST.get(mark.name, 0) for mark in item.iter_markers())
    items.sort(key=lambda item: -cost[item.path])  # stable: a file's tests keep their order


# What pytest's plugins and then the test modules import (torch, scipy, pandas, Ray: millions of
# objects) lives as long as the process: out of the garbage collector's way, whose full passes
# would scan it all again (a seventh of the fast lane's CPU time), and collected with it paused,
# as a job's processes import (cluster.collector_paused).
def pytest_configure(config: pytest.Config) -> None:
    gc.freeze()
    gc.disable()
    if not hasattr(config, "workerinput"):
        config.stash[_SHARED_RAY] = _share_ray()


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        _unshare_ray(config.stash[_SHARED_RAY])


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """After collection, before the tests, in every process (pytest-xdist's controller collects
    nothing, and a worker's collection errors end it here too): the collector back on."""
    gc.freeze()
    gc.enable()


def _refuse(request: pytest.FixtureRequest, what: str, marker: str) -> Callable[..., None]:
    fixtures = ", ".join(name for name, marks in MARKED_BY.items() if marks == marker)
    message = f"{request.node.nodeid} {what} but is not marked {marker!r}: request one of its fixtures ({fixtures})"

    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail(message, pytrace=False)  # an OutcomeException: no `except Exception` swallows it

    return refuse


def _answers(url: str | None) -> bool:
    """Whether something listens at the dashboard ``url`` (None: Ray would look for one)."""
    if url is None:
        return True
    parsed = urlparse(url if "://" in url else f"http://{url}")
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 8265), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _enforce_markers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``ray``: starting Ray (``ray.init``, ``ray start`` through ``local_ray.start``, a
    simulated cluster) fails, and so does a Job Submission client for a dashboard that answers;
    one where nothing listens is left to fail as it would (the tests of unreachable clusters).
    Without ``training``: an epoch of the training loop fails (validation before it may run).
    Only this process is guarded: a test's subprocesses start from its own code."""
    if request.node.get_closest_marker("ray") is None:
        import ray
        import ray.cluster_utils
        import ray.job_submission

        from cluster.client import local_ray

        refuse = _refuse(request, "starts or connects to Ray", "ray")
        monkeypatch.setattr(ray, "init", refuse)
        monkeypatch.setattr(ray.cluster_utils, "Cluster", refuse)
        monkeypatch.setattr(local_ray, "start", refuse)
        client = ray.job_submission.JobSubmissionClient

        def unreachable_only(address: str | None = None, *args: object, **kwargs: object) -> object:
            if _answers(address):
                refuse()
            return client(address, *args, **kwargs)

        monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", unreachable_only)
    if request.node.get_closest_marker("training") is None:
        import certlib.training.train

        monkeypatch.setattr(certlib.training.train, "_epoch", _refuse(request, "runs the training loop", "training"))


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    from tests.helpers import CIFAR10_DIR

    if not (CIFAR10_DIR / "test_batch.bin").is_file():
        pytest.skip(f"CIFAR-10 binary version not found at {CIFAR10_DIR}")
    return CIFAR10_DIR


@pytest.fixture(scope="session")
def dssn_paper() -> pd.DataFrame:
    import pandas as pd

    from tests.helpers import DSSN_PAPER_FILE

    if not DSSN_PAPER_FILE.is_file():
        pytest.skip(f"the DSSN paper's per-image results are not at {DSSN_PAPER_FILE}")
    return pd.read_parquet(DSSN_PAPER_FILE)


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture
def coarse_zhang_curves(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Zhang et al.'s radius curves from 2,000 samples of pi0 instead of the families' 100,000,
    on a radius grid ten times coarser (ratio 1.05 instead of 1.005: a radius rounds down by up
    to 5% instead of 0.5%): a twentieth of the time. For tests of how sweeps, rows,
    re-certification and tables carry the radii, whose assertions hold at any sample count and
    on any grid. The curve's own tests (test_dual_certificate.py) keep the families' count and
    grid; the curve cache is emptied on both sides so that no coarse curve reaches them."""
    import certlib.families.zhang
    from certlib.certificates import dual

    monkeypatch.setattr(certlib.families.zhang, "CURVE_SAMPLES", 2_000)
    monkeypatch.setattr(dual, "RADIUS_RATIO", 1.05)
    dual.radius_curve.cache_clear()
    yield
    dual.radius_curve.cache_clear()


@pytest.fixture(scope="session")
def fresh_python() -> FreshPython:
    """Python interpreters of the test's own, for what only a fresh process shows (what an
    import pulls in, what is set at import) and for harnesses that fork per case: seconds each,
    as most import torch."""
    from tests.helpers import FreshPython

    return FreshPython()


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="session")
def train_model() -> Callable[..., ModelCard]:
    """The training loop (``certlib.training.train.train_model``), for tests that train in
    this process."""
    from certlib.training.train import train_model

    return train_model


@pytest.fixture(scope="session")
def trained_digits_dssn(
    train_model: Callable[..., ModelCard], tmp_path_factory: pytest.TempPathFactory
) -> TrainedModel:
    """A small CNN trained on digits under DSSN noise at sigma 0.5, seed 0, with the paper
    defaults (30 epochs, seconds on a CPU): trained once for the session and shared by the tests
    that need a trained model but not a training run of their own. Copy it to change it."""
    from certlib.data import load_digits
    from certlib.training.config import TrainConfig
    from tests.helpers import TrainedModel, quiet

    path = tmp_path_factory.mktemp("trained") / "dssn-standard-0.5-0.pt"
    config = TrainConfig("digits", "dssn", 0.5, seed=0)
    card = train_model(config, path, load_digits("train"), load_digits("test"), log=quiet)
    return TrainedModel(path, card)


@pytest.fixture(scope="session")
def trains_in_ray_job() -> None:
    """For a test whose Ray job trains models in its workers, where this process's guard cannot
    see them: the test is marked ``training`` all the same."""


# --------------------------------------------------------------------------- Ray


# One private Ray instance serves the whole run: the first process to need it starts it, the
# others (pytest-xdist's workers) attach to it, and the process that ran pytest (the controller,
# or the only process) stops it once every test has ended. Each instance costs seconds of CPU to
# start and a twentieth of a core while it runs. Its folder, made before the workers start (they
# inherit its name), holds Ray's token for every Ray the tests start or reach (so that
# ``local_ray.start``, which makes the token file 0600, never touches the user's ~/.ray), the
# lock and the instance's record.
SHARED_RAY = "CERTIFY_TEST_RAY"
_SHARED_RAY = pytest.StashKey[tuple[Path, dict[str, str | None]]]()


def _share_ray() -> tuple[Path, dict[str, str | None]]:
    """The run's folder and token, named in the environment; returns what it replaced."""
    import secrets

    folder = Path(tempfile.mkdtemp(prefix="certify-test-ray-"))
    token = folder / "auth_token"
    with os.fdopen(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(secrets.token_hex(32))
    replaced = {name: os.environ.get(name) for name in (SHARED_RAY, "RAY_AUTH_TOKEN_PATH")}
    os.environ.update({SHARED_RAY: str(folder), "RAY_AUTH_TOKEN_PATH": str(token)})
    return folder, replaced


def _unshare_ray(shared: tuple[Path, dict[str, str | None]]) -> None:
    """Stop the run's instance if one runs, and put the environment back."""
    from cluster.client import local_ray

    folder, replaced = shared
    instance = local_ray.load_record(folder / "instance.json")
    if instance is not None:
        local_ray.stop(instance, grace_seconds=STOP_GRACE_SECONDS)
    shutil.rmtree(folder, ignore_errors=True)
    for name, value in replaced.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """The run's private local Ray instance (2 CPUs per pytest process, dashboard on 127.0.0.1
    for the Job Submission API), on ports and in a directory of its own: a Ray the user already
    runs (the quickstart leaves one up) is neither attached to nor disturbed. Yields its
    ``LocalRay`` (gcs_address, dashboard_url); this process is connected to it. Shared by the
    run's processes: a test finds the Ray's jobs, actors and tasks of other tests beside its own."""
    ray = pytest.importorskip("ray")
    from cluster.client import local_ray

    folder = Path(os.environ[SHARED_RAY])
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        instance = local_ray.load_record(folder / "instance.json")
        if instance is None:
            processes = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
            instance = local_ray.start(num_cpus=2 * processes, private=True, object_store_bytes=1 << 30)
            local_ray.save_record(instance, folder / "instance.json")
    try:
        ray.init(address=instance.gcs_address, log_to_driver=False)
        yield instance
    finally:
        ray.shutdown()


@pytest.fixture
def own_ray() -> Iterator[Callable[..., object]]:
    """Starts private local Ray instances that the test owns (``local_ray.start(private=True,
    ...)``), for a test that kills parts of one or stops it: the session's instance stays
    whole. Whatever the test left running is stopped afterwards."""
    from cluster.client import local_ray

    started: list[local_ray.LocalRay] = []

    def start(**options: object) -> local_ray.LocalRay:
        started.append(local_ray.start(private=True, **options))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for instance in started:
        local_ray.stop(instance, grace_seconds=STOP_GRACE_SECONDS)


@pytest.fixture
def ray_cluster() -> Iterator[Callable[..., tuple[object, list[object]]]]:
    """Starts a simulated multi-node cluster (``helpers.simulated_cluster``) and connects this
    process to it; its connection to the session's Ray, if any, is set aside meanwhile and
    restored afterwards, so the tests after it find the session's Ray as they expect."""
    import ray

    from tests.helpers import simulated_cluster

    previous = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    with contextlib.ExitStack() as stack:

        def start(nodes: int, **head_args: object) -> tuple[object, list[object]]:
            ray.shutdown()
            cluster, workers = stack.enter_context(simulated_cluster(nodes, "certify-mn-", **head_args))
            ray.init(address=cluster.address, log_to_driver=False)
            return cluster, workers

        yield start
    if previous is not None:
        ray.init(address=previous, log_to_driver=False)
