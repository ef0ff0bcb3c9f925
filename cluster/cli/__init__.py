"""The ``certify`` command line: submit sweeps as Ray jobs, follow them, read their tables.

Every error a user can cause is printed as one line and exits with code 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

import certlib
from cluster.cli.errors import UserError, user_errors
from cluster.cli.importing import import_model_command
from cluster.cli.plan import plan, print_plan
from cluster.cli.report import report
from cluster.cli.tables import plot, table
from cluster.client import jobs, local_ray, submission
from cluster.client.submission import submission_id as submission_id  # where tests and scripts found it
from cluster.record import PROGRESS_PREFIX


def address_option(command):
    return click.option(
        "--address", help="Ray dashboard address (http://head:8265); default RAY_ADDRESS, else the local instance."
    )(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(certlib.__version__, prog_name="certify")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Batch certification of randomized-smoothing classifiers (DSSN, SSN, uniform, Gaussian,
    Laplace) on a local or remote Ray cluster."""
    if debug:
        os.environ["CERTIFY_DEBUG"] = "1"


# --------------------------------------------------------------------------- Ray connection


def _client(address: str | None, start: bool = False):
    """A JobSubmissionClient (``submission.connect``: the address, else the embedded local Ray,
    started when ``start`` is set); no local Ray to talk to is the user's one-line error."""
    try:
        return submission.connect(address, start=start, notice=lambda line: click.echo(line, err=True))
    except submission.NoLocalRay as err:
        raise UserError(str(err)) from None


# --------------------------------------------------------------------------- submit-job


@main.command("submit-job")
@click.argument("spec_file", type=click.Path(path_type=Path))
@address_option
@click.option("--wait", is_flag=True, help="Follow the job to its end and print its table.")
@click.option(
    "--dry-run", is_flag=True, help="Print the plan and a time estimate (`certify plan`); submit and write nothing."
)
@user_errors
def submit_job(spec_file: Path, address: str | None, wait: bool, dry_run: bool) -> None:
    """Validate SPEC_FILE completely, then submit it as one Ray job."""
    if dry_run:  # the plan against this machine's files and device: nothing submitted or written
        if address:
            raise UserError("--dry-run plans against this machine's files and device: run it without --address")
        print_plan(spec_file)
        return
    submitted = submission.submit(spec_file, address, echo=click.echo, notice=lambda line: click.echo(line, err=True))
    job_id = submitted.job_id
    if submitted.already is not None:
        click.echo(f"{job_id} is already {submitted.already}; follow it with `certify status {job_id}`")
    else:
        click.echo(
            f"dashboard: {submitted.dashboard}  |  "
            f"certify status {job_id}  |  certify logs {job_id}  |  certify cancel {job_id}"
        )
    if wait:
        sys.exit(_wait(submitted.client, job_id))


def _wait(client, job_id: str, raw: bool = False) -> int:
    """Follow the job to its real end (``submission.wait``) and say how it ended; 0 if it
    succeeded. Its log as a person reads it (``console.JobConsole``), or ``raw``."""
    from cluster.cli.console import JobConsole

    console = None if raw else JobConsole()
    ending = submission.wait(client, job_id, console or click.echo)
    if console is not None:
        console.close()
    click.echo(ending.describe())
    return 0 if ending.succeeded else 1


# --------------------------------------------------------------------------- status, list, logs, cancel


def _resolve_job(client, job: str) -> str:
    """A submission id, or the name of a sweep (its latest job)."""
    ours = [j for j in client.list_jobs() if (j.metadata or {}).get("certify") == "1"]
    for j in ours:
        if j.submission_id == job:
            return job
    named = sorted((j for j in ours if (j.metadata or {}).get("name") == job), key=lambda j: j.start_time or 0)
    if named:
        return named[-1].submission_id
    raise UserError(f"no certify job {job!r} on this cluster (see `certify list`)")


