"""The processes of one Ray instance this product started, recognised by what the kernel says
about them and never by what their command lines say.

A process is named by its pid and its start time: the clock ticks from boot to its creation
that the kernel keeps in ``/proc/<pid>/stat`` (what psutil's ``create_time`` is computed from,
without the wall clock that NTP moves; ``create_time`` itself where there is no ``/proc``). A
pid that names another process after the first one ended has another start time. ``ray start``
runs in a session of its own; when it returns, every process in that session is recorded as a
root (pid, start). Later, a live process belongs to the instance when it is

1. a recorded root, with its recorded start time, still in the recorded session, which no live
   process leads (``ray start``, its leader, has exited: a session with a live leader is
   someone else's);
2. a child of a process of the instance (the kernel's parent pid) that started no earlier than
   its parent: workers, agents, the job supervisor and the job drivers it starts;
3. in the recorded session (no live leader) while a process of the instance is in it, or in a
   session a process of the instance created (a job driver's): only descendants of a session's
   creator can be in it, so an orphan whose parent died is still recognised;

and it started no earlier than ``ray start``. Never this process, its ancestors or anything in
its own session. The scan runs again while the instance shuts down, so that processes started
meanwhile are stopped too, and a process once recognised stays known by (pid, start).

A signal is sent through a pidfd opened before the start time is checked: if the pid has
meanwhile been reused, the pidfd names the process that ended and the signal goes nowhere.
Where pidfds do not exist the check and ``kill`` are microseconds apart.

What is not recognised: a process whose parent and session creator have both ended before the
first scan (an orphan of a job driver that had already exited); Ray stops its own workers when
their raylet ends. A record that names a stranger's process exactly (pid, start time, and a
session without a live leader) is trusted: only the record's owner can write it (local_ray).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

Identity = tuple[int, float]  # (pid, start time)
PROC = Path("/proc")


@dataclass(frozen=True)
class Stat:
    """What the kernel says about one process, read at once."""

    ppid: int
    sid: int
    start: float  # clock ticks since boot (an int) with /proc, else psutil's create_time
    zombie: bool


def stat(pid: int) -> Stat | None:
    """The process ``pid`` as the kernel describes it now; None if there is none."""
    if PROC.is_dir():
        try:
            raw = (PROC / str(pid) / "stat").read_bytes()
        except OSError:
            return None
        fields = raw[raw.rindex(b")") + 2 :].split()  # field 3 (state) onwards: the name may hold spaces
        return Stat(ppid=int(fields[1]), sid=int(fields[3]), start=int(fields[19]), zombie=fields[0] in (b"Z", b"X"))
    try:
        proc = psutil.Process(pid)
        return Stat(proc.ppid(), os.getsid(pid), proc.create_time(), proc.status() == psutil.STATUS_ZOMBIE)
    except (psutil.Error, OSError):
        return None


def table() -> dict[int, Stat]:
    """Every process of this machine that can be seen."""
    pids = [int(name) for name in os.listdir(PROC) if name.isdigit()] if PROC.is_dir() else psutil.pids()
    return {pid: found for pid in pids if (found := stat(pid)) is not None}


def protected(processes: Mapping[int, Stat]) -> set[int]:
    """This process, its ancestors and its session: never signalled, whatever a record says."""
    mine, pid = os.getsid(0), os.getpid()
    lineage: set[int] = set()
    while pid > 0 and pid not in lineage:  # this process and its ancestors, up to init
        lineage.add(pid)
        pid = processes[pid].ppid if pid in processes else 0
    return lineage | {p for p, st in processes.items() if st.sid == mine}


@dataclass(frozen=True)
class Launch:
    """What one ``ray start`` started: its session (the pid ``ray start`` had), its start time,
    and the processes in its session when it returned."""

    session: int
    started: float
    roots: tuple[Identity, ...]

    def members(self, known: Mapping[int, float] | None = None) -> dict[int, float]:
        """The live processes of the instance now (the rules in the module docstring): pid ->
        start. ``known``: processes recognised earlier, kept while they run with the same start."""
        now = table()
        keep = protected(now)  # never counted, so that nothing is counted through them either
        ours = {pid: start for pid, start in (known or {}).items() if pid in now and now[pid].start == start}
        ours.update(self._roots(now))
        ours = {pid: start for pid, start in ours.items() if pid not in keep}
        leader = now.get(self.session)
        leaderless = leader is None or leader.zombie
        changed = True
        while changed:
            sessions = {pid for pid in ours if now[pid].sid == pid}
            if leaderless and any(now[pid].sid == self.session for pid in ours):
                sessions.add(self.session)
            changed = False
            for pid, st in now.items():
                if pid in ours or pid in keep or st.start < self.started:
                    continue
                parent = ours.get(st.ppid)
                if st.sid in sessions or (parent is not None and st.start >= parent):
                    ours[pid] = st.start
                    changed = True
        return {pid: start for pid, start in ours.items() if not now[pid].zombie}

    def _roots(self, now: Mapping[int, Stat]) -> dict[int, float]:
        """The recorded roots that still run in the recorded session (rule 1)."""
        leader = now.get(self.session)
        if leader is not None and not leader.zombie:  # `ray start` has ended: this session is not its
            return {}
        return {
            pid: start
            for pid, start in self.roots
            if pid in now and now[pid].start == start and now[pid].sid == self.session and not now[pid].zombie
        }

    def alive(self) -> bool:
        """Whether a recorded root still runs (rule 1)."""
        return bool(self._roots(table()))

    def terminate(
        self,
        grace_seconds: float = 5.0,
        kill_seconds: float = 5.0,
        last: Callable[[int], bool] = lambda pid: False,
        at_once: Callable[[int], bool] = lambda pid: False,
    ) -> int:
        """SIGTERM to every process of the instance, SIGKILL to those still running after
        ``grace_seconds``, scanning again meanwhile for processes started since; waits up to
        ``kill_seconds`` more for them to end. The processes ``last`` picks (by pid) are
        signalled the same way once all the others have ended; those ``at_once`` picks get
        SIGKILL from the start. Returns how many processes were signalled."""
        signalled: dict[int, float] = {}
        for holding in (True, False):
            sig, deadline = signal.SIGTERM, time.monotonic() + grace_seconds
            while True:
                found = self.members(signalled).items()
                new = {pid: start for pid, start in found if pid not in signalled and not (holding and last(pid))}
                for pid, start in new.items():
                    send(pid, start, signal.SIGKILL if at_once(pid) else sig)
                signalled.update(new)
                live = [(pid, start) for pid, start in signalled.items() if running(pid, start)]
                if not live and not new:
                    break
                if time.monotonic() >= deadline:
                    if sig == signal.SIGKILL:
                        break
                    sig, deadline = signal.SIGKILL, time.monotonic() + kill_seconds
                    for pid, start in live:
                        send(pid, start, sig)
                time.sleep(0.1)
        return len(signalled)


def running(pid: int, start: float) -> bool:
    """Whether the process (pid, start) runs (a zombie has ended)."""
    st = stat(pid)
    return st is not None and st.start == start and not st.zombie


def send(pid: int, start: float, sig: int) -> bool:
    """Send ``sig`` to the process ``pid`` if it is the one that started at ``start``."""
    try:
        handle: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):  # no pidfds here
        handle = None
    try:
        if not running(pid, start):
            return False
        if handle is None:
            os.kill(pid, sig)
        else:
            signal.pidfd_send_signal(handle, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if handle is not None:
            os.close(handle)


def in_session(session: int, started: float, exclude: Iterable[int] = ()) -> tuple[Identity, ...]:
    """The processes now in ``session`` that started no earlier than ``started``."""
    skip = set(exclude)
    return tuple(
        sorted(
            (pid, st.start)
            for pid, st in table().items()
            if st.sid == session and st.start >= started and pid not in skip and not st.zombie
        )
    )
