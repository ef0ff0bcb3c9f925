"""Certified-accuracy curves as the papers draw them; matplotlib is imported when a plot is asked for."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from certlib.analysis.tables import (
    PER,
    Over,
    _groups,
    candidates,
    certified_accuracy,
    grouping,
    norms,
    over_columns,
    radius,
    row_key,
)
from certlib.families import traits

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def radius_norm(df: pd.DataFrame) -> str:
    """The one norm of the rows' radii, from their families: a plot never mixes norms."""
    found = norms(df)
    if len(found) != 1:
        by_norm = {n: sorted(m for m in df["method"].unique() if traits(m).norm == n) for n in found}
        detail = "; ".join(f"{', '.join(methods)}: {n.upper()}" for n, methods in by_norm.items())
        raise ValueError(f"plot: the rows hold radii in several norms ({detail}); plot one norm at a time")
    return found[0]


FORMATS = (".png", ".pdf", ".svg")


# Thin curves of one family differ in dash as well as in shade: told apart in print and in grey.
DASHES = ("solid", (0, (5, 2)), (0, (1, 1.5)), (0, (5, 2, 1, 2)), (0, (8, 3)), (0, (3, 1, 1, 1, 1, 1)))
SYMBOLS = {"sigma": "σ", "training_sigma": "training σ"}
UNITS = {"l1": "L1", "l2": "L2", "linf": "L∞"}


def _plain(text: str) -> str:
    """``text`` drawn as it is: a "$" in a method or dataset name would start matplotlib's math mode."""
    return text.replace("$", r"\$")


def _parameters(values: dict) -> str:
    return ", ".join(f"{SYMBOLS.get(c, c)}={float(v):g}" for c, v in values.items() if pd.notna(v))


def _title(df: pd.DataFrame, norm: str) -> str:
    """ "digits (test): certified accuracy against L1 radius": the rows' dataset(s) and norm."""
    if {"dataset", "split"} <= set(df.columns):
        pairs = df[["dataset", "split"]].drop_duplicates().itertuples(index=False, name=None)
        data = ", ".join(f"{d} ({s})" for d, s in sorted(pairs, key=str)) + ": "
    else:
        data = ""
    return _plain(f"{data}certified accuracy against {UNITS.get(norm, norm)} radius")


def _draw_family(ax, x: np.ndarray, curves: np.ndarray, family: tuple, color: np.ndarray) -> None:
    """One group's curves (``curves``: one row of % per configuration of ``family``, which is its
    key, its configurations and the parameters that tell them apart): the envelope bold, each
    configuration thin in a lighter shade and its own dash as its place grows."""
    keys, configurations, told = family
    ax.plot(x, curves.max(axis=0), color=color, linewidth=2.6, label=f"{_plain(' / '.join(map(str, keys)))}: best")
    if len(curves) < 2:  # one configuration: its curve is the envelope
        return
    for j, (curve, (_, config)) in enumerate(zip(curves, configurations.iterrows())):
        shade = color + (1 - color) * 0.55 * j / (len(curves) - 1)
        label = _plain(_parameters({c: config[c] for c in told}))
        ax.plot(x, curve, color=shade, linewidth=1, linestyle=DASHES[j % len(DASHES)], label=f"   {label}")


def curves_figure(
    df: pd.DataFrame,
    by: Sequence[str] = ("method", "training"),
    over: Over = "sigma",
    points: int = 200,
) -> Figure:
    """Certified accuracy (%) against radius, as in the papers' figures: for each group (never
    pooling training modes, training noises or datasets) a bold envelope over ``over``, and one
    thin curve per configuration, in the group's colour, shade and dash by its place, labelled
    with the parameters that tell it apart (sigma, and k for Zhang et al.'s families). Radii in
    the rows' norm, pixel scale [0, 1] (L-infinity in units of 1/255); the title names the
    dataset and the norm; the legend stands right of the axes, never over a curve. A matplotlib
    Figure (shown inline by Jupyter), not drawn on pyplot's global state."""
    import matplotlib
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    by, norm, chosen = grouping(df, by), radius_norm(df), over_columns(over)
    per = PER.get(norm, 1)
    radii = radius(df)
    top = np.nanmax(np.where(np.isfinite(radii), radii, np.nan)) if np.isfinite(radii).any() else 1.0
    grid = np.linspace(0, max(top, 1e-6) * 1.02, points)
    per_config = certified_accuracy(df, grid.tolist(), by + chosen)
    among = candidates(df, by, over)
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text
        fig = Figure(figsize=(9, 5), layout="constrained")
        ax = fig.subplots()
        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (keys, group) in enumerate(_groups(per_config, by)):
            curves = group[[float(r) for r in grid]].to_numpy()
            family = (keys, group, among[row_key(keys)].varying)
            _draw_family(ax, grid * per, 100 * curves, family, np.array(to_rgb(colors[i % len(colors)])))
        unit = "pixel scale [0, 1]" if per == 1 else f"in units of 1/{per}"
        ax.set_xlabel(f"{UNITS.get(norm, norm)} radius ({unit})")
        ax.set_ylabel("certified accuracy (%)")
        ax.set_title(_title(df, norm))
        ax.set_ylim(0, 100)
        ax.set_xlim(0, grid[-1] * per)
        ax.grid(alpha=0.3)
        entries, parameters = len(ax.get_lines()), ", ".join(SYMBOLS.get(c, c) for c in chosen)
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1),
            borderaxespad=0,
            ncols=1 + entries // 24,  # a tall legend in columns rather than past the figure
            title=f"bold: best over {parameters}\nthin: one {parameters} each",
            fontsize="small",
        )
    return fig


def plot_curves(
    df: pd.DataFrame,
    path: str | Path,
    by: Sequence[str] = ("method", "training"),
    over: Over = "sigma",
    points: int = 200,
    *,
    results: str | Path | None = None,
) -> Path:
    """``curves_figure`` saved to ``path``: PNG, PDF or SVG by its suffix (SVG text stays text).
    ``results``: the results directory the rows came from, which ``path`` must not be inside
    (it holds result shards only, which every Parquet reader reads whole)."""
    import matplotlib

    path = Path(path)
    if results is not None and path.resolve().is_relative_to(Path(results).resolve()):
        raise ValueError(f"{path}: inside the results directory, which holds result shards only; write it beside")
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"plot: the output must end in {', '.join(FORMATS)}, got {path.name}")
    fig = curves_figure(df, by, over, points)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(path, dpi=150)
    return path
