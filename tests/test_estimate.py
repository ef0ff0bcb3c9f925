"""The dry run (``certify plan``, ``certify submit-job --dry-run``): the plan's counts against
sums computed here independently (DSSN's L, Monte Carlo's n0 + n, trainings with existing
checkpoints and shared Zhang checkpoints, shards already on disk), a deterministic estimate from
given rates, JSON numbers, the command line, a real calibration, and nothing written, no Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from certlib.data import load_digits
from certlib.engine.throughput import timed_rate
from certlib.families import make_noise
from cluster.cli import main
from cluster.cli.plan import dry_run, duration, plan, print_plan, render
from cluster.job.worker import UnitRunner
from cluster.plan import model_keys, resolve_paths
from cluster.plan.estimate import Rates, Workers, makespan
from cluster.spec import parse_spec
from tests.helpers import random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 30  # images selected from the digits test split
TRAIN_IMAGES = 1797 - 360  # the digits training split


def spec(tmp_path: Path, **changes) -> dict:
    """A small digits sweep with absolute paths under ``tmp_path``; ``changes`` replace keys."""
    data = {
        "name": "estimate",
        "output": str(tmp_path / "out"),
        "dataset": {"name": "digits", "limit": LIMIT},
        "models": {"path": str(tmp_path / "models" / "{method}-{training}-{sigma}-{seed}.pt"), "train": {"epochs": 3}},
        "methods": ["dssn"],
        "sigmas": [0.25, 0.5, 1.0, 2.0],
        "seeds": [0, 1],
        "training": ["standard", "stability"],
        "certify": {"n0": 8, "n": 100, "compile": False},
        "resources": {"workers": 2, "gpus_per_worker": 0, "shard_size": 8},
    }
    return data | changes


def given(spec_data, **options) -> dict:
    """The dry run at given rates (no measurement)."""
    return dry_run(spec_data, rate=options.pop("rate", 1e5), train_rate=options.pop("train_rate", 2e3), **options)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def digits():
    return load_digits("test")


def test_dssn_forward_passes_are_the_sum_of_L_over_the_plan(tmp_path):
    report = given(spec(tmp_path, resources={"shard_size": "auto"}))
    per_model = {s: make_noise("dssn", s, q=16).levels for s in (0.25, 0.5, 1.0, 2.0)}
    expected = sum(LIMIT * per_model[s] for s in per_model for _seed in (0, 1) for _mode in ("standard", "stability"))
    passes = report["plan"]["forward_passes"]
    assert passes == {"exact": expected, "monte_carlo": 0, "total": expected}
    assert sum(g["forward_passes"] for g in report["plan"]["groups"]) == expected
    assert {(g["sigma"], g["passes_per_image"]) for g in report["plan"]["groups"]} == set(per_model.items())
    assert report["plan"]["images"] == {"total": LIMIT * 16, "done": 0, "pending": LIMIT * 16}
    assert report["plan"]["units"]["shard_size_source"].startswith("auto")


def test_monte_carlo_samples_are_n0_plus_n_per_image_and_configuration(tmp_path):
    data = spec(tmp_path, methods=["uniform", "gaussian", "laplace"], sigmas=[0.25, 0.5], training=["standard"])
    plan_ = given(data)["plan"]
    configurations = 3 * 2 * 2
    assert plan_["models"]["configurations"] == configurations
    samples = (8 + 100) * LIMIT * configurations
    assert plan_["forward_passes"] == {"exact": 0, "monte_carlo": samples, "total": samples}
    assert [m["forward_passes"] for m in plan_["methods"]] == [(8 + 100) * LIMIT * 4] * 3
    assert plan_["units"] == {
        "total": configurations * 4,  # 30 images in shards of 8
        "done": 0,
        "pending": configurations * 4,
        "shard_size": 8,
        "shard_size_source": "spec",
    }


def test_models_to_train_skip_existing_checkpoints(tmp_path, digits):
    data = spec(tmp_path)
    sweep = parse_spec(data)
    present = model_keys(sweep)[:3]
    for key in present:
        random_checkpoint(key.checkpoint(sweep), digits, key.method, key.sigma, key.seed, key.training)
    models = given(data)["plan"]["models"]
    assert (models["configurations"], models["checkpoints_present"], models["to_train"]) == (16, 3, 13)
    by_mode = {t["training"]: t for t in models["training"]}
    assert by_mode["standard"]["models"] == 8 - 3 and by_mode["stability"]["models"] == 8
    assert by_mode["standard"]["relative_cost"] == 1.0 and by_mode["stability"]["relative_cost"] == 2.0
    assert by_mode["stability"]["images"] == 8 * 3 * TRAIN_IMAGES
    assert models["training_images"] == 13 * 3 * TRAIN_IMAGES


def test_zhang_families_share_one_training_per_checkpoint(tmp_path, digits):
    data = spec(
        tmp_path,
        methods=["zhang-l2", "gaussian"],
        ks=[0, 10],
        sigmas=[0.5, 1.0],
        training=["standard"],
        models=spec(tmp_path)["models"] | {"noise": "gaussian"},
    )
    # zhang-l2: 2 sigmas x 2 ks x 2 seeds, gaussian: 2 sigmas x 2 seeds; all on 4 Gaussian checkpoints.
    models = given(data)["plan"]["models"]
    assert (models["configurations"], models["to_train"], models["training"][0]["configurations"]) == (12, 4, 12)
    random_checkpoint(tmp_path / "models" / "gaussian-standard-0.5-0.pt", digits, "gaussian", 0.5, 0)
    models = given(data)["plan"]["models"]
    assert (models["checkpoints_present"], models["to_train"], models["training"][0]["configurations"]) == (3, 3, 9)
    assert models["training_images"] == 3 * 3 * TRAIN_IMAGES


def test_shards_on_disk_count_as_done_and_the_dry_run_writes_nothing(tmp_path, digits):
    data = spec(tmp_path, sigmas=[0.5], training=["standard"])
    sweep = parse_spec(data)
    first = model_keys(sweep)[0]
    random_checkpoint(first.checkpoint(sweep), digits, first.method, first.sigma, first.seed)
    runner = UnitRunner(sweep.to_json(), "test-job")
    from cluster.plan import Unit

    runner.certify(Unit(first, 0, 8))  # a resume: one unit of the first model already on disk
    before = snapshot(tmp_path)
    plan_ = given(data)["plan"]
    assert snapshot(tmp_path) == before
    assert plan_["units"]["done"] == 1 and plan_["units"]["pending"] == 2 * 4 - 1
    assert plan_["images"] == {"total": 2 * LIMIT, "done": 8, "pending": 2 * LIMIT - 8}
    assert plan_["groups"][0]["forward_passes"] == (2 * LIMIT - 8) * make_noise("dssn", 0.5, q=16).levels
    assert plan_["models"]["to_train"] == 1


def test_a_fresh_dry_run_writes_nothing(tmp_path, monkeypatch):
    relative = spec(Path("."), output="results/fresh", models={"path": "models/{method}-{training}-{sigma}-{seed}.pt"})
    relative["models"]["train"] = {"epochs": 2}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(relative))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    lines: list[str] = []
    print_plan("spec.yaml", rate=1e5, train_rate=1e3, echo=lines.append)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "results").exists() and not (tmp_path / "models").exists()
    assert not (tmp_path / "results" / "fresh.job").exists()
    assert f"-> {tmp_path / 'results' / 'fresh'}" in lines[0]  # paths resolved as submit-job resolves them


def test_given_rates_give_a_deterministic_estimate(tmp_path):
    data = spec(tmp_path, sigmas=[0.5, 1.0])
    report = given(data, rate=5e4, train_rate=1e3, workers=3)
    plan_, est = report["plan"], report["estimate"]
    assert given(data, rate=5e4, train_rate=1e3, workers=3) == report
    runs = [3 * TRAIN_IMAGES / 1e3] * 4 + [2 * 3 * TRAIN_IMAGES / 1e3] * 4  # standard, stability (2x)
    units = [u * make_noise("dssn", s, q=16).levels / 5e4 for s in (0.5, 1.0) for _ in range(4) for u in (8, 8, 8, 6)]
    assert est["one_worker_seconds"]["training"] == pytest.approx(sum(runs))
    assert est["one_worker_seconds"]["certification"] == pytest.approx(plan_["forward_passes"]["total"] / 5e4)
    assert est["one_worker_seconds"]["certification"] == pytest.approx(sum(units))
    assert est["wall_seconds"]["training"] == pytest.approx(makespan(runs, 3))
    assert est["wall_seconds"]["certification"] == pytest.approx(makespan(units, 3))
    assert est["total_seconds"]["wall"] == pytest.approx(makespan(runs, 3) + makespan(units, 3))
    assert est["workers"] == {"certify": 3, "train": 3, "source": "--workers"}
    assert report["calibration"]["seconds"] == 0.0 and report["calibration"]["certification"]["source"] == "given"


def test_the_schedule_and_the_durations():
    assert makespan([3.0, 3.0, 3.0], 2) == 6.0 and makespan([], 4) == 0.0 and makespan([5.0, 1.0, 1.0], 2) == 5.0
    assert [duration(s) for s in (None, 8.24, 42, 185, 7800, 4 * 86400 + 3 * 3600)] == [
        "unknown",
        "8.2 s",
        "42 s",
        "3 min 05 s",
        "2 h 10 min",
        "4 d 03 h",
    ]
    assert Rates(1.0, None).train_images_per_second is None and Workers(1, 1, "x").certify == 1


def test_timed_rate_counts_only_finished_calls():
    calls = []
    rate = timed_rate(lambda: calls.append(time.sleep(0.01)), lambda: None, 0.1)
    assert len(calls) >= 2 and 20 < rate < 110  # ~100/s at most, the machine may be busy


def test_the_command_prints_json_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path, methods=["dssn", "uniform"])))
    args = [str(path), "--format", "json", "--rate", "20000", "--train-rate", "500", "--workers", "2"]
    result = CliRunner().invoke(plan, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    integers = [report["plan"]["forward_passes"]["total"], report["plan"]["units"]["total"]]
    integers += [report["plan"]["models"]["to_train"], report["plan"]["images"]["pending"]]
    assert all(type(v) is int for v in integers)
    seconds = report["estimate"]["wall_seconds"]
    assert all(type(v) is float and v > 0 for v in seconds.values())
    assert type(report["calibration"]["certification"]["per_second"]) is float
    text = CliRunner().invoke(plan, args[:1] + args[3:])
    assert text.exit_code == 0 and "| total |" in text.output and "Estimated time (an estimate" in text.output


@pytest.fixture
def short_calibration(monkeypatch):
    """A real calibration of a fifth of the command's second per rate: these tests follow the
    measurement through the command, whose length does not change what they assert."""
    import importlib

    # the module, not the `plan` command that cluster.cli's namespace holds under that name
    monkeypatch.setattr(importlib.import_module("cluster.cli.plan"), "CALIBRATION_SECONDS", 0.2)


def test_submit_job_dry_run_prints_the_plan(tmp_path, monkeypatch, short_calibration):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path)))
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["submit-job", str(path), "--dry-run"])  # a real calibration on the CPU
    assert result.exit_code == 0, result.output
    assert "nothing submitted, nothing written" in result.output and "forward passes" in result.output
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    remote = CliRunner().invoke(main, ["submit-job", str(path), "--dry-run", "--address", "http://head:8265"])
    assert remote.exit_code == 2 and "without --address" in remote.output


@pytest.mark.parametrize(
    "change,message",
    [
        ({"sigmas": [0.5, -1]}, "sigmas[1]: must be > 0"),
        ({"dataset": {"name": "cifar10", "root": "/nonexistent/cifar"}}, "dataset: no CIFAR-10 under"),
        ({"models": {"path": "m/{method}-{training}-{sigma}-{seed}.pt"}}, "no checkpoint"),
    ],
)
def test_a_bad_spec_gets_submit_jobs_one_line_error(tmp_path, monkeypatch, change, message):

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path, resources={"shard_size": 8}) | change))
    ours = CliRunner().invoke(plan, [str(path), "--rate", "1000", "--train-rate", "100"])
    assert ours.exit_code == 2 and ours.output.count("\n") == 1 and message in ours.output, ours.output
    theirs = CliRunner().invoke(main, ["submit-job", str(path)])
    assert theirs.exit_code == 2 and theirs.output == ours.output


def test_a_real_calibration_on_the_quickstart(tmp_path, monkeypatch, short_calibration):
    quickstart = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(quickstart))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(plan, ["quickstart.yaml", "--device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path) == before
    report = json.loads(result.output)
    calibration = report["calibration"]
    certify, training = calibration["certification"], calibration["training"]
    assert certify["source"] == training["source"] == "measured"
    assert certify["per_second"] > 0 and training["per_second"] > 0 and certify["architecture"] == "small_cnn"
    assert 0 < calibration["seconds"] < 15  # about 0.2 s per rate here; busy machines take longer
    assert report["estimate"]["wall_seconds"]["training"] > 0 and report["plan"]["models"]["to_train"] == 12
    lines = render(report).splitlines()
    measured = [line for line in lines if "measured on cpu" in line]
    assert len(measured) == 2 and "samples/s of small_cnn" in measured[0] and "images/s of small_cnn" in measured[1]
    assert any(line.startswith("Calibration, ") for line in lines)


@pytest.mark.parametrize(
    "gpus,device,expected",
    [
        ((0, 0), "auto", ("cpu", "cpu", 16, 16)),  # the quickstart's resources on a GPU machine
        (("auto", "auto"), "auto", ("cuda", "cuda", 2, 2)),
        ((0.5, 0), "auto", ("cuda", "cpu", 4, 16)),
        (("auto", 1), "cpu", ("cpu", "cpu", 16, 16)),  # --device cpu: the CPU's rates and no GPU
    ],
)
def test_auto_measures_each_rate_where_its_workers_run(tmp_path, monkeypatch, gpus, device, expected):
    """On a machine with 2 GPUs and 16 CPUs (stubbed), a worker given no GPU runs on the CPU
    (cluster.job.worker.assigned_device): the plan measures its rate there and counts it by CPUs."""
    import os

    import torch

    import certlib.engine.throughput as throughput
    import cluster.job.worker

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(cluster.job.worker, "device_name", lambda dev: f"{dev.type} (stub)")
    seen: dict[str, str] = {}

    def fake(stage: str, per_second: float):
        def measure(*args, device, **kwargs):
            seen[stage] = device.type
            return throughput.Throughput(per_second, 8, "eager", device.type, 0.2)

        return measure

    monkeypatch.setattr(throughput, "forward_throughput", fake("certify", 1e4))
    monkeypatch.setattr(throughput, "training_throughput", fake("train", 1e2))
    resources = {"workers": "auto", "cpus_per_worker": 1, "shard_size": 8}
    resources |= {"gpus_per_worker": gpus[0], "gpus_per_train_worker": gpus[1]}
    report = dry_run(spec(tmp_path, resources=resources), device=device)
    calibration, workers = report["calibration"], report["estimate"]["workers"]
    assert (seen["certify"], seen["train"], workers["certify"], workers["train"]) == expected
    assert calibration["certification"]["device"] == f"{expected[0]} (stub)"
    assert calibration["training"]["device"] == f"{expected[1]} (stub)"


def test_the_dry_run_and_the_worker_calibration_import_no_ray(tmp_path, fresh_python):
    code = (
        "import sys; from cluster.cli.plan import dry_run; import cluster.plan.estimate, certlib.engine.throughput; "
        "from cluster.job.worker import UnitRunner; "
        f"r = dry_run({spec(tmp_path)!r}, rate=1e4, train_rate=1e3); "
        f"assert UnitRunner({json.dumps(resolve_paths(parse_spec(spec(tmp_path)), tmp_path).to_json())}, 'j')"
        ".calibrate('small_cnn', seconds=0.1) > 0; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    done = fresh_python.run(code)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists()
