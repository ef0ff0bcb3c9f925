"""Sweeps from a notebook: submit a spec, follow it with a progress bar, read its results.

    from cluster.notebook import submit
    job = submit("jobs/quickstart.yaml")        # or a spec dict; address="http://head:8265"
    job.wait()                                  # progress bar; raises JobFailed if the job fails
    df = job.results()                          # one row per (image, configuration)
    print(job.table())
    job.plot("curves.svg")                      # or job.plot(): a matplotlib Figure, shown inline

The same machinery as the ``certify`` command line (``cluster.client.submission``): the same
validation (one-line ``SpecError`` before anything is written or started), job ids and
attempts, the embedded local Ray started where none runs, the same progress record as
``certify status`` and the same tables and curves as ``certify table`` and ``certify plot``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.client import jobs, submission
from cluster.client.jobs import ClusterError
from cluster.spec import SpecError, Sweep

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["ClusterError", "Job", "JobFailed", "SpecError", "attach", "submit"]

PROGRESS_EVERY = 5.0  # seconds between progress reads while waiting: the bar moves at the log's pace


class JobFailed(RuntimeError):
    """The job ended without succeeding (FAILED, STOPPED, or its driver's node died); one line."""

    def __init__(self, ending: submission.Ending):
        super().__init__(f"{ending.describe()}; see job.logs()")
        self.ending = ending


class Job:
    """A sweep's Ray job: follow it, ask its status, read its log and results, cancel it."""

    def __init__(self, client: Any, job_id: str, sweep: Sweep, dashboard: str):
        self.client, self.job_id, self.sweep, self.dashboard = client, job_id, sweep, dashboard

    def __repr__(self) -> str:
        return f"<Job {self.job_id}: {self.sweep.name} -> {self.sweep.output}>"

    def status(self) -> str:
        """Ray's status of the job: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return jobs.job_status(self.client.get_job_status(self.job_id))

    def progress(self) -> dict | None:
        """The job's latest progress record, the one ``certify status`` reads (images and units
        done of the total, failures, images/s, ETA, training), or None before the first."""
        return jobs.latest_progress(self.client, self.job_id, self.sweep.output)

    def logs(self, tail: int | None = None) -> str:
        """The driver's log, or only its last ``tail`` lines (read from the end of the file)."""
        if tail:
            return jobs.log_tail(self.client, self.job_id, tail)
        return self.client.get_job_logs(self.job_id)

    def cancel(self) -> bool:
        """Stop the job (False if it had already ended); finished units stay, and submitting
        the spec again resumes it."""
        return bool(self.client.stop_job(self.job_id))

    def wait(self, progress: bool = True) -> Job:
        """Follow the job to its real end with a progress bar (images certified of the total;
        ``progress=False``: none) and return the job; raise JobFailed unless it succeeded.
        Interrupting the wait leaves the job running."""
        bar = _ProgressBar(self) if progress else None
        try:
            echo, on_poll = (bar.write, bar.update) if bar else (print, None)
            ending = submission.wait(self.client, self.job_id, echo, show_logs=False, on_poll=on_poll)
            if bar:
                bar.update(force=True)
        finally:
            if bar:
                bar.close()
        if not ending.succeeded:
            raise JobFailed(ending)
        return self

    def results(self, filters: Any = None, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The rows under the sweep's results directory as ``certify table`` reads them
        (``certlib.analysis.load_results``: ``filters`` and ``columns`` are pushed down)."""
        from certlib.analysis import load_results

        return load_results(self.sweep.output, filters=filters, columns=columns)

    def table(
        self,
        radii: Sequence[float] | None = None,
        by: Sequence[str] = ("method", "training"),
        fmt: str = "markdown",
        seeds: bool = False,
        radii_linf: Sequence[float] | None = None,
        rows: pd.DataFrame | None = None,
    ) -> str:
        """The best-certified-accuracy tables, one per norm, as ``certify table`` prints them
        (``certlib.analysis.format_tables``): at the sweep's radii unless ``radii`` are given,
        ``fmt`` markdown, latex, csv or json, ``seeds`` for the per-seed table (Table 3), of
        ``rows`` where given (e.g. ``job.results().query("sigma <= 0.5")``), else all results."""
        from certlib.analysis import format_tables
        from certlib.analysis.tables import LINF_RADII

        chosen = list(radii) if radii is not None else list(self.sweep.radii)
        df = self.results() if rows is None else rows
        return format_tables(df, chosen, list(by), fmt, seeds, radii_linf or LINF_RADII)

    def plot(
        self,
        path: str | Path | None = None,
        by: Sequence[str] = ("method", "training"),
        norm: str | None = None,
        rows: pd.DataFrame | None = None,
    ) -> Path | Figure:
        """Certified accuracy against radius as ``certify plot`` draws it (one curve per sigma,
        the envelope bold, one norm per plot: ``norm`` where the results hold several), of
        ``rows`` where given, else all results. Saved to ``path`` (PNG, PDF or SVG by its
        extension; never inside the results directory) and that path returned; without a
        path, the matplotlib Figure (Jupyter shows it inline)."""
        from certlib.analysis import curves_figure, plot_curves
        from certlib.analysis.tables import select_norm

        selected, over = select_norm(self.results() if rows is None else rows, norm, "norm")
        if path is None:
            return curves_figure(selected, list(by), over)
        return plot_curves(selected, path, list(by), over, results=self.sweep.output)


def submit(spec: str | Path | Mapping[str, Any], address: str | None = None, quiet: bool = False) -> Job:
    """Validate ``spec`` (a YAML file, or the spec as a dict) completely, as ``certify
    submit-job`` does, and submit it as one Ray job on ``address`` (a dashboard, or
    RAY_ADDRESS), else on the embedded local Ray instance, started where none runs. Relative
    paths are relative to the current directory. A spec that cannot run raises SpecError
    (one line naming the field) before anything is written or started; an attempt of the
    same spec still running is returned instead of a new one; one that ended is resumed."""
    echo: Callable[[str], None] = (lambda line: None) if quiet else print
    submitted = submission.submit(spec, address, echo=echo)
    if submitted.already is not None:
        echo(f"{submitted.job_id} is already {submitted.already}: job.wait() follows it")
    else:
        echo(f"dashboard: {submitted.dashboard}")
    return Job(submitted.client, submitted.job_id, submitted.sweep, submitted.dashboard)


def attach(job_id: str, address: str | None = None) -> Job:
    """The job ``job_id`` (a submission id, as ``submit`` or ``certify list`` show it) on
    ``address`` (else RAY_ADDRESS, else the local instance), e.g. after a kernel restart."""
    client = submission.connect(address)
    try:
        info = client.get_job_info(job_id)
    except Exception as err:  # noqa: BLE001 - Ray answers an unknown id in several ways
        raise ClusterError(f"no job {job_id!r} on this cluster ({jobs.first_line(err)})") from None
    metadata = info.metadata or {}
    if metadata.get("certify") != "1":
        raise ClusterError(f"{job_id} is not a certify job (see `certify list`)")
    return Job(
        client, job_id, _attached_sweep(job_id, metadata), jobs.dashboard_address(address) or jobs.LOCAL_DASHBOARD
    )


def _attached_sweep(job_id: str, metadata: dict[str, str]) -> Sweep:
    """The sweep of a job, from its metadata; a spec too large for the metadata
    (``cluster.record.METADATA_SPEC_BYTES``) from the job record its driver wrote,
    ``<output>.job/sweep.json``, where this machine reads it."""
    from cluster.record import sweep_file
    from cluster.spec.bounds import MAX_SPEC_JSON

    if metadata.get("spec"):
        return Sweep.from_json(metadata["spec"])
    record = sweep_file(metadata.get("output") or "")
    try:
        with record.open("rb") as handle:
            sweep = Sweep.from_json(handle.read(MAX_SPEC_JSON).decode())
    except (OSError, ValueError) as err:
        raise ClusterError(
            f"{job_id}: its spec is too large for the job's metadata, and {record} cannot be read here "
            f"({type(err).__name__})"
        ) from None
    if sweep.name != metadata.get("name"):
        raise ClusterError(f"{job_id}: {record} holds the sweep {sweep.name!r}, not this job's")
    return sweep


class _ProgressBar:
    """A tqdm bar (``tqdm.auto``: a widget in Jupyter, text in a terminal) of the job's images
    certified, moved from its progress record; models in training show beside it."""

    def __init__(self, job: Job):
        from tqdm.auto import tqdm

        self.job, self.last, self.started = job, float("-inf"), False
        self.bar = tqdm(total=None, desc=job.job_id, unit="img", dynamic_ncols=True)

    def update(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last < PROGRESS_EVERY:
            return
        self.last = time.monotonic()
        snap = self.job.progress()
        if snap is None:
            return
        # .get: a record of another version of the driver must not stop the wait
        done = snap.get("images_done", 0)
        if not self.started:  # a resumed job's images done before: the bar starts there, its rate from here
            self.bar.reset(total=snap.get("images_total"))
            self.bar.initial = done
            self.started = True
        self.bar.total = snap.get("images_total")
        self.bar.n = done
        postfix = {"units": f"{snap.get('units_done', '?')}/{snap.get('units_total', '?')}"}
        postfix["failed"] = snap.get("units_failed", 0)
        trained, to_train = snap.get("models_trained", 0), snap.get("models_to_train", 0)
        if trained < to_train:
            postfix["trained"] = f"{trained}/{to_train}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
