"""Local Ray instances this product starts, and stops without touching any other.

``certify submit-job`` starts the embedded instance (dashboard on 127.0.0.1:8265) when none
answers; ``certify stop`` shuts it down. Tests and benchmarks start private instances: every
port chosen free and a temporary directory of their own, so that a Ray the user already runs
(the quickstart leaves one up) is neither attached to nor disturbed.

``ray stop`` would kill every Ray process on the machine. An instance started here runs in a
process group of its own (``ray start`` in a new session), and stopping it signals that group
and the few processes that leave it (job drivers, workers), recognised by its GCS address.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

RECORD = Path.home() / ".certify" / "local-ray.json"  # the embedded instance certify started
START_SECONDS = 90.0


@dataclass(frozen=True)
class LocalRay:
    """A Ray instance started on this machine: its addresses and its process group."""

    gcs_address: str  # "ip:port", for ray.init(address=...)
    dashboard_url: str  # "http://127.0.0.1:port", for the Job Submission API
    pgid: int
    temp_dir: str | None  # None: Ray's default (/tmp/ray)

    def processes(self) -> list[psutil.Process]:
        """Its live processes: the group ``ray start`` created (while its GCS server still runs
        in it, so that a reused group id never counts), and those that left the group but name
        its GCS address or temporary directory on their command line."""
        return self._scan()[0]

    def alive(self) -> bool:
        """Whether its GCS server still runs."""
        return self._scan()[1]

    def _scan(self) -> tuple[list[psutil.Process], bool]:
        gcs = f"--gcs_server_port={self.gcs_address.rsplit(':', 1)[1]}"
        mark = re.compile(
            "|".join(re.escape(m) + r"(?![\w.])" for m in [self.gcs_address, *filter(None, [self.temp_dir])])
        )
        group, marked, own_gcs = [], [], False
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.pid == os.getpid():
                continue
            try:
                cmdline = " ".join(proc.info["cmdline"] or [])
                in_group = os.getpgid(proc.pid) == self.pgid
            except (psutil.Error, OSError):
                continue
            if in_group:
                group.append(proc)
                own_gcs |= "gcs_server" in cmdline and gcs in cmdline
            elif mark.search(cmdline):
                marked.append(proc)
        return (group if own_gcs else []) + marked, own_gcs


def ray_cli() -> list[str]:
    ray = shutil.which("ray")
    return [ray] if ray else [sys.executable, "-m", "ray.scripts.scripts"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_token(env: dict) -> None:
    if not (Path.home() / ".ray" / "auth_token").is_file() and not env.get("RAY_AUTH_TOKEN"):
        subprocess.run(ray_cli() + ["get-auth-token", "--generate"], env=env, check=True, capture_output=True)


def _private_args(temp_dir: str) -> list[str]:
    """`ray start` arguments that keep an instance off every other's ports and files."""
    ports = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
        "ray-client-server-port",
        "node-manager-port",
        "object-manager-port",
    )
    return [f"--temp-dir={temp_dir}", "--min-worker-port=0", "--max-worker-port=0"] + [
        f"--{name}={free_port()}" for name in ports
    ]


def start(
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    private: bool = False,
    dashboard_port: int = 8265,
    object_store_bytes: int | None = None,
) -> LocalRay:
    """Start a head node (dashboard on 127.0.0.1, Ray's token authentication on).

    ``private``: every port chosen free, workers on random ports and a temporary directory of
    its own, so that it can run beside any other instance. Raises RuntimeError (one line) when
    Ray does not start or its dashboard does not answer within START_SECONDS."""
    env = dict(os.environ, RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    _ensure_token(env)
    gcs_port = free_port() if private else 6379
    dashboard_port = free_port() if private else dashboard_port
    args = [
        "start",
        "--head",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    temp_dir = tempfile.mkdtemp(prefix="certify-ray-") if private else None
    if temp_dir is not None:
        args += _private_args(temp_dir)
    resources = {"num-cpus": num_cpus, "num-gpus": num_gpus, "object-store-memory": object_store_bytes}
    args += [f"--{name}={value}" for name, value in resources.items() if value is not None]
    # A new session: every daemon `ray start` leaves behind keeps this process group.
    started = subprocess.Popen(
        ray_cli() + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    output, _ = started.communicate(timeout=START_SECONDS)
    instance = LocalRay(
        gcs_address=_gcs_address(output, gcs_port),
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        pgid=started.pid,
        temp_dir=temp_dir,
    )
    if started.returncode != 0:
        stop(instance)
        lines = [line for line in output.strip().splitlines() if line.strip()] or ["no output"]
        raise RuntimeError(f"could not start a local Ray instance: {lines[-1].strip()}")
    _wait_for_dashboard(instance)
    return instance


def _gcs_address(output: str, port: int) -> str:
    """The head's GCS address as `ray start` printed it (its IP may not be 127.0.0.1)."""
    found = re.search(rf"--address='?([\w.:-]+):{port}(?!\d)", output)
    return f"{found.group(1)}:{port}" if found else f"127.0.0.1:{port}"


def _wait_for_dashboard(instance: LocalRay) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + START_SECONDS
    while time.time() < deadline:
        try:
            JobSubmissionClient(instance.dashboard_url).list_jobs()
            return
        except Exception:  # noqa: BLE001 - the dashboard takes a few seconds to come up
            time.sleep(0.5)
    stop(instance)
    raise RuntimeError(f"the local Ray instance started but its dashboard did not answer within {START_SECONDS:.0f} s")


def stop(instance: LocalRay, grace_seconds: float = 5.0) -> int:
    """Terminate the instance's processes (SIGTERM, then SIGKILL after ``grace_seconds``) and
    remove its private temporary directory; returns how many processes were signalled."""
    procs = instance.processes()
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_seconds)
    for proc in alive + instance.processes():
        try:
            proc.kill()
        except psutil.Error:
            pass
    if instance.temp_dir:
        shutil.rmtree(instance.temp_dir, ignore_errors=True)
    return len(procs)


def save_record(instance: LocalRay) -> None:
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(asdict(instance)))


def load_record() -> LocalRay | None:
    """The embedded instance certify started, if it still runs."""
    try:
        instance = LocalRay(**json.loads(RECORD.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return instance if instance.alive() else None


def forget_record() -> None:
    RECORD.unlink(missing_ok=True)
