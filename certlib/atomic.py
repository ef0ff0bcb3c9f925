"""Safe file updates on shared storage: atomic writes (readers see the old file or the
complete new one, never a part, and a crash after the write keeps it) and exclusive locks
between processes and jobs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temporary file beside ``path`` (named ``.<name>.*.tmp``, which
    Parquet readers skip), fsync it, rename it over ``path`` and fsync the directory (else a
    crash could lose the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the other users of shared storage
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextlib.contextmanager
def exclusive_lock(path: str | Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.<name>.lock`` beside ``path`` (created if missing) for
    the duration of the block, waiting for any other holder; ``on_wait`` is called once if the
    lock is taken. The operating system releases it if the holder dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Locked(RuntimeError):
    """A lock another process holds; the message is what it recorded about itself."""


@contextlib.contextmanager
def owned_lock(path: str | Path, owner: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block without waiting, the file naming
    ``owner`` meanwhile; ``Locked`` (with the holder's own description) where another process
    holds it. The operating system releases it if the holder dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked(_holder(handle)) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(owner.encode())
            handle.flush()
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_holder(path: str | Path) -> str | None:
    """Who holds ``owned_lock(path)`` now (its description), or None where nobody does;
    writes and creates nothing."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after the lock is released
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(handle)
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def _holder(handle: BinaryIO) -> str:
    handle.seek(0)
    return handle.read(300).decode(errors="replace").strip() or "another process"
