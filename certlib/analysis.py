"""What users read at the end of a sweep: result shards as a DataFrame, certified accuracy, the
best-certified-accuracy envelope over a sigma grid (Levine & Feizi 2021, Table 1), per-seed
tables (Table 3), Cohen et al.'s high-probability correction (Theorem 5), re-certification
from stored votes, runtime summaries and certified-accuracy curves.

Conventions (as in the papers):

* An image is certified at radius r when the prediction is its label, not an abstention, and
  its radius >= r (DSSN radii are inclusive by the tie rule; Monte Carlo radii are suprema).
* Clean accuracy is exact for DSSN; for Monte Carlo it is the accuracy of the class selected by
  the n0 samples (Yang et al.'s convention, Levine & Feizi Appendix B): the ``selected`` column.
* The radius is ``radius_l1``, or ``radius_l2`` for Gaussian rows. Accuracies are fractions.
"""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pds

from certlib import certificates
from certlib.schema import CONFIG, PARTITION_SCHEMA

# The columns the accuracy tables need: load only these for speed on millions of rows.
ANALYSIS_COLUMNS = ("method", "training", "sigma", "seed", "index", "label", "selected", "prediction", "radius_l1", "radius_l2",
                    "alpha")
CERTIFICATES = ("standard", "box", "box_input", "dssn")


# --------------------------------------------------------------------------- reading

