"""Sweeps on a real local Ray instance: one row per image and configuration, resilience to
killed workers and drivers, failures that stay local, and results independent of sharding,
batching and the number of workers."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from certlib.analysis import load_results
from certlib.data import load_cifar10
from certlib.engine.cascade import COMPILE_MODE
from certlib.rows import existing_shards
from cluster.job.executor import run_sweep
from cluster.job.worker import UnitRunner
from cluster.plan import SweepConflict, expand, model_keys
from cluster.record import PROGRESS_PREFIX, failures_dir, sweep_file
from cluster.spec import parse_spec
from tests.helpers import quiet, random_checkpoint


def cifar_sweep(
    tmp_path: Path,
    cifar10_dir: Path,
    *,
    output: str = "out",
    methods=("dssn", "uniform"),
    limit: int = 24,
    shard_size: int = 8,
    batch_size: int | None = None,
    workers: int = 2,
    n: int = 200,
    sigmas=(0.25,),
    seeds=(0,),
    compile: bool = False,
):
    return parse_spec(
        {
            "name": "test-sweep",
            "output": str(tmp_path / output),
            "dataset": {
                "name": "cifar10",
                "split": "test",
                "root": str(cifar10_dir),
                "every": 7,
                "start": 3,
                "limit": limit,
            },
            "models": {"path": str(tmp_path / "models" / "{method}-{training}-{sigma}-{seed}.pt")},
            "methods": list(methods),
            "sigmas": list(sigmas),
            "seeds": list(seeds),
            "certify": {"n0": 16, "n": n, "alpha": 0.001, "batch_size": batch_size, "compile": compile},
            "resources": {
                "workers": workers,
                "cpus_per_worker": 1,
                "gpus_per_worker": 0,
                "shard_size": shard_size,
                "max_retries": 2,
            },
        }
    )


@pytest.fixture(scope="module")
def cifar_test(cifar10_dir):
    return load_cifar10(cifar10_dir, "test")


def _this_job() -> tuple[str, str, str]:
    """The filter on this process's Ray job: the session's Ray also runs other test processes'."""
    import ray

    return ("job_id", "=", ray.get_runtime_context().get_job_id())


def finished_calls(dashboard_url: str, key) -> int:
    """Finished calls named after ``key``'s model, as the dashboard's job page counts them."""
    from ray.util.state import list_tasks

    named = [("name", "=", f"certify {key.label}"), _this_job()]
    calls = list_tasks(address=dashboard_url, filters=named, limit=10_000)
    return sum(1 for t in calls if t.state == "FINISHED")


def make_models(sweep, dataset, poison=()):
    for key in model_keys(sweep):
        random_checkpoint(
            key.checkpoint(sweep), dataset, key.method, key.sigma, key.seed, key.training, poison=key.method in poison
        )


def expected_indices(limit):
    return list(range(3, 10_000, 7))[:limit]


@pytest.fixture(scope="module")
def swept(ray_session, cifar10_dir, cifar_test, tmp_path_factory):
    """One sweep on the session's Ray (DSSN and uniform at two sigmas, 12 images in units of 8,
    one worker, batches of 64): the rows test's subject and the invariance test's reference.
    Returns the sweep, its progress and each model's finished calls before it ran (this session's
    earlier tests ran calls of the same names)."""
    tmp = tmp_path_factory.mktemp("swept")
    sweep = cifar_sweep(tmp, cifar10_dir, sigmas=(0.25, 0.5), limit=12, workers=1, batch_size=64)
    make_models(sweep, cifar_test)
    before = {key: finished_calls(ray_session.dashboard_url, key) for key in model_keys(sweep)}
    return sweep, run_sweep(sweep, "job-rows", log=quiet), before


