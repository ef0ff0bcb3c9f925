"""The result rows' Hive-partitioned Parquet layout (their schema is certlib.schema's).

One row per (image, configuration). Each unit writes one file,
``<output>/method=<m>/training=<t>/sigma=<s>/seed=<k>/part-<unit_id>.parquet``, atomically
(temporary dot-file, fsync, rename), so ``pandas.read_parquet(output)`` reads the whole result
with the partition columns and never a half-written file (names starting with '.' or '_' are
ignored by Parquet readers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from certlib.atomic import atomic_write
from certlib.schema import ROW_SCHEMA

UNIT_METADATA_KEY = b"certify.unit"


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
    """Write a unit's rows atomically, its parameters in the file's metadata."""
    table = table.replace_schema_metadata({UNIT_METADATA_KEY: unit_parameters.encode()})
    atomic_write(path, lambda handle: pq.write_table(table, handle))


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
