"""The math of the accuracy tables: certified accuracy per configuration, the
best-certified-accuracy envelope over a sigma grid (Levine & Feizi 2021, Table 1), per-seed
tables (Table 3), Cohen et al.'s high-probability correction (Theorem 5) and runtime summaries.

Conventions (as in the papers):

* An image is certified at radius r when the prediction is its label, not an abstention, and
  its radius >= r (DSSN radii are inclusive by the tie rule; Monte Carlo radii are suprema).
* Clean accuracy is exact for DSSN; for Monte Carlo it is the accuracy of the class selected by
  the n0 samples (Yang et al.'s convention, Levine & Feizi Appendix B): the ``selected`` column.
* A row's radius is in its family's norm (``radius_l1`` or ``radius_l2``). Accuracies are fractions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from certlib.families import traits
from certlib.rows import CONFIG, RADIUS_COLUMNS

# The columns the accuracy tables need: load only these for speed on millions of rows.
ANALYSIS_COLUMNS = (
    "method",
    "training",
    "sigma",
    "seed",
    "image_index",
    "label",
    "selected",
    "prediction",
    "radius_l1",
    "radius_l2",
    "radius_linf",
    "k",
    "training_sigma",
    "alpha",
    # never pooled into one table row (NEVER_POOLED): read so that a projection keeps them apart
    "training_noise",
    "dataset",
    "split",
)
Over = str | Sequence[str]  # the column(s) an envelope chooses over: sigma, or sigma and k


# Radii of these norms are shown in units of 1/PER[norm] (L-infinity in 1/255, as the papers do).
PER = {"linf": 255}
RADII = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)  # pixel scale: where a sweep names none
LINF_RADII = (2, 4, 6, 8, 10, 12)  # in 1/255: Zhang et al.'s Table 3


# Columns a table row never pools over: one row is one method, training mode, training noise
# and dataset (norms are split before, by ``split_by_norm``).
NEVER_POOLED = ("method", "training", "training_noise", "dataset", "split")


def over_columns(over: Over) -> list[str]:
    return [over] if isinstance(over, str) else list(over)


# Columns that tell one configuration's rows (one model, one smoothing) from another's beyond
# CONFIG: never pooled where a table is per configuration.
CONFIGURATION_POOLED_NEVER = NEVER_POOLED + ("k", "training_sigma")


def grouping(df: pd.DataFrame, by: Sequence[str], never: Sequence[str] = NEVER_POOLED) -> list[str]:
    """``by`` and every ``never`` column that takes several values within one of its groups:
    a table asked for by method alone still keeps standard and stability training apart."""
    by = list(by)
    # A column with one value overall cannot vary within a group: only the others need the
    # (costlier, on millions of rows) per-group count.
    extra = [c for c in never if c in df and c not in by and df[c].nunique(dropna=False) > 1]
    if not extra or df.empty:
        return by
    if not by:
        varying = df[extra].nunique(dropna=False)
    else:
        varying = df.groupby(by, observed=True, dropna=False)[extra].nunique(dropna=False).max()
    return by + [c for c in extra if varying[c] > 1]


def family_attribute(methods: pd.Series, name: str) -> pd.Series:
    """Each row's family's ``name`` (norm or exact: ``traits``), looked up once per distinct
    method: the tables run on millions of rows."""
    return methods.map({m: getattr(traits(m), name) for m in methods.unique()})


def envelope_over(rows: pd.DataFrame) -> Over:
    """What an envelope of ``rows`` chooses over: sigma, with Zhang et al.'s k where rows have
    one and the models' training sigma where models were certified at other sigmas than they
    were trained at (models.sigmas): the best over classifiers. A training sigma equal to the
    sigma on every row tells no configuration apart that sigma does not."""
    chosen = ["sigma"]
    if "k" in rows and rows["k"].notna().any():
        chosen.append("k")
    if "training_sigma" in rows and rows["training_sigma"].nunique() > 1 and not trained_where_certified(rows):
        chosen.append("training_sigma")
    return chosen if len(chosen) > 1 else "sigma"


def trained_where_certified(configurations: pd.DataFrame) -> bool:
    """Whether every row's model was trained at the sigma it is certified at (``training_sigma``
    equals ``sigma``; an unknown training sigma is not)."""
    return bool((configurations["training_sigma"] == configurations["sigma"]).all())


class Candidates(NamedTuple):
    """What an envelope row chose among: the parameters that tell its candidate configurations
    apart (each cell names the chosen one's), and those that take one value in every candidate
    (said once, with the row's name)."""

    varying: list[str]
    constant: dict[str, float]


def candidates(rows: pd.DataFrame, by: Sequence[str], over: Over) -> dict[tuple, Candidates]:
    """``Candidates`` of each group of ``by`` in ``rows``, over the ``over`` columns. A parameter
    a family does not have (its k is null) is in neither; a training sigma equal to the sigma in
    every candidate is implied by it and is in neither."""
    chosen = over_columns(over)
    configurations = rows[list(by) + chosen].drop_duplicates()
    out = {}
    for keys, group in _groups(configurations, by):
        varying, constant = [], {}
        for column in chosen:
            values = group[column].dropna().unique()
            if len(values) == 0 or (column == "training_sigma" and trained_where_certified(group)):
                continue
            if group[column].nunique(dropna=False) > 1:
                varying.append(column)
            else:
                constant[column] = float(values[0])
        out[row_key(keys)] = Candidates(varying, constant)
    return out


def row_key(keys: tuple) -> tuple:
    """A group's key as a dictionary key: NaN (a missing training noise, say) as None, since
    one NaN is not equal to another."""
    return tuple(None if not isinstance(k, str) and pd.isna(k) else k for k in keys)


def split_by_norm(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame, Over]]:
    """(norm, rows, what an envelope chooses over: ``envelope_over``) for each norm of the rows'
    radii: tables and plots never mix norms."""
    row_norm = family_attribute(df["method"], "norm")
    out: list[tuple[str, pd.DataFrame, Over]] = []
    for norm in sorted(set(row_norm)):
        rows = df[row_norm == norm]
        out.append((norm, rows, envelope_over(rows)))
    return out


def select_norm(df: pd.DataFrame, norm: str | None, option: str = "norm") -> tuple[pd.DataFrame, Over]:
    """The rows of one norm and what their envelope chooses over, for a plot: ``norm``, or the
    only norm the rows hold (a plot never mixes norms; ``option`` names the choice in errors)."""
    found = {each: (rows, over) for each, rows, over in split_by_norm(df)}
    if norm is None and len(found) > 1:
        raise ValueError(f"the results hold {', '.join(found)} radii: plot one norm at a time ({option})")
    if norm is not None and norm not in found:
        raise ValueError(f"{option} {norm}: the results hold {', '.join(found)} radii only")
    return found[norm or next(iter(found))]


def _groups(frame: pd.DataFrame, by: Sequence[str], sort: bool = True):
    """(key tuple, rows) for each value of the ``by`` columns (NaN values form groups too)."""
    for keys, group in frame.groupby(list(by), sort=sort, observed=True, dropna=False):
        yield (keys if isinstance(keys, tuple) else (keys,)), group


def norms(df: pd.DataFrame) -> list[str]:
    """The norms of the rows' radii ("l1", "l2", "linf"), from their families."""
    return sorted({traits(m).norm for m in df["method"].unique()})


def radius(df: pd.DataFrame) -> np.ndarray:
    """Each row's certified radius, in its family's norm (NaN where it abstains)."""
    out = np.full(len(df), np.nan)
    row_norm = family_attribute(df["method"], "norm").to_numpy()
    for norm, column in RADIUS_COLUMNS.items():
        if column in df:
            out = np.where(row_norm == norm, df[column].to_numpy(dtype=np.float64, na_value=np.nan), out)
    return out


def _scores(df: pd.DataFrame, radii: Sequence[float]) -> pd.DataFrame:
    """Per row: clean correctness and certified correctness at each radius, as 0/1 floats."""
    prediction = df["prediction"].to_numpy()
    label = df["label"].to_numpy()
    radii_of_rows = radius(df)
    certified = (prediction == label) & (prediction >= 0)
    out: dict[str | float, np.ndarray] = {"clean": (df["selected"].to_numpy() == label).astype(np.float64)}
    for r in radii:
        out[float(r)] = (certified & (radii_of_rows >= r)).astype(np.float64)
    return pd.DataFrame(out, index=df.index)


def certified_accuracy(df: pd.DataFrame, radii: Sequence[float], by: Sequence[str] = CONFIG) -> pd.DataFrame:
    """Certified accuracy at each radius for each configuration: one row per value of the
    ``by`` columns (with any column of ``CONFIGURATION_POOLED_NEVER`` the rows vary in within
    them, such as Zhang et al.'s k), a ``clean`` column, one column per radius (float keys) and
    ``images``."""
    by = grouping(df, by, CONFIGURATION_POOLED_NEVER)
    scores = _scores(df, radii)
    scores[by] = df[by]
    grouped = scores.groupby(by, sort=True, observed=True, dropna=False)  # k is null outside Zhang's families
    table = grouped.mean()
    table["images"] = grouped.size()
    return table.reset_index()


def best_certified_accuracy(
    df: pd.DataFrame, radii: Sequence[float], by: Sequence[str] = ("method", "training"), over: Over = "sigma"
) -> pd.DataFrame:
    """The envelope of Levine & Feizi Table 1: for each group and radius, the best certified
    accuracy over ``over`` (the sigma grid), with the clean accuracy and the ``over`` value of
    the configuration achieving it (ties go to the smaller value). ``over`` may name several
    columns (sigma and Zhang et al.'s k: the best over classifiers).

    Long format: the ``by`` columns (with any ``NEVER_POOLED`` column the rows vary in:
    ``grouping``), ``radius``, ``certified_accuracy``, ``clean_accuracy`` and ``over``. Rows of
    several seeds in one configuration are pooled (use ``seed_table`` to separate them).
    """
    by, chosen = grouping(df, by), over_columns(over)
    per_config = certified_accuracy(df, radii, by + chosen)
    rows = []
    for keys, group in _groups(per_config, by):
        group = group.sort_values(chosen)
        for r in radii:
            best = group.iloc[int(np.argmax(group[float(r)].to_numpy()))]  # first maximum: the smallest value
            rows.append(
                {
                    **dict(zip(by, keys)),
                    "radius": float(r),
                    "certified_accuracy": best[float(r)],
                    "clean_accuracy": best["clean"],
                    **{column: best[column] for column in chosen},
                }
            )
    return pd.DataFrame(rows)


SEED_STATISTICS = ("mean", "std", "max-min")


def seed_table(
    df: pd.DataFrame,
    radii: Sequence[float],
    by: Sequence[str] = ("method", "training"),
    over: Over = "sigma",
    seed: str = "seed",
) -> pd.DataFrame:
    """Levine & Feizi Table 3: the envelope for each seed, then, for groups with several seeds,
    the mean, the sample standard deviation (ddof=1) and max - min of the best certified
    accuracy across seeds (a group with one seed has no statistics: a standard deviation of 0
    would claim a spread that was never measured).

    Long format: the ``by`` columns, ``seed`` (null on statistics rows), ``statistic`` (null on
    per-seed rows, else "mean", "std" or "max-min"), ``radius``, ``certified_accuracy`` and,
    for the per-seed rows, ``clean_accuracy`` and ``over``.
    """
    by = grouping(df, by)
    per_seed = best_certified_accuracy(df, radii, by + [seed], over)
    rows = [per_seed.assign(statistic=None)]
    for keys, group in per_seed.groupby(by + ["radius"], sort=True, observed=True, dropna=False):
        values = group["certified_accuracy"].to_numpy()
        if len(values) < 2:
            continue
        base = dict(zip(by + ["radius"], keys))
        spread = {"mean": values.mean(), "std": values.std(ddof=1), "max-min": values.max() - values.min()}
        rows.append(pd.DataFrame([{**base, "statistic": name, "certified_accuracy": v} for name, v in spread.items()]))
    out = pd.concat(rows, ignore_index=True)
    out[seed] = out[seed].astype("Int64")
    first = by + [seed, "statistic"]
    return out[first + [c for c in out.columns if c not in first]]


def high_probability_accuracy(
    df: pd.DataFrame, radii: Sequence[float], alpha: float | None = None, rho: float = 0.001, by: Sequence[str] = CONFIG
) -> pd.DataFrame:
    """Approximate certified accuracy next to Cohen et al.'s Theorem 5 lower bound, which holds
    at each radius with probability >= ``confidence`` over the randomness of CERTIFY run at
    failure rate alpha (default: the rows' own alpha): 1 - rho, and 1 - rho - delta for Zhang et
    al.'s families, whose radius curve (failure probability delta) is shared by every image.
    DSSN rows are exact: their bound is the accuracy itself (confidence 1). Configurations are
    never pooled (``certified_accuracy``: different k or training sigmas stay apart).

    Long format: the ``by`` columns, ``radius``, ``images``, ``approximate``, ``lower_bound``,
    ``confidence``.
    """
    from certlib import certificates  # scipy and statsmodels: only this table needs them

    by = grouping(df, by, CONFIGURATION_POOLED_NEVER)
    table = certified_accuracy(df, radii, by)
    grouped = df.groupby(by, sort=True, observed=True, dropna=False)
    exact_rows = family_attribute(df["method"], "exact")
    exact = exact_rows.groupby([df[c] for c in by], sort=True, dropna=False).all().to_numpy()
    row_alpha = grouped["alpha"].max().to_numpy() if "alpha" in df else np.full(len(table), np.nan)
    curve_delta = grouped["delta"].max().fillna(0.0).to_numpy() if "delta" in df else np.zeros(len(table))
    rows = []
    for i, (_, config) in enumerate(table.iterrows()):
        a = alpha if alpha is not None else row_alpha[i]
        for r in radii:
            approx = config[float(r)]
            if exact[i]:
                bound, confidence = approx, 1.0
            elif a is None or np.isnan(a):
                raise ValueError("high_probability_accuracy: Monte Carlo rows without alpha; pass alpha")
            else:
                bound = float(
                    certificates.certified_accuracy_lower_bound(
                        round(approx * config["images"]), int(config["images"]), a, rho
                    )
                )
                confidence = 1 - rho - curve_delta[i]
            rows.append(
                {
                    **{k: config[k] for k in by},
                    "radius": float(r),
                    "images": int(config["images"]),
                    "approximate": approx,
                    "lower_bound": bound,
                    "confidence": confidence,
                }
            )
    return pd.DataFrame(rows)


def runtime_summary(df: pd.DataFrame, by: Sequence[str] = CONFIG) -> pd.DataFrame:
    """Certification time per configuration: images, mean seconds per image, total seconds
    (GPU-seconds on GPU workers) and the devices used."""
    by = list(by)
    grouped = df.groupby(by, sort=True, observed=True)
    out = grouped.agg(
        images=("seconds", "size"),
        seconds_per_image=("seconds", "mean"),
        total_seconds=("seconds", "sum"),
        devices=("device", lambda d: ", ".join(sorted(set(d)))),
    )
    return out.reset_index()
