"""Writing one unit's shard, and trusting one on disk only while its bytes hold what was
written.

A shard is written atomically (``atomic_write``: temporary file, fsync, rename, fsync of the
directory) with Parquet page checksums (CRC-32 of every data page) and, in its metadata, the
unit's parameters and a SHA-256 digest of each column's values. Reading verifies both: a flipped
bit in a data page fails its CRC, one in a page header or the footer either fails to decode or
changes a value and with it the column's digest. A damaged shard is named (``DamagedShard``),
never read as numbers; a resumed job recomputes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from certlib.atomic import atomic_write
from certlib.rows.schema import ROW_SCHEMA

UNIT_METADATA_KEY = b"certify.unit"
DIGESTS_KEY = b"certify.digests"  # {column: SHA-256 of its values}


class DamagedShard(ValueError):
    """A shard whose bytes no longer hold what was written; the message names the file."""


def _value_bytes(array: pa.Array) -> bytes:
    """A column's values as bytes that depend on the values only, not on how a writer or reader
    laid them out (buffers, offsets, chunks): validity, then the values (strings through their
    dictionary, lists through their lengths and flattened values)."""
    # Without nulls (most columns) the validity is all zero bits and filling changes nothing:
    # the same bytes, without two passes over the column.
    nulls = array.null_count
    validity = (
        np.packbits(array.is_null().to_numpy(zero_copy_only=False)).tobytes() if nulls else bytes(-(-len(array) // 8))
    )
    kind = array.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        return validity + lengths.tobytes() + _value_bytes(array.flatten())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        encoded = (array.fill_null("") if nulls else array).dictionary_encode()
        words = json.dumps(encoded.dictionary.to_pylist()).encode()
        return validity + words + encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64).tobytes()
    filled = array.fill_null(False if pa.types.is_boolean(kind) else 0) if nulls else array
    return validity + filled.to_numpy(zero_copy_only=False).tobytes()


def _type_name(kind: pa.DataType) -> str:
    """A type's name without a list's child field name (``item`` written, ``element`` read back)."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return f"list<{_type_name(kind.value_type)}>"
    return str(kind)


def column_digest(column: pa.ChunkedArray) -> str:
    """SHA-256 of a column's type and values (``_value_bytes``)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return hashlib.sha256(_type_name(array.type).encode() + b"\0" + _value_bytes(array)).hexdigest()


def write_shard(path: str | Path, table: pa.Table, unit_parameters: str) -> None:
    """Write a unit's rows atomically with page checksums, its parameters and its columns'
    digests in the file's metadata."""
    digests = {name: column_digest(table.column(name)) for name in table.column_names}
    metadata = {
        **(table.schema.metadata or {}),
        UNIT_METADATA_KEY: unit_parameters.encode(),
        DIGESTS_KEY: json.dumps(digests, sort_keys=True).encode(),
    }
    table = table.replace_schema_metadata(metadata)
    atomic_write(path, lambda handle: pq.write_table(table, handle, write_page_checksum=True))


def read_shard(path: str | Path, columns: Sequence[str] | None = None) -> tuple[pa.Table, dict]:
    """A shard's ``columns`` (default all), verified against its page checksums and column
    digests, and its unit parameters (empty for shards of certify 0.2, written without them;
    their columns cannot be verified and are read as they are). DamagedShard where the bytes
    do not hold what was written."""
    path = Path(path)
    try:
        shard = pq.ParquetFile(path, page_checksum_verification=True)
        schema = shard.schema_arrow
        stored = schema.metadata or {}
        digests = json.loads(stored[DIGESTS_KEY]) if DIGESTS_KEY in stored else None
        parameters = json.loads(stored[UNIT_METADATA_KEY]) if UNIT_METADATA_KEY in stored else {}
        present = [c for c in (columns or ROW_SCHEMA.names) if c in schema.names]
        table = shard.read(columns=present)
    except Exception as err:  # noqa: BLE001 - every way a damaged file fails to decode
        raise DamagedShard(f"{path}: damaged or not a result shard ({_first_line(err)})") from None
    if (digests is not None and not isinstance(digests, dict)) or not isinstance(parameters, dict):
        raise DamagedShard(f"{path}: damaged metadata")
    if isinstance(digests, dict) and set(digests) != set(schema.names):
        raise DamagedShard(f"{path}: damaged: its columns are not those it was written with")
    for name in present:
        if isinstance(digests, dict) and digests.get(name) != _digest_or_none(table.column(name)):
            raise DamagedShard(f"{path}: damaged: the values of column {name!r} changed since it was written")
    return table, parameters


def _digest_or_none(column: pa.ChunkedArray) -> str | None:
    """The column's digest, or None where a damaged footer gave it a type no writer uses (a
    flipped bit can turn an integer column into bytes, which has no digest form)."""
    try:
        return column_digest(column)
    except (pa.ArrowException, TypeError, ValueError):
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def shard_state(path: str | Path, unit_parameters: str, rows: int) -> str:
    """'missing', 'valid', or why the file is not a valid result of this unit ('damaged ...'
    where its bytes changed since they were written)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        meta = pq.read_metadata(path)
        stored = json.loads((meta.metadata or {}).get(UNIT_METADATA_KEY, b"null"))
    except Exception as err:  # noqa: BLE001 - any read failure means the file must be recomputed
        return f"unreadable ({_first_line(err)})"
    if stored != json.loads(unit_parameters):
        return "computed with other parameters"
    if meta.num_rows != rows:
        return f"holds {meta.num_rows} rows instead of {rows}"
    if not meta.schema.to_arrow_schema().remove_metadata().equals(ROW_SCHEMA):
        return "has another schema"
    try:
        read_shard(path)
    except DamagedShard as err:
        return str(err).removeprefix(f"{path}: ")
    return "valid"
