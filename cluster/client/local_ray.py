"""Local Ray instances this product starts, and stops without touching any other.

``certify submit-job`` starts the embedded instance (dashboard on 127.0.0.1:8265) when none
answers; ``certify stop`` shuts it down. Tests and benchmarks start private instances: every
port chosen free and a temporary directory of their own, so that a Ray the user already runs
(the quickstart leaves one up) is neither attached to nor disturbed.

``ray stop`` would kill every Ray process on the machine. An instance started here is known by
the processes ``ray start`` left in the session of its own it runs in, each named by pid and
start time, and by their descendants (``processes``: the rules, and why a command line never
counts). Stopping it signals those and nothing else. A ``ray start`` that fails or outlives
START_SECONDS is stopped the same way, and its own error is reported in one line: no address
is ever assumed.

The embedded instance's record (RECORD) is read only when it is the current user's own regular
file that no one else may read or write (0600), in a directory no one else may write, with
exactly the fields certify writes; a temporary directory it names must carry the marker file
certify wrote into it, holding the random token the record names, before anything is removed.
A record that fails a check is refused with one line (``RecordError``); one whose processes no
longer run with their recorded start times names an instance that is gone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from cluster.client import processes
from cluster.client.ports import free_ports
from cluster.client.processes import Launch

RECORD = Path.home() / ".certify" / "local-ray.json"  # the embedded instance certify started
START_SECONDS = 90.0
# What a start that failed left (no job has run on it yet) gets this long after SIGTERM: a raylet
# caught mid-start ignores it until its start ends, which the default 5 s waited out in full.
FAILED_START_GRACE_SECONDS = 1.0
TEMP_PREFIX = "certify-ray-"  # a private instance's temporary directory
MARKER = ".certify-instance"  # in it: the token its LocalRay names


class RecordError(ValueError):
    """A record of a local Ray instance that certify will not act on; one line."""


@dataclass(frozen=True)
class LocalRay(Launch):
    """A Ray instance started on this machine: its addresses and its processes."""

    gcs_address: str  # "ip:port", for ray.init(address=...)
    dashboard_url: str  # "http://127.0.0.1:port", for the Job Submission API
    temp_dir: str | None = None  # None: Ray's default (/tmp/ray)
    marker: str | None = None  # the token in temp_dir/MARKER


def ray_cli() -> list[str]:
    """``ray`` of this very Python: the instance's workers then import the environment that
    started it. The first ``ray`` on PATH may belong to another interpreter (a pyenv shim, the
    system Python), whose workers would import another install of this product (seen: a job
    from a virtual environment whose workers ran another checkout's code)."""
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def secure_token(env: dict, notice: Callable[[str], None] = _stderr) -> None:
    """Ray's token file (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token), generated when missing,
    readable by its owner alone (Ray writes it 0644: anyone who reads it can submit jobs), in a
    directory no one else may write; one line of warning when it was readable by others."""
    if env.get("RAY_AUTH_TOKEN"):
        return
    default = Path.home() / ".ray" / "auth_token"
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else default
    if not path.exists():
        if path == default:  # where `ray get-auth-token --generate` writes it
            generate = ray_cli() + ["get-auth-token", "--generate"]
            subprocess.run(generate, env=env, check=True, capture_output=True, umask=0o077)
        else:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
                file.write(secrets.token_hex(32))
    mode, owner = path.stat().st_mode, path.stat().st_uid
    if mode & 0o044:
        notice(f"warning: Ray's token {path} was readable by others (mode {mode & 0o777:04o}): they could submit jobs")
    if owner == os.getuid() and mode & 0o077:
        path.chmod(0o600)
    folder = path.parent.stat()
    if path == default and folder.st_uid == os.getuid() and folder.st_mode & 0o022:
        path.parent.chmod(folder.st_mode & 0o755)


def _private_ports() -> dict[str, int]:
    """`ray start`'s port options for an instance beside any other: each port chosen free."""
    names = (
        "port",  # the GCS
        "dashboard-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
        "ray-client-server-port",
        "node-manager-port",
        "object-manager-port",
    )
    # Distinct: Ray refuses a port named for two components.
    return dict(zip(names, free_ports(len(names)), strict=True))


def private_temp_dir() -> tuple[str, str]:
    """A new temporary directory (0700) with the marker file that lets ``stop`` remove it:
    its path and the marker's token."""
    temp_dir, token = os.path.realpath(tempfile.mkdtemp(prefix=TEMP_PREFIX)), secrets.token_hex(16)
    with os.fdopen(os.open(Path(temp_dir) / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(token)
    return temp_dir, token


def start(
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    private: bool = False,
    dashboard_port: int = 8265,
    object_store_bytes: int | None = None,
    notice: Callable[[str], None] = _stderr,
) -> LocalRay:
    """Start a head node (dashboard on 127.0.0.1, Ray's token authentication on).

    ``private``: every port chosen free, workers on random ports and a temporary directory of
    its own, so that it can run beside any other instance. Raises RuntimeError (one line) when
    Ray does not start or its dashboard does not answer within START_SECONDS, after stopping
    what it started. ``notice``: where a warning about Ray's token goes (stderr)."""
    env = dict(os.environ, RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    secure_token(env, notice)
    ports = _private_ports() if private else {"port": 6379, "dashboard-port": dashboard_port}
    args = [
        "start",
        "--head",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--disable-usage-stats",
        # Its job drivers take no worker output (ray.init(log_to_driver=False)); the log monitor
        # would only re-read every worker's log file each second. The logs stay in the session
        # directory, where the dashboard reads them.
        "--include-log-monitor=false",
    ] + [f"--{name}={port}" for name, port in ports.items()]
    temp_dir, marker = private_temp_dir() if private else (None, None)
    if temp_dir is not None:
        args += [f"--temp-dir={temp_dir}", "--min-worker-port=0", "--max-worker-port=0"]
    resources = {"num-cpus": num_cpus, "num-gpus": num_gpus, "object-store-memory": object_store_bytes}
    args += [f"--{name}={value}" for name, value in resources.items() if value is not None]
    try:
        launch, failure, output = _launch(ray_cli() + args, env)
    except BaseException:
        _remove_temp_dir(temp_dir, marker)
        raise
    gcs_address = _gcs_address(output, ports["port"])
    if failure is None and gcs_address is None:
        failure = "`ray start` did not print the head's address"
    if failure is not None or gcs_address is None:
        launch.terminate(FAILED_START_GRACE_SECONDS, last=is_gcs)
        _remove_temp_dir(temp_dir, marker)
        raise RuntimeError(f"could not start a local Ray instance: {failure}")
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    instance = LocalRay(**asdict(launch), gcs_address=gcs_address, dashboard_url=url, temp_dir=temp_dir, marker=marker)
    try:
        _wait_for_dashboard(instance)
    except BaseException:  # it did not answer, or Ctrl-C: no instance is left without a record
        stop(instance, grace_seconds=FAILED_START_GRACE_SECONDS)
        raise
    return instance


def _launch(command: list[str], env: dict) -> tuple[Launch, str | None, str]:
    """Run ``ray start`` in a new session; when it has ended (killed after START_SECONDS), and
    before it is reaped (its pid, the session's number, cannot be reused until then), record
    the processes it left in its session. Returns them, what went wrong (None: nothing) and
    its output."""
    with tempfile.TemporaryFile("w+") as log:
        started = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        leader = processes.stat(started.pid)
        started_at = leader.start if leader is not None else 0

        def left() -> Launch:
            return Launch(started.pid, started_at, processes.in_session(started.pid, started_at, [started.pid]))

        failure = None
        try:
            if not _ended(started.pid, time.monotonic() + START_SECONDS):
                failure = f"`ray start` did not finish within {START_SECONDS:.0f} s"
        except BaseException:  # interrupted (Ctrl-C): leave nothing behind
            _ended(started.pid, 0)
            left().terminate(FAILED_START_GRACE_SECONDS, last=is_gcs)
            started.wait()
            raise
        launch = left()
        started.wait()
        log.seek(0)
        output = log.read()
    if failure is None and started.returncode != 0:
        failure = f"`ray start` failed: {_ray_error(output)}"
    return launch, failure, output


def _ended(pid: int, deadline: float) -> bool:
    """Wait until our child ``pid`` has exited, without reaping it; past ``deadline`` kill it
    (its pid is still its own: unreaped) and return False."""
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            return False
        time.sleep(0.1)
    return True


def _ray_error(output: str) -> str:
    """The line of ``ray start``'s output that says what went wrong: its exception, else its
    last line (at most 300 characters)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()] or ["no output"]
    errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
    line = (errors or lines)[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def _gcs_address(output: str, port: int) -> str | None:
    """The head's GCS address as `ray start` printed it (its IP may not be 127.0.0.1)."""
    found = re.search(rf"--address='?([\w.:-]+):{port}(?!\d)", output)
    return f"{found.group(1)}:{port}" if found else None


def _wait_for_dashboard(instance: LocalRay) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + START_SECONDS
    while time.time() < deadline:
        try:
            JobSubmissionClient(instance.dashboard_url).list_jobs()
            return
        except Exception:  # noqa: BLE001 - the dashboard takes a few seconds to come up
            time.sleep(0.2)
    raise RuntimeError(f"the local Ray instance started but its dashboard did not answer within {START_SECONDS:.0f} s")


def is_gcs(pid: int) -> bool:
    """Whether ``pid`` is a GCS server, by the name the kernel gives it: stopped last, as
    ``ray stop`` does too. The raylet and Ray's agents asked to stop while the GCS goes wait for
    it past any grace period (seen: more than 8 s, then killed); while it runs they end within
    a second."""
    try:
        return psutil.Process(pid).name() == "gcs_server"
    except psutil.Error:
        return False


def is_autoscaler(pid: int) -> bool:
    """Whether ``pid`` is Ray's autoscaler (``monitor.py``), killed outright: asked to stop, it
    sends every connected driver (a notebook's ``ray.init``) a traceback saying that the
    autoscaler failed. A local instance has nothing for it to scale down or save."""
    try:
        script = os.path.join("ray", "autoscaler", "_private", "monitor.py")
        return any(arg.endswith(script) for arg in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def stop(instance: LocalRay, grace_seconds: float = 5.0) -> int:
    """Terminate the instance's processes (SIGTERM, then SIGKILL after ``grace_seconds``), its
    GCS once the others have ended and its autoscaler at once, and remove its private temporary
    directory if it carries its marker; returns how many processes were signalled."""
    count = instance.terminate(grace_seconds, last=is_gcs, at_once=is_autoscaler)
    _remove_temp_dir(instance.temp_dir, instance.marker)
    return count


def temp_dir_problem(temp_dir: str, marker: str | None) -> str | None:
    """Why ``temp_dir`` is not a directory certify created for an instance (None: it is): an
    absolute path without links, named TEMP_PREFIX..., the user's own, holding the user's own
    MARKER file (a regular file) with the token ``marker``."""
    path, shown = Path(temp_dir), repr(temp_dir)[:80]
    if not path.is_absolute() or os.path.realpath(path) != str(path) or not path.name.startswith(TEMP_PREFIX):
        return f"{shown} is not an absolute path named {TEMP_PREFIX}... without links"
    try:
        folder, mark = os.lstat(path), os.lstat(path / MARKER)
        with open(path / MARKER, "rb") as file:
            token = file.read(64) if stat.S_ISREG(mark.st_mode) else None
    except OSError:
        return f"{shown} does not carry certify's marker"
    if not stat.S_ISDIR(folder.st_mode) or folder.st_uid != os.getuid():  # Ray makes it 0777
        return f"{shown} is not a directory of yours"
    if mark.st_uid != os.getuid() or not marker or token is None or not secrets.compare_digest(token, marker.encode()):
        return f"{shown} does not carry the marker certify wrote for this instance"
    return None


def _remove_temp_dir(temp_dir: str | None, marker: str | None) -> None:
    if temp_dir is not None and temp_dir_problem(temp_dir, marker) is None:
        shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- the record


def save_record(instance: LocalRay, path: Path | None = None) -> None:
    """Write RECORD (or ``path``: 0600, atomically) in a directory of the user's alone."""
    path = path or RECORD
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = path.parent.stat()
    if folder.st_uid == os.getuid() and folder.st_mode & 0o022:
        path.parent.chmod(folder.st_mode & 0o755)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "w") as file:
        file.write(json.dumps(asdict(instance)))
    os.replace(staging, path)


def load_record(path: Path | None = None) -> LocalRay | None:
    """The embedded instance certify started (or the one recorded at ``path``), if it still
    runs; None if there is no record or its instance is gone. RecordError (one line) for a
    record not to act on (module docstring)."""
    path = path or RECORD
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RecordError(f"cannot read {path}: {err.strerror}") from None
    problem = _file_problem(info, path.parent.lstat())
    instance = None
    if problem is None:
        instance, problem = _parse_record(path)
    if problem is not None:
        raise RecordError(f"refusing {path}: it {problem}; nothing was signalled or removed")
    return instance if instance is not None and instance.alive() else None


def _file_problem(info: os.stat_result, folder: os.stat_result) -> str | None:
    """What is wrong with the record as a file (None: nothing)."""
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_uid != os.getuid():
        return f"belongs to user id {info.st_uid}, not to you"
    if info.st_mode & 0o077:
        return f"may be read or written by others (mode {info.st_mode & 0o777:04o}; certify writes 0600)"
    if not stat.S_ISDIR(folder.st_mode) or folder.st_uid != os.getuid() or folder.st_mode & 0o022:
        return "lies in a directory that others may write or that is not yours"
    return None


def _parse_record(path: Path) -> tuple[LocalRay | None, str | None]:
    """The record's instance, or what is wrong with its content."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as file:
            data = json.loads(file.read(1 << 16))
        if isinstance(data, dict) and "pgid" in data:
            return None, "was written by an older certify, which named a process group: stop that Ray yourself"
        roots = tuple((pid, start) for pid, start in data["roots"])
        instance = LocalRay(**{**data, "roots": roots})
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as err:
        return None, f"is not a record certify wrote ({type(err).__name__})"

    def number(value, low: float = 0) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and value >= low

    fields_ok = (
        set(data) == {"session", "started", "roots", "gcs_address", "dashboard_url", "temp_dir", "marker"}
        and number(instance.session, 2)
        and isinstance(instance.session, int)
        and number(instance.started)
        and all(isinstance(pid, int) and number(pid, 2) and number(start, instance.started) for pid, start in roots)
        and isinstance(instance.gcs_address, str)
        and isinstance(instance.dashboard_url, str)
        and isinstance(instance.temp_dir, str | None)
        and isinstance(instance.marker, str | None)
    )
    if not fields_ok:
        return None, "does not hold the fields certify writes"
    problem = temp_dir_problem(instance.temp_dir, instance.marker) if instance.temp_dir is not None else None
    return (None, f"names a temporary directory certify did not create ({problem})") if problem else (instance, None)


def forget_record() -> None:
    RECORD.unlink(missing_ok=True)
