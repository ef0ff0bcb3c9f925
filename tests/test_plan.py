"""The sweep's plan without Ray: its units, the train-before-certify dependencies, the shards
already done, the output directories it refuses, the initial progress and the shard size."""

from __future__ import annotations

from pathlib import Path

import pytest

from certlib.data import load_digits
from cluster.plan import (
    SweepConflict,
    calibration_architecture,
    expand,
    model_keys,
    plan_sweep,
    preflight,
    select_images,
    with_shard_size,
)
from cluster.plan.sizing import choose_shard_size, recorded_shard_size
from cluster.record import sweep_file
from cluster.spec import SpecError, parse_spec
from tests.helpers import random_checkpoint


def digits_sweep(
    tmp_path: Path, *, train: bool = True, shard_size: int | str = 8, limit: int = 20, every: int = 1, start: int = 0
):
    models = {"path": str(tmp_path / "models" / "{method}-{training}-{sigma}-{seed}.pt")}
    if train:
        models["train"] = {"epochs": 1}
    return parse_spec(
        {
            "name": "plan",
            "output": str(tmp_path / "out"),
            "dataset": {"name": "digits", "limit": limit, "every": every, "start": start},
            "models": models,
            "methods": ["uniform"],
            "sigmas": [0.5],
            "seeds": [0, 1],
            "certify": {"n0": 8, "n": 64, "compile": False},
            "resources": {"shard_size": shard_size},
        }
    )


@pytest.fixture(scope="module")
def digits():
    return load_digits("test")


def checkpoint(sweep, key, digits):
    random_checkpoint(key.checkpoint(sweep), digits, key.method, key.sigma, key.seed, key.training)


