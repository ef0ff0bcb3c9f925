"""The ``certify report`` command: a results directory and its job record as one HTML file to
share (``certlib.analysis.report``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cluster.cli.errors import UserError, user_errors
from cluster.cli.tables import _floats, _read_results, _sweep_radii, filter_option


def job_record(results: Path) -> tuple[str | None, list[dict], str | None]:
    """What the job record beside ``results`` says (``cluster.record``): a status line from
    its progress file, its failure records and its spec (the sweep file, as YAML); None and
    nothing where it has none. A record that does not parse is shown as its text: the report
    says what is there."""
    import yaml

    from cluster.progress import describe_progress
    from cluster.record import failures_dir, progress_file, sweep_file

    spec = _text(sweep_file(results))
    if spec is not None:
        try:
            spec = yaml.safe_dump(json.loads(spec), sort_keys=False, allow_unicode=True)
        except ValueError:
            pass
    status = None
    progress = _text(progress_file(results))
    if progress is not None:
        try:
            record = json.loads(progress)
            status = f"job {record.get('job_id')}: {record.get('state')}; {describe_progress(record)}"
        except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
            status = f"progress record: {progress[:300]}"
    failures = []
    folder = failures_dir(results)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        text = _text(path) or ""
        try:
            failure = json.loads(text)
            failures.append(failure if isinstance(failure, dict) else {"task": path.stem, "error": text})
        except ValueError:
            failures.append({"task": path.stem, "error": text})
    return status, failures, spec


def _text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


@click.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="An .html file.")
@click.option("--radii", help="Radii, comma-separated (default: the sweep's radii, else 0, 0.5, ..., 4).")
@click.option(
    "--radii-linf",
    help="L-infinity radii in units of 1/255, comma-separated (default: the sweep's, else 2, 4, ..., 12).",
)
@click.option("--by", default="method,training", show_default=True, help="Columns that name a table row.")
@filter_option
@user_errors
def report(results: Path, output: Path, radii: str | None, radii_linf: str | None, by: str, where: str | None) -> None:
    """One self-contained HTML file to share: the best-certified-accuracy tables and curves per
    norm, each model's clean and certified accuracy and runtime, the job's failures and its spec.
    Opens offline in any browser; prints on paper."""
    from certlib.analysis import html_report

    if output.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"report: the output must end in .html, got {output.name}")
    if output.resolve().is_relative_to(results.resolve()):
        raise UserError(f"{output}: inside the results directory, which holds result shards only; write it beside")
    df, columns = _read_results(results, "stored", None, by, where)
    default, default_linf = _sweep_radii(results)
    status, failures, spec = job_record(results)
    try:
        page = html_report(
            df,
            _floats(radii) or default,
            title=f"Certified accuracy: {results.name}",
            by=columns,
            radii_linf=_floats(radii_linf) or default_linf,
            status=status,
            failures=failures,
            spec=spec,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    click.echo(f"wrote {output}")
