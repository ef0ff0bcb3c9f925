"""The result rows, defined once: their schema, the Parquet layout (written and parsed here
only), building a unit's rows from a certification, writing and validating a shard, and loading
results.

One row per (image, configuration). Each unit writes one file,
``<output>/<method>/<training>/sigma-<s>/seed-<k>/part-<unit_id>.parquet``, atomically
(temporary ``.*.tmp`` file, fsync, rename), so a reader never sees a half-written file. Every
column, the configuration's included, is stored typed in the files: the directory names are
deliberately not Hive ``key=value`` pairs, which pandas, pyarrow and DuckDB would read back as
strings (or refuse to merge with the typed column). ``pandas.read_parquet(output)``, pyarrow
datasets, Polars (``<output>/**/*.parquet``) and DuckDB read the directory typed, nullable
integers as pandas ``Int64``. The README documents each column.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from certlib.atomic import atomic_write
from certlib.data import DATASETS
from certlib.families import CertifySettings, SmoothingNoise, Votes, family, make_noise

# The configuration of a row: one model and its smoothing (with Zhang et al.'s k, below).
CONFIG = ("method", "training", "sigma", "seed")

_FIELDS = pa.schema(
    [
        pa.field("method", pa.string()),
        pa.field("training", pa.string()),  # standard | stability
        pa.field("sigma", pa.float64()),
        pa.field("seed", pa.int64()),
        pa.field("job_id", pa.string()),
        pa.field("unit_id", pa.string()),
        pa.field("dataset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("image_index", pa.int64()),  # the image's index in the dataset's official order
        pa.field("label", pa.int64()),
        pa.field("noise_lambda", pa.float64()),  # effective lambda (DSSN: L/(2q)); null for Gaussian/Laplace
        pa.field("noise_scale", pa.float64()),  # sigma for Gaussian, b for Laplace, lambda otherwise
        pa.field("k", pa.float64()),  # Zhang et al.'s shape k; null for the other families
        pa.field("levels", pa.int64()),  # DSSN: L; null otherwise
        pa.field("q", pa.int64()),
        pa.field("n0", pa.int64()),  # Monte Carlo only
        pa.field("n", pa.int64()),
        pa.field("alpha", pa.float64()),
        pa.field("delta", pa.float64()),  # Zhang et al.: the radius curve's failure probability (added to alpha)
        pa.field("certificate", pa.string()),  # standard (each family's own) | box | box_input
        pa.field("multiclass", pa.bool_()),  # Monte Carlo: multiclass bounds or binary; null for exact families
        pa.field("selected", pa.int64()),  # DSSN: the prediction; Monte Carlo: the n0 samples' class
        pa.field("prediction", pa.int64()),  # -1 = abstain
        pa.field("correct", pa.bool_()),  # prediction == label
        pa.field("votes", pa.list_(pa.int64())),  # DSSN: votes over all L offsets; MC: counts of the n samples
        pa.field("selection_votes", pa.list_(pa.int64())),  # MC: counts of the n0 samples; null for DSSN
        pa.field("p_a_lower", pa.float64()),
        pa.field("p_b_upper", pa.float64()),
        pa.field("norm", pa.string()),  # the norm of this row's radius: l1, l2 or linf
        pa.field("radius_l1", pa.float64()),  # NaN where abstaining or not an L1 certificate
        pa.field("radius_l2", pa.float64()),
        pa.field("radius_linf", pa.float64()),
        pa.field("seconds", pa.float64()),  # certification time per image (unit wall time / images)
        pa.field("precision", pa.string()),
        pa.field("batch_size", pa.int64()),
        pa.field("worker_host", pa.string()),
        pa.field("device", pa.string()),
        pa.field("model_sha256", pa.string()),
        pa.field("training_noise", pa.string()),  # the noise the model was trained with (its card's method)
        pa.field("training_sigma", pa.float64()),  # the sigma it was trained at (its card's)
        pa.field("library_version", pa.string()),
    ]
)
# Columns that are null for some families, with the pandas dtype that reads them back as what
# they are (Int64, not floats; boolean, not objects).
NULLABLE = {"levels": "Int64", "n0": "Int64", "n": "Int64", "multiclass": "boolean"}


def _with_pandas_metadata(schema: pa.Schema) -> pa.Schema:
    """``schema`` carrying pandas' own metadata, which makes ``pandas.read_parquet`` restore the
    NULLABLE columns as their pandas dtypes (pyarrow writes the same metadata for a DataFrame)."""
    empty = schema.empty_table().to_pandas()
    for column, dtype in NULLABLE.items():
        empty[column] = empty[column].astype(dtype)
    return schema.with_metadata(pa.Table.from_pandas(empty, schema=schema, preserve_index=False).schema.metadata)


ROW_SCHEMA = _with_pandas_metadata(_FIELDS)
RADIUS_COLUMNS = {"l1": "radius_l1", "l2": "radius_l2", "linf": "radius_linf"}  # the column of each norm's radius
UNIT_METADATA_KEY = b"certify.unit"
SHARD_GLOB = "*/*/sigma-*/seed-*/part-*.parquet"


# --------------------------------------------------------------------------- layout


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


def existing_shards(output: str | Path) -> list[Path]:
    return sorted(Path(output).glob(SHARD_GLOB))


# --------------------------------------------------------------------------- building and writing


def rows_table(columns: Mapping[str, Any]) -> pa.Table:
    """A table in ROW_SCHEMA from a dict of column arrays or scalars (missing columns are null)."""
    n = len(columns["image_index"])
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
            arrays.append(
                pa.array(value, f.type)
                if f.type == pa.string()
                else pa.array(np.asarray(value), f.type, from_pandas=True)
            )
    return pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)


def certification_rows(
    noise: SmoothingNoise,
    result: Mapping[str, Any],
    settings: CertifySettings,
    *,
    indices: np.ndarray,
    labels: np.ndarray,
    **context: Any,
) -> pa.Table:
    """The rows of one certification: ``result`` as ``Smooth.certify`` returns it for images of
    dataset ``indices`` with ``labels``, under ``settings`` (the rows keep what the family
    depends on); ``context`` gives the remaining columns (training, seed, job_id, unit_id,
    dataset, split, q, seconds, ...)."""
    described = noise.describe()
    used = noise.depends_on(settings)
    prediction = np.asarray(result["prediction"])
    radius = np.asarray(result["radius"], dtype=np.float64)
    nan = np.full(len(prediction), np.nan)
    return rows_table(
        {
            **context,
            "method": noise.name,
            "sigma": noise.sigma,
            "image_index": indices,
            "label": labels,
            "noise_lambda": described.get("lambda"),
            "noise_scale": noise.scale,
            "k": described.get("k"),
            "delta": used.get("delta"),
            "norm": noise.norm,
            "levels": described.get("levels"),
            "n0": used.get("n0"),
            "n": used.get("n"),
            "alpha": used.get("alpha"),
            "certificate": result["certificate"],
            "multiclass": result["multiclass"],
            "selected": result["selected"],
            "prediction": prediction,
            "correct": prediction == labels,
            "votes": result["votes"],
            "selection_votes": result["selection_votes"],
            "p_a_lower": result["p_a_lower"],
            "p_b_upper": result["p_b_upper"],
            **{column: radius if norm == noise.norm else nan for norm, column in RADIUS_COLUMNS.items()},
        }
    )


def write_shard(path: str | Path, table: pa.Table, unit_parameters: str) -> None:
    """Write a unit's rows atomically, its parameters in the file's metadata."""
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), UNIT_METADATA_KEY: unit_parameters.encode()}
    )
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


# --------------------------------------------------------------------------- reading


def _expression(filters):
    if not isinstance(filters, dict):
        return filters
    expression = None
    for column, value in filters.items():
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        term = pds.field(column).isin(values)
        expression = term if expression is None else expression & term
    return expression


def _constant(rows: pd.DataFrame, column: str) -> Any:
    """The one value ``rows`` hold in ``column``; ValueError where they hold several or lack it."""
    if column not in rows:
        raise ValueError(f"the rows lack the {column!r} column their smoothing is rebuilt from")
    values = rows[column].unique()
    if len(values) != 1:
        shown = ", ".join(str(v) for v in values[:4])
        raise ValueError(f"rows of one smoothing differ in {column} ({shown}{', ...' if len(values) > 4 else ''})")
    return values[0]


# The row column each family parameter is stored in (the input dimension: the dataset's).
PARAMETER_COLUMNS = {"q": "q", "seed": "seed", "k": "k", "dim": "dataset"}


def smoothing_columns(method: str) -> tuple[str, ...]:
    """The row columns the smoothing of ``method``'s rows is rebuilt from: sigma and its
    family's own parameters (``parameters``)."""
    return ("sigma", *(PARAMETER_COLUMNS[name] for name in family(method).parameters))


