"""The ``certify table`` and ``certify plot`` commands: results read back, optionally
re-certified from their stored votes, as the papers' tables and figures."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cluster.cli.errors import UserError, user_errors


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return sorted(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise UserError(f"--radii: give numbers separated by commas, got {text!r}") from None


def _sweep_radii(results: Path) -> tuple[list[float], list[float]]:
    """The radii of the sweep that wrote ``results`` (its job record's ``radii`` and
    ``radii_linf``, as the job's own closing table uses them), else the defaults. Read as plain
    JSON, not through the spec (which imports every family and torch): written by the job,
    validated when it was."""
    from certlib.analysis.tables import LINF_RADII, RADII
    from cluster.record import sweep_file

    try:
        sweep = json.loads(sweep_file(results).read_text())
        return [float(r) for r in sweep.get("radii", RADII)], [float(r) for r in sweep.get("radii_linf", LINF_RADII)]
    except (OSError, ValueError, TypeError, AttributeError):  # no record, or not a sweep's
        return list(RADII), list(LINF_RADII)


def recertify_options(command):
    """--certificate and --dataset-root, shared by table and plot."""
    command = click.option(
        "--dataset-root", help="Dataset directory for --certificate box_input (CIFAR-10, ImageNet)."
    )(command)
    return click.option(
        "--certificate",
        type=click.Choice(["stored", "standard", "box", "box_input"]),
        default="stored",
        show_default=True,
        help="Re-certify the Monte Carlo rows from their stored counts first "
        "(box: Voracek & Hein uniform++/split++; box_input: their Theorem 2.8 with the images).",
    )(command)


def _read_results(results: Path, certificate: str, dataset_root: str | None, by: str, where: str | None):
    """The rows (those matching ``where``, re-certified with ``certificate`` unless ``stored``)
    and the columns that name a table row or curve: ``by``, plus the certificate when
    re-certifying."""
    import pandas as pd

    from certlib.analysis import load_results, recertify
    from certlib.analysis.tables import family_attribute

    try:
        df = load_results(results)
    except ValueError as err:
        raise UserError(str(err)) from None
    df = _filtered(df, where)
    columns = [c.strip() for c in by.split(",") if c.strip()]
    unknown = [c for c in columns if c not in df.columns]
    if unknown:
        raise UserError(f"--by: no column {unknown[0]!r} in the results")
    if certificate != "stored":
        monte_carlo = ~family_attribute(df["method"], "exact").astype(bool)
        if not monte_carlo.any():
            raise UserError(
                f"--certificate {certificate}: the results hold exact rows only, which need no re-certification"
            )
        try:
            redone = recertify(df[monte_carlo], certificate, dataset_root=dataset_root)
        except ValueError as err:
            raise UserError(str(err)) from None
        df = pd.concat([df[~monte_carlo], redone], ignore_index=True)
        columns += [] if "certificate" in columns else ["certificate"]
    return df, columns


def _filtered(df, where: str | None):
    """The rows matching the pandas expression ``where`` (``DataFrame.query``), at least one."""
    if where is None:
        return df
    try:
        kept = df.query(where)
    except Exception as err:  # noqa: BLE001 - any parse or evaluation error is the user's expression
        raise UserError(f"--filter {where!r}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    if kept.empty:
        raise UserError(f"--filter {where!r}: no result rows match")
    return kept


def filter_option(command):
    return click.option(
        "--filter",
        "where",
        metavar="EXPR",
        help="Only the rows matching this pandas expression over the result columns, "
        "e.g. \"training == 'standard' and sigma <= 0.5\".",
    )(command)


@click.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--radii", help="Radii, comma-separated (default: the sweep's radii, else 0, 0.5, ..., 4).")
@click.option(
    "--radii-linf",
    help="L-infinity radii in units of 1/255, comma-separated (default: the sweep's, else 2, 4, ..., 12).",
)
@click.option("--by", default="method,training", show_default=True, help="Columns that name a table row.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["markdown", "latex", "csv", "json"]),
    default="markdown",
    show_default=True,
    help="markdown, latex: the papers' layout; csv, json: one record per norm, group and radius, numbers as numbers.",
)
@click.option("--seeds", is_flag=True, help="Levine & Feizi Table 3: the envelope per seed with mean, std and max-min.")
@filter_option
@recertify_options
@user_errors
def table(
    results: Path,
    radii: str | None,
    radii_linf: str | None,
    by: str,
    fmt: str,
    seeds: bool,
    where: str | None,
    certificate: str,
    dataset_root: str | None,
) -> None:
    """Best certified accuracy over the sigma grid (and k), as in Levine & Feizi Table 1: one
    table per norm, L-infinity radii in units of 1/255; training modes, training noises and
    datasets are never pooled into one row."""
    from certlib.analysis import format_tables

    df, columns = _read_results(results, certificate, dataset_root, by, where)
    if {"sigma", "k"} & set(columns) or (seeds and "seed" in columns):
        raise UserError("--by: sigma and k (and with --seeds, seed) are what the table chooses over, not row names")
    default, default_linf = _sweep_radii(results)
    radii_list, linf_list = _floats(radii) or default, _floats(radii_linf) or default_linf
    click.echo(format_tables(df, radii_list, columns, fmt, seeds, linf_list))


@click.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="A .png, .pdf or .svg file."
)
@click.option("--by", default="method,training", show_default=True, help="Columns that name a curve family.")
@click.option(
    "--norm", type=click.Choice(["l1", "l2", "linf"]), help="The norm to plot where the results hold several."
)
@filter_option
@recertify_options
@user_errors
def plot(
    results: Path,
    output: Path,
    by: str,
    norm: str | None,
    where: str | None,
    certificate: str,
    dataset_root: str | None,
) -> None:
    """Certified accuracy against radius: one curve per sigma (and k), the envelope bold; one
    norm per plot; PNG, PDF or SVG by the file's extension."""
    from certlib.analysis import plot_curves
    from certlib.analysis.tables import select_norm

    df, columns = _read_results(results, certificate, dataset_root, by, where)
    try:
        rows, over = select_norm(df, norm, "--norm")
        path = plot_curves(rows, output, columns, over, results=results)
    except ValueError as err:
        raise UserError(str(err)) from None
    click.echo(f"wrote {path}")
