"""Where shards live: ``<output>/<method>/<training>/sigma-<s>/seed-<k>/part-<unit_id>.parquet``,
written and parsed here only. The directory names are deliberately not Hive ``key=value`` pairs,
which pandas, pyarrow and DuckDB would read back as strings (or refuse to merge with the typed
column)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from certlib.rows.schema import CONFIG

SHARD_GLOB = "*/*/sigma-*/seed-*/part-*.parquet"


def partition_dir(output: str | Path, method: str, training: str, sigma: float, seed: int) -> Path:
    """The directory of one configuration's shards."""
    return Path(output) / method / training / f"sigma-{sigma!r}" / f"seed-{seed}"


def shard_path(output: str | Path, config: Mapping[str, Any], unit_id: str) -> Path:
    """The file of one unit: ``config`` holds method, training, sigma and seed."""
    return partition_dir(output, *(config[c] for c in CONFIG)) / f"part-{unit_id}.parquet"


def shard_config(output: str | Path, path: str | Path) -> dict[str, Any]:
    """The configuration a shard's path names (the inverse of ``shard_path``), typed."""
    method, training, sigma, seed = Path(path).relative_to(output).parts[:-1]
    return {
        "method": method,
        "training": training,
        "sigma": float(sigma.removeprefix("sigma-")),
        "seed": int(seed.removeprefix("seed-")),
    }


def legacy_layout(output: str | Path) -> str | None:
    """Why ``output`` cannot be read or extended: results in certify 0.1's Hive layout
    (``method=<m>/...``, partition columns stored as untyped directory names); None otherwise."""
    legacy = next(Path(output).glob("method=*"), None)
    if legacy is None:
        return None
    return (
        f"{legacy} is in the Hive layout of certify 0.1 (untyped partition columns): "
        "rerun its sweep into a new output directory"
    )


def leftover_files(output: str | Path) -> list[Path]:
    """Temporary files of shard writes that never finished (``atomic_write`` names them
    ``.part-<unit>.parquet.*.tmp``; a worker killed mid-write leaves one behind)."""
    return sorted(Path(output).glob(SHARD_GLOB.replace("part-*.parquet", ".part-*.parquet.*.tmp")))


def existing_shards(output: str | Path) -> list[Path]:
    return sorted(Path(output).glob(SHARD_GLOB))
