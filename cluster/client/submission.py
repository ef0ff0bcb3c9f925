"""Submitting a sweep as one Ray job and waiting for its end: the core that ``certify
submit-job`` and the notebook API (``cluster.notebook``) share, so that both validate,
name, start and follow jobs the same way.

Nothing here prints by itself: callers pass ``echo`` (and ``notice`` for what the command
line sends to stderr), so the command line keeps its messages and a notebook its own.
Ray and the spec's dependencies are imported when used: ``certify --help`` stays fast.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.client import jobs, local_ray
from cluster.record import METADATA_SPEC_BYTES, spec_digest, write_spec_package

if TYPE_CHECKING:
    from cluster.spec import Sweep

Echo = Callable[[str], None]
SpecSource = str | Path | Mapping[str, Any]  # a YAML file, or the spec as plain data


class NoLocalRay(jobs.ClusterError):
    """No address given and no embedded local Ray instance answers (and none may be started)."""


def _silent(_line: str) -> None:
    pass


def submission_id(spec_json: str, name: str) -> str:
    """Deterministic: the same validated spec always gets the same job id (its later attempts
    add -r2, -r3, ...)."""
    return f"certify-{name}-{hashlib.sha256(spec_json.encode()).hexdigest()[:10]}"


def connect(address: str | None, *, start: bool = False, notice: Echo = _silent):
    """A JobSubmissionClient for ``address`` (or RAY_ADDRESS; ``auto``: the Ray running here);
    without either, the embedded local Ray instance, started (dashboard on 127.0.0.1, token
    authentication on) when none runs and ``start`` is set; else NoLocalRay."""
    url = jobs.dashboard_address(address)
    if url:
        return jobs.connect(url)
    try:
        return jobs.connect(jobs.LOCAL_DASHBOARD)
    except jobs.ClusterError:
        if not start:
            raise NoLocalRay(
                f"no local Ray instance at {jobs.LOCAL_DASHBOARD} (submit a job to start one, "
                "or pass --address / set RAY_ADDRESS)"
            ) from None
    notice(
        f"starting a local Ray instance (dashboard on {jobs.LOCAL_DASHBOARD}, token authentication on; "
        "`certify stop` shuts it down)..."
    )
    instance = local_ray.start(num_cpus=os.cpu_count() or 1, notice=notice)
    local_ray.save_record(instance)
    return jobs.connect(instance.dashboard_url)


def user_modules(sweep: Sweep, notice: Echo = _silent) -> list[str]:
    """The sources of the user's own modules that build the sweep's imported models (cards with a
    ``factory:`` architecture), for the job's ``py_modules``: Ray ships them to the driver and
    every worker, which import them like the product's own code. Runs no code of theirs (finds
    the modules without importing them). A card whose module ``models.trust_code`` does not name,
    or a module of the standard library, is refused with one line. Only a module whose source lies
    under the current directory or an entry of the PYTHONPATH the user set is shipped; one
    installed in the environment (site-packages) or found elsewhere is not (``notice`` says so for
    the latter): the workers import it from their own installation. A checkpoint not readable
    here (a remote cluster's storage) is skipped: its module must be installed on the cluster."""
    from certlib.checkpoints.checkpoint import read_card
    from certlib.checkpoints.trust import importable_from_here, require_consent
    from certlib.checkpoints.weights import factory_module
    from cluster.plan import model_keys

    importable_from_here()
    installed, project = _installed_roots(), _project_roots()
    sources: dict[str, None] = {}
    for path in dict.fromkeys(key.checkpoint(sweep) for key in model_keys(sweep)):  # a k grid shares one file
        architecture = read_card(path).architecture if path.is_file() else ""
        module = factory_module(architecture)
        if module is None:
            continue
        require_consent(architecture, sweep.models.trust_code, str(path))
        source = _module_source(module)
        if source is None or any(source.is_relative_to(root) for root in installed):
            continue  # a missing module: the worker's import names it in one line
        if not any(source.is_relative_to(root) for root in project):
            notice(
                f"not shipping {module} ({source}): it lies outside the current directory and PYTHONPATH, "
                "so the workers import it from their own installation"
            )
            continue
        sources[str(source)] = None
    return list(sources)


def _module_source(module: str) -> Path | None:
    """The file or package directory of ``module``'s top-level package, found without importing
    anything; None for a module not found, built in, or without a file (a namespace package)."""
    import importlib.util

    from certlib.checkpoints.trust import standard_library

    top = module.partition(".")[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if found is None or not found.origin or found.origin in ("built-in", "frozen"):
        return None
    origin = Path(found.origin).resolve()
    source = origin.parent if found.submodule_search_locations else origin  # a package: its directory
    stdlib = {Path(sysconfig.get_paths()[key]).resolve() for key in ("stdlib", "platstdlib")}
    if standard_library(top) or (
        any(source.is_relative_to(root) for root in stdlib)
        and not any(source.is_relative_to(root) for root in _installed_roots())
    ):
        raise ValueError(f"{module!r} is a module of the standard library ({source}): never shipped with a job")
    return source


def _installed_roots() -> set[Path]:
    """Where installed packages live: site-packages of this environment and of the user."""
    import site

    paths = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    paths += [*site.getsitepackages(), site.getusersitepackages()]
    return {Path(p).resolve() for p in paths}


def _project_roots() -> list[Path]:
    """The user's own directories: the current one and the entries of PYTHONPATH they set."""
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [Path.cwd().resolve(), *(Path(p).resolve() for p in entries)]


def _as_package(source: Path, staging: Path) -> Path:
    """A directory Ray can ship as ``py_modules``: a package's own, or for a single-file module
    ``name.py`` a package ``name/`` holding it as ``__init__.py`` (importable by the same name;
    the Job Submission client uploads directories only, although the runtime_env takes files)."""
    if source.is_dir():
        return source
    package = staging / source.stem
    package.mkdir()
    shutil.copyfile(source, package / "__init__.py")
    return package


@dataclass(frozen=True)
class Target:
    """Where a validated spec goes: the dashboard ``url`` (None: the embedded local instance),
    a connection to it where one was made to decide, whether the cluster is remote, and the
    user's modules to ship with the job (``user_modules``)."""

    url: str | None
    client: Any = None  # ray.job_submission.JobSubmissionClient
    remote: bool = False
    modules: tuple[str, ...] = ()


def validate(spec: SpecSource, address: str | None, notice: Echo = _silent) -> tuple[Sweep, Target]:
    """The whole spec checked before anything is written or started (one-line SpecError), its
    relative paths made absolute against the current directory for a local Ray; and where it
    goes. The models' code is checked first (``user_modules``: consent needs no cluster, so an
    untrusted module is refused before any is asked). Whether the cluster is remote is asked of
    the cluster (``jobs.is_remote``): for a remote one only the spec itself is checked, its
    files are the cluster's."""
    from cluster.plan import preflight, relative_paths, resolve_paths
    from cluster.plan.preflight import one_line
    from cluster.spec import SpecError, load_spec, parse_spec

    sweep = parse_spec(dict(spec)) if isinstance(spec, Mapping) else load_spec(spec)
    try:  # relative checkpoints are read from here, as resolve_paths makes them
        modules = tuple(user_modules(sweep, notice))
    except SpecError:
        raise
    except (ValueError, OSError) as err:  # a malformed card or an untrusted module: named as preflight does
        raise SpecError(f"models.path: {one_line(err)}") from None
    url = jobs.dashboard_address(address)
    client = jobs.connect(url) if url else None
    target = Target(url, client, jobs.is_remote(url, client), modules)
    if target.remote:
        relative = relative_paths(sweep)
        if relative:
            raise SpecError(
                f"{relative[0]}: give an absolute path on the cluster's shared storage for a remote cluster"
            )
        return sweep, target
    sweep = resolve_paths(sweep, Path.cwd())  # relative to where the user works, not the driver
    preflight(sweep)
    return sweep, target


@dataclass(frozen=True)
class Submission:
    """A sweep's job on a cluster, as ``submit`` left it."""

    client: Any  # ray.job_submission.JobSubmissionClient
    job_id: str
    sweep: Sweep
    url: str | None  # the dashboard; None: the embedded local instance (jobs.LOCAL_DASHBOARD)
    already: str | None = None  # the status of an attempt that was still running: nothing submitted

    @property
    def dashboard(self) -> str:
        return self.url or jobs.LOCAL_DASHBOARD


def submit(
    spec: SpecSource, address: str | None = None, *, echo: Echo = _silent, notice: Echo | None = None
) -> Submission:
    """Validate ``spec`` completely (``validate``), then submit it as one Ray job whose id is
    derived from the spec (``submission_id``). An attempt of the same spec still running is
    returned as it is (``already``); after a cancel, a failure or a crash the spec is submitted
    again as attempt ``-r2``, ``-r3``, ... whose driver skips the units already on disk.
    ``echo`` says what was submitted; ``notice`` (default ``echo``) that a local Ray starts."""

    sweep, target = validate(spec, address, notice or echo)
    url, modules = target.url, target.modules
    spec_json = sweep.to_json()
    base_id = submission_id(spec_json, sweep.name)
    client = target.client or connect(address, start=True, notice=notice or echo)
    attempts = {
        j.submission_id: j
        for j in client.list_jobs()
        if (j.submission_id or "") == base_id or (j.submission_id or "").startswith(base_id + "-r")
    }
    running = [j for j in attempts.values() if jobs.job_status(j) not in jobs.TERMINAL]
    if running:
        return Submission(client, running[0].submission_id, sweep, url, already=jobs.job_status(running[0]))
    numbers = [1] + [int(j[len(base_id) + 2 :]) for j in attempts if j[len(base_id) + 2 :].isdigit()]
    job_id = base_id if not attempts else f"{base_id}-r{max(numbers) + 1}"
    if attempts:
        echo(f"resubmitting as {job_id} (attempt {max(numbers) + 1}); finished units are kept")
    # A remote cluster's Python is its own; a local driver runs in this very environment.
    python = "python" if target.remote else shlex.quote(sys.executable)
    if modules:
        echo(f"shipping the models' own code with the job: {', '.join(modules)}")
    digest = spec_digest(spec_json)
    metadata = {"certify": "1", "name": sweep.name, "output": sweep.output, "spec_sha256": digest}
    if len(spec_json.encode()) <= METADATA_SPEC_BYTES:  # Ray copies the metadata into an environment variable
        metadata["spec"] = spec_json
    with tempfile.TemporaryDirectory(prefix="certify-job-") as staging:
        # The models' modules, and the spec as a package of its own where the metadata cannot hold
        # it (cluster.record says why a small spec ships no runtime environment).
        py_modules = [str(_as_package(Path(m), Path(staging))) for m in modules]
        if "spec" not in metadata:
            py_modules.insert(0, str(write_spec_package(spec_json, Path(staging) / "spec")))
        client.submit_job(  # uploads the packages: the staging copies may go once it returns
            entrypoint=f"{python} -m cluster.job.driver --job-id {job_id} --spec-sha256 {digest}",
            runtime_env={"py_modules": py_modules} if py_modules else None,
            submission_id=job_id,
            metadata=metadata,
        )
    echo(f"submitted {job_id}: {sweep.name} -> {sweep.output}")
    return Submission(client, job_id, sweep, url)


@dataclass(frozen=True)
class Ending:
    """How a job ended: SUCCEEDED, FAILED, STOPPED, or LOST (its driver's node died while Ray
    still lists it as running), with the last line of Ray's reason where it did not succeed."""

    job_id: str
    state: str
    reason: str = ""

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"

    def describe(self) -> str:
        """The one line ``certify submit-job --wait`` ends with."""
        if self.state == "LOST":
            return (
                f"{self.job_id}: FAILED (its driver's node died; resubmit the spec to resume, finished units are kept)"
            )
        return f"{self.job_id}: {self.state}" + (f" ({self.reason})" if self.reason else "")


def wait(
    client, job_id: str, echo: Echo, *, show_logs: bool = True, on_poll: Callable[[], None] | None = None
) -> Ending:
    """Follow the job to its real end (``jobs.follow``: the log streamed to ``echo`` with
    ``show_logs``, dashboard faults ridden out, a dead driver node noticed, ``on_poll`` before
    each status check) and say how it ended."""
    end = jobs.follow(client, job_id, echo, show_logs=show_logs, on_poll=on_poll)
    reason = ""
    if end not in ("SUCCEEDED", "LOST"):
        try:
            message = (client.get_job_info(job_id).message or "").strip()
        except Exception:  # noqa: BLE001 - the reason is a courtesy; the end is known
            message = ""
        reason = message.splitlines()[-1] if message else ""
    return Ending(job_id, end, reason)
