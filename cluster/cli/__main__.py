"""``python -m cluster.cli`` and the ``certify`` console command."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import NoReturn

import psutil

from cluster.cli import main


def _alone() -> bool:
    """Whether nothing of this process's own still runs: no thread but daemons, no child."""
    threads = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    return not threads and not psutil.Process().children()


def run() -> NoReturn:
    """``main``, then the end of the process without the interpreter's teardown: a second once
    torch is imported (freeing what it, pandas and Ray's client built), after the command's
    output was written. Where a thread or child process of its own still runs, the usual
    ending, which waits for them."""
    try:
        main()
        code: str | int | None = 0
    except SystemExit as end:
        code = end.code
    if not _alone():
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)  # as SystemExit shows a message
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if isinstance(code, str) else code or 0)


if __name__ == "__main__":
    run()
