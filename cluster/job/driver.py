"""The job's entry point: ``python -m cluster.job.driver --job-id ... --spec-sha256 ...``, run by Ray
as the driver of a submitted job. It reads the validated sweep shipped with the job, in a
package or in the job's metadata (``cluster.record.read_shipped_spec``, checked against its
SHA-256), runs it
(``cluster.job.executor.run_sweep``: the plan of ``cluster.plan`` on Ray actors) and prints the
sweep's table.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import sys

from cluster import collector_paused

with collector_paused():  # the job's first seconds: cluster.collector_paused says why
    from cluster.job.executor import run_sweep
    from cluster.plan import SweepConflict
    from cluster.record import read_shipped_spec
    from cluster.spec import SpecError, Sweep
    from cluster.spec.bounds import MAX_SPEC_JSON

PRINTED_RADII = 64  # columns of the table the driver logs (its time grows with them: 20,000 took minutes)


def printed_radii(radii: tuple[float, ...]) -> list[float]:
    """The radii of the logged table: all of them, or PRINTED_RADII evenly spaced among them
    (the first and the last included)."""
    if len(radii) <= PRINTED_RADII:
        return list(radii)
    step = (len(radii) - 1) / (PRINTED_RADII - 1)
    return [radii[round(i * step)] for i in range(PRINTED_RADII)]


def print_table(sweep: Sweep, log=print) -> None:
    """The sweep's best-certified-accuracy table (its own configurations only), at most
    PRINTED_RADII radii wide."""
    from certlib.analysis import ANALYSIS_COLUMNS, format_tables, load_results

    filters = {
        "method": list(sweep.methods),
        "training": list(sweep.training),
        "sigma": list(sweep.sigmas),
        "seed": list(sweep.seeds),
    }
    try:
        df = load_results(sweep.output, filters=filters, columns=ANALYSIS_COLUMNS)
    except (OSError, ValueError) as err:
        log(f"no table: {err}")
        return
    if len(df):
        radii, radii_linf = printed_radii(sweep.radii), printed_radii(sweep.radii_linf)
        over = "sigma and k" if len(sweep.ks) > 1 else "sigma"
        log(f"best certified accuracy over {over}: certified % (clean % of the best configuration)")
        if len(radii) < len(sweep.radii) or len(radii_linf) < len(sweep.radii_linf):
            log(
                f"(at {len(radii)} of the spec's {len(sweep.radii):,} radii and {len(radii_linf)} of its "
                f"{len(sweep.radii_linf):,} radii_linf, evenly spaced; `certify table {sweep.output} --radii ...` "
                "for others)"
            )
        log(format_tables(df, radii, radii_linf=radii_linf))


def _spec_text(args: argparse.Namespace) -> str:
    """The sweep's JSON from where the command line says (as shipped: at most MAX_SPEC_JSON bytes)."""
    if args.spec_sha256:
        return read_shipped_spec(args.spec_sha256, MAX_SPEC_JSON, os.environ)
    return base64.b64decode(args.spec_b64).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="certify: run a sweep as a Ray job's driver")
    parser.add_argument("--job-id", required=True)
    spec = parser.add_mutually_exclusive_group(required=True)
    spec.add_argument("--spec-sha256", help="the SHA-256 of the validated sweep shipped with the job")
    spec.add_argument("--spec-b64", help="the validated sweep as base64 JSON (a small one: it is a command line)")
    args = parser.parse_args(argv)
    try:
        sweep = Sweep.from_json(_spec_text(args))
    except (OSError, ValueError) as err:  # SpecError among them; a missing or altered spec package
        print(f"error: {err}", flush=True)
        return 2
    try:
        progress = run_sweep(sweep, args.job_id, log=lambda line: print(line, flush=True))
    except (SpecError, SweepConflict, FileNotFoundError) as err:
        print(f"error: {err}", flush=True)
        return 2
    if progress.failures:
        print("the table covers the images certified so far: some units failed", flush=True)
    print_table(sweep, log=lambda line: print(line, flush=True))
    if progress.failures:
        print(f"{len(progress.failures)} task(s) failed:", flush=True)
        for line in progress.failures:
            print(f"  {line}", flush=True)
        return 1
    print(f"done: {progress.done} of {progress.total} rows in {sweep.output}", flush=True)
    return 0


def exit_now(code: int) -> None:
    """End the driver, and with it the job, once Ray is told: without the interpreter's
    teardown, which spent a second freeing what torch, pandas and Ray built before Ray could
    see the job end. Every file the driver writes is complete and closed by then (atomic
    writes, the writer lock released), and its output flushed here."""
    import ray

    ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    gc.freeze()  # the job's process: what its imports built lives as long (cluster.collector_paused)
    exit_now(main())
