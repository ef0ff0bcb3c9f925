"""The job's entry point: ``python -m cluster.job.driver --job-id ...``, run by Ray as the driver of
a submitted job. It reads the validated sweep from its environment, runs it
(``cluster.job.executor.run_sweep``: the plan of ``cluster.plan`` on Ray actors) and prints the
sweep's table.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys

from cluster.job.executor import run_sweep
from cluster.plan import SweepConflict
from cluster.record import SPEC_VARIABLE
from cluster.spec import SpecError, Sweep


def print_table(sweep: Sweep, log=print) -> None:
    """The sweep's best-certified-accuracy table (its own configurations only)."""
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
        log("best certified accuracy over sigma (and k) (certified % (clean % @ sigma)):")
        log(format_tables(df, sweep.radii, radii_linf=sweep.radii_linf))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="certify: run a sweep as a Ray job's driver")
    parser.add_argument("--job-id", required=True)
    parser.add_argument(
        "--spec-b64",
        default=os.environ.get(SPEC_VARIABLE),
        help=f"the validated sweep as base64 JSON (default: ${SPEC_VARIABLE})",
    )
    args = parser.parse_args(argv)
    if not args.spec_b64:
        parser.error(f"no sweep: pass --spec-b64 or set {SPEC_VARIABLE}")
    try:
        sweep = Sweep.from_json(base64.b64decode(args.spec_b64).decode())
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


if __name__ == "__main__":
    sys.exit(main())