def test_one_row_per_image_and_configuration(swept, ray_session, cifar_test):
    sweep, progress, before = swept
    assert not progress.failures and progress.done == progress.total == 12 * 4
    df = load_results(sweep.output)
    assert len(df) == 48
    assert not df.duplicated(["method", "training", "sigma", "seed", "image_index"]).any()
    for _, group in df.groupby(["method", "sigma"]):
        assert sorted(group["image_index"]) == expected_indices(12)
    labels = cifar_test.labels.numpy()
    assert (df["label"].to_numpy() == labels[df["image_index"].to_numpy()]).all()
    dssn = df[df.method == "dssn"]
    assert (dssn["votes"].map(sum) == dssn["levels"]).all() and dssn["n"].isna().all()
    mc = df[df.method == "uniform"]
    assert (mc["votes"].map(sum) == 200).all() and (mc["selection_votes"].map(sum) == 16).all()
    assert set(df.columns) >= {
        "job_id",
        "unit_id",
        "radius_l1",
        "p_a_lower",
        "model_sha256",
        "worker_host",
        "device",
        "seconds",
    }
    # plain pandas reads the Hive layout too, partition columns included
    assert len(pd.read_parquet(sweep.output)) == 48
    # the dashboard's job page counts the calls by name: 2 more finished units per model (8 + 4 images)
    for key in model_keys(sweep):
        deadline = time.time() + 30
        while time.time() < deadline and finished_calls(ray_session.dashboard_url, key) < before[key] + 2:
            time.sleep(0.5)
        assert finished_calls(ray_session.dashboard_url, key) == before[key] + 2, key.label
    assert sweep_file(sweep.output).read_text() == sweep.to_json()
    # gpus_per_worker: 0 certifies on the CPU, also where the session's Ray has a GPU
    assert df["device"].str.startswith("cpu").all(), set(df["device"])


def test_results_do_not_depend_on_shards_batches_or_workers(swept, tmp_path, cifar10_dir, cifar_test):
    """The 12 images at sigma 0.25 of the swept fixture (units of 8, batches of 64, one
    worker) against a sweep of units of 12, batches of 1000 and two workers. Compilation:
    test_voting (real compilation, the same votes) and the test below (the spec reaches it)."""
    a = swept[0]
    b = cifar_sweep(tmp_path, cifar10_dir, output="b", shard_size=12, batch_size=1000, workers=2, limit=12)
    make_models(b, cifar_test)
    run_sweep(b, "job-b", log=quiet)
    columns = ["method", "sigma", "image_index", "votes", "selection_votes", "prediction", "radius_l1", "p_a_lower"]
    filters = {"sigma": [0.25], "image_index": expected_indices(12)}
    ra = load_results(a.output, columns=columns, filters=filters).sort_values(["method", "image_index"])
    ra = ra.reset_index(drop=True)
    rb = load_results(b.output, columns=columns).sort_values(["method", "image_index"]).reset_index(drop=True)
    assert len(ra) == len(rb) == 24
    for column in ("votes", "selection_votes"):
        assert [None if v is None else list(v) for v in ra[column]] == [
            None if v is None else list(v) for v in rb[column]
        ]
    pd.testing.assert_frame_equal(
        ra.drop(columns=["votes", "selection_votes"]), rb.drop(columns=["votes", "selection_votes"])
    )


def test_the_specs_compile_runs_each_models_engine_through_torch_compile(
    tmp_path, cifar10_dir, cifar_test, monkeypatch
):
    """``certify.compile: true`` reaches a worker's engine: each model's first level is
    compiled once, for one static batch shape (short batches padded). torch.compile is stubbed
    here; test_voting compiles for real and checks that no vote changes."""
    compiled, batches = [], []

    def stub(module, **options):
        compiled.append(options)
        return lambda x: batches.append(len(x)) or module(x)

    monkeypatch.setattr(torch, "compile", stub)
    sweep = cifar_sweep(tmp_path, cifar10_dir, limit=2, shard_size=2, batch_size=100, compile=True)
    make_models(sweep, cifar_test)
    runner = UnitRunner(sweep.to_json(), "job-compiled")
    for unit in expand(sweep, 2):
        runner.certify(unit)
    mode = COMPILE_MODE[runner.device.type]  # max-autotune where the worker runs on a GPU
    assert compiled == [{"mode": mode, "dynamic": False}] * 2  # once per model (DSSN, uniform)
    assert batches and set(batches) == {100}  # DSSN's 220 noise levels and n0 = 16 are not multiples of 100
    assert len(load_results(sweep.output)) == 4