def load_results(path: str | Path, filters=None, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """All Parquet shards under a results directory as one DataFrame, the partition columns
    (method, training, sigma, seed) included as plain columns.

    ``filters``: a pyarrow expression, or a dict {column: value or list of values}, pushed down
    to the files. ``columns``: read only these (e.g. ``ANALYSIS_COLUMNS``; much faster on
    millions of rows than the vote lists).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no results directory at {path}")
    # Only the Parquet shards: other files (a plot, notes) may sit beside them; names starting
    # with '.' or '_' are temporary files and failure records.
    files = [str(f) for f in sorted(path.rglob("*.parquet"))
             if not any(part.startswith((".", "_")) for part in f.relative_to(path).parts)]
    if not files:
        raise FileNotFoundError(f"no result shards under {path}")
    dataset = pds.dataset(files, format="parquet", partition_base_dir=str(path),
                          partitioning=pds.partitioning(PARTITION_SCHEMA, flavor="hive"))
    expression = filters
    if isinstance(filters, dict):
        expression = None
        for column, value in filters.items():
            values = list(value) if isinstance(value, (list, tuple, set)) else [value]
            term = pds.field(column).isin(values)
            expression = term if expression is None else expression & term
    table = dataset.to_table(columns=list(columns) if columns is not None else None, filter=expression)
    return table.to_pandas()


# --------------------------------------------------------------------------- accuracy tables

def _groups(frame: pd.DataFrame, by: Sequence[str], sort: bool = True):
    """(key tuple, rows) for each value of the ``by`` columns (NaN values form groups too)."""
    for keys, group in frame.groupby(list(by), sort=sort, observed=True, dropna=False):
        yield (keys if isinstance(keys, tuple) else (keys,)), group


def _radius(df: pd.DataFrame) -> np.ndarray:
    radius = df["radius_l1"].to_numpy(dtype=np.float64, na_value=np.nan) if "radius_l1" in df else np.full(len(df), np.nan)
    if "radius_l2" in df:
        radius = np.where(np.isnan(radius), df["radius_l2"].to_numpy(dtype=np.float64, na_value=np.nan), radius)
    return radius


def _scores(df: pd.DataFrame, radii: Sequence[float]) -> pd.DataFrame:
    """Per row: clean correctness and certified correctness at each radius, as 0/1 floats."""
    prediction = df["prediction"].to_numpy()
    label = df["label"].to_numpy()
    radius = _radius(df)
    certified = (prediction == label) & (prediction >= 0)
    out = {"clean": (df["selected"].to_numpy() == label).astype(np.float64)}
    for r in radii:
        out[float(r)] = (certified & (radius >= r)).astype(np.float64)
    return pd.DataFrame(out, index=df.index)


def certified_accuracy(df: pd.DataFrame, radii: Sequence[float], by: Sequence[str] = CONFIG) -> pd.DataFrame:
    """Certified accuracy at each radius for each configuration: one row per value of the
    ``by`` columns, a ``clean`` column, one column per radius (float keys) and ``images``."""
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

    Long format: the ``by`` columns, ``radius``, ``certified_accuracy``, ``clean_accuracy`` and
    ``over``. Rows of several seeds in one configuration are pooled (use ``seed_table`` to
    separate them).
    """
    by = list(by)
    per_config = certified_accuracy(df, radii, by + [over])
    rows = []
    for keys, group in _groups(per_config, by):
        group = group.sort_values(over)
        for r in radii:
            best = group.iloc[int(np.argmax(group[float(r)].to_numpy()))]  # first maximum: the smallest value
            rows.append({**dict(zip(by, keys)), "radius": float(r), "certified_accuracy": best[float(r)],
                         "clean_accuracy": best["clean"], over: best[over]})
    return pd.DataFrame(rows)


def seed_table(df: pd.DataFrame, radii: Sequence[float], by: Sequence[str] = ("method", "training"),
               over: str = "sigma", seed: str = "seed") -> pd.DataFrame:
    """Levine & Feizi Table 3: the envelope for each seed, then across seeds the mean, the
    standard deviation (sample, ddof=1) and max - min of the best certified accuracy.

    Long format: the ``by`` columns, ``seed`` (the seed, or "mean", "std", "max-min"),
    ``radius``, ``certified_accuracy`` and, for the per-seed rows, ``clean_accuracy`` and ``over``.
    """
    by = list(by)
    per_seed = best_certified_accuracy(df, radii, by + [seed], over)
    rows = [per_seed]
    for keys, group in per_seed.groupby(by + ["radius"], sort=True, observed=True):
        values = group["certified_accuracy"].to_numpy()
        base = dict(zip(by + ["radius"], keys))
        for name, value in (("mean", values.mean()), ("std", values.std(ddof=1) if len(values) > 1 else 0.0),
                            ("max-min", values.max() - values.min())):
            rows.append(pd.DataFrame([{**base, seed: name, "certified_accuracy": value}]))
    out = pd.concat(rows, ignore_index=True)
    out[seed] = out[seed].astype(str)
    return out


def high_probability_accuracy(df: pd.DataFrame, radii: Sequence[float], alpha: float | None = None, rho: float = 0.001,
                              by: Sequence[str] = CONFIG) -> pd.DataFrame:
    """Approximate certified accuracy next to Cohen et al.'s Theorem 5 lower bound, which holds
    with probability >= 1 - rho over the randomness of CERTIFY run at failure rate alpha
    (default: the rows' own alpha). DSSN rows are exact: their bound is the accuracy itself.

    Long format: the ``by`` columns, ``radius``, ``images``, ``approximate``, ``lower_bound``.
    """
    by = list(by)
    table = certified_accuracy(df, radii, by)
    exact = df["method"].eq("dssn").groupby([df[c] for c in by], sort=True, observed=True).all().to_numpy()
    row_alpha = (df.groupby(by, sort=True, observed=True)["alpha"].max().to_numpy() if "alpha" in df
                 else np.full(len(table), np.nan))
    rows = []
    for i, config in table.iterrows():
        a = alpha if alpha is not None else row_alpha[i]
        for r in radii:
            approx = config[float(r)]
            if exact[i]:
                bound = approx
            elif a is None or np.isnan(a):
                raise ValueError("high_probability_accuracy: Monte Carlo rows without alpha; pass alpha")
            else:
                bound = float(certificates.certified_accuracy_lower_bound(round(approx * config["images"]), int(config["images"]), a, rho))
            rows.append({**{k: config[k] for k in by}, "radius": float(r), "images": int(config["images"]),
                         "approximate": approx, "lower_bound": bound})
    return pd.DataFrame(rows)


def runtime_summary(df: pd.DataFrame, by: Sequence[str] = CONFIG) -> pd.DataFrame:
    """Certification time per configuration: images, mean seconds per image, total seconds
    (GPU-seconds on GPU workers) and the devices used."""
    by = list(by)
    grouped = df.groupby(by, sort=True, observed=True)
    out = grouped.agg(images=("seconds", "size"), seconds_per_image=("seconds", "mean"), total_seconds=("seconds", "sum"),
                      devices=("device", lambda d: ", ".join(sorted(set(d)))))
    return out.reset_index()


# --------------------------------------------------------------------------- re-certification

def _noise_radius(method: str, certificate: str, lam: float, scale: float, x: np.ndarray | None):
    """The radius function (p_a_lower, p_b_upper or None) of ``certificate`` for ``method``."""
    if method in ("uniform", "ssn"):
        if certificate == "standard":
            return lambda p_a, p_b: certificates.l1_uniform_radius(p_a, lam, p_b)
        return lambda p_a, p_b: certificates.l1_box_radius(p_a, lam, p_b, x=x, method=method)
    if certificate != "standard":
        raise ValueError(f"recertify: box-constrained certificates hold for uniform and ssn rows only, not {method!r} "
                         "(Voracek & Hein Theorem 2.11)")
    if method == "gaussian":
        return lambda p_a, p_b: certificates.l2_gaussian_radius(p_a, scale, p_b)
    if method == "laplace":
        def laplace(p_a, p_b):
            if p_b is not None:
                raise ValueError("recertify: the Laplace certificate is binary only (Zhang et al. Corollary 1)")
            return certificates.l1_laplace_radius(p_a, scale)
        return laplace
    raise ValueError(f"recertify: unknown method {method!r}")


@functools.lru_cache(maxsize=4)
def _dataset(name: str, split: str, root: str | None):
    from certlib.data import load_dataset

    return load_dataset(name, split, root)


def _images_of(rows: pd.DataFrame, dataset_root: str | Path | None) -> np.ndarray:
    """The rows' images in pixel scale, flattened, read from their dataset."""
    (name, split), = rows[["dataset", "split"]].drop_duplicates().itertuples(index=False, name=None)
    data = _dataset(name, split, None if dataset_root is None else str(dataset_root))
    position = pd.Series(np.arange(len(data)), index=data.indices)
    wanted = rows["index"].to_numpy()
    missing = ~np.isin(wanted, data.indices)
    if missing.any():
        raise ValueError(f"recertify: image index {wanted[missing][0]} is not in {name}/{split}")
    return data.pixels(position.loc[wanted].to_numpy()).flatten(1).numpy().astype(np.float64)


def recertify(df: pd.DataFrame, certificate: str = "standard", *, multiclass: bool | None = None,
              alpha: float | None = None, dataset_root: str | Path | None = None) -> pd.DataFrame:
    """Recompute predictions and radii from the stored vote/count vectors, without the model.

    ``certificate``: ``standard`` (each noise's own certificate), ``box`` (Voracek & Hein
    uniform++/split++, Prop. 2.5, uniform and ssn rows), ``box_input`` (their input-dependent
    Theorem 2.8; reads the images from the dataset, ``dataset_root`` for CIFAR-10/ImageNet) or
    ``dssn`` (exact, DSSN rows). ``multiclass`` switches between binary and Bonferroni
    multiclass certification (default: each row's own); ``alpha`` sets a new one-sided level
    (default: each row's own). DSSN rows accept ``standard``/``dssn`` only.

    Returns a copy with prediction, correct, radius_l1/radius_l2, p_a_lower, p_b_upper, alpha
    and certificate replaced; ``selected`` (the n0 choice) is unchanged.
    """
    if certificate not in CERTIFICATES:
        raise ValueError(f"recertify: certificate must be one of {CERTIFICATES}, got {certificate!r}")
    out = df.reset_index(drop=True)  # positions below must be unique labels
    group_keys = [c for c in ("method", "training", "sigma", "seed", "certificate", "alpha", "dataset", "split") if c in out]
    for keys, rows in _groups(out, group_keys, sort=False):
        params = dict(zip(group_keys, keys))
        method = params["method"]
        if method == "dssn":
            if certificate not in ("standard", "dssn"):
                raise ValueError(f"recertify: {certificate!r} does not apply to DSSN rows, whose votes are exact and whose "
                                 "noise is not independent (Voracek & Hein Theorem 2.11); select the Monte Carlo rows first")
            votes = np.stack(rows["votes"].to_numpy()).astype(np.int64)
            prediction, radius = certificates.dssn_radius(votes, int(rows["levels"].iloc[0]), int(rows["q"].iloc[0]))
            out.loc[rows.index, "prediction"] = prediction
            out.loc[rows.index, "radius_l1"] = radius
            out.loc[rows.index, "certificate"] = "dssn_exact"
            continue
        if certificate == "dssn":
            raise ValueError(f"recertify: the exact DSSN certificate needs DSSN rows, not {method!r}")
        if rows["votes"].isna().any() or rows["selection_votes"].isna().any():
            raise ValueError(f"recertify: {method} rows without stored counts cannot be re-certified")
        mode = params.get("certificate") or "binary"
        multi = mode.startswith("multiclass") if multiclass is None else multiclass
        level = float(params["alpha"]) if alpha is None else float(alpha)
        x = _images_of(rows, dataset_root) if certificate == "box_input" else None
        radius_fn = _noise_radius(method, certificate, float(rows["lambda"].iloc[0]) if method in ("uniform", "ssn") else np.nan,
                                  float(rows["noise_scale"].iloc[0]), x)
        result = certificates.monte_carlo_certify(np.stack(rows["selection_votes"].to_numpy()), np.stack(rows["votes"].to_numpy()),
                                                  level, radius_fn, multi)
        norm = "radius_l2" if method == "gaussian" else "radius_l1"
        out.loc[rows.index, "prediction"] = result["prediction"]
        out.loc[rows.index, norm] = result["radius"]
        out.loc[rows.index, "p_a_lower"] = result["p_a_lower"]
        out.loc[rows.index, "p_b_upper"] = result["p_b_upper"]
        out.loc[rows.index, "alpha"] = level
        out.loc[rows.index, "certificate"] = ("multiclass" if multi else "binary") + ("" if certificate == "standard" else f"_{certificate}")
    out["correct"] = out["prediction"].to_numpy() == out["label"].to_numpy()
    out.index = df.index
    return out


# --------------------------------------------------------------------------- formatting and plots

def _cell(certified: float, clean: float, value, symbol: str) -> str:
    return f"{100 * certified:.2f}% ({100 * clean:.2f}% @ {symbol}={float(value)})"


def _render(header: list[str], lines: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([header] + lines)
        return buffer.getvalue()
    if fmt == "latex":
        def escape(text: str) -> str:
            return text.replace("%", r"\%").replace("σ", r"$\sigma$").replace("_", r"\_")
        body = [" & ".join(escape(c) for c in row) + r" \\" for row in [header] + lines]
        return "\n".join([r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", body[0], r"\hline", *body[1:], r"\end{tabular}"])
    if fmt != "markdown":
        raise ValueError(f"unknown table format {fmt!r}; expected markdown, csv or latex")
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)] + lines
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def format_envelope(table: pd.DataFrame, by: Sequence[str] = ("method", "training"), over: str = "sigma",
                    fmt: str = "markdown") -> str:
    """An envelope from ``best_certified_accuracy`` as the paper prints it: one row per group,
    one column per radius, cells "72.25% (81.50% @ σ=0.75)"; ``fmt`` markdown, csv or latex."""
    by = list(by)
    radii = sorted(table["radius"].unique())
    symbol = "σ" if over == "sigma" else over
    lines = []
    for keys, group in _groups(table, by):
        cells = {row.radius: _cell(row.certified_accuracy, row.clean_accuracy, getattr(row, over), symbol)
                 for row in group.itertuples(index=False)}
        lines.append([" / ".join(str(k) for k in keys)] + [cells.get(r, "") for r in radii])
    return _render([" / ".join(by)] + [f"r = {r:g}" for r in radii], lines, fmt)


def format_seed_table(table: pd.DataFrame, by: Sequence[str] = ("method", "training"), over: str = "sigma",
                      fmt: str = "markdown") -> str:
    """A table from ``seed_table``: one row per group and seed, then mean, std and max-min rows."""
    by = list(by)
    radii = sorted(table["radius"].unique())
    symbol = "σ" if over == "sigma" else over
    lines = []
    for keys, group in _groups(table, by):
        order = [s for s in group["seed"].unique() if s not in ("mean", "std", "max-min")] + ["mean", "std", "max-min"]
        for seed in order:
            rows = group[group["seed"] == seed].set_index("radius")
            if seed in ("mean", "std", "max-min"):
                cells = [f"{100 * rows.loc[r, 'certified_accuracy']:.2f}%" if r in rows.index else "" for r in radii]
                label = seed
            else:
                cells = [_cell(rows.loc[r, "certified_accuracy"], rows.loc[r, "clean_accuracy"], rows.loc[r, over], symbol)
                         if r in rows.index else "" for r in radii]
                label = f"seed = {seed}"
            lines.append([" / ".join(str(k) for k in keys) + f" / {label}"] + cells)
    return _render([" / ".join(by) + " / seed"] + [f"r = {r:g}" for r in radii], lines, fmt)


def plot_curves(df: pd.DataFrame, path: str | Path, by: Sequence[str] = ("method", "training"), over: str = "sigma",
                points: int = 200) -> Path:
    """Certified accuracy against radius, one thin curve per configuration and the envelope
    over ``over`` bold per group, as in the papers' figures. PNG or SVG by the file suffix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"plot: the output must end in .png or .svg, got {path.name}")
    by = list(by)
    radius = _radius(df)
    top = np.nanmax(np.where(np.isfinite(radius), radius, np.nan)) if np.isfinite(radius).any() else 1.0
    grid = np.linspace(0, max(top, 1e-6) * 1.02, points)
    per_config = certified_accuracy(df, grid, by + [over])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (keys, group) in enumerate(_groups(per_config, by)):
        color = colors[i % len(colors)]
        curves = group[[float(r) for r in grid]].to_numpy()
        for curve in curves:
            ax.plot(grid, 100 * curve, color=color, linewidth=0.7, alpha=0.45)
        ax.plot(grid, 100 * curves.max(axis=0), color=color, linewidth=2.4, label=" / ".join(str(k) for k in keys))
    norms = {"L2" if m == "gaussian" else "L1" for m in df["method"].unique()}
    ax.set_xlabel(f"{' / '.join(sorted(norms))} radius (pixel scale [0, 1]){'; Gaussian rows are L2' if len(norms) > 1 else ''}")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, grid[-1])
    ax.grid(alpha=0.3)
    ax.legend(title=f"envelope over {over} (bold); thin: each {over}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
