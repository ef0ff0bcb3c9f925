"""The result rows (schema defined here, once) and their Hive-partitioned Parquet layout.

One row per (image, configuration). Each unit writes one file,
``<output>/method=<m>/training=<t>/sigma=<s>/seed=<k>/part-<unit_id>.parquet``, atomically
(temporary dot-file, fsync, rename), so ``pandas.read_parquet(output)`` reads the whole result
with the partition columns and never a half-written file (names starting with '.' or '_' are
ignored by Parquet readers).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PARTITIONS = ("method", "training", "sigma", "seed")
UNIT_METADATA_KEY = b"certify.unit"

# The row schema (partition columns method, training, sigma, seed live in the path).
ROW_SCHEMA = pa.schema([
    pa.field("job_id", pa.string()),
    pa.field("unit_id", pa.string()),
    pa.field("dataset", pa.string()),
    pa.field("split", pa.string()),
    pa.field("index", pa.int64()),  # the image's index in the dataset's official order
    pa.field("label", pa.int64()),
    pa.field("lambda", pa.float64()),  # effective lambda (DSSN: L/(2q)); null for Gaussian/Laplace
    pa.field("noise_scale", pa.float64()),  # sigma for Gaussian, b for Laplace, lambda otherwise
    pa.field("levels", pa.int64()),  # DSSN: L; null otherwise
    pa.field("q", pa.int64()),
    pa.field("n0", pa.int64()),  # Monte Carlo only
    pa.field("n", pa.int64()),
    pa.field("alpha", pa.float64()),
    pa.field("certificate", pa.string()),  # dssn_exact | binary | multiclass
    pa.field("selected", pa.int64()),  # DSSN: the prediction; Monte Carlo: the n0 samples' class
    pa.field("prediction", pa.int64()),  # -1 = abstain
    pa.field("correct", pa.bool_()),  # prediction == label
    pa.field("votes", pa.list_(pa.int64())),  # DSSN: votes over all L offsets; MC: counts of the n samples
    pa.field("selection_votes", pa.list_(pa.int64())),  # MC: counts of the n0 samples; null for DSSN
    pa.field("p_a_lower", pa.float64()),
    pa.field("p_b_upper", pa.float64()),
    pa.field("radius_l1", pa.float64()),  # NaN where abstaining or not an L1 certificate
    pa.field("radius_l2", pa.float64()),
    pa.field("seconds", pa.float64()),  # certification time per image (unit wall time / images)
    pa.field("precision", pa.string()),
    pa.field("batch_size", pa.int64()),
    pa.field("worker_host", pa.string()),
    pa.field("device", pa.string()),
    pa.field("model_sha256", pa.string()),
    pa.field("library_version", pa.string()),
])


def partition_dir(output: str | Path, method: str, training: str, sigma: float, seed: int) -> Path:
    return Path(output) / f"method={method}" / f"training={training}" / f"sigma={sigma!r}" / f"seed={seed}"


def shard_path(output: str | Path, unit) -> Path:
    m = unit.model
    return partition_dir(output, m.method, m.training, m.sigma, m.seed) / f"part-{unit.unit_id}.parquet"


def rows_table(columns: dict) -> pa.Table:
    """A table in ROW_SCHEMA from a dict of column arrays (missing nullable columns are null)."""
    n = len(columns["index"])
    arrays = []
    for f in ROW_SCHEMA:
        value = columns.get(f.name)
        if value is None:
            arrays.append(pa.nulls(n, f.type))
        elif pa.types.is_list(f.type):
            arrays.append(pa.array([None if v is None else [int(c) for c in v] for v in value], f.type))
        elif isinstance(value, (str, int, float)):
            arrays.append(pa.array([value] * n, f.type))
        else:
            arrays.append(pa.array(np.asarray(value), f.type, from_pandas=True) if f.type != pa.string() else pa.array(value, f.type))
    return pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)


def write_shard(path: str | Path, table: pa.Table, unit_parameters: str) -> None:
    """Write a unit's rows atomically: a dot-named temporary file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({UNIT_METADATA_KEY: unit_parameters.encode()})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_state(path: str | Path, unit_parameters: str, rows: int) -> str:
    """'missing', 'valid', or why the file is not a valid result of this unit."""
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        meta = pq.read_metadata(path)
    except Exception as err:  # noqa: BLE001 - any read failure means the file must be recomputed
        return f"unreadable ({err})"
    stored = (meta.metadata or {}).get(UNIT_METADATA_KEY)
    if stored is None or json.loads(stored) != json.loads(unit_parameters):
        return "computed with other parameters"
    if meta.num_rows != rows:
        return f"holds {meta.num_rows} rows instead of {rows}"
    if not meta.schema.to_arrow_schema().remove_metadata().equals(ROW_SCHEMA):
        return "has another schema"
    return "valid"


def existing_shards(output: str | Path) -> list[Path]:
    return sorted(Path(output).glob("method=*/training=*/sigma=*/seed=*/part-*.parquet"))