def _alive_worker_pids(dashboard_url: str):
    from ray.util.state import list_actors

    return [
        a.pid
        for a in list_actors(
            address=dashboard_url, filters=[("class_name", "=", "Worker"), ("state", "=", "ALIVE"), _this_job()]
        )
    ]


def test_a_killed_driver_resumes_with_only_the_missing_units_and_a_killed_worker_is_replaced(
    ray_session, tmp_path, cifar10_dir, cifar_test
):
    """A driver killed after two units: the resumed sweep runs only the missing units and
    rewrites no finished shard. Its worker, killed once the resume has written a shard, is
    replaced and its unit retried: every row exactly once, no failure."""
    sweep = cifar_sweep(tmp_path, cifar10_dir, methods=("uniform",), limit=16, shard_size=2, n=1000, workers=1)
    make_models(sweep, cifar_test)
    address = ray_session.gcs_address
    spec = base64.b64encode(sweep.to_json().encode()).decode()
    code = (
        f"import ray, sys; ray.init(address={address!r}, log_to_driver=False); "
        f"from cluster.job.driver import main; sys.exit(main(['--job-id', 'driver-kill', '--spec-b64', {spec!r}]))"
    )
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(existing_shards(sweep.output)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(1.0)  # the killed driver's workers go with it
    before = {p: p.stat().st_mtime_ns for p in existing_shards(sweep.output)}
    assert 2 <= len(before) < 7, "too few units left for the resume to lose a worker"

    lines, outcome = [], {}
    resume = threading.Thread(
        target=lambda: outcome.setdefault("progress", run_sweep(sweep, "driver-kill", log=lines.append))
    )
    resume.start()
    deadline = time.time() + 120
    while len(existing_shards(sweep.output)) == len(before) and time.time() < deadline:
        time.sleep(0.1)
    pids = _alive_worker_pids(ray_session.dashboard_url)
    assert pids, "no worker to kill"
    os.kill(pids[0], signal.SIGKILL)
    resume.join(timeout=300)
    progress = outcome["progress"]
    assert f"{len(before)} units already done, {8 - len(before)} to run" in lines[0]
    assert any("worker died" in line for line in lines), lines
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished shards were not rewritten
    assert progress.units_done == 8 and not progress.failures
    df = load_results(sweep.output)
    assert len(df) == 16 and sorted(df["image_index"]) == expected_indices(16)


def test_the_progress_file_follows_each_finished_unit(ray_session, tmp_path, cifar10_dir, cifar_test, monkeypatch):
    """Between the log's progress lines (here: none but the first and the last), the progress
    file is rewritten as units land, so `certify status` never lags a finished unit by 5 s."""
    import cluster.job.executor as executor

    written = []

    def recording(output, job_id, snap, state):
        written.append((state, snap["units_done"]))
        write(output, job_id, snap, state)

    write = executor.write_progress
    monkeypatch.setattr(executor, "write_progress", recording)
    monkeypatch.setattr(executor, "PROGRESS_EVERY", 10**6)
    monkeypatch.setattr(executor, "PROGRESS_FILE_EVERY", 0.0)
    sweep = cifar_sweep(tmp_path, cifar10_dir, methods=("dssn",), limit=8, shard_size=2, workers=1)
    make_models(sweep, cifar_test)
    lines = []
    run_sweep(sweep, "job-progress-file", log=lines.append)
    assert sum(line.startswith("progress:") for line in lines) == 2, lines
    assert written[-1] == ("finished", 4)
    running = [done for state, done in written if state == "running"]
    assert running == sorted(set(running)) and set(running) >= {1, 2, 3}, written


def test_a_failing_unit_fails_alone(ray_session, tmp_path, cifar10_dir, cifar_test):
    sweep = cifar_sweep(tmp_path, cifar10_dir, limit=8, shard_size=4, workers=1)
    make_models(sweep, cifar_test, poison=("uniform",))  # NaN weights: NaN logits
    lines = []
    progress = run_sweep(sweep, "job-fail", log=lines.append)
    assert progress.units_failed == 2 and len(progress.failures) == 2
    assert all("NaN" in f for f in progress.failures)
    failures = sorted(failures_dir(sweep.output).glob("*.json"))
    assert len(failures) == 2 and "NaN" in failures[0].read_text()
    df = load_results(sweep.output)
    assert set(df["method"]) == {"dssn"} and len(df) == 8


def test_an_output_directory_of_another_sweep_is_refused(ray_session, tmp_path, cifar10_dir, cifar_test):
    sweep = cifar_sweep(tmp_path, cifar10_dir, methods=("dssn",), limit=8, shard_size=4)
    make_models(sweep, cifar_test)
    runner = UnitRunner(sweep.to_json(), "job-1")  # the earlier sweep's shards, from this process:
    for unit in expand(sweep, 8):  # run_sweep refuses before starting any worker
        runner.certify(unit)
    with pytest.raises(SweepConflict, match="another shard size"):
        run_sweep(cifar_sweep(tmp_path, cifar10_dir, methods=("dssn",), limit=8, shard_size=3), "job-2", log=quiet)
    other = parse_spec({**_as_yaml(sweep), "dataset": {**_as_yaml(sweep)["dataset"], "every": 5}})
    with pytest.raises(SweepConflict, match="other parameters"):
        run_sweep(other, "job-3", log=quiet)
    key = model_keys(sweep)[0]
    random_checkpoint(
        key.checkpoint(sweep), cifar_test, key.method, key.sigma, key.seed + 1
    )  # other weights, same place
    from certlib.checkpoints.checkpoint import load_checkpoint, save_checkpoint

    model, card = load_checkpoint(key.checkpoint(sweep), override=True)
    save_checkpoint(key.checkpoint(sweep), model, dataclasses.replace(card, seed=key.seed))
    with pytest.raises(SweepConflict, match="another model"):
        run_sweep(sweep, "job-4", log=quiet)


def _as_yaml(sweep):
    import json

    return json.loads(sweep.to_json())


def test_jobs_sharing_a_checkpoint_train_it_once(train_model, tmp_path, monkeypatch, capsys):
    import torch

    import cluster.job.training as training

    sweep = parse_spec(
        {
            "name": "shared-model",
            "output": str(tmp_path / "out"),
            "dataset": {"name": "digits"},
            "models": {
                "path": str(tmp_path / "models" / "{method}-{training}-{sigma}-{seed}.pt"),
                "train": {"epochs": 1},
            },
            "methods": ["dssn"],
            "sigmas": [0.5],
        }
    )
    key = model_keys(sweep)[0]
    trained = []

    def slow_train_model(*args, **kwargs):
        trained.append(args[1])
        time.sleep(1.0)  # long enough for the other job to find the checkpoint locked
        return train_model(*args, **kwargs)

    monkeypatch.setattr(training, "train_model", slow_train_model)
    trainers = [training.ModelTrainer(sweep, torch.device("cpu")) for _ in range(2)]
    results = [None, None]

    def train(i):
        results[i] = trainers[i].train(key)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=120)
    assert trained == [key.checkpoint(sweep)]
    assert results[0]["clean_accuracy"] == results[1]["clean_accuracy"] is not None
    out = capsys.readouterr().out
    assert "waiting: another process is training" in out and "was trained meanwhile by another process" in out


