"""One HTML file to share a sweep's results: the best-certified-accuracy tables and curves per
norm, each model's clean and certified accuracy at the tables' radii with its runtime per image,
the failures and the spec from the job record. Self-contained (inline CSS and SVG, no script,
no font or file fetched), light and printable.

Results directories are hostile input: every text from them (a training mode, a dataset name, a
failure's message, the spec) is HTML-escaped, matplotlib escapes the SVG's text, and the page's
Content-Security-Policy runs no script and loads nothing even if something slipped through.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence

import pandas as pd

from certlib.analysis.plot import curves_figure
from certlib.analysis.render import format_envelope, html_table, table_records
from certlib.analysis.tables import CONFIGURATION_POOLED_NEVER, LINF_RADII, PER, certified_accuracy, grouping
from certlib.rows import CONFIG

STYLE = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; background: #fff;
       max-width: 1100px; margin: 2rem auto; padding: 0 1.25rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.25rem; margin-top: 2.2rem;
     border-bottom: 1px solid #ddd; padding-bottom: .2rem; } h3 { font-size: 1.05rem; }
.summary { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d8d8d8; padding: .3rem .55rem; text-align: right; }
th:first-child, td:first-child { text-align: left; } thead th { background: #f3f4f6; }
tbody tr:nth-child(even) { background: #fafafa; }
.scroll { overflow-x: auto; }
figure { margin: .8rem 0; } figure svg { max-width: 100%; height: auto; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: .7rem; overflow-x: auto; white-space: pre-wrap;
      word-break: break-word; font-size: 13px; }
.note { color: #555; font-size: .9rem; }
@media print {
  body { max-width: none; margin: 0; font-size: 11pt; }
  h2 { break-after: avoid; } table, figure, pre { break-inside: avoid; }
  .scroll { overflow: visible; }
}
"""

# No script runs and nothing is fetched: a defence in depth behind the escaping.
POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _svg(fig, salt: str) -> str:
    """The figure as inline SVG (its text kept as text); ``salt`` keeps its element ids apart
    from another figure's on the page."""
    import matplotlib

    out = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(out, format="svg")
    text = out.getvalue()
    return text[text.index("<svg") :]  # without the XML prolog and DOCTYPE, which HTML does not take


def _percent(value: float) -> str:
    return "" if pd.isna(value) else f"{100 * value:.2f}%"


def _radius_header(r: float, per: int | None) -> str:
    return f"r = {r:g}" if per is None else f"r = {round(r * per, 6):g}/{per}"


def per_model(rows: pd.DataFrame, radii: Sequence[float], per: int | None) -> str:
    """Each model's (configuration's) images, clean accuracy, certified accuracy at ``radii``
    (pixel scale) and mean seconds per image with its devices: a table."""
    keys = grouping(rows, CONFIG, CONFIGURATION_POOLED_NEVER)
    keys = [c for c in keys if rows[c].notna().any()]  # k: Zhang et al.'s families only
    accuracy = certified_accuracy(rows, radii, keys)
    timed = {"seconds", "device"} <= set(rows.columns)
    if timed:
        grouped = rows.groupby(keys, sort=True, observed=True, dropna=False)
        runtime = pd.DataFrame(
            {
                "seconds_per_image": grouped["seconds"].mean(),
                "devices": grouped["device"].agg(lambda d: ", ".join(sorted({str(v) for v in d}))),
            }
        ).reset_index()
        accuracy = accuracy.merge(runtime, on=keys, how="left")
    header = [*keys, "images", "clean", *(_radius_header(r, per) for r in radii)]
    header += ["s / image", "devices"] if timed else []
    lines = []
    for _, row in accuracy.iterrows():
        line = ["" if pd.isna(row[c]) else f"{row[c]:g}" if isinstance(row[c], float) else str(row[c]) for c in keys]
        line += [f"{int(row['images'])}", _percent(row["clean"]), *(_percent(row[float(r)]) for r in radii)]
        if timed:
            seconds = row["seconds_per_image"]
            line += ["" if pd.isna(seconds) else f"{seconds:.4g}", str(row["devices"])]
        lines.append(line)
    return html_table(header, lines)


def failures_section(failures: Sequence[Mapping[str, object]]) -> str:
    """The failed units and trainings of the job record (task, attempts, error)."""
    if not failures:
        return '<p class="note">No unit or training failed.</p>'
    items = []
    for failure in failures:
        task, attempts = failure.get("task", "?"), failure.get("attempts", "?")
        items.append(f"<h3>{_e(task)} <span class='note'>({_e(attempts)} attempts)</span></h3>")
        items.append(f"<pre>{_e(failure.get('error', ''))}</pre>")
    return "".join(items)


def html_report(
    df: pd.DataFrame,
    radii: Sequence[float],
    *,
    title: str,
    by: Sequence[str] = ("method", "training"),
    radii_linf: Sequence[float] = LINF_RADII,
    status: str | None = None,
    failures: Sequence[Mapping[str, object]] = (),
    spec: str | None = None,
) -> str:
    """The report of result rows as one HTML document: per norm, the best-certified-accuracy
    table (as ``certify table`` prints it), the curves (as ``certify plot`` draws them, inline
    SVG) and each model's accuracies and runtime; then the job's ``status`` line, its
    ``failures`` (records with task, attempts and error) and its ``spec`` (text). ``radii`` in
    pixel scale, ``radii_linf`` in units of 1/255; accuracies shown in %."""
    datasets = ", ".join(sorted(f"{d} ({s})" for d, s in df[["dataset", "split"]].drop_duplicates().itertuples(False)))
    models = len(df[list(CONFIG)].drop_duplicates())
    body = [f"<h1>{_e(title)}</h1>"]
    body.append(f'<p class="summary">{_e(datasets)}: {len(df):,} result rows, {models} models</p>')
    if status:
        body.append(f'<p class="summary">{_e(status)}</p>')
    for part in table_records(df, radii, by, radii_linf=radii_linf):
        per, name = PER.get(part.norm), part.norm.upper()
        rows = df[df["method"].isin(part.table["method"].unique())]
        chosen = sorted(part.table["radius"].unique())
        body.append(f"<h2>{_e(name)} radius</h2><h3>Best certified accuracy</h3>")
        body.append(format_envelope(part.table, part.columns, part.over, "html", per, part.among))
        body.append(f"<h3>Certified accuracy against {_e(name)} radius</h3>")
        body.append(f"<figure>{_svg(curves_figure(rows, part.columns, part.over), part.norm)}</figure>")
        body.append("<h3>Per model</h3>" + per_model(rows, chosen, per))
    body.append("<h2>Failures</h2>" + failures_section(failures))
    body.append("<h2>Spec</h2>" + (f"<pre>{_e(spec)}</pre>" if spec else '<p class="note">No job record.</p>'))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
