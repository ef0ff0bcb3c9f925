"""`certify` signals only the processes of the Ray instance it started (issue 26): decoys of
the same user that name the instance's GCS address, its temporary directory or Redis's default
address, and a process whose pid an edited record names, survive a failed start, a start that
runs out of time, `certify stop` and `certify stop --force`; a record not to be trusted is
refused with one line before anything is signalled or removed; Ray's token is left readable by
its owner alone."""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from cluster.cli import main
from cluster.client import jobs, local_ray, ports, processes

SLEEP = "import time; time.sleep(600)"


class Decoy:
    """A process of this user whose command line begins with ``title``, in a session of its own
    (a stranger's shell would not share ours). ``orphan``: its session's leader has exited, as
    Ray's daemons' has, so that only its start time or the record's checks protect it."""

    def __init__(self, title: str, orphan: bool = False):
        command = f"exec -a {shlex.quote(title)} {shlex.quote(sys.executable)} -c {shlex.quote(SLEEP)}"
        self.child: subprocess.Popen | None = None
        if orphan:
            script = f"{command} </dev/null >/dev/null 2>&1 & echo $!"
            done = subprocess.run(["bash", "-c", script], start_new_session=True, capture_output=True, text=True)
            pid = int(done.stdout)
        else:
            self.child = subprocess.Popen(["bash", "-c", command], start_new_session=True)
            pid = self.child.pid
        self.pid, self.proc = pid, psutil.Process(pid)  # psutil keeps its start time: kill() checks it
        deadline = time.time() + 10
        while title not in " ".join(self.proc.cmdline()) and time.time() < deadline:
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.is_running() and self.proc.status() != psutil.STATUS_ZOMBIE

    def end(self) -> None:
        if self.proc.is_running():
            self.proc.kill()
        if self.child is not None:
            self.child.wait()


@pytest.fixture
def decoys():
    """Start decoys (``Decoy(title, orphan)``); each is killed afterwards."""
    started: list[Decoy] = []

    def spawn(title: str, orphan: bool = False) -> Decoy:
        started.append(Decoy(title, orphan))
        return started[-1]

    yield spawn
    for decoy in started:
        decoy.end()


def naming(text: str, besides: list[Decoy]) -> list[int]:
    """Live processes other than ``besides`` whose command line names ``text`` (a test may look)."""
    skip = {decoy.pid for decoy in besides}
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.pid not in skip and proc.info["status"] != psutil.STATUS_ZOMBIE:
            if text in " ".join(proc.info["cmdline"] or []):
                found.append(proc.pid)
    return found


def alive(decoys: list[Decoy]) -> bool:
    return all(decoy.alive() for decoy in decoys)


def private_home(tmp_path: Path, monkeypatch, token_mode: int | None = 0o644, folder_mode: int = 0o755) -> Path:
    """A HOME of the test's own, with a Ray token as Ray writes it (0644 in a 0755 directory)."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    if token_mode is not None:
        (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex * 2)
        (home / ".ray" / "auth_token").chmod(token_mode)
    (home / ".ray").chmod(folder_mode)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    return home


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- failed starts


def _decoys_around_start(monkeypatch, decoys) -> tuple[list[Decoy], list[str]]:
    """Decoys that name the GCS address and the temporary directory the next `start` chooses,
    started before `ray start` runs; and Redis on its default address."""
    spawned = [decoys("redis-server 127.0.0.1:6379")]
    temp_dirs: list[str] = []
    free_ports, private_temp_dir = local_ray.free_ports, local_ray.private_temp_dir

    def ports(count: int) -> list[int]:
        chosen = free_ports(count)
        spawned.append(decoys(f"redis-server 127.0.0.1:{chosen[0]}"))  # the first is the GCS port
        return chosen

    def temp_dir() -> tuple[str, str]:
        made = private_temp_dir()
        temp_dirs.append(made[0])
        spawned.append(decoys(f"tail -F {made[0]}/session_latest/logs/raylet.out"))
        return made

    monkeypatch.setattr(local_ray, "free_ports", ports)
    monkeypatch.setattr(local_ray, "private_temp_dir", temp_dir)
    return spawned, temp_dirs


def test_a_failed_start_stops_what_it_started_and_nothing_else(tmp_path, monkeypatch, decoys, capsys, own_ray):
    """`ray start` fails after it started its GCS and dashboard (an object store below Ray's
    minimum): what it started is stopped, its own error is the one line, no address is
    assumed, and the decoys survive. Ray's token, as Ray writes it, is made 0600 with a warning."""
    home = private_home(tmp_path, monkeypatch, folder_mode=0o777)
    spawned, temp_dirs = _decoys_around_start(monkeypatch, decoys)
    with pytest.raises(RuntimeError) as failed:
        own_ray(num_cpus=1, object_store_bytes=1)
    message = str(failed.value)
    assert "\n" not in message and "`ray start` failed: ValueError: Attempting to cap object store memory" in message
    assert len(spawned) == 3 and alive(spawned)
    assert naming(temp_dirs[0], spawned) == []  # nothing it started is left
    assert not Path(temp_dirs[0]).exists()
    token = home / ".ray" / "auth_token"
    assert mode(token) == 0o600 and mode(token.parent) == 0o755
    warnings = [line for line in capsys.readouterr().err.splitlines() if "auth_token" in line]
    assert len(warnings) == 1 and "was readable by others (mode 0644)" in warnings[0]