def test_training_progress_and_eta_are_reported_while_models_train(
    ray_session, trains_in_ray_job, tmp_path, monkeypatch
):
    import cluster.job.executor as executor

    epochs = 12  # a few seconds a model on one CPU: several progress records (every 0.5 s) catch one mid-training
    monkeypatch.setattr(executor, "PROGRESS_EVERY", 0.5)
    monkeypatch.setattr(executor, "PROGRESS_JSON_EVERY", 0.5)
    sweep = parse_spec(
        {
            "name": "train-progress",
            "output": str(tmp_path / "out"),
            "dataset": {"name": "digits", "limit": 10},
            "models": {
                "path": str(tmp_path / "models" / "{method}-{training}-{sigma}-{seed}.pt"),
                "train": {"epochs": epochs},
            },
            "methods": ["uniform"],
            "sigmas": [0.5],
            "seeds": [0, 1],
            "certify": {"n0": 8, "n": 64},
            # training on the CPU on a GPU node too: there the 12 epochs could end between two records
            "resources": {
                "workers": 1,
                "cpus_per_worker": 1,
                "gpus_per_worker": 0,
                "gpus_per_train_worker": 0,
                "shard_size": 10,
            },
        }
    )
    lines = []
    progress = run_sweep(sweep, "job-train-progress", log=lines.append)
    assert not progress.failures and progress.models_trained == 2
    records = [json.loads(line.split(PROGRESS_PREFIX, 1)[1]) for line in lines if PROGRESS_PREFIX in line]
    mid = [r for r in records if any(t.get("state") == "training" and "epoch" in t for t in r["training"].values())]
    assert mid, "no progress record caught a model mid-training"
    entry = next(t for t in mid[0]["training"].values() if "epoch" in t)
    assert 1 <= entry["epoch"] <= epochs and entry["epochs"] == epochs and entry["images_per_second"] > 0
    assert entry["eta_seconds"] >= 0 and mid[0]["training_eta_seconds"] is not None
    # one worker: while the first model trains, the second waits, and the job's ETA waits for both
    assert any(t["state"] == "queued" for t in mid[0]["training"].values())
    assert any("training ETA" in line for line in lines)
    final = records[-1]
    assert [t["state"] for t in final["training"].values()] == ["done", "done"] and final["eta_seconds"] == 0
    assert all(t["epoch"] == epochs for t in final["training"].values() if "epoch" in t)


