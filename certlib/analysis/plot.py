"""Certified-accuracy curves as the papers draw them; matplotlib is imported when a plot is asked for."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from certlib.analysis.tables import PER, Over, _groups, certified_accuracy, norms, over_columns, radius
from certlib.families import family


def radius_norm(df: pd.DataFrame) -> str:
    """The one norm of the rows' radii, from their families: a plot never mixes norms."""
    found = norms(df)
    if len(found) != 1:
        by_norm = {n: sorted(m for m in df["method"].unique() if family(m).norm == n) for n in found}
        detail = "; ".join(f"{', '.join(methods)}: {n.upper()}" for n, methods in by_norm.items())
        raise ValueError(f"plot: the rows hold radii in several norms ({detail}); plot one norm at a time")
    return found[0]


def plot_curves(
    df: pd.DataFrame,
    path: str | Path,
    by: Sequence[str] = ("method", "training"),
    over: Over = "sigma",
    points: int = 200,
) -> Path:
    """Certified accuracy against radius, one thin curve per configuration and the envelope
    over ``over`` bold per group, as in the papers' figures. PNG or SVG by the file suffix
    (SVG text stays text)."""
    import matplotlib
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"plot: the output must end in .png or .svg, got {path.name}")
    by, norm = list(by), radius_norm(df)
    per = PER.get(norm, 1)
    radii = radius(df)
    top = np.nanmax(np.where(np.isfinite(radii), radii, np.nan)) if np.isfinite(radii).any() else 1.0
    grid = np.linspace(0, max(top, 1e-6) * 1.02, points)
    per_config = certified_accuracy(df, grid.tolist(), by + over_columns(over))
    with matplotlib.rc_context({"svg.fonttype": "none"}):
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
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)
    return path
