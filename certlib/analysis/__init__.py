"""What users read at the end of a sweep: the math of the tables (``tables``), re-certification
from stored votes (``recertify``), and the renderers (``render``: Markdown, LaTeX, CSV, JSON;
``plot``: curves, matplotlib imported on demand; ``report``: one HTML file of them all). Results
load with ``load_results``."""

from certlib.analysis.plot import curves_figure, plot_curves
from certlib.analysis.recertify import recertify
from certlib.analysis.render import format_envelope, format_records, format_seed_table, format_tables, table_records
from certlib.analysis.report import html_report
from certlib.analysis.tables import (
    ANALYSIS_COLUMNS,
    best_certified_accuracy,
    certified_accuracy,
    high_probability_accuracy,
    norms,
    radius,
    runtime_summary,
    seed_table,
)
from certlib.rows import load_results

__all__ = [
    "ANALYSIS_COLUMNS",
    "best_certified_accuracy",
    "certified_accuracy",
    "curves_figure",
    "format_envelope",
    "format_records",
    "format_seed_table",
    "format_tables",
    "high_probability_accuracy",
    "html_report",
    "load_results",
    "norms",
    "plot_curves",
    "radius",
    "recertify",
    "runtime_summary",
    "seed_table",
    "table_records",
]
