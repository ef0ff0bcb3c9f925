"""The job queue as a user meets it beyond the happy path: a dashboard that answers 500 or
drops the log stream, an agent that dies with its node mid-job, `certify stop` (its safety:
test_local_ray_safety.py), and `RAY_ADDRESS=auto`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from click.testing import CliRunner

from certlib.data import load_digits
from cluster.cli import main
from cluster.client import jobs, local_ray
from cluster.record import PROGRESS_PREFIX, progress_file
from tests.helpers import random_checkpoint


class FlakyClient:
    """A Job Submission client whose dashboard fails now and then: the first log stream drops
    after one chunk, the first two status requests answer 500."""

    def __init__(self, end: str = "SUCCEEDED", failures: int = 2):
        self.streams = self.status_calls = 0
        self.end, self.failures = end, failures

    async def tail_job_logs(self, job_id):
        self.streams += 1
        yield "line 1\n"
        if self.streams == 1:
            raise ConnectionError("Request failed with status code 500: agent unreachable")
        yield "line 2\n"

    def get_job_status(self, job_id):
        self.status_calls += 1
        if self.status_calls <= self.failures:
            raise RuntimeError("Request failed with status code 500: No available agent")
        return self.end


def test_following_a_job_rides_out_dashboard_errors_and_prints_each_line_once():
    client, out, sleeps = FlakyClient(), [], []
    backoff = jobs.Backoff(sleep=sleeps.append)
    assert jobs.follow(client, "job", out.append, backoff=backoff) == "SUCCEEDED"
    printed = [line for line in out if not line.startswith("[certify]")]
    assert printed == ["line 1", "line 2"]
    assert sleeps == [1.0, 2.0] and client.status_calls == 3  # doubling waits, then the real end


class SlowClosingClient:
    """Ray's log stream as it ends: the job has ended (its whole log written) well before the
    stream delivers the last lines and closes."""

    LOG = "line 1\nline 2\ntable\ndone\n"

    def __init__(self):
        self.began = time.monotonic()

    async def tail_job_logs(self, job_id):
        yield "line 1\n"
        await asyncio.sleep(30)
        yield self.LOG[len("line 1\n") :]

    def get_job_status(self, job_id):
        return "SUCCEEDED" if time.monotonic() - self.began > 0.2 else "RUNNING"

    def get_job_logs(self, job_id):
        return self.LOG


def test_following_ends_with_the_job_not_with_rays_stream(monkeypatch):
    """The rest of the log is read once the job has ended: every line once, in order, without
    waiting for the stream to close."""
    monkeypatch.setattr(jobs, "END_POLL_SECONDS", 0.05)
    out: list[str] = []
    began = time.monotonic()
    assert jobs.follow(SlowClosingClient(), "job", out.append) == "SUCCEEDED"
    assert time.monotonic() - began < 10
    assert "\n".join(out) == SlowClosingClient.LOG.rstrip("\n")


def test_following_gives_up_with_one_line_when_the_dashboard_stays_away():
    clock = iter(range(0, 10_000, 100))
    backoff = jobs.Backoff(give_up=900, sleep=lambda s: None, clock=lambda: next(clock))
    with pytest.raises(jobs.ClusterError, match="did not answer for 900 s.*may still run"):
        jobs.follow(FlakyClient(failures=10**6), "job", lambda line: None, show_logs=False, backoff=backoff)


def test_progress_lines_are_found_from_the_end_of_a_log():
    lines = [
        "x",
        PROGRESS_PREFIX + json.dumps({"images_done": 1}),
        "y",
        PROGRESS_PREFIX + json.dumps({"images_done": 2}),
        PROGRESS_PREFIX + '{"images_do',
    ]
    assert jobs.last_progress_line(lines) == {"images_done": 2}  # the cut last line is skipped
    assert jobs.last_progress_line(["nothing"]) is None


def _spec(tmp_path: Path, name: str, limit: int, n: int) -> Path:
    digits = load_digits("test")
    models = tmp_path / "models"
    random_checkpoint(models / "uniform-standard-0.5-0.pt", digits, "uniform", 0.5, 0)
    spec = {
        "name": name,
        "output": str(tmp_path / "out"),
        "dataset": {"name": "digits", "limit": limit},
        "models": {"path": str(models / "{method}-{training}-{sigma}-{seed}.pt")},
        "methods": ["uniform"],
        "sigmas": [0.5],
        "certify": {"n0": 16, "n": n},
        "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "shard_size": 4},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _processes(instance: local_ray.LocalRay, named: str) -> list[psutil.Process]:
    """The instance's live processes whose command line holds ``named`` (one that ended
    meanwhile, a zombie included, has none to read)."""
    found = []
    for pid in instance.members():
        try:
            process = psutil.Process(pid)
            if named in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize("agent", ["DashboardAgent", "RuntimeEnvAgent"])
def test_wait_reports_the_true_end_when_an_agent_dies_mid_job(own_ray, tmp_path, agent):
    """Ray's agents fate-share with their raylet: the job's driver dies with the node, while the
    job stays RUNNING in Ray's records. `--wait` must say the job ended, not fail on a 500."""
    instance = own_ray(num_cpus=2, object_store_bytes=300 << 20)
    spec = _spec(tmp_path, "agent-death", limit=80, n=5_000)  # units of seconds: 20 of them outlast the kill
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "submit-job",
            str(spec),
            "--address",
            instance.dashboard_url,
            "--wait",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    progress = progress_file(tmp_path / "out")
    deadline = time.time() + 180
    while time.time() < deadline and not (progress.is_file() and json.loads(progress.read_text())["units_done"] >= 1):
        if waiting.poll() is not None:  # the command ended before the job got going: say why at once
            pytest.fail("submit-job ended early:\n" + waiting.communicate()[0][-3000:])
        time.sleep(0.2)
    assert progress.is_file(), "the job never reported progress"
    victims = _processes(instance, agent)
    assert victims, f"no {agent} process"
    for proc in victims:
        proc.kill()
    output, _ = waiting.communicate(timeout=180)
    assert waiting.returncode == 1, output
    last = output.strip().splitlines()[-1]
    assert "FAILED (its driver's node died" in last, output
    assert "node of its driver died" in output and "status code 500" not in last


