"""Renderers of the accuracy tables: Markdown, LaTeX and CSV text as the papers print them."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import pandas as pd

from certlib.analysis.tables import _groups


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
        return "\n".join(
            [r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", body[0], r"\hline", *body[1:], r"\end{tabular}"]
        )
    if fmt != "markdown":
        raise ValueError(f"unknown table format {fmt!r}; expected markdown, csv or latex")
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)] + lines
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def format_envelope(
    table: pd.DataFrame, by: Sequence[str] = ("method", "training"), over: str = "sigma", fmt: str = "markdown"
) -> str:
    """An envelope from ``best_certified_accuracy`` as the paper prints it: one row per group,
    one column per radius, cells "72.25% (81.50% @ σ=0.75)"; ``fmt`` markdown, csv or latex."""
    by = list(by)
    radii = sorted(table["radius"].unique())
    symbol = "σ" if over == "sigma" else over
    lines = []
    for keys, group in _groups(table, by):
        cells = {
            row.radius: _cell(row.certified_accuracy, row.clean_accuracy, getattr(row, over), symbol)
            for row in group.itertuples(index=False)
        }
        lines.append([" / ".join(str(k) for k in keys)] + [cells.get(r, "") for r in radii])
    return _render([" / ".join(by)] + [f"r = {r:g}" for r in radii], lines, fmt)


def format_seed_table(
    table: pd.DataFrame, by: Sequence[str] = ("method", "training"), over: str = "sigma", fmt: str = "markdown"
) -> str:
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
                cells = [
                    _cell(rows.loc[r, "certified_accuracy"], rows.loc[r, "clean_accuracy"], rows.loc[r, over], symbol)
                    if r in rows.index
                    else ""
                    for r in radii
                ]
                label = f"seed = {seed}"
            lines.append([" / ".join(str(k) for k in keys) + f" / {label}"] + cells)
    return _render([" / ".join(by) + " / seed"] + [f"r = {r:g}" for r in radii], lines, fmt)
