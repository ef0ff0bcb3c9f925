"""What a person sees of a running job: the job's own lines in order, its progress as one live
line on a terminal or one short line per interval elsewhere, never the machine records."""

from __future__ import annotations

import io
import json

from cluster.cli.console import JobConsole
from cluster.progress import describe_progress
from cluster.record import PROGRESS_PREFIX

SNAP = {
    "images_done": 1200,
    "images_total": 4320,
    "images_per_second": 310.0,
    "eta_seconds": 10.0,
    "units_done": 4,
    "units_total": 12,
    "units_failed": 0,
    "models_trained": 2,
    "models_to_train": 12,
    "training": {f"model-{i}": {"state": "queued"} for i in range(10)},
    "by_model": {f"model-{i}": [100, 360] for i in range(12)},
}


def log(*lines: str) -> str:
    return "\n".join(lines)


def test_off_a_terminal_one_short_progress_line_per_interval_and_no_machine_records():
    out, now = io.StringIO(), [0.0]
    console = JobConsole(out, interactive=False, interval=30.0, clock=lambda: now[0])
    console(log("sweep quick: 360 images x 12 configurations", describe_progress(SNAP)))
    now[0] = 5.0
    console(log(describe_progress(SNAP), PROGRESS_PREFIX + json.dumps(SNAP), "trained dssn/standard/sigma=0.25"))
    now[0] = 31.0
    console(describe_progress(SNAP))
    console.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "sweep quick: 360 images x 12 configurations"
    assert [line.startswith("[progress] 1200/4320 images") for line in lines[1:]] == [True, False, True]
    assert lines[2] == "trained dssn/standard/sigma=0.25"
    assert not any(PROGRESS_PREFIX in line or "by_model" in line for line in lines)
    assert max(map(len, lines)) < 200  # the machine record was about 3 KB


def test_on_a_terminal_one_live_line_under_the_jobs_own_lines(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # the live line is cut to the terminal's width
    out = io.StringIO()
    console = JobConsole(out, interactive=True)
    console(PROGRESS_PREFIX + json.dumps(SNAP))
    console("the table\n| a | b |")
    console.close()
    text = out.getvalue()
    assert "\n" not in text.split("the table")[0]  # the live line is rewritten in place, not added
    live = "[progress] 1,200/4,320 images (28%), 310.0/s, ETA 0m10s, units 4/12, trained 2/12"
    assert text.count(live) == 3  # shown, then redrawn under each line of the job's own
    assert text.endswith("| a | b |\n" + live + "\r\x1b[K")  # closed: cleared, the next line starts clean
    assert "by_model" not in text


def test_a_record_cut_by_the_log_tail_is_skipped():
    out = io.StringIO()
    console = JobConsole(out, interactive=False)
    console(PROGRESS_PREFIX + '{"images_do')
    console("done: 4320 of 4320 rows")
    assert out.getvalue() == "done: 4320 of 4320 rows\n"


def test_rays_own_info_records_stay_out_of_sight_and_its_warnings_do_not():
    """The quickstart's --wait printed Ray's bookkeeping between the job's lines (lines as they
    appear in a job's log, copied from one)."""
    out = io.StringIO()
    console = JobConsole(out, interactive=False)
    console(
        "2026-12-04 17:08:50,644\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
        "Running entrypoint for job certify-quickstart-ffd0fc1110: python -m cluster.job.driver --job-id x\n"
        "2026-12-04 17:08:56,240\tINFO worker.py:1841 -- Connecting to existing Ray cluster...\n"
        "sweep quickstart: 360 images x 12 configurations = 4320 rows\n"
        "2026-12-04 17:08:57,001\tWARNING worker.py:2000 -- A worker died or was killed\n"
    )
    console.close()
    assert out.getvalue().splitlines() == [
        "sweep quickstart: 360 images x 12 configurations = 4320 rows",
        "2026-12-04 17:08:57,001\tWARNING worker.py:2000 -- A worker died or was killed",
    ]
