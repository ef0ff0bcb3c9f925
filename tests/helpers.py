"""What several test modules share and is not a fixture: the real data's locations, model
checkpoints without training, small classifiers written as torch modules, a simulated Ray
cluster, and the DSSN paper's printed Table 1. Fixtures live in ``conftest.py``; a test module
imports from here, never from another test module."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from certlib.checkpoints.checkpoint import ModelCard

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# bench/gpu_check.py points it at the CIFAR-10 subset staged on the GPU machine (no ../shared there).
CIFAR10_DIR = Path(os.environ.get("CERTIFY_TEST_CIFAR10") or SHARED_DATA / "cifar-10-batches-bin")
DSSN_PAPER_FILE = SHARED_DATA / "dssn-paper-cifar10" / "certificates.parquet"

RADII = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]

# Table 1 of Levine & Feizi 2021 as printed: (certified %, clean %, sigma) per radius.
TABLE_1 = {
    ("uniform_additive", "standard"): [
        (70.54, 83.97, 0.5),
        (58.43, 78.70, 1.0),
        (50.73, 73.05, 1.75),
        (43.16, 73.05, 1.75),
        (33.24, 69.56, 2.0),
        (25.98, 62.48, 2.5),
        (20.66, 53.38, 3.5),
        (17.12, 53.38, 3.5),
    ],
    ("uniform_additive", "stability"): [
        (71.09, 78.79, 0.5),
        (60.36, 74.27, 0.75),
        (52.86, 65.88, 1.5),
        (47.08, 63.32, 1.75),
        (42.26, 57.49, 2.5),
        (38.55, 57.49, 2.5),
        (33.76, 57.49, 2.5),
        (27.12, 57.49, 2.5),
    ],
    ("dssn", "standard"): [
        (72.25, 81.50, 0.75),
        (63.07, 77.85, 1.25),
        (56.21, 71.17, 2.25),
        (51.33, 67.98, 3.0),
        (46.76, 65.40, 3.5),
        (42.66, 65.40, 3.5),
        (38.26, 65.40, 3.5),
        (33.64, 65.40, 3.5),
    ],
    ("dssn", "stability"): [
        (71.23, 79.00, 0.5),
        (61.04, 71.29, 1.0),
        (54.21, 66.04, 1.5),
        (49.39, 64.26, 1.75),
        (45.45, 59.88, 2.5),
        (42.67, 57.16, 3.0),
        (39.46, 56.29, 3.25),
        (36.46, 54.96, 3.5),
    ],
}


class FreshPython:
    """This interpreter's executable, started from the checkout (``tests/`` importable)."""

    def run(self, code: str, *, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """``python -c code``, its output captured as text."""
        return subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``python *args``, its output piped as text."""
        environment = dict(os.environ if env is None else env)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


class TrainedModel(NamedTuple):
    """A checkpoint a fixture trained, and the card training returned for it."""

    path: Path
    card: ModelCard


def quiet(_line: str) -> None:
    """A ``log`` that drops the line: the tests read what they assert on, not the chatter."""


def quickstart_like(training: str = "standard") -> pd.DataFrame:
    """The quickstart's shape: DSSN and uniform rows of digits at three sigmas and two seeds,
    each model certified at the sigma it was trained at; radii drawn so that curves cross."""
    rng = np.random.default_rng(0)
    frames = []
    for method in ("dssn", "uniform"):
        for sigma in (0.25, 0.5, 1.0):
            for seed in (0, 1):
                n = 60
                correct = rng.random(n) < 0.95 - 0.2 * sigma
                frames.append(
                    pd.DataFrame(
                        {
                            "method": method,
                            "training": training,
                            "sigma": sigma,
                            "training_sigma": sigma,
                            "seed": seed,
                            "image_index": np.arange(n),
                            "label": 1,
                            "selected": np.where(correct, 1, 2),
                            "prediction": np.where(correct, 1, 2),
                            "radius_l1": rng.uniform(0, 2.5 * sigma, n),
                            "alpha": 0.001 if method == "uniform" else np.nan,
                            "dataset": "digits",
                            "split": "test",
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)


def random_checkpoint(
    path: Path,
    dataset: Any,
    method: str,
    sigma: float,
    seed: int,
    training: str = "standard",
    architecture: str = "small_cnn",
    poison: bool = False,
) -> Path:
    """A checkpoint of a randomly initialised model with a matching card, for tests whose
    assertions do not depend on accuracy (no training); with ``poison`` its weights are NaN, so
    that certifying it fails. ``dataset`` is a QuantizedDataset or anything with its fields."""
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


def random_cnn(in_channels: int, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A small randomly initialised CNN whose predictions vary across noisy copies (logits
    scaled up), for 8x8 one-channel or 32x32 three-channel images."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(num_classes),
    )
    model(torch.zeros(1, in_channels, 8, 8) if in_channels == 1 else torch.zeros(1, in_channels, 32, 32))
    with torch.no_grad():
        model[-1].weight.mul_(20)  # make the logits depend strongly on the noisy pixels
    return model.eval()


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


@contextlib.contextmanager
def simulated_cluster(nodes: int, prefix: str, **head_args: Any) -> Iterator[tuple[Any, list[Any]]]:
    """A Ray cluster of ``nodes`` simulated nodes in this process (``ray.cluster_utils``): a
    head without CPUs, and nodes with one CPU and one (fake) GPU each, every port chosen free
    and a temporary directory of its own, so that it runs beside any other Ray. Yields the
    cluster and its nodes; shuts Ray, the cluster and its directory down afterwards."""
    import ray
    import ray._private.utils
    from ray.cluster_utils import Cluster

    from cluster.client.ports import free_ports

    write_ray_address = ray._private.utils.write_ray_address
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None  # leave /tmp/ray's pointer alone
    temp_dir = tempfile.mkdtemp(prefix=prefix)  # short: Ray's socket paths must fit 107 bytes
    gcs, client, *agents = free_ports(2 + 1 + nodes)
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "gcs_server_port": gcs,
                "include_dashboard": False,
                "ray_client_server_port": client,
                "dashboard_agent_listen_port": agents[0],
                "include_log_monitor": False,  # its drivers take no worker output (log_to_driver=False)
                "temp_dir": temp_dir,
                **head_args,
            },
        )
        try:
            yield (
                cluster,
                [cluster.add_node(num_cpus=1, num_gpus=1, dashboard_agent_listen_port=port) for port in agents[1:]],
            )
        finally:
            ray.shutdown()
            cluster.shutdown()
    finally:
        ray._private.utils.write_ray_address = write_ray_address
        shutil.rmtree(temp_dir, ignore_errors=True)


class StubDashboard:
    """A dashboard of a cluster that runs elsewhere, as an SSH tunnel shows it on 127.0.0.1:
    Ray's Job Submission API answered with a session name no Ray here has, package uploads
    accepted, and every submission kept (``submitted``)."""

    SESSION = "session_2001-01-01_00-00-00_000000_1"

    def __init__(self):
        import http.server
        import threading

        stub = self
        self.submitted: list[dict] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body=None):
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                import ray

                if self.path == "/api/version":
                    version = {"version": "4", "ray_version": ray.__version__, "ray_commit": "stub"}
                    self._answer(200, version | {"session_name": stub.SESSION})
                elif self.path.startswith("/api/jobs"):
                    self._answer(200, [])
                else:
                    self._answer(404, {})

            def do_PUT(self):
                self._body()
                self._answer(200, {})

            def do_POST(self):
                body = json.loads(self._body())
                stub.submitted.append(body)
                self._answer(200, {"job_id": "raysubmit_stub", "submission_id": body["submission_id"]})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubDashboard:
        self.thread.start()
        return self

    def admit(self, monkeypatch: Any) -> None:
        """Let a test without ``ray`` connect to this stub: the suite's guard (conftest) refuses
        a Job Submission client for any dashboard that answers, and this one is no Ray. Every
        other address still goes through the guard."""
        import ray.job_submission
        from ray.dashboard.modules.job.sdk import JobSubmissionClient

        guarded = ray.job_submission.JobSubmissionClient

        def client(address: str | None = None, *args: Any, **kwargs: Any) -> Any:
            if address == self.url:
                return JobSubmissionClient(address, *args, **kwargs)
            return guarded(address, *args, **kwargs)

        monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", client)

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