def test_a_start_that_runs_out_of_time_leaves_nothing(monkeypatch, decoys, own_ray):
    monkeypatch.setattr(local_ray, "START_SECONDS", 4.0)
    spawned, temp_dirs = _decoys_around_start(monkeypatch, decoys)
    ran_out = r"^could not start a local Ray instance: `ray start` did not finish within 4 s$"
    with pytest.raises(RuntimeError, match=ran_out):
        own_ray(num_cpus=1, object_store_bytes=80 << 20)
    assert alive(spawned)
    assert naming(temp_dirs[0], spawned) == [] and not Path(temp_dirs[0]).exists()


# --------------------------------------------------------------------------- what counts as the instance

FAKE_RAY = """
import os, subprocess, sys, time
role, folder = sys.argv[1], sys.argv[2]

def spawn(name, **kwargs):
    return subprocess.Popen([sys.executable, __file__, name, folder], **kwargs)

def wait_for(name):
    while not os.path.exists(os.path.join(folder, name)):
        time.sleep(0.05)

with open(os.path.join(folder, "pids"), "a") as file:
    file.write(f"{role} {os.getpid()}\\n")
if role == "start":  # `ray start`: leaves a daemon in its session and exits
    spawn("daemon")
    wait_for("daemon-up")
elif role == "daemon":  # the raylet: once recorded, an orphan in its session, a driver in one of its own
    open(os.path.join(folder, "daemon-up"), "w").close()
    wait_for("go")
    spawn("orphaner", start_new_session=False).wait()
    spawn("driver", start_new_session=True)
    time.sleep(600)
elif role in ("orphaner", "driver-orphaner"):  # starts a child and exits: the child is orphaned
    spawn("leaf" if role == "orphaner" else "driver-leaf")
elif role == "driver":  # a job driver: its own session, an orphan in it
    spawn("driver-orphaner").wait()
    time.sleep(600)
else:
    time.sleep(600)
"""


def test_an_instance_is_what_ray_start_left_and_its_descendants(tmp_path, decoys):
    """A process tree shaped like Ray's (no Ray needed): ``ray start`` leaves a daemon in its
    session and exits; the daemon then orphans a process in that session and starts a driver
    in a session of its own, which orphans one in its session. All of them are the instance;
    an orphaned stranger of the same user, named like Redis, is not; all of them are stopped."""
    script = tmp_path / "fake_ray.py"
    script.write_text(FAKE_RAY)
    stranger = decoys("redis-server 127.0.0.1:6379", orphan=True)
    launch, failure, _ = local_ray._launch([sys.executable, str(script), "start", str(tmp_path)], dict(os.environ))
    try:
        assert failure is None and [pid for pid, _ in launch.roots] == [_pids(tmp_path)["daemon"]]
        (tmp_path / "go").touch()
        _wait_for(lambda: len(_pids(tmp_path)) == 7, 30)
        pids = _pids(tmp_path)
        expected = {pids[role] for role in ("daemon", "leaf", "driver", "driver-leaf")}
        members = launch.members()
        assert set(members) == expected and psutil.Process(pids["leaf"]).ppid() != pids["daemon"]
        assert launch.terminate(grace_seconds=2) == 4
        assert not any(processes.running(pid, start) for pid, start in members.items())
        assert stranger.alive()
    finally:  # whatever the code under test did: the test's own fake processes go
        for proc in psutil.process_iter(["cmdline"]):
            if str(script) in (proc.info["cmdline"] or []):
                proc.kill()