def test_the_eta_adds_the_training_still_to_do_to_certification():
    from cluster.progress import Progress, describe_progress, describe_training

    now = time.time()
    progress = Progress(
        total=200,
        done=100,
        by_model={},
        units_total=4,
        started=now - 10,
        images_this_run=50,
        models_to_train=2,
        train_slots=2,
    )
    progress.training = {
        "a": {
            "state": "training",
            "epoch": 2,
            "epochs": 10,
            "images": 1000,
            "images_per_second": 100.0,
            "reported": now,
        },
        "b": {"state": "queued"},
    }
    snap = progress.snapshot()
    # a: 8 epochs of 10 s left; b: a whole model (100 s); two workers; then 100 images at 5 images/s
    assert snap["training_eta_seconds"] == pytest.approx(90, abs=0.5)
    assert snap["eta_seconds"] == pytest.approx(110, abs=0.5)
    assert snap["training"]["a"]["eta_seconds"] == pytest.approx(80, abs=0.5)
    assert "ETA 1m50s" in describe_progress(snap) and "1 training, training ETA 1m30s" in describe_progress(snap)
    assert describe_training("a", snap["training"]["a"]) == "a: training, epoch 2/10, 100 images/s, ETA 1m20s"
    progress.training["a"] = {"state": "training"}  # nothing measured yet: no honest ETA
    assert progress.snapshot()["eta_seconds"] is None


@pytest.mark.parametrize(
    "dataset,architecture,training,share",
    [
        ("cifar10", "wrn40_2", ["standard"], 0.25),
        ("cifar10", "wrn40_2", ["standard", "stability"], 0.5),
        ("imagenet", "resnet50", ["standard"], 1.0),
        ("digits", "small_cnn", ["stability"], 0.25),
    ],
)
def test_training_units_share_a_gpu_when_a_step_does_not_fill_it(tmp_path, dataset, architecture, training, share):
    from cluster.job.pool import training_gpu_share

    spec = {
        "name": "share",
        "output": str(tmp_path / "out"),
        "dataset": {"name": dataset, **({} if dataset == "digits" else {"root": str(tmp_path)})},
        "models": {"path": "m/{method}-{training}-{sigma}-{seed}.pt", "train": {"architecture": architecture}},
        "methods": ["gaussian"],
        "sigmas": [0.5],
        "training": training,
    }
    assert training_gpu_share(parse_spec(spec)) == share
    assert training_gpu_share(parse_spec({**spec, "resources": {"gpus_per_train_worker": 0.5}})) == 0.5


