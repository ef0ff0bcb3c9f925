"""What a person sees of a running job (``certify submit-job --wait``, ``certify logs -f``):
the job's own human lines in the order they came, and its progress as one live line on a
terminal (rewritten in place) or one short line per interval in a log file or CI. The machine
progress records (``[certify-progress] {...}`` JSON, for ``certify status``) and the driver's
frequent ``progress:`` lines feed that line and are not printed; ``--raw`` shows the log as it
is."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

from cluster.progress import format_seconds
from cluster.record import PROGRESS_PREFIX

HUMAN_PROGRESS = "progress: "  # the driver's periodic line (``cluster.progress.describe_progress``)
# Ray's own INFO records in a job's log (its logger's format: time, level, file:line --) and the
# job manager's line naming the entry point: Ray's bookkeeping, not the job's. Warnings and
# errors stay; ``--raw`` shows everything.
RAY_BOOKKEEPING = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+INFO \S+:\d+ -- |^Running entrypoint for job ")
INTERVAL = 30.0  # seconds between progress lines off a terminal


def summary(snap: dict) -> str:
    """The short progress line: images, rate, ETA, units, training."""
    done, total = snap["images_done"], max(snap["images_total"], 1)
    line = (
        f"{done:,}/{snap['images_total']:,} images ({100 * done / total:.0f}%), "
        f"{snap['images_per_second']:,.1f}/s, ETA {format_seconds(snap.get('eta_seconds'))}, "
        f"units {snap['units_done']}/{snap['units_total']}"
    )
    if snap.get("units_failed"):
        line += f" ({snap['units_failed']} failed)"
    if snap.get("models_trained", 0) < snap.get("models_to_train", 0):
        line += f", trained {snap['models_trained']}/{snap['models_to_train']}"
    return line


class JobConsole:
    """An ``echo`` for ``cluster.client.jobs.follow``: call it with log text as it arrives;
    ``close`` when the job has ended."""

    def __init__(
        self,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.interval, self.clock = interval, clock
        self.live = ""  # the live line on the terminal, if one is shown
        self.shown_at: float | None = None  # when the last progress line was printed (off a terminal)

    def __call__(self, text: str) -> None:
        for line in text.splitlines():
            if PROGRESS_PREFIX in line:
                try:
                    self._progress(summary(json.loads(line.split(PROGRESS_PREFIX, 1)[1])))
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut by the log tail: the next one will do
            elif line.startswith(HUMAN_PROGRESS):
                self._progress(line.removeprefix(HUMAN_PROGRESS))
            elif not RAY_BOOKKEEPING.match(line):
                self._print(line)

    def _progress(self, text: str) -> None:
        if self.interactive:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.live = f"[progress] {text}"[:width]
            self.stream.write("\r\033[K" + self.live)
            self.stream.flush()
            return
        now = self.clock()
        if self.shown_at is None or now - self.shown_at >= self.interval:
            self.shown_at = now
            self._print(f"[progress] {text}")

    def _print(self, line: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(line + "\n")
        if self.live:
            self.stream.write(self.live)
        self.stream.flush()

    def close(self) -> None:
        """End the live line, so that what follows starts on a line of its own."""
        if self.live:
            self.stream.write("\r\033[K")
            self.live = ""
        self.stream.flush()