HELD_LAST = """
import os, signal, subprocess, sys, time
role, folder = sys.argv[1], sys.argv[2]

def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True

if role == "start":  # leaves both in its session and exits, as `ray start` does
    other = subprocess.Popen([sys.executable, __file__, "other", folder])
    subprocess.Popen([sys.executable, __file__, "held", folder, str(other.pid)])
    while not os.path.exists(os.path.join(folder, "held")):
        time.sleep(0.05)
elif role == "held":  # the GCS: says whether the other had ended when its turn came
    def on_term(*_):
        with open(os.path.join(folder, "held-saw"), "w") as file:
            file.write("gone" if gone(int(sys.argv[3])) else "running")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    open(os.path.join(folder, "held"), "w").close()
    time.sleep(600)
else:
    time.sleep(600)
"""


def test_the_process_picked_last_is_signalled_once_the_others_have_ended(tmp_path):
    """The GCS's turn (``local_ray.stop``): the raylet and agents asked to stop while it goes
    would wait for it past any grace period."""
    script = tmp_path / "held_last.py"
    script.write_text(HELD_LAST)
    launch, failure, _ = local_ray._launch([sys.executable, str(script), "start", str(tmp_path)], dict(os.environ))
    try:
        held = [pid for pid in launch.members() if psutil.Process(pid).cmdline()[2] == "held"]
        assert failure is None and len(held) == 1 and len(launch.members()) == 2
        assert launch.terminate(grace_seconds=10, last=lambda pid: pid == held[0]) == 2
        assert (tmp_path / "held-saw").read_text() == "gone"
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if str(script) in (proc.info["cmdline"] or []):
                proc.kill()


def _pids(folder: Path) -> dict[str, int]:
    lines = (folder / "pids").read_text().split("\n") if (folder / "pids").exists() else []
    return {role: int(pid) for role, pid in (line.split() for line in lines if line.strip())}


SELF_CHECK = """
import json, os, sys
from cluster.client import processes
me = processes.stat(os.getpid())
launch = processes.Launch(session=me.sid, started=0, roots=((os.getpid(), me.start),))
with open(sys.argv[1], "w") as file:
    json.dump(sorted(launch.members()), file)
"""


def test_a_record_never_names_the_process_reading_it_or_its_session(tmp_path):
    """A process in a session without a live leader (as Ray's daemons are) reads a record that
    names itself and its session: nothing is counted, so nothing would be signalled."""
    found = tmp_path / "members.json"
    script = f"{shlex.quote(sys.executable)} -c {shlex.quote(SELF_CHECK)} {shlex.quote(str(found))}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(["bash", "-c", f"{script} </dev/null >/dev/null 2>&1 &"], start_new_session=True, env=env)
    _wait_for(lambda: found.exists() and found.read_text(), 60)
    assert json.loads(found.read_text()) == []


# --------------------------------------------------------------------------- certify stop