def test_a_worker_given_no_gpu_certifies_on_the_cpu_and_hides_the_nodes_gpus(monkeypatch):
    """Ray leaves a GPU node's CUDA_VISIBLE_DEVICES alone for a worker it gave no GPU: the
    worker must not pick the GPU up itself (``gpus_per_worker: 0``, the tests' specs)."""
    from cluster.job.worker import assigned_device

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # as Ray sets it for its GPU; undone afterwards
    given = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a declared GPU without one: the CPU
    assert assigned_device(["0"]) == given and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert assigned_device([]) == torch.device("cpu") and os.environ["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize("gpus", [0.0, 1.0])
def test_an_idle_worker_of_the_other_kind_takes_a_task_where_both_kinds_need_the_same(monkeypatch, tmp_path, gpus):
    """On CPUs a training worker and a certifying one need the same resources: the model a
    worker trained is certified by it, without starting another process. With a GPU (a whole
    one to certify, a share to train) the training worker is retired for a certifying one."""
    from cluster.job import pool as pools

    sweep = parse_spec(
        {
            "name": "kinds",
            "output": str(tmp_path / "out"),
            "dataset": {"name": "digits", "limit": 8},
            "models": {"path": "m/{method}-{training}-{sigma}-{seed}.pt", "train": {"epochs": 1}},
            "methods": ["dssn"],
            "sigmas": [0.5],
            "resources": {"workers": 1, "shard_size": 8},
        }
    )
    monkeypatch.setattr(pools.Pool, "_totals", staticmethod(lambda: (gpus, 2.0)))
    killed = []
    monkeypatch.setattr(pools.ray, "kill", lambda actor, no_restart: killed.append(actor))
    pool = pools.Pool(sweep, "job-kinds")
    started = []
    pool.factory = {
        kind: types.SimpleNamespace(remote=lambda *args: started.append(args) or object()) for kind in pool.factory
    }
    (key,) = model_keys(sweep)
    trainer = pool.assign(pools.Task("train", key), {"train"})
    trainer.tasks.append("training")
    trainer.model = key
    assert pool.assign(pools.Task("train", key), {"train"}) is None  # one worker a kind: it waits
    trainer.tasks.clear()
    certifier = pool.assign(pools.Task("certify", key, expand(sweep, 8)[0]), {"certify"})
    assert certifier.kind == "certify" and pool.slots == [certifier]
    assert (certifier is trainer) == (gpus == 0.0) and len(started) == (1 if gpus == 0.0 else 2)
    assert killed == ([] if gpus == 0.0 else [trainer.actor])


def test_an_automatic_shard_size_is_measured_once_and_kept_by_the_resume(ray_session, tmp_path):
    from certlib.data import load_digits
    from cluster.plan.sizing import recorded_shard_size

    sweep = parse_spec(
        {
            "name": "auto-shards",
            "output": str(tmp_path / "out"),
            "dataset": {"name": "digits", "limit": 30},
            "models": {"path": str(tmp_path / "models" / "{method}-{training}-{sigma}-{seed}.pt")},
            "methods": ["uniform"],
            "sigmas": [0.5],
            "certify": {"n0": 8, "n": 64},
            "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
        }
    )
    make_models(sweep, load_digits("test"))
    first, again = [], []
    assert not run_sweep(sweep, "auto-1", log=first.append).failures
    size = recorded_shard_size(sweep.output)
    assert isinstance(size, int) and any(line.startswith(f"shard size {size} images") for line in first)
    assert len(load_results(sweep.output)) == 30 and len(existing_shards(sweep.output)) == -(-30 // size)
    run_sweep(sweep, "auto-2", log=again.append)
    assert not any(line.startswith("shard size") for line in again)
    assert any("units already done, 0 to run" in line for line in again), again
