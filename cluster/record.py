"""The job record of a results directory and what the client and the job say to each other: both
sides import this module and nothing of each other. Everything a sweep writes that is not a
result row lives beside the results, in ``<output>.job/``, so the results directory holds Parquet shards
only (Polars, DuckDB and Spark read it whole without a glob).

``<output>.job/sweep.json`` is the resolved spec (`certify table` takes its radii from it, a
resume its shard size), ``progress.json`` the latest progress record (`certify status`),
``failures/`` one JSON record per failed unit or training, ``writer.lock`` the lock of the one
job writing the results (it names that job).
"""

from __future__ import annotations

from pathlib import Path

SPEC_VARIABLE = "CERTIFY_SPEC_B64"  # the job's validated sweep, base64 JSON, in its environment
PROGRESS_PREFIX = "[certify-progress] "  # a machine-readable progress record in the job's log
SWEEP_FILE = "sweep.json"
WRITER_LOCK = "writer.lock"  # held by the one job writing the results directory
PROGRESS_FILE = "progress.json"
FAILURES_DIR = "failures"


def record_dir(output: str | Path) -> Path:
    """``<output>.job``: the job record beside the results directory ``output``."""
    output = Path(output)
    return output.with_name(output.name + ".job")


def sweep_file(output: str | Path) -> Path:
    return record_dir(output) / SWEEP_FILE


def progress_file(output: str | Path) -> Path:
    return record_dir(output) / PROGRESS_FILE


def failures_dir(output: str | Path) -> Path:
    return record_dir(output) / FAILURES_DIR


def writer_lock(output: str | Path) -> Path:
    """The lock a job holds for as long as it writes ``output`` (``certlib.atomic.owned_lock``)."""
    return record_dir(output) / WRITER_LOCK