def _wait_for(condition, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.parametrize("force", [False, True])
def test_stop_signals_the_instance_and_its_jobs_and_nothing_else(
    ray_session, tmp_path, monkeypatch, decoys, connected_notebook, force
):
    """The embedded instance with a job running, whose driver leaves Ray's session and process
    group: `certify stop` refuses and signals nothing; once the job ends (or with --force) it
    stops the instance and the driver. Decoys naming the instance survive, and so does the
    test session's own Ray. A notebook's driver connected to it (``ray.init``) is not told that
    the autoscaler failed (Ray's own message when its autoscaler gets SIGTERM)."""
    monkeypatch.setattr(local_ray, "RECORD", tmp_path / "certify" / "local-ray.json")
    embedded = local_ray.start(num_cpus=1, private=True, object_store_bytes=80 << 20)
    try:
        local_ray.save_record(embedded)
        assert mode(local_ray.RECORD) == 0o600
        assert len([pid for pid in embedded.members() if local_ray.is_gcs(pid)]) == 1  # stopped last
        # its drivers take no worker output: no log monitor re-reads the workers' logs
        assert set(naming("log_monitor", [])) & set(embedded.members()) == set()
        spawned = [
            decoys(f"redis-server {embedded.gcs_address}"),
            decoys("redis-server 127.0.0.1:6379"),
            decoys(f"tail -F {embedded.temp_dir}/session_latest/logs/raylet.out"),
        ]
        tag = f"certify-test-driver-{uuid.uuid4().hex[:8]}"
        client = jobs.connect(embedded.dashboard_url)
        job_id = client.submit_job(entrypoint=f"{shlex.quote(sys.executable)} -c {shlex.quote(SLEEP)} {tag}")
        _wait_for(lambda: naming(tag, []))
        if not force:
            refused = CliRunner().invoke(main, ["stop"])
            assert refused.exit_code == 2 and "still running" in refused.output
            assert embedded.alive() and naming(tag, []) and alive(spawned)
            client.stop_job(job_id)
            _wait_for(lambda: jobs.job_status(client.get_job_status(job_id)) in jobs.TERMINAL)
        # a notebook's driver connected to it counts as a running job: only --force stops beside one
        notebook = connected_notebook(embedded.gcs_address, tmp_path / "notebook.out") if force else None
        stopped = CliRunner().invoke(main, ["stop", "--force"] if force else ["stop"])
        assert stopped.exit_code == 0 and stopped.output.startswith("stopped the local Ray instance"), stopped.output
        assert alive(spawned)
        assert naming(tag, []) == [] and naming(embedded.temp_dir, spawned) == []
        assert not embedded.alive() and not Path(embedded.temp_dir).exists() and not local_ray.RECORD.exists()
        assert ray_session.alive() and ray_session.members()
        if notebook is not None:
            time.sleep(2)  # Ray's message arrived within a second of the signal
            assert "autoscaler failed" not in (tmp_path / "notebook.out").read_text()
    finally:
        local_ray.stop(embedded)


@pytest.fixture
def connected_notebook():
    """Start a Python that connects to a Ray instance (``ray.init(address)``) as a notebook
    does and sleeps, its output in ``output``; it is killed afterwards."""
    started: list[subprocess.Popen] = []

    def start(address: str, output: Path) -> subprocess.Popen:
        code = f"import ray; ray.init({address!r}); print('connected', flush=True); {SLEEP}"
        with output.open("w") as sink:
            started.append(subprocess.Popen([sys.executable, "-c", code], stdout=sink, stderr=subprocess.STDOUT))
        _wait_for(lambda: "connected" in output.read_text(), 60)
        return started[-1]

    yield start
    for process in started:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------- the record


def _record(path: Path, fields: dict, file_mode: int = 0o600) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(json.dumps(fields))
    path.chmod(file_mode)


def _stop_both_ways(monkeypatch, path: Path, fields: dict, file_mode: int = 0o600) -> list:
    monkeypatch.setattr(jobs, "LOCAL_DASHBOARD", "http://127.0.0.1:9")  # nothing listens there
    results = []
    for args in (["stop"], ["stop", "--force"]):
        _record(path, fields, file_mode)
        results.append(CliRunner().invoke(main, args))
    return results


def _fields(decoy: Decoy, **changes) -> dict:
    """A record that names ``decoy`` (pid, start time, session) as its only process."""
    st = processes.stat(decoy.pid)
    fields = {
        "session": st.sid,
        "started": st.start - 1,
        "roots": [[decoy.pid, st.start]],
        "gcs_address": "127.0.0.1:6379",
        "dashboard_url": "http://127.0.0.1:9",
        "temp_dir": None,
        "marker": None,
    }
    return {**fields, **changes}


@pytest.mark.parametrize("edit", ["a reused pid", "a stranger's session"])
def test_a_record_whose_processes_are_not_its_own_names_an_instance_that_is_gone(tmp_path, monkeypatch, decoys, edit):
    """A record whose pid now names a process that started at another time (the decoy leads
    no session, like Ray's daemons: only the start time protects it), or whose session has a
    live leader (`ray start` has always ended): the instance is gone, nothing is signalled."""
    monkeypatch.setattr(local_ray, "RECORD", tmp_path / "certify" / "local-ray.json")
    decoy = decoys("redis-server 127.0.0.1:6379", orphan=edit == "a reused pid")
    fields = _fields(decoy)
    if edit == "a reused pid":
        fields["roots"] = [[decoy.pid, fields["roots"][0][1] + 100]]
    for result in _stop_both_ways(monkeypatch, local_ray.RECORD, fields):
        assert result.exit_code == 0 and result.output == "no local Ray instance started by certify is running\n"
        assert alive([decoy]) and not local_ray.RECORD.exists()


def _edit(edit: str, fields: dict, tmp_path: Path) -> tuple[dict, int]:
    """The record ``fields`` as ``edit`` changes it, and the file's mode."""
    marked = tmp_path / "certify-ray-other"  # another instance's directory: another token
    marked.mkdir(exist_ok=True)
    (marked / local_ray.MARKER).write_text("a" * 32)
    if edit == "a directory without the marker":
        return {**fields, "temp_dir": str(tmp_path / "certify-ray-precious"), "marker": "b" * 32}, 0o600
    if edit == "the root directory":
        return {**fields, "temp_dir": "/", "marker": "b" * 32}, 0o600
    if edit == "another instance's marker":
        return {**fields, "temp_dir": str(marked), "marker": "b" * 32}, 0o600
    if edit == "an older record":
        older = ("gcs_address", "dashboard_url", "temp_dir")  # certify 0.2's record
        return {"pgid": fields["session"], **{key: fields[key] for key in older}}, 0o600
    if edit == "a pid that is a string":
        return {**fields, "roots": [[str(pid), start] for pid, start in fields["roots"]]}, 0o600
    return fields, {"a record others may write": 0o666, "a record others may read": 0o644}[edit]


REFUSALS = {
    "a directory without the marker": "names a temporary directory certify did not create",
    "the root directory": "names a temporary directory certify did not create",
    "another instance's marker": "names a temporary directory certify did not create",
    "a record others may write": "may be read or written by others (mode 0666",
    "a record others may read": "may be read or written by others (mode 0644",
    "an older record": "was written by an older certify",
    "a pid that is a string": "does not hold the fields certify writes",
}


@pytest.mark.parametrize("edit", list(REFUSALS))
def test_a_record_not_to_be_trusted_is_refused_before_anything_is_signalled(tmp_path, monkeypatch, decoys, edit):
    """The record names the decoy exactly (pid, start time, a session without a leader), so
    that only the record's own checks protect it and the directory it names."""
    monkeypatch.setattr(local_ray, "RECORD", tmp_path / "certify" / "local-ray.json")
    precious = tmp_path / "certify-ray-precious"  # named like certify's, without its marker
    precious.mkdir()
    (precious / "results.parquet").write_text("keep me")
    decoy = decoys(f"redis-server 127.0.0.1:6379 {precious}", orphan=True)
    fields, file_mode = _edit(edit, _fields(decoy), tmp_path)
    for result in _stop_both_ways(monkeypatch, local_ray.RECORD, fields, file_mode):
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.startswith(f"error: refusing {local_ray.RECORD}: it {REFUSALS[edit]}")
        assert "nothing was signalled or removed" in result.output
        assert alive([decoy]) and (precious / "results.parquet").read_text() == "keep me"
        assert local_ray.RECORD.exists()


def test_the_record_names_the_decoy_exactly(tmp_path, monkeypatch, decoys):
    """The control for the refusals above: left as it is, such a record is trusted."""
    monkeypatch.setattr(local_ray, "RECORD", tmp_path / "certify" / "local-ray.json")
    decoy = decoys("redis-server 127.0.0.1:6379", orphan=True)
    _record(local_ray.RECORD, _fields(decoy))
    assert local_ray.load_record() is not None


def test_a_record_that_is_a_link_or_anothers_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(local_ray, "RECORD", tmp_path / "certify" / "local-ray.json")
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    local_ray.RECORD.parent.mkdir(mode=0o700)
    local_ray.RECORD.symlink_to(target)
    with pytest.raises(local_ray.RecordError, match="it is not a regular file"):
        local_ray.load_record()
    if os.getuid() == 0:  # only root can give a file away
        local_ray.RECORD.unlink()
        _record(local_ray.RECORD, {})
        os.chown(local_ray.RECORD, 65534, -1)
        with pytest.raises(local_ray.RecordError, match="belongs to user id 65534, not to you"):
            local_ray.load_record()
    local_ray.RECORD.unlink()
    local_ray.RECORD.parent.chmod(0o777)
    _record(local_ray.RECORD, {})
    with pytest.raises(local_ray.RecordError, match="in a directory that others may write"):
        local_ray.load_record()


# --------------------------------------------------------------------------- Ray's token


def test_rays_token_is_left_readable_by_its_owner_alone(tmp_path, monkeypatch):
    notices: list[str] = []
    home = private_home(tmp_path, monkeypatch, token_mode=0o600, folder_mode=0o700)
    local_ray.secure_token(dict(os.environ), notices.append)
    assert notices == [] and mode(home / ".ray" / "auth_token") == 0o600  # nothing to say or do

    (home / ".ray" / "auth_token").unlink()  # none yet: Ray generates one, born 0600
    (home / ".ray").chmod(0o777)
    local_ray.secure_token(dict(os.environ), notices.append)
    assert notices == [] and mode(home / ".ray" / "auth_token") == 0o600 and mode(home / ".ray") == 0o755
    assert len((home / ".ray" / "auth_token").read_text()) == 64

    custom = tmp_path / "elsewhere" / "token"  # RAY_AUTH_TOKEN_PATH: the file it names
    custom.parent.mkdir()
    custom.write_text("c" * 64)
    custom.chmod(0o640)
    local_ray.secure_token({**os.environ, "RAY_AUTH_TOKEN_PATH": str(custom)}, notices.append)
    assert mode(custom) == 0o600 and len(notices) == 1 and f"{custom} was readable by others" in notices[0]


def test_free_ports_lie_below_the_ephemeral_range_and_are_not_taken(tmp_path, monkeypatch):
    """Below the range the kernel gives outgoing connections (which once took a port of Ray's
    before its raylet bound it), and never one something holds."""
    monkeypatch.setattr(ports.tempfile, "gettempdir", lambda: str(tmp_path))
    floor = ports._ephemeral_floor()
    assert all(ports.PORT_FLOOR <= ports.free_port() < floor for _ in range(50))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        others = [1, 2, 3, 4, 5]  # one of these is free (a machine holding all five would fail this)
        draws = iter([taken - ports.PORT_FLOOR, *others])
        monkeypatch.setattr(ports, "_ephemeral_floor", lambda: taken + 1000)
        monkeypatch.setattr(ports.secrets, "randbelow", lambda _: next(draws))
        assert ports.free_port() in [ports.PORT_FLOOR + other for other in others]


def test_free_ports_are_distinct_and_kept_from_other_processes_draws(tmp_path, monkeypatch):
    """One call never names a port twice (Ray refuses a port given to two components), and a
    port drawn in the last HOLD_SECONDS, by any process of this user, is not drawn again: two
    instances starting at once would otherwise both get it, and one time out."""
    monkeypatch.setattr(ports.tempfile, "gettempdir", lambda: str(tmp_path))
    draws = iter([7, 7, 8, 7, 8, 9, 7])
    monkeypatch.setattr(ports.secrets, "randbelow", lambda _: next(draws))
    assert ports.free_ports(2) == [ports.PORT_FLOOR + 7, ports.PORT_FLOOR + 8]
    assert ports.free_ports(1) == [ports.PORT_FLOOR + 9]
    registry = tmp_path / f"certify-ports-{os.getuid()}"
    kept = {int(line.split()[0]) for line in registry.read_text().splitlines()}
    assert kept == {ports.PORT_FLOOR + 7, ports.PORT_FLOOR + 8, ports.PORT_FLOOR + 9}
    now = time.time()
    lines = f"{ports.PORT_FLOOR + 7} {now - 1:.0f}\n{ports.PORT_FLOOR + 8} {now + 1e6:.0f}\n"
    registry.write_bytes(b"\xff\xfe garbage\n" + lines.encode())
    draws = iter([7, 8])  # expired, and an expiry past HOLD_SECONDS: neither holds a port back
    assert ports.free_ports(2) == [ports.PORT_FLOOR + 7, ports.PORT_FLOOR + 8]
    registry.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(f"{ports.PORT_FLOOR + 7} {now + 60:.0f}\n")
    registry.symlink_to(elsewhere)  # not followed: neither read nor written
    draws = iter([7])
    assert ports.free_ports(1) == [ports.PORT_FLOOR + 7]
    assert elsewhere.read_text() == f"{ports.PORT_FLOOR + 7} {now + 60:.0f}\n"
    registry.unlink()
    os.mkfifo(registry)  # not a regular file: not read (a read would wait for a writer forever)
    draws = iter([7])
    assert ports.free_ports(1) == [ports.PORT_FLOOR + 7]
