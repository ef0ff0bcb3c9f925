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

import hashlib
import importlib.util
from pathlib import Path

# The job's validated sweep travels as a file in a package of its own, shipped with the job
# (``py_modules`` of its runtime environment: Ray uploads it through the dashboard and unpacks it
# on the driver's node, also for a remote cluster), its SHA-256 on the driver's command line. Not
# in an environment variable: Linux limits each to 128 KiB, and Ray also copies the job's
# metadata into one (RAY_JOB_CONFIG_JSON_ENV_VAR), so the metadata holds a copy only when small.
SPEC_PACKAGE = "certify_job_spec"
SPEC_FILE = "spec.json"
METADATA_SPEC_BYTES = 32 << 10  # a spec up to this size is also in the job's metadata (certify attach)
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


def spec_digest(spec_json: str) -> str:
    return hashlib.sha256(spec_json.encode()).hexdigest()


def write_spec_package(spec_json: str, staging: Path) -> Path:
    """The directory to ship as ``py_modules``: a package SPEC_PACKAGE holding SPEC_FILE."""
    package = staging / SPEC_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""The sweep spec shipped with a certify job (spec.json)."""\n')
    (package / SPEC_FILE).write_text(spec_json, encoding="utf-8")
    return package


def read_spec_package(digest: str, limit: int) -> str:
    """The spec shipped with this job (``write_spec_package``, found on the import path as Ray
    puts ``py_modules`` there), checked against its SHA-256 ``digest``; at most ``limit`` bytes
    are read. Raises ValueError (one line) when it is missing, too large or another spec."""
    found = importlib.util.find_spec(SPEC_PACKAGE)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ValueError(f"no {SPEC_PACKAGE} package shipped with the job: submit it with `certify submit-job`")
    path = Path(locations[0]) / SPEC_FILE
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit:,} bytes")
    text = data.decode("utf-8")
    if spec_digest(text) != digest:
        raise ValueError(f"{path}: not the spec this job was submitted with (its SHA-256 differs)")
    return text
