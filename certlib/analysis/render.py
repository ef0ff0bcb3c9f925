"""Renderers of the accuracy tables: Markdown, LaTeX and CSV text as the papers print them."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import pandas as pd

from certlib.analysis.tables import (
    LINF_RADII,
    PER,
    Over,
    _groups,
    best_certified_accuracy,
    over_columns,
    seed_table,
    split_by_norm,
)

SYMBOLS = {"sigma": "σ"}


def _cell(certified: float, clean: float, chosen: dict) -> str:
    """ "72.25% (81.50% @ σ=0.75)": the accuracy, and the clean accuracy and parameters of the
    configuration achieving it (a parameter a family does not have, e.g. its k, is left out)."""
    where = ", ".join(f"{SYMBOLS.get(c, c)}={float(v)}" for c, v in chosen.items() if pd.notna(v))
    return f"{100 * certified:.2f}% ({100 * clean:.2f}% @ {where})"


def _header(r: float, per: int | None) -> str:
    return f"r = {r:g}" if per is None else f"r = {round(r * per, 6):g}/{per}"


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
    table: pd.DataFrame,
    by: Sequence[str] = ("method", "training"),
    over: Over = "sigma",
    fmt: str = "markdown",
    per: int | None = None,
) -> str:
    """An envelope from ``best_certified_accuracy`` as the paper prints it: one row per group,
    one column per radius, cells "72.25% (81.50% @ σ=0.75)"; ``fmt`` markdown, csv or latex;
    ``per`` writes the radii as multiples of 1/per (255 for L-infinity, as the papers do)."""
    by, chosen = list(by), over_columns(over)
    radii = sorted(table["radius"].unique())
    lines = []
    for keys, group in _groups(table, by):
        cells = {
            row["radius"]: _cell(row["certified_accuracy"], row["clean_accuracy"], {c: row[c] for c in chosen})
            for _, row in group.iterrows()
        }
        lines.append([" / ".join(str(k) for k in keys)] + [cells.get(r, "") for r in radii])
    return _render([" / ".join(by)] + [_header(r, per) for r in radii], lines, fmt)


def format_seed_table(
    table: pd.DataFrame,
    by: Sequence[str] = ("method", "training"),
    over: Over = "sigma",
    fmt: str = "markdown",
    per: int | None = None,
) -> str:
    """A table from ``seed_table``: one row per group and seed, then mean, std and max-min rows."""
    by, chosen = list(by), over_columns(over)
    radii = sorted(table["radius"].unique())
    summaries = ("mean", "std", "max-min")
    lines = []
    for keys, group in _groups(table, by):
        order = [s for s in group["seed"].unique() if s not in summaries] + list(summaries)
        for seed in order:
            rows = group[group["seed"] == seed].set_index("radius")
            if seed in summaries:
                cells = [f"{100 * rows.loc[r, 'certified_accuracy']:.2f}%" if r in rows.index else "" for r in radii]
            else:
                cells = [
                    _cell(
                        rows.loc[r, "certified_accuracy"], rows.loc[r, "clean_accuracy"], rows.loc[r, chosen].to_dict()
                    )
                    if r in rows.index
                    else ""
                    for r in radii
                ]
            label = seed if seed in summaries else f"seed = {seed}"
            lines.append([" / ".join(str(k) for k in keys) + f" / {label}"] + cells)
    return _render([" / ".join(by) + " / seed"] + [_header(r, per) for r in radii], lines, fmt)


def format_tables(
    df: pd.DataFrame,
    radii: Sequence[float],
    by: Sequence[str] = ("method", "training"),
    fmt: str = "markdown",
    seeds: bool = False,
    radii_linf: Sequence[float] = LINF_RADII,
) -> str:
    """The best-certified-accuracy tables of result rows, one per norm (headed "L2 radius:"
    when there are several): the envelope (``seeds``: per seed, Table 3) over sigma, and k for
    Zhang et al.'s families. ``radii`` in pixel scale; ``radii_linf`` in units of 1/255."""
    parts = split_by_norm(df)
    texts = []
    for norm, rows, over in parts:
        per = PER.get(norm)
        chosen = [r / per for r in radii_linf] if per else list(radii)
        if seeds:
            text = format_seed_table(seed_table(rows, chosen, by, over), by, over, fmt, per)
        else:
            text = format_envelope(best_certified_accuracy(rows, chosen, by, over), by, over, fmt, per)
        texts.append(f"{norm.upper()} radius:\n{text}" if len(parts) > 1 else text)
    return "\n".join(texts)
