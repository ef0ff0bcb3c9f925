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
import json
from collections.abc import Mapping
from pathlib import Path

# The job's validated sweep reaches its driver, its SHA-256 on the driver's command line, in the
# job's metadata when it is small: Ray hands the driver its job's metadata in an environment
# variable (JOB_CONFIG_VARIABLE), and Linux limits each to 128 KiB. A larger spec travels as a
# file in a package of its own, shipped with the job (``py_modules`` of its runtime environment:
# Ray uploads it through the dashboard and unpacks it on the driver's node, also for a remote
# cluster). A job with a runtime environment starts each of its Ray processes through a setup
# step (a Python process of its own), so a small spec ships none unless models' code does.
SPEC_PACKAGE = "certify_job_spec"
SPEC_FILE = "spec.json"
METADATA_SPEC_BYTES = 32 << 10  # a spec up to this size is in the job's metadata (certify attach)
JOB_CONFIG_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray's: {"runtime_env": ..., "metadata": ...}
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


def read_shipped_spec(digest: str, limit: int, environ: Mapping[str, str]) -> str:
    """The spec shipped with this job: the package (``write_spec_package``, found on the import
    path as Ray puts ``py_modules`` there), else the copy in the job's metadata (``environ``'s
    JOB_CONFIG_VARIABLE), checked against its SHA-256 ``digest``; at most ``limit`` bytes. Raises
    ValueError (one line) when neither is there, or it is too large or another spec."""
    found = importlib.util.find_spec(SPEC_PACKAGE)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if locations:
        path = Path(locations[0]) / SPEC_FILE
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
        where = str(path)
    else:
        data = _metadata_spec(environ).encode(errors="replace")  # a lone surrogate: no spec of ours
        where = "the job's metadata"
    if len(data) > limit:
        raise ValueError(f"{where}: the spec is larger than {limit:,} bytes")
    text = data.decode("utf-8")
    if spec_digest(text) != digest:
        raise ValueError(f"{where}: not the spec this job was submitted with (its SHA-256 differs)")
    return text


def _metadata_spec(environ: Mapping[str, str]) -> str:
    missing = f"no spec shipped with the job (no {SPEC_PACKAGE} package, none in its metadata)"
    try:
        spec = json.loads(environ.get(JOB_CONFIG_VARIABLE) or "{}").get("metadata", {}).get("spec")
    except (ValueError, AttributeError):
        spec = None
    if not isinstance(spec, str):
        raise ValueError(f"{missing}: submit it with `certify submit-job`")
    return spec
