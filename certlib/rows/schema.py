"""The row schema, defined once (the README documents each column), and building a unit's rows
from a certification."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from certlib.families import CertifySettings, SmoothingNoise

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
        pa.field("n", pa.int64()),  # sequential: the estimation samples this image used
        pa.field("alpha", pa.float64()),
        pa.field("delta", pa.float64()),  # Zhang et al.: the radius curve's failure probability (added to alpha)
        pa.field("certificate", pa.string()),  # standard (each family's own) | box | box_input
        pa.field("multiclass", pa.bool_()),  # Monte Carlo: multiclass bounds or binary; null for exact families
        pa.field("sampling", pa.string()),  # Monte Carlo: fixed (n samples) or sequential (stopped early)
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
            "n": result.get("n", used.get("n")),
            "alpha": used.get("alpha"),
            "certificate": result["certificate"],
            "multiclass": result["multiclass"],
            "sampling": result.get("sampling"),
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