@main.command()
@click.argument("job")
@address_option
@click.option("--json", "as_json", is_flag=True, help="The status and the latest progress record as JSON.")
@user_errors
def status(job: str, address: str | None, as_json: bool) -> None:
    """Status and progress of JOB (a job id or a sweep name)."""
    from cluster.progress import TrainingState, describe_progress, describe_training

    client = _client(address)
    job_id = _resolve_job(client, job)
    info = client.get_job_info(job_id)
    output = (info.metadata or {}).get("output")
    progress = jobs.latest_progress(client, job_id, output)
    if as_json:
        click.echo(
            json.dumps({"job_id": job_id, "status": jobs.job_status(info), "output": output, "progress": progress})
        )
        return
    click.echo(f"{job_id}: {jobs.job_status(info)}  ({(info.metadata or {}).get('name')} -> {output})")
    if progress is None:
        click.echo("no progress reported yet")
        return
    click.echo(describe_progress(progress) + f"  (as of {progress['elapsed_seconds']:.0f} s into the run)")
    training = progress.get("training", {})
    if any(entry["state"] != TrainingState.DONE for entry in training.values()):
        click.echo("training:")
        for label, entry in sorted(training.items()):
            click.echo(f"  {describe_training(label, entry)}")
    click.echo("certified images per model:")
    for label, (model_done, model_total) in sorted(progress["by_model"].items()):
        click.echo(f"  {label}: {model_done}/{model_total}")


@main.command("list")
@address_option
@user_errors
def list_jobs(address: str | None) -> None:
    """The certify jobs on the cluster."""
    client = _client(address)
    ours = sorted(
        (j for j in client.list_jobs() if (j.metadata or {}).get("certify") == "1"), key=lambda j: j.start_time or 0
    )
    if not ours:
        click.echo("no certify jobs")
    for j in ours:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime((j.start_time or 0) / 1000))
        click.echo(f"{j.submission_id}  {jobs.job_status(j):<9}  {started}  {(j.metadata or {}).get('output')}")


@main.command()
@click.argument("job")
@address_option
@click.option("--follow", "-f", is_flag=True, help="Stream the log until the job ends (Ray's log tailing).")
@click.option("--tail", type=click.IntRange(min=1), help="Only the last N lines.")
@click.option("--raw", is_flag=True, help="The log as it is, the machine progress records included.")
@user_errors
def logs(job: str, address: str | None, follow: bool, tail: int | None, raw: bool) -> None:
    """The driver log of JOB (a job id or a sweep name)."""
    client = _client(address)
    job_id = _resolve_job(client, job)
    if follow:
        sys.exit(_wait(client, job_id, raw))
    text = jobs.log_tail(client, job_id, tail) if tail else client.get_job_logs(job_id)
    if not raw:
        text = "".join(line for line in text.splitlines(keepends=True) if PROGRESS_PREFIX not in line)
    click.echo(text, nl=False)


@main.command()
@click.argument("job")
@address_option
@user_errors
def cancel(job: str, address: str | None) -> None:
    """Stop JOB; finished units stay, and resubmitting the spec resumes it."""
    client = _client(address)
    job_id = _resolve_job(client, job)
    if client.stop_job(job_id):
        click.echo(f"stopping {job_id}; resubmit its spec to resume")
    else:
        click.echo(f"{job_id} has already ended ({jobs.job_status(client.get_job_status(job_id))})")


@main.command()
@click.option(
    "--force", is_flag=True, help="Stop it even while certify jobs run on it (they stop; resubmit to resume)."
)
@user_errors
def stop(force: bool) -> None:
    """Shut down the local Ray instance that `certify submit-job` started (never another one)."""
    try:
        instance = local_ray.load_record()
    except local_ray.RecordError as err:
        raise UserError(str(err)) from None
    if instance is None:
        local_ray.forget_record()
        try:
            jobs.connect(jobs.LOCAL_DASHBOARD).list_jobs()
        except Exception:  # noqa: BLE001 - nothing answers: nothing to stop
            click.echo("no local Ray instance started by certify is running")
            return
        raise UserError(
            f"the Ray instance at {jobs.LOCAL_DASHBOARD} was not started by certify; stop it with `ray stop`"
        )
    if not force:
        running = [
            str(j.submission_id)
            for j in jobs.connect(instance.dashboard_url).list_jobs()
            if jobs.job_status(j) not in jobs.TERMINAL
        ]
        if running:
            raise UserError(
                f"{len(running)} job(s) still running on the local Ray instance ({', '.join(running)}): "
                "cancel them, or pass --force"
            )
    count = local_ray.stop(instance)
    local_ray.forget_record()
    click.echo(f"stopped the local Ray instance ({count} processes)")


main.add_command(plan)
main.add_command(import_model_command)
main.add_command(table)
main.add_command(plot)
main.add_command(report)


if __name__ == "__main__":
    main()
