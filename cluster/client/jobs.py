"""The job queue on Ray's Job Submission API, as the ``certify`` commands use it: which
dashboard to talk to, following a job to its real end through transient faults, and reading
a job's progress without its whole log.

Ray keeps a job RUNNING when the node of its driver dies (the dashboard agent and the
runtime-env agent fate-share with their raylet), so a follower that trusted the job status
alone would wait forever; ``follow`` also asks whether the driver's node is alive.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cluster.record import PROGRESS_PREFIX, progress_file

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

LOCAL_DASHBOARD = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
TAIL_LINES = 2000  # log lines read from the end when the progress file is not readable here
RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # seconds between attempts to reach the dashboard: doubling up to this
GIVE_UP_SECONDS = 900.0  # a dashboard unreachable this long is reported as such
# How often a log stream, or a wait without logs, asks whether its job ended: Ray's stream
# closes about 2 s after the end (its tail sleeps a second between reads of the file, and reads
# once more after the end). A status request costs the dashboard and this process about 10 ms
# of CPU.
END_POLL_SECONDS = 1.0


class ClusterError(RuntimeError):
    """The cluster cannot be reached or refused a request; one line."""


def job_status(value) -> str:
    """'RUNNING' from a JobStatus, a JobInfo or a string."""
    return str(getattr(value, "status", value)).split(".")[-1]


def first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def dashboard_address(address: str | None) -> str | None:
    """The dashboard URL to submit to: ``address``, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS;
    ``auto`` is the Ray cluster running on this machine; None means the embedded local
    instance (LOCAL_DASHBOARD). A GCS or Ray Client address is refused with the right form."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        return None
    if address == "auto":
        return _running_local_dashboard()
    if address.startswith("ray://") or ":10001" in address or ":6379" in address:
        raise ClusterError(f"address {address}: give the dashboard address (http://<head>:8265) for job submission")
    return address if "://" in address else f"http://{address}"


def _running_local_dashboard() -> str:
    from ray._private.services import canonicalize_bootstrap_address
    from ray.dashboard.utils import ray_address_to_api_server_url

    try:
        if canonicalize_bootstrap_address("auto") is None:
            raise ConnectionError("none found")
        return ray_address_to_api_server_url("auto")
    except Exception as err:  # noqa: BLE001 - none running, several, or a stale one
        raise ClusterError(f"RAY_ADDRESS=auto: no single running local Ray cluster ({first_line(err)})") from None


def is_remote(url: str | None, client: JobSubmissionClient | None = None) -> bool:
    """Whether jobs submitted to the dashboard ``url`` run on other machines: then paths are the
    cluster's and are not checked here, and the entry point is the cluster's ``python``.

    Decided by asking the cluster, not by the address's host name: the documented workflow
    reaches a remote head through an SSH tunnel at http://127.0.0.1:8265. The dashboard names
    its Ray session (``/api/version``: a name made of the start time and a process id); the
    cluster is local when a Ray of that session runs on this machine (``local_sessions``). A
    dashboard that names none (an older Ray, a proxy) is judged by its host name. ``client``:
    a connection to ``url`` already made (else one is made; ClusterError where none answers)."""
    if not url:
        return False
    session = cluster_session(client if client is not None else connect(url))
    if session is None:
        from urllib.parse import urlparse

        return urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1")
    return session not in local_sessions()


def cluster_session(client: JobSubmissionClient) -> str | None:
    """The session name the dashboard behind ``client`` reports (None where it reports none)."""
    try:
        response = client._do_request("GET", "/api/version")  # the client's helper: it authenticates
        session = response.json().get("session_name") if response.status_code == 200 else None
    except Exception:  # noqa: BLE001 - an answer that is not the version record names no session
        return None
    return session if isinstance(session, str) and session else None


