"""Free ports on 127.0.0.1 for the Ray instances ``certify`` starts (``local_ray``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Ports chosen for an instance lie below the kernel's ephemeral range (Linux: 32768-60999 by
# default): a port the kernel hands out (bind to 0) is free only until it gives the same number to
# the next outgoing connection of any process, and one of Ray's own connections taking a port
# before Ray binds it stops its raylet ("The current node timed out during startup").
PORT_FLOOR = 10_000

# A drawn port is free only until Ray binds it, seconds later. Two instances started at once (a
# test run's parallel processes, two benchmarks) would otherwise draw from the same pool and one
# of them time out; so the ports this user's processes drew in the last HOLD_SECONDS are kept
# out of later draws, in a small file under the temporary directory.
HOLD_SECONDS = 300.0
_REGISTRY_BYTES = 64 << 10


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # elsewhere at least this high (macOS: 49152)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing holds now (see ``free_ports``)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports on 127.0.0.1 that nothing holds now and that no other process
    of this user drew in the last HOLD_SECONDS, drawn below the ephemeral range (PORT_FLOOR);
    the kernel's choice where that range leaves no room or all draws are taken."""
    with _registry() as recent, contextlib.ExitStack() as held:
        # Each chosen port stays bound until all are chosen: no port is drawn twice.
        chosen: list[int] = []
        top = _ephemeral_floor()
        for _ in range(100 * count if top - PORT_FLOOR >= 1000 else 0):
            if len(chosen) == count:
                break
            port = PORT_FLOOR + secrets.randbelow(top - PORT_FLOOR)
            if port not in recent and _bind(held, port):
                chosen.append(port)
        while len(chosen) < count:
            chosen.append(_bind(held, 0))
        expiry = time.time() + HOLD_SECONDS
        recent.update({port: expiry for port in chosen})
        return chosen


def _bind(held: contextlib.ExitStack, port: int) -> int:
    """Bind ``port`` (0: the kernel's choice) on 127.0.0.1 until ``held`` closes; the port
    bound, or 0 where it is taken."""
    sock = held.enter_context(socket.socket())
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return 0
    return sock.getsockname()[1]


@contextlib.contextmanager
def _registry() -> Iterator[dict[int, float]]:
    """The ports this user's processes drew recently ({port: expiry, epoch seconds}), locked
    against other processes; what the caller adds is written back. Empty, and not written,
    where the file is not this user's own regular file (a link is not followed)."""
    path = Path(tempfile.gettempdir()) / f"certify-ports-{os.getuid()}"
    try:  # non-blocking: a FIFO put there must not hold the open
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError:
        yield {}
        return
    info = os.fstat(fd)
    if info.st_uid != os.getuid() or not stat.S_ISREG(info.st_mode):
        os.close(fd)
        yield {}
        return
    with os.fdopen(fd, "r+", encoding="ascii", errors="replace") as file:
        fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
        now, recent = time.time(), {}
        for line in file.read(_REGISTRY_BYTES).splitlines():
            fields = line.split()
            with contextlib.suppress(ValueError):
                if len(fields) == 2 and now < float(fields[1]) <= now + HOLD_SECONDS:
                    recent[int(fields[0])] = float(fields[1])
        yield recent
        file.seek(0)
        file.truncate()
        file.write("".join(f"{port} {int(expiry)}\n" for port, expiry in recent.items()))