def stored_noise(rows: pd.DataFrame) -> SmoothingNoise:
    """The smoothing that certified ``rows``, rebuilt through the registry from the columns of
    its family's parameters (``smoothing_columns``: sigma, DSSN's q and seed, Zhang et al.'s k
    and the dataset's input dimension), which must be the same in every row, and checked
    against what the rows store (DSSN's L)."""
    method = _constant(rows, "method")
    values = {column: _constant(rows, column) for column in smoothing_columns(method)}
    if "dataset" in values and values["dataset"] not in DATASETS:
        raise ValueError(f"{method} rows name an unknown dataset {values['dataset']!r}")
    parameters = {
        "q": lambda: int(values["q"]),
        "seed": lambda: int(values["seed"]),
        "k": lambda: float(values["k"]),
        "dim": lambda: math.prod(DATASETS[values["dataset"]].input_shape),
    }
    own = {name: parameters[name]() for name in family(method).parameters}
    noise = make_noise(method, float(values["sigma"]), **own)
    stored, levels = (rows["levels"].iloc[0] if "levels" in rows else None), noise.describe().get("levels")
    if levels is not None and pd.notna(stored) and int(stored) != levels:
        raise ValueError(
            f"{method} rows store L={int(stored)}, but sigma={values['sigma']} at q={noise.describe()['q']} "
            f"gives L={levels}"
        )
    return noise


