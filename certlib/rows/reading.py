"""Loading a results directory typed, as ``pandas.read_parquet`` would, with rows of older
shards read as today's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds

from certlib.rows.layout import legacy_layout
from certlib.rows.schema import ROW_SCHEMA
from certlib.rows.shards import read_shard


def _expression(filters):
    if not isinstance(filters, dict):
        return filters
    expression = None
    for column, value in filters.items():
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        term = pds.field(column).isin(values)
        expression = term if expression is None else expression & term
    return expression


def load_results(path: str | Path, filters=None, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """All Parquet shards under a results directory as one DataFrame, typed as ``ROW_SCHEMA``
    (the same frame ``pandas.read_parquet(path)`` gives).

    Every shard is verified as it is read (``read_shard``: page checksums, column digests): a
    damaged one raises ``DamagedShard`` naming the file, never returns different numbers. A
    directory whose shards of one method were certified with different settings or image
    selections (two jobs writing into it) is refused with one line.

    ``filters``: a pyarrow expression, or a dict {column: value or list of values}.
    ``columns``: read only these (much faster on millions of rows than the vote lists).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no results directory at {path}")
    refused = legacy_layout(path)
    if refused:
        raise ValueError(refused)
    # Names starting with '.' or '_' are temporary or foreign files, skipped as Parquet readers do.
    files = [
        f
        for f in sorted(path.rglob("*.parquet"))
        if not any(part.startswith((".", "_")) for part in f.relative_to(path).parts)
    ]
    if not files:
        raise FileNotFoundError(f"no result shards under {path}")
    wanted = list(columns) if columns is not None else list(ROW_SCHEMA.names)
    unknown = [c for c in wanted if c not in ROW_SCHEMA.names]
    if unknown:
        raise ValueError(f"no column {unknown[0]!r} in the result rows")
    if isinstance(filters, dict) or filters is None:
        needed = list(dict.fromkeys([*wanted, *(filters or {})]))
    else:  # an expression may name any column
        needed = list(ROW_SCHEMA.names)
    schema = pa.schema([ROW_SCHEMA.field(c) for c in needed], metadata=ROW_SCHEMA.metadata)
    tables: list[pa.Table] = []
    settings: dict[str, tuple[Path, dict]] = {}
    for file in files:
        table, parameters = read_shard(file, needed)
        _check_same_settings(settings, file, parameters)
        for name in needed:  # shards written before a column existed read it as null
            if name not in table.column_names:
                table = table.append_column(ROW_SCHEMA.field(name), pa.nulls(len(table), ROW_SCHEMA.field(name).type))
        tables.append(table.select(needed).cast(schema))
    table = pds.dataset(pa.concat_tables(tables)).to_table(columns=wanted, filter=_expression(filters))
    return _split_legacy_certificates(table.replace_schema_metadata(ROW_SCHEMA.metadata).to_pandas())


def _check_same_settings(seen: dict[str, tuple[Path, dict]], file: Path, parameters: dict) -> None:
    """Refuse a shard of a method whose earlier shards in the directory were certified with
    other settings or images (``seen``: method -> the first shard's path and settings)."""
    method = (parameters.get("model") or {}).get("method")
    if method is None:  # certify 0.2: no recorded parameters to compare
        return
    mine = {"certify": parameters.get("certify"), "dataset": parameters.get("dataset")}
    first, theirs = seen.setdefault(method, (file, mine))
    if theirs != mine:
        field = next(
            f"{part}.{key}"
            for part in mine
            for key in sorted({*(mine[part] or {}), *(theirs[part] or {})})
            if (mine[part] or {}).get(key) != (theirs[part] or {}).get(key)
        )
        raise ValueError(
            f"{file.parent}: its {method} rows were certified with different settings ({field}: {first} "
            f"and {file}), e.g. by two jobs writing into one directory; read them apart"
        )


# certify 0.2 stored both facts in one string: each value's (certificate, multiclass).
LEGACY_CERTIFICATES = {
    "dssn_exact": ("standard", None),
    "binary": ("standard", False),
    "multiclass": ("standard", True),
    "binary_box": ("box", False),
    "multiclass_box": ("box", True),
    "binary_box_input": ("box_input", False),
    "multiclass_box_input": ("box_input", True),
}


def _split_legacy_certificates(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of certify 0.2 shards read as today's: their ``certificate`` string split into the
    certificate and ``multiclass``."""
    if "certificate" not in df:
        return df
    legacy = df["certificate"].isin(list(LEGACY_CERTIFICATES))
    if legacy.any():
        old = df.loc[legacy, "certificate"]
        df.loc[legacy, "certificate"] = old.map(lambda value: LEGACY_CERTIFICATES[value][0])
        if "multiclass" in df:
            df.loc[legacy, "multiclass"] = old.map(lambda value: LEGACY_CERTIFICATES[value][1]).astype("boolean")
    return df
