"""Free ports on 127.0.0.1 for the Ray instances ``certify`` starts (``local_ray``)."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

# Ports chosen for an instance lie below the kernel's ephemeral range (Linux: 32768-60999 by
# default): a port the kernel hands out (bind to 0) is free only until it gives the same number to
# the next outgoing connection of any process, and one of Ray's own connections taking a port
# before Ray binds it stops its raylet ("The current node timed out during startup").
PORT_FLOOR = 10_000


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # elsewhere at least this high (macOS: 49152)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing holds now, drawn below the ephemeral range
    (PORT_FLOOR); the kernel's choice where that range leaves no room or all draws are taken."""
    top = _ephemeral_floor()
    for _ in range(100 if top - PORT_FLOOR >= 1000 else 0):
        port = PORT_FLOOR + secrets.randbelow(top - PORT_FLOOR)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
