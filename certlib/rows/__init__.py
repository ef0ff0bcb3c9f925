"""The result rows, defined once: their schema and how a unit's rows are built (``schema``),
where shards live (``layout``), writing a shard and trusting one on disk (``shards``: atomic
writes, page checksums and column digests), loading a results directory typed (``reading``),
and the smoothing and votes re-certification reads back (``stored``).

One row per (image, configuration); each unit writes one file. Every column, the
configuration's included, is stored typed in the files: ``pandas.read_parquet(output)``,
pyarrow datasets, Polars (``<output>/**/*.parquet``) and DuckDB read the directory typed,
nullable integers as pandas ``Int64``. The README documents each column.
"""

from certlib.rows.layout import (
    SHARD_GLOB,
    existing_shards,
    leftover_files,
    legacy_layout,
    partition_dir,
    shard_config,
    shard_path,
)
from certlib.rows.reading import LEGACY_CERTIFICATES, load_results
from certlib.rows.schema import CONFIG, NULLABLE, RADIUS_COLUMNS, ROW_SCHEMA, certification_rows, rows_table
from certlib.rows.shards import (
    DIGESTS_KEY,
    UNIT_METADATA_KEY,
    DamagedShard,
    column_digest,
    read_shard,
    shard_state,
    write_shard,
)
from certlib.rows.stored import PARAMETER_COLUMNS, smoothing_columns, stored_noise, stored_votes

__all__ = [
    "CONFIG",
    "DIGESTS_KEY",
    "LEGACY_CERTIFICATES",
    "NULLABLE",
    "PARAMETER_COLUMNS",
    "RADIUS_COLUMNS",
    "ROW_SCHEMA",
    "SHARD_GLOB",
    "UNIT_METADATA_KEY",
    "DamagedShard",
    "certification_rows",
    "column_digest",
    "existing_shards",
    "leftover_files",
    "legacy_layout",
    "load_results",
    "partition_dir",
    "read_shard",
    "rows_table",
    "shard_config",
    "shard_path",
    "shard_state",
    "smoothing_columns",
    "stored_noise",
    "stored_votes",
    "write_shard",
]
