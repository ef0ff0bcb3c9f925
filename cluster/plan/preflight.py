"""What the command line checks before it submits a spec: the dataset, the models' cards and the
output directory against the files here; and the spec's paths made absolute for a job's driver."""

from __future__ import annotations

import json
import os
from pathlib import Path

from certlib.atomic import lock_holder
from certlib.checkpoints.checkpoint import check_card, verify_checkpoint
from certlib.rows import legacy_layout
from cluster.plan.sizing import known_shard_size, with_shard_size
from cluster.plan.state import plan_sweep
from cluster.plan.units import model_keys, select_images
from cluster.record import writer_lock
from cluster.spec import SpecError, Sweep, parse_spec


def preflight(sweep: Sweep) -> None:
    """Checks that need the files: the dataset, the models' checkpoints, the output directory."""
    try:
        images = select_images(sweep)
    except (FileNotFoundError, ValueError) as err:
        raise SpecError(f"dataset: {err}") from None
    if len(images) == 0:
        raise SpecError("dataset: the selection (every/start/limit) holds no image")
    check_checkpoints(sweep)
    refused = legacy_layout(sweep.output)
    if refused:
        raise SpecError(f"output: {refused}")
    holder = lock_holder(writer_lock(sweep.output))
    if holder is not None:
        raise SpecError(f"output: {sweep.output} is being written by {holder}; wait for it to end")
    known = known_shard_size(sweep)
    if known is not None:  # else the driver sizes the units: no shard can be there yet
        plan_sweep(with_shard_size(sweep, known[0]), len(images), log=lambda line: None)


def check_checkpoints(sweep: Sweep) -> None:
    """Every existing checkpoint of the sweep checked as a worker will load it, so that what
    ``certify plan`` accepts a worker can load: its card valid, its code (a ``factory:``
    architecture) trusted by ``models.trust_code``, its card matching the model the sweep
    certifies (unless ``models.override_card``), its images' shape and class count the
    dataset's, its weights hashing to the card's SHA-256 and fitting the architecture key by
    key. Reads every checkpoint once (about a second per GB); builds each kind of model once."""
    models = sweep.models
    checked: set[str] = set()
    for key in model_keys(sweep):
        path, expected = key.checkpoint(sweep), key.expected_card(sweep)
        if not path.is_file() or str(path) in checked:  # a k grid shares one file
            continue
        checked.add(str(path))
        try:
            card = verify_checkpoint(path, override=True, trust_code=models.trust_code, **expected)
            problems = check_card(
                card, **{k: v for k, v in expected.items() if k not in ("input_shape", "num_classes")}
            )
        except (ValueError, OSError) as err:
            raise SpecError(f"models.path: {one_line(err)}") from None
        if problems and not models.override_card:
            raise SpecError(
                f"models.path: {path}: the card does not match: {problems[0]} (models.override_card: true to use it)"
            )


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def relative_paths(sweep: Sweep) -> list[str]:
    """The spec fields holding relative paths (a remote cluster cannot know what they mean)."""
    candidates = {"output": sweep.output, "models.path": sweep.models.path, "dataset.root": sweep.dataset.root}
    return [
        key for key, value in candidates.items() if value is not None and not Path(value).expanduser().is_absolute()
    ]


def resolve_paths(sweep: Sweep, base: Path) -> Sweep:
    """The sweep with its relative file paths (output, models.path, dataset.root) made
    absolute against ``base``: a job's driver runs in another working directory."""

    def absolute(p: str | None) -> str | None:
        return None if p is None else str(base / Path(p).expanduser())  # an absolute p stays as it is

    data = json.loads(sweep.to_json())
    data["output"] = absolute(data["output"])
    data["models"]["path"] = absolute(data["models"]["path"])
    data["dataset"]["root"] = absolute(data["dataset"]["root"])
    own_directory(Path(data["output"]), base)
    return parse_spec(data)


def own_directory(output: Path, here: Path) -> None:
    """Refuse an ``output`` that is not a results directory of its own on this machine: ``here``
    or a directory above it (``~``, a symbolic link to ``/``), the root of a filesystem, an
    existing file, or a path under a file."""
    own = "give the results a directory of their own"
    try:
        resolved, here = output.resolve(), here.resolve()  # symbolic links followed
    except (OSError, RuntimeError) as err:
        raise SpecError(f"output: {output}: cannot be resolved ({err.__class__.__name__})") from None
    if resolved == here or resolved in here.parents:
        raise SpecError(f"output: {output} is the current directory or one above it; {own}")
    if os.path.ismount(resolved):
        raise SpecError(f"output: {output} is the root of a filesystem; {own}")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir():
        raise SpecError(f"output: {existing} is a file, not a directory; {own}")
