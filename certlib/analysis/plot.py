"""Certified-accuracy curves as the papers draw them; matplotlib is imported when a plot is asked for."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from certlib.analysis.tables import PER, Over, _groups, certified_accuracy, grouping, norms, over_columns, radius
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


def curves_figure(
    df: pd.DataFrame,
    by: Sequence[str] = ("method", "training"),
    over: Over = "sigma",
    points: int = 200,
) -> Figure:
    """Certified accuracy against radius, one thin curve per configuration and the envelope
    over ``over`` bold per group (never pooling training modes, training noises or datasets),
    as in the papers' figures: a matplotlib Figure (shown inline by Jupyter), not drawn on
    pyplot's global state."""
    import matplotlib
    from matplotlib.figure import Figure

    by, norm = grouping(df, by), radius_norm(df)
    per = PER.get(norm, 1)
    radii = radius(df)
    top = np.nanmax(np.where(np.isfinite(radii), radii, np.nan)) if np.isfinite(radii).any() else 1.0
    grid = np.linspace(0, max(top, 1e-6) * 1.02, points)
    per_config = certified_accuracy(df, grid.tolist(), by + over_columns(over))
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (keys, group) in enumerate(_groups(per_config, by)):
            color = colors[i % len(colors)]
            curves = group[[float(r) for r in grid]].to_numpy()
            for curve in curves:
                ax.plot(grid * per, 100 * curve, color=color, linewidth=0.7, alpha=0.45)
            label = " / ".join(str(k) for k in keys)
            ax.plot(grid * per, 100 * curves.max(axis=0), color=color, linewidth=2.4, label=label)
        unit = "pixel scale [0, 1]" if per == 1 else f"in units of 1/{per}"
        ax.set_xlabel(f"{norm.upper()} radius ({unit})")
        ax.set_ylabel("certified accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_xlim(0, grid[-1] * per)
        ax.grid(alpha=0.3)
        chosen = ", ".join(over_columns(over))
        ax.legend(title=f"envelope over {chosen} (bold); thin: each {chosen}")
        fig.tight_layout()
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
