"""cluster: Ray orchestration of certification sweeps and the ``certify`` command line."""

import contextlib
import gc
import os
import sys
from collections.abc import Iterator

# Ray's token authentication: a client sends ~/.ray/auth_token when RAY_AUTH_MODE is "token".
# Ray reads the mode once, when it is imported, so it is set here, before any module of this
# package imports ray; where ray came first, ray.init() settles the mode itself.
if "ray" not in sys.modules:
    os.environ.setdefault("RAY_AUTH_MODE", "token")


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The garbage collector off for a block (back on after, if it was): for the imports of a
    job's driver and workers, whose torch, pandas and Ray build millions of objects that the
    collector's passes would rescan while they load. The processes of the job's own then
    ``gc.freeze()`` them: they live as long as the process, and no later pass rescans them
    either (together 0.85 of a driver's 3.1 CPU-s of imports)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