def test_the_plan_imports_no_ray(fresh_python):
    code = (
        "import cluster.plan, certlib.families, certlib.rows, certlib.analysis; import sys; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    done = fresh_python.run(code)
    assert done.returncode == 0, done.stderr


def test_units_of_a_model_to_train_wait_for_it(tmp_path, digits):
    sweep = digits_sweep(tmp_path)
    present, missing = model_keys(sweep)
    checkpoint(sweep, present, digits)
    assert len(select_images(sweep)) == 20
    units = expand(sweep, 20)
    assert [(u.model, u.start, u.stop) for u in units] == [
        (k, a, b) for k in (present, missing) for a, b in ((0, 8), (8, 16), (16, 20))
    ]
    plan = plan_sweep(sweep, 20, log=pytest.fail)
    assert plan.pending == units and plan.skipped == 0 and plan.to_train == [missing]
    assert plan.waiting == {missing: units[3:]}  # every unit of the model to train waits for it
    assert plan.ready == units[:3]  # the units of the model whose checkpoint exists run at once
    progress = plan.progress()
    assert (progress.total, progress.done, progress.units_total, progress.units_done) == (40, 0, 6, 0)
    assert progress.by_model == {present.label: [0, 20], missing.label: [0, 20]}
    assert progress.models_to_train == 1 and progress.training == {missing.label: {"state": "queued"}}
    with pytest.raises(SweepConflict, match="no models.train section"):
        plan_sweep(digits_sweep(tmp_path, train=False), 20)


def test_a_valid_shard_is_skipped_and_a_damaged_one_recomputed(tmp_path, digits):
    from cluster.job.worker import UnitRunner

    sweep = digits_sweep(tmp_path)
    for key in model_keys(sweep):
        checkpoint(sweep, key, digits)
    units = expand(sweep, 20)
    UnitRunner(sweep.to_json(), "job-plan").certify(units[1])
    units[2].path(sweep).write_bytes(b"not parquet")
    lines = []
    plan = plan_sweep(sweep, 20, log=lines.append)
    assert plan.skipped == 1 and plan.pending == [u for u in units if u != units[1]]
    assert plan.to_train == [] and plan.waiting == {} and plan.ready == plan.pending
    assert len(lines) == 1 and lines[0].startswith(f"recomputing {units[2].unit_id}: its file unreadable")
    progress = plan.progress()
    assert (progress.total, progress.done, progress.units_total, progress.units_done) == (40, 8, 6, 1)
    assert progress.by_model[units[1].model.label] == [8, 20] and progress.training == {}


def test_an_output_directory_of_another_sweep_is_refused(tmp_path, digits):
    from cluster.job.worker import UnitRunner

    sweep = digits_sweep(tmp_path)
    for key in model_keys(sweep):
        checkpoint(sweep, key, digits)
    unit = expand(sweep, 20)[0]
    UnitRunner(sweep.to_json(), "job-plan").certify(unit)
    with pytest.raises(SweepConflict, match="another shard size"):
        plan_sweep(with_shard_size(sweep, 5), 20)
    with pytest.raises(SweepConflict, match="other parameters"):  # the same unit ids over another selection
        plan_sweep(digits_sweep(tmp_path, every=2), 20)
    unit.model.checkpoint(sweep).unlink()
    with pytest.raises(SweepConflict, match="no longer at models.path"):
        plan_sweep(sweep, 20)


def test_units_need_a_resolved_shard_size(tmp_path):
    with pytest.raises(ValueError, match="must be resolved"):
        expand(digits_sweep(tmp_path, shard_size="auto"), 20)


def test_shard_size_is_chosen_from_the_measured_rate():
    # 1,000 images x 10 models at 0.1 s each over 2 workers: 8 units per worker of 62.5 s each
    assert choose_shard_size(1000, 10, 1000, 10_000, 2) == 625
    # a small job: units of at least a minute, here the whole selection
    assert choose_shard_size(100, 1, 1000, 10_000, 4) == 100
    # a huge one: units of at most ten minutes
    assert choose_shard_size(10**6, 100, 1000, 10_000, 1) == 6000


def test_a_resume_reads_the_shard_size_an_earlier_run_chose(tmp_path):
    sweep = digits_sweep(tmp_path, shard_size="auto")
    output = Path(sweep.output)
    assert recorded_shard_size(output) is None
    output.mkdir(parents=True)
    sweep_file(output).parent.mkdir(parents=True)
    sweep_file(output).write_text(sweep.to_json())
    assert recorded_shard_size(output) is None  # still "auto": never resolved
    sweep_file(output).write_text(with_shard_size(sweep, 7).to_json())
    assert recorded_shard_size(output) == 7


def test_preflight_checks_the_selection_and_the_output(tmp_path, digits):
    from cluster.job.worker import UnitRunner

    with pytest.raises(SpecError, match="holds no image"):
        preflight(digits_sweep(tmp_path, start=10_000))
    sweep = digits_sweep(tmp_path)
    for key in model_keys(sweep):
        checkpoint(sweep, key, digits)
    preflight(sweep)
    UnitRunner(sweep.to_json(), "job-plan").certify(expand(sweep, 20)[0])
    preflight(sweep)
    with pytest.raises(SweepConflict, match="another shard size"):
        preflight(with_shard_size(sweep, 5))


def test_the_calibrated_architecture_is_the_one_that_will_run(tmp_path, digits):
    """Automatic shard sizes time the architecture the sweep certifies: an existing checkpoint's,
    else models.train's, else its dataset's paper default (a spec may leave it out)."""
    assert calibration_architecture(digits_sweep(tmp_path, shard_size="auto")) == "small_cnn"  # the digits default
    sweep = digits_sweep(tmp_path, train=False, shard_size="auto")
    with pytest.raises(SweepConflict, match="no models.train section"):
        calibration_architecture(sweep)
    key = model_keys(sweep)[1]
    random_checkpoint(key.checkpoint(sweep), digits, key.method, key.sigma, key.seed, architecture="wrn40_2")
    assert calibration_architecture(sweep) == "wrn40_2"