def local_sessions() -> set[str]:
    """The session names of the Ray clusters whose GCS server runs on this machine, read from
    the servers' command lines (``--session-name=``; only read, nothing signalled), and of the
    embedded instance ``certify`` started (its record, ``local_ray.load_record``: the session
    its temporary directory's ``session_latest`` names), in case its processes are hidden."""
    import psutil

    from cluster.client import local_ray

    names = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if cmdline and os.path.basename(cmdline[0]) == "gcs_server":
            names |= {arg.split("=", 1)[1] for arg in cmdline if arg.startswith("--session-name=")}
    try:
        instance = local_ray.load_record()
        if instance is not None:
            temp_dir = getattr(instance, "temp_dir", None) or os.path.join(tempfile.gettempdir(), "ray")
            names.add(os.path.basename(os.path.realpath(os.path.join(temp_dir, "session_latest"))))
    except Exception:  # noqa: BLE001 - an unreadable record names no session; the scan above stands
        pass
    return names


def connect(url: str) -> JobSubmissionClient:
    """Ray's JobSubmissionClient for the dashboard at ``url``; ClusterError where none answers.
    A dashboard addressed on this machine is first knocked at with a bare TCP connection, so that
    `certify list` and `status` without a running Ray say so before importing Ray (a second)."""
    from urllib.parse import urlparse

    if urlparse(url).hostname in ("127.0.0.1", "localhost", "::1"):
        _knock(url)
    import logging

    from ray.job_submission import JobSubmissionClient

    # Ray's client logs each package upload and closed stream at INFO: its bookkeeping, not ours.
    logging.getLogger("ray").setLevel(logging.WARNING)

    try:
        return JobSubmissionClient(url)
    except Exception as err:  # noqa: BLE001 - connection failures come in many types
        raise ClusterError(f"cannot reach the Ray cluster at {url}: {first_line(err)}") from None


def _knock(url: str) -> None:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 8265), timeout=5):
            pass
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at {url}: {first_line(err)}") from None