def stored_votes(rows: pd.DataFrame, exact: bool) -> Votes:
    """The vote counts ``rows`` store: all copies' (exact), or Monte Carlo's estimation and
    selection counts."""
    if rows["votes"].isna().any() or (not exact and rows["selection_votes"].isna().any()):
        raise ValueError(f"{rows['method'].iloc[0]} rows without stored counts cannot be re-certified")
    counts = np.stack(list(rows["votes"])).astype(np.int64)
    return Votes(counts, None if exact else np.stack(list(rows["selection_votes"])).astype(np.int64))


def load_results(path: str | Path, filters=None, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """All Parquet shards under a results directory as one DataFrame, typed as ``ROW_SCHEMA``
    (the same frame ``pandas.read_parquet(path)`` gives).

    ``filters``: a pyarrow expression, or a dict {column: value or list of values}, pushed down
    to the files. ``columns``: read only these (much faster on millions of rows than the vote
    lists).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no results directory at {path}")
    refused = legacy_layout(path)
    if refused:
        raise ValueError(refused)
    # Names starting with '.' or '_' are temporary or foreign files, skipped as Parquet readers do.
    files = [
        str(f)
        for f in sorted(path.rglob("*.parquet"))
        if not any(part.startswith((".", "_")) for part in f.relative_to(path).parts)
    ]
    if not files:
        raise FileNotFoundError(f"no result shards under {path}")
    # The full schema: shards written before a column existed read it as null.
    dataset = pds.dataset(files, schema=ROW_SCHEMA, format="parquet")
    table = dataset.to_table(columns=list(columns) if columns is not None else None, filter=_expression(filters))
    return _split_legacy_certificates(table.to_pandas())


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