def test_stop_shuts_down_only_the_instance_certify_started(ray_session, tmp_path, monkeypatch):
    """Without a record; with a Ray that certify did not start. Stopping the one it started,
    beside decoys and the test session's own instance: tests/test_local_ray_safety.py."""
    monkeypatch.setattr(local_ray, "RECORD", tmp_path / "local-ray.json")
    monkeypatch.setattr(jobs, "LOCAL_DASHBOARD", "http://127.0.0.1:9")  # nothing listens there
    assert CliRunner().invoke(main, ["stop"]).output.strip() == "no local Ray instance started by certify is running"

    monkeypatch.setattr(jobs, "LOCAL_DASHBOARD", ray_session.dashboard_url)  # a Ray certify did not start
    refused = CliRunner().invoke(main, ["stop"])
    assert refused.exit_code == 2 and "was not started by certify; stop it with `ray stop`" in refused.output
    assert ray_session.alive()


def test_ray_address_auto_means_the_running_local_cluster(ray_session, monkeypatch):
    import ray._private.services as services

    # Here two instances may run (the user's and this session's): point auto-detection at ours.
    for name in ("canonicalize_bootstrap_address", "canonicalize_bootstrap_address_or_die"):
        monkeypatch.setattr(services, name, lambda address=None, temp_dir=None: ray_session.gcs_address)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert jobs.dashboard_address(None) == ray_session.dashboard_url
    listed = CliRunner().invoke(main, ["list"])
    assert listed.exit_code == 0, listed.output


def test_ray_address_auto_without_a_cluster_is_one_line(monkeypatch):
    import ray._private.services as services

    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda address=None, temp_dir=None: None)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 2 and result.output.startswith(
        "error: RAY_ADDRESS=auto: no single running local Ray cluster"
    )
