"""Renderers of the accuracy tables: Markdown and LaTeX as the papers print them, HTML for the
report, CSV and JSON as numbers (one record per group and radius) for other programs."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import pandas as pd

from certlib.analysis.tables import (
    LINF_RADII,
    NEVER_POOLED,
    PER,
    SEED_STATISTICS,
    Candidates,
    Over,
    _groups,
    best_certified_accuracy,
    candidates,
    grouping,
    over_columns,
    row_key,
    seed_table,
    split_by_norm,
    trained_where_certified,
)


class NormTable(NamedTuple):
    """One norm's table (``table_records``): the long table, the columns naming its rows, what
    it chose over and what each row chose among (``candidates``)."""

    norm: str
    table: pd.DataFrame
    columns: list[str]
    over: Over
    among: dict[tuple, Candidates]


TEXT_FORMATS = ("markdown", "latex", "html")
DATA_FORMATS = ("csv", "json")

SYMBOLS = {"sigma": "σ"}


def _parameters(values: Mapping[str, float]) -> str:
    """ "σ=0.75, k=8.0": the parameters a family has (a null k is left out)."""
    return ", ".join(f"{SYMBOLS.get(c, c)}={float(v)}" for c, v in values.items() if pd.notna(v))


def _cell(certified: float, clean: float, chosen: Mapping[str, float]) -> str:
    """ "72.25% (81.50% @ σ=0.75)": the accuracy, and the clean accuracy and the telling
    parameters of the configuration achieving it; "72.25% (81.50%)" where none tells its row's
    candidates apart."""
    where = _parameters(chosen)
    return f"{100 * certified:.2f}% ({100 * clean:.2f}%{f' @ {where}' if where else ''})"


def _named(keys: tuple, among: Candidates) -> str:
    """A row's name: its group, and the parameters its every candidate shares ("dssn / standard (σ=0.5)")."""
    shared = _parameters(among.constant)
    return " / ".join(str(k) for k in keys) + (f" ({shared})" if shared else "")


def _told(table: pd.DataFrame, by: Sequence[str], over: Over) -> dict[tuple, Candidates]:
    """Without the rows' ``candidates``: each cell names every parameter the chosen ones have,
    less a training sigma implied by the sigma (a parameter that took one value among the
    candidates cannot be told from the chosen ones alone)."""
    out = {}
    for keys, group in _groups(table, by):
        chosen = [c for c in over_columns(over) if group[c].notna().any()]
        if "training_sigma" in chosen and trained_where_certified(group):
            chosen.remove("training_sigma")
        out[row_key(keys)] = Candidates(chosen, {})
    return out


def _header(r: float, per: int | None) -> str:
    return f"r = {r:g}" if per is None else f"r = {round(r * per, 6):g}/{per}"


def _row_columns(table: pd.DataFrame, by: Sequence[str]) -> list[str]:
    """``by`` and the never-pooled columns ``grouping`` added to the table."""
    return list(by) + [c for c in NEVER_POOLED if c in table and c not in by]


def _render(header: list[str], lines: list[list[str]], fmt: str) -> str:
    if fmt == "latex":

        def escape(text: str) -> str:
            return text.replace("%", r"\%").replace("σ", r"$\sigma$").replace("_", r"\_")

        body = [" & ".join(escape(c) for c in row) + r" \\" for row in [header] + lines]
        return "\n".join(
            [r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", body[0], r"\hline", *body[1:], r"\end{tabular}"]
        )
    if fmt == "html":
        return html_table(header, lines)
    if fmt != "markdown":
        raise ValueError(f"unknown table format {fmt!r}; expected one of {', '.join(TEXT_FORMATS)}")
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)] + lines
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def html_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """An HTML table of plain-text cells, every one escaped (result rows are hostile input)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in lines)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def format_envelope(
    table: pd.DataFrame,
    by: Sequence[str] = ("method", "training"),
    over: Over = "sigma",
    fmt: str = "markdown",
    per: int | None = None,
    among: Mapping[tuple, Candidates] | None = None,
) -> str:
    """An envelope from ``best_certified_accuracy`` as the paper prints it: one row per group,
    one column per radius, cells "72.25% (81.50% @ σ=0.75)"; ``fmt`` markdown, latex or html;
    ``per`` writes the radii as multiples of 1/per (255 for L-infinity, as the papers do).
    ``among``: the rows' ``candidates``, so that a cell names only the parameters that tell them
    apart and the row's name those they share (without: every chosen parameter, in each cell)."""
    by = _row_columns(table, by)
    among = among if among is not None else _told(table, by, over)
    radii = sorted(table["radius"].unique())
    lines = []
    for keys, group in _groups(table, by):
        told = among[row_key(keys)].varying
        cells = {
            row["radius"]: _cell(row["certified_accuracy"], row["clean_accuracy"], {c: row[c] for c in told})
            for _, row in group.iterrows()
        }
        lines.append([_named(keys, among[row_key(keys)])] + [cells.get(r, "") for r in radii])
    return _render([" / ".join(by)] + [_header(r, per) for r in radii], lines, fmt)