class Backoff:
    """Doubling waits between attempts; gives up after GIVE_UP_SECONDS of failures in a row."""

    def __init__(
        self,
        first: float = RETRY_FIRST,
        most: float = RETRY_MAX,
        give_up: float = GIVE_UP_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.first, self.most, self.give_up, self.sleep, self.clock = first, most, give_up, sleep, clock
        self.delay, self.failing_since = first, None

    delay: float
    failing_since: float | None

    def reset(self) -> None:
        self.delay, self.failing_since = self.first, None

    def wait(self, what: str, err: BaseException, echo: Callable[[str], None]) -> None:
        """After a failed attempt: wait, or raise ClusterError once failures have lasted too long."""
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
        if now - self.failing_since >= self.give_up:
            raise ClusterError(
                f"{what}: the dashboard did not answer for {self.give_up:.0f} s ({first_line(err)}); "
                "the job may still run: ask again with `certify status`"
            )
        echo(f"[certify] {what}: {first_line(err)}; retrying in {self.delay:.0f} s")
        self.sleep(self.delay)
        self.delay = min(self.most, 2 * self.delay)


def follow(
    client,
    job_id: str,
    echo: Callable[[str], None],
    *,
    show_logs: bool = True,
    backoff: Backoff | None = None,
    on_poll: Callable[[], None] | None = None,
) -> str:
    """Print the job's log as it grows (Ray's log tailing) until the job ends; returns its end:
    SUCCEEDED, FAILED or STOPPED, or LOST when its driver's node died while Ray still lists it
    as running. Transient faults (a dashboard answering 500, a dropped connection, a dead
    agent) are retried with ``backoff``. ``on_poll`` runs before each status check (every
    END_POLL_SECONDS without logs): a progress bar moves with this loop rather than a second one."""
    backoff = backoff or Backoff()
    printed = [0]  # characters of the log already shown: a re-opened stream starts from the top
    while True:
        if show_logs:
            try:
                _stream(client, job_id, printed, echo)
            except Exception as err:  # noqa: BLE001 - the agent serving logs is unreachable: poll status
                echo(f"[certify] log stream interrupted: {first_line(err)}")
        try:
            if on_poll is not None:
                on_poll()
            status = job_status(client.get_job_status(job_id))
            lost = None if status in TERMINAL else driver_node_death(client, job_id)
        except Exception as err:  # noqa: BLE001
            backoff.wait("job status", err, echo)
            continue
        backoff.reset()
        if status in TERMINAL:
            return status
        if lost is not None:
            echo(f"[certify] {job_id}: the node of its driver died ({lost}); Ray still lists the job as running")
            return "LOST"
        if show_logs:
            backoff.wait("log stream", ConnectionError("closed while the job runs"), echo)
        else:
            time.sleep(END_POLL_SECONDS)


def _stream(client, job_id: str, printed: list[int], echo: Callable[[str], None]) -> None:
    """Echo the log beyond its first ``printed[0]`` characters until the job ends or the stream
    breaks; ``printed[0]`` follows what has been shown either way. The job's status is asked
    every END_POLL_SECONDS beside the stream: once it has ended, the rest of its log (complete:
    the driver has exited) is read at once rather than waiting for Ray to close the stream."""

    def show(text: str, start: int) -> None:  # ``text`` is the log from character ``start`` on
        new = text[max(0, printed[0] - start) :]
        if new:
            echo(new.rstrip("\n"))
            printed[0] = start + len(text)

    async def tail() -> None:
        seen = 0
        async for chunk in client.tail_job_logs(job_id):
            show(chunk, seen)
            seen += len(chunk)

    async def ended() -> None:
        while True:
            await asyncio.sleep(END_POLL_SECONDS)
            try:
                if job_status(await asyncio.to_thread(client.get_job_status, job_id)) in TERMINAL:
                    return
            except Exception:  # noqa: BLE001 - follow's own status check retries and reports it
                continue

    async def run() -> None:
        streaming, ending = asyncio.ensure_future(tail()), asyncio.ensure_future(ended())
        done, _ = await asyncio.wait({streaming, ending}, return_when=asyncio.FIRST_COMPLETED)
        for task in (streaming, ending):
            task.cancel()
        if streaming in done and (ending not in done or streaming.exception() is None):
            streaming.result()  # its error, if it broke while the job runs
            return
        show(await asyncio.to_thread(client.get_job_logs, job_id), 0)

    asyncio.run(run())


def driver_node_death(client, job_id: str) -> str | None:
    """Why the node of the job's driver died, or None while it is alive (or not yet known)."""
    from ray.util.state import get_node

    node_id = client.get_job_info(job_id).driver_node_id
    if not node_id:
        return None
    node = get_node(node_id, address=client.get_address())
    if node is None or node.state != "DEAD":
        return None
    return (getattr(node, "state_message", None) or "no reason given").strip().splitlines()[0]


def latest_progress(client, job_id: str, output: str | None) -> dict | None:
    """The job's latest progress record: ``<output>.job/progress.json`` where this machine reads
    the output directory and the file is this job's, else the last progress line among the
    last TAIL_LINES lines of its log (Ray's log tail API reads from the end, never the whole
    log)."""
    if output:
        try:
            record = json.loads(progress_file(output).read_text())
            if record.get("job_id") == job_id:
                return record
        except (OSError, ValueError):
            pass
    try:
        lines = log_tail(client, job_id, TAIL_LINES).splitlines()
    except Exception:  # noqa: BLE001 - no log yet, or its node is gone
        return None
    return last_progress_line(lines)


def log_tail(client, job_id: str, lines: int) -> str:
    """The last ``lines`` lines of the job's driver log, read from the end of the file by the
    node's log agent (the dashboard's log API; ``ray.util.state.get_log`` would want the GCS
    address). Through the client's own request helper, which carries its authentication."""
    node_id = client.get_job_info(job_id).driver_node_id  # the log agent of the driver's node serves it
    response = client._do_request(
        "GET",
        "/api/v0/logs/file",
        params={
            "submission_id": job_id,
            "node_id": node_id,
            "lines": lines,
            "timeout": 30,
            "suffix": "out",
            "attempt_number": 0,
        },
    )
    if response.status_code != 200:
        raise ClusterError(f"log of {job_id}: {first_line(RuntimeError(response.text))}")
    return response.content.decode("utf-8", errors="replace")


def last_progress_line(lines: list[str]) -> dict | None:
    for line in reversed(lines):
        if PROGRESS_PREFIX in line:
            try:
                return json.loads(line.split(PROGRESS_PREFIX, 1)[1])
            except json.JSONDecodeError:  # a line cut by the tail
                continue
    return None
