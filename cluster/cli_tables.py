"""The ``certify table`` and ``certify plot`` commands: results read back, optionally
re-certified from their stored votes, as the papers' tables and figures."""

from __future__ import annotations

from pathlib import Path

import click

from cluster.cli_errors import UserError, user_errors


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return sorted(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise UserError(f"--radii: give numbers separated by commas, got {text!r}") from None


def _default_radii(results: Path) -> list[float]:
    """The radii of the sweep that wrote ``results`` (its _sweep.json), else 0, 0.5, ..., 4."""
    from cluster.plan import SWEEP_FILE
    from cluster.spec import Sweep

    try:
        return list(Sweep.from_json((results / SWEEP_FILE).read_text()).radii)
    except (OSError, ValueError):
        return list(Sweep.radii)


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


def _read_results(results: Path, certificate: str, dataset_root: str | None, by: str):
    """The rows (re-certified with ``certificate`` unless ``stored``) and the columns that name
    a table row or curve: ``by``, plus the certificate when re-certifying."""
    import pandas as pd

    from certlib.analysis import load_results, recertify
    from certlib.analysis.tables import family_attribute

    df = load_results(results)
    if df.empty:
        raise UserError(f"{results}: no result rows")
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


@click.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--radii", help="Radii, comma-separated (default: the sweep's radii, else 0, 0.5, ..., 4).")
@click.option("--radii-linf", help="L-infinity radii in units of 1/255, comma-separated (default 2, 4, ..., 12).")
@click.option("--by", default="method,training", show_default=True, help="Columns that name a table row.")
@click.option("--format", "fmt", type=click.Choice(["markdown", "csv", "latex"]), default="markdown", show_default=True)
@click.option("--seeds", is_flag=True, help="Levine & Feizi Table 3: the envelope per seed with mean, std and max-min.")
@recertify_options
@user_errors
def table(
    results: Path,
    radii: str | None,
    radii_linf: str | None,
    by: str,
    fmt: str,
    seeds: bool,
    certificate: str,
    dataset_root: str | None,
) -> None:
    """Best certified accuracy over the sigma grid (and k), as in Levine & Feizi Table 1: one
    table per norm, L-infinity radii in units of 1/255."""
    from certlib.analysis import format_tables
    from certlib.analysis.tables import LINF_RADII

    df, columns = _read_results(results, certificate, dataset_root, by)
    if {"sigma", "k"} & set(columns) or (seeds and "seed" in columns):
        raise UserError("--by: sigma and k (and with --seeds, seed) are what the table chooses over, not row names")
    radii_list = _floats(radii) or _default_radii(results)
    click.echo(format_tables(df, radii_list, columns, fmt, seeds, _floats(radii_linf) or LINF_RADII))


@click.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG or SVG file.")
@click.option("--by", default="method,training", show_default=True, help="Columns that name a curve family.")
@click.option(
    "--norm", type=click.Choice(["l1", "l2", "linf"]), help="The norm to plot where the results hold several."
)
@recertify_options
@user_errors
def plot(results: Path, output: Path, by: str, norm: str | None, certificate: str, dataset_root: str | None) -> None:
    """Certified accuracy against radius: one curve per sigma (and k), the envelope bold; one norm per plot."""
    from certlib.analysis import plot_curves
    from certlib.analysis.tables import split_by_norm

    df, columns = _read_results(results, certificate, dataset_root, by)
    plots = {each: (rows, over) for each, rows, over in split_by_norm(df)}
    if norm is None and len(plots) > 1:
        raise UserError(f"the results hold {', '.join(plots)} radii: plot one norm at a time (--norm)")
    if norm is not None and norm not in plots:
        raise UserError(f"--norm {norm}: the results hold {', '.join(plots)} radii only")
    rows, over = plots[norm or next(iter(plots))]
    try:
        path = plot_curves(rows, output, columns, over)
    except ValueError as err:
        raise UserError(str(err)) from None
    click.echo(f"wrote {path}")
