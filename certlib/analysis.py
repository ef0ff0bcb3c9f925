"""Reading result shards and the papers' tables: certified accuracy, the best-certified-accuracy
envelope over a sigma grid (Levine & Feizi 2021, Table 1), per-seed tables (Table 3).

Conventions (as in the papers):

* An image is certified at radius r when the prediction is its label, not an abstention, and
  its radius >= r (DSSN radii are inclusive by the tie rule; Monte Carlo radii are suprema).
* Clean accuracy is exact for DSSN; for Monte Carlo it is the accuracy of the class selected by
  the n0 samples (Yang et al.'s convention, Levine & Feizi Appendix B).
* The radius column is ``radius_l1``, or ``radius_l2`` for Gaussian rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds

PARTITION_SCHEMA = pa.schema([("method", pa.string()), ("training", pa.string()), ("sigma", pa.float64()), ("seed", pa.int64())])
CONFIG = ("method", "training", "sigma", "seed")


def load_results(path: str | Path, filters=None, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """All Parquet shards under a results directory as one DataFrame, partition columns
    (method, training, sigma, seed) included as plain columns.

    ``filters``: a pyarrow expression, or a dict {column: value or list of values}, pushed down
    to the files; ``columns``: project to these columns (faster on millions of rows).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    dataset = pds.dataset(path, format="parquet", partitioning=pds.partitioning(PARTITION_SCHEMA, flavor="hive"))
    expression = filters
    if isinstance(filters, dict):
        expression = None
        for column, value in filters.items():
            values = value if isinstance(value, (list, tuple, set)) else [value]
            term = pds.field(column).isin(list(values))
            expression = term if expression is None else expression & term
    table = dataset.to_table(columns=list(columns) if columns is not None else None, filter=expression)
    return table.to_pandas()


def _radius(df: pd.DataFrame) -> np.ndarray:
    l1 = df["radius_l1"].to_numpy(dtype=np.float64, na_value=np.nan) if "radius_l1" in df else np.full(len(df), np.nan)
    if "radius_l2" in df:
        l2 = df["radius_l2"].to_numpy(dtype=np.float64, na_value=np.nan)
        l1 = np.where(np.isnan(l1), l2, l1)
    return l1


def _scores(df: pd.DataFrame, radii: Sequence[float]) -> pd.DataFrame:
    """Per row: clean correctness and certified correctness at each radius (as 0/1 floats)."""
    prediction = df["prediction"].to_numpy()
    label = df["label"].to_numpy()
    radius = _radius(df)
    certified = (prediction == label) & (prediction >= 0)
    out = {"clean": (df["selected"].to_numpy() == label).astype(np.float64)}
    for r in radii:
        out[float(r)] = (certified & (radius >= r)).astype(np.float64)
    return pd.DataFrame(out, index=df.index)


def certified_accuracy(df: pd.DataFrame, radii: Sequence[float], by: Sequence[str] = CONFIG) -> pd.DataFrame:
    """Certified accuracy (fraction of images) at each radius for each configuration.

    Returns one row per configuration (the ``by`` columns), a ``clean`` column and one column
    per radius, plus ``images`` (rows counted).
    """
    by = list(by)
    scores = _scores(df, radii)
    scores[by] = df[by]
    grouped = scores.groupby(by, sort=True, observed=True)
    table = grouped.mean()
    table["images"] = grouped.size()
    return table.reset_index()


def best_certified_accuracy(df: pd.DataFrame, radii: Sequence[float], by: Sequence[str] = ("method", "training"),
                            over: str = "sigma") -> pd.DataFrame:
    """The envelope of Levine & Feizi Table 1: for each group and radius, the best certified
    accuracy over ``over`` (the sigma grid), with the clean accuracy and the ``over`` value of
    the configuration achieving it (ties go to the smaller value).

    Returns long format: the ``by`` columns, radius, certified_accuracy, clean_accuracy, and ``over``.
    """
    by = list(by)
    per_config = certified_accuracy(df, radii, by + [over])
    rows = []
    for keys, group in per_config.groupby(by, sort=True, observed=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        group = group.sort_values(over)
        for r in radii:
            best = group.iloc[int(np.argmax(group[float(r)].to_numpy()))]  # first maximum: smallest sigma
            rows.append({**dict(zip(by, keys)), "radius": float(r), "certified_accuracy": best[float(r)],
                         "clean_accuracy": best["clean"], over: best[over]})
    return pd.DataFrame(rows)


def format_envelope(table: pd.DataFrame, by: Sequence[str] = ("method", "training"), over: str = "sigma",
                    fmt: str = "markdown") -> str:
    """The envelope as the paper prints it: one row per group, one column per radius,
    cells "72.25% (81.50% @ σ=0.75)". ``fmt``: markdown, csv or latex."""
    by = list(by)
    radii = sorted(table["radius"].unique())
    symbol = "σ" if over == "sigma" else over
    lines = []
    for keys, group in table.groupby(by, sort=True, observed=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        cells = {}
        for row in group.itertuples(index=False):
            cells[row.radius] = f"{100 * row.certified_accuracy:.2f}% ({100 * row.clean_accuracy:.2f}% @ {symbol}={getattr(row, over):g})"
        lines.append([" / ".join(str(k) for k in keys)] + [cells.get(r, "") for r in radii])
    header = [" / ".join(by)] + [f"r = {r:g}" for r in radii]
    if fmt == "csv":
        import csv
        import io

        buffer = io.StringIO()
        csv.writer(buffer).writerows([header] + lines)
        return buffer.getvalue()
    if fmt == "latex":
        escape = lambda s: s.replace("%", r"\%").replace("σ", r"$\sigma$").replace("_", r"\_")  # noqa: E731
        body = [" & ".join(escape(c) for c in row) + r" \\" for row in [header] + lines]
        return "\n".join([r"\begin{tabular}{l" + "c" * len(radii) + "}", body[0], r"\hline", *body[1:], r"\end{tabular}"])
    if fmt != "markdown":
        raise ValueError(f"unknown table format {fmt!r}; expected markdown, csv or latex")
    rows = [header, ["---"] + ["---:"] * len(radii)] + lines
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