def format_seed_table(
    table: pd.DataFrame,
    by: Sequence[str] = ("method", "training"),
    over: Over = "sigma",
    fmt: str = "markdown",
    per: int | None = None,
    among: Mapping[tuple, Candidates] | None = None,
) -> str:
    """A table from ``seed_table``: one row per group and seed, then its mean, std and max-min
    rows where it has several seeds; ``among`` as in ``format_envelope``."""
    by = _row_columns(table, by)
    among = among if among is not None else _told(table[table["statistic"].isna()], by, over)
    radii = sorted(table["radius"].unique())
    lines = []
    for keys, group in _groups(table, by):
        name, told = _named(keys, among[row_key(keys)]), among[row_key(keys)].varying
        per_seed = group[group["statistic"].isna()]
        for seed, rows in per_seed.groupby("seed", sort=True):
            rows = rows.set_index("radius")
            cells = [
                _cell(rows.loc[r, "certified_accuracy"], rows.loc[r, "clean_accuracy"], rows.loc[r, told].to_dict())
                if r in rows.index
                else ""
                for r in radii
            ]
            lines.append([f"{name} / seed = {seed}"] + cells)
        for statistic in SEED_STATISTICS:
            rows = group[group["statistic"] == statistic].set_index("radius")
            if not rows.empty:
                cells = [f"{100 * rows.loc[r, 'certified_accuracy']:.2f}%" if r in rows.index else "" for r in radii]
                lines.append([f"{name} / {statistic}"] + cells)
    return _render([" / ".join(by) + " / seed"] + [_header(r, per) for r in radii], lines, fmt)


def format_records(table: pd.DataFrame, fmt: str) -> str:
    """A long table (one record per group and radius) as CSV or JSON records, numbers as
    numbers: accuracies as fractions, radii in pixel scale, missing values empty (CSV) or null."""
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        # Python's json, not pandas' to_json, which rounds floats to 10 digits.
        records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
        return json.dumps(records, indent=1) + "\n"
    raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(DATA_FORMATS)}")


def table_records(
    df: pd.DataFrame,
    radii: Sequence[float],
    by: Sequence[str] = ("method", "training"),
    seeds: bool = False,
    radii_linf: Sequence[float] = LINF_RADII,
) -> list[NormTable]:
    """For each norm of the rows: its long table from ``best_certified_accuracy`` or, with
    ``seeds``, ``seed_table``, the row columns, what it chose over and each row's
    ``candidates`` (``NormTable``). ``radii`` in pixel scale; ``radii_linf`` in units of 1/255."""
    out = []
    for norm, rows, over in split_by_norm(df):
        per = PER.get(norm)
        chosen = [r / per for r in radii_linf] if per else list(radii)
        columns = grouping(rows, by)
        # A table asked for per training sigma (--by training_sigma) no longer chooses over it.
        kept = [c for c in over_columns(over) if c not in columns]
        if not kept:
            raise ValueError(f"by: {', '.join(over_columns(over))} is what the table chooses over, not a row name")
        over = kept if len(kept) > 1 else kept[0]
        table = (seed_table if seeds else best_certified_accuracy)(rows, chosen, columns, over)
        out.append(NormTable(norm, table, columns, over, candidates(rows, _row_columns(table, columns), over)))
    return out


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
    Zhang et al.'s families, never pooling training modes, training noises or datasets; a cell
    names only the parameters that tell its row's candidates apart. ``radii`` in pixel scale;
    ``radii_linf`` in units of 1/255. ``fmt`` markdown or latex (the papers' layout), csv or
    json (one record per norm, group and radius, with a ``norm`` column)."""
    parts = table_records(df, radii, by, seeds, radii_linf)
    if fmt in DATA_FORMATS:
        long = pd.concat([part.table.assign(norm=part.norm) for part in parts], ignore_index=True)
        return format_records(long[["norm", *long.columns.drop("norm")]], fmt)
    texts = []
    for part in parts:
        render = format_seed_table if seeds else format_envelope
        text = render(part.table, part.columns, part.over, fmt, PER.get(part.norm), part.among)
        texts.append(f"{part.norm.upper()} radius:\n{text}" if len(parts) > 1 else text)
    return "\n".join(texts)
