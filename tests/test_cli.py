"""The certify command line as a user runs it: one-line errors with exit code 2 for bad
specs, and a whole job through the Ray Job Submission API."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from certlib.analysis import load_results
from certlib.data import load_digits
from cluster.cli import __main__ as console_command
from cluster.cli import main, submission_id
from cluster.client import submission
from cluster.record import progress_file
from tests.helpers import random_checkpoint

GOOD = {
    "name": "cli-test",
    "output": "out",
    "dataset": {"name": "digits", "split": "test", "limit": 40},
    "models": {"path": "models/{method}-{training}-{sigma}-{seed}.pt", "train": {"epochs": 2}},
    "methods": ["dssn"],
    "sigmas": [0.5],
    "certify": {"n0": 8, "n": 100},
    "radii": [0.0, 0.5],
    "resources": {"workers": 1, "gpus_per_worker": 0, "shard_size": 20},
}


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def with_(key: str, value):
    spec = yaml.safe_load(yaml.safe_dump(GOOD))
    target = spec
    *parents, leaf = key.split(".")
    for p in parents:
        target = target[p]
    if value is KeyError:
        del target[leaf]
    else:
        target[leaf] = value
    return spec


BAD_SPECS = [
    (with_("colour", "blue"), "colour: unknown key"),
    (with_("sigmas", [0.5, -1]), "sigmas[1]: must be > 0"),
    (with_("sigmas", [0.001]), "sigmas[0]: sigma=0.001 gives L = floor(2*lambda*q) = 0"),
    (with_("methods", ["dssn", "gauss"]), "methods[1]: must be one of"),
    (with_("certify.n", "many"), "certify.n: must be an integer"),
    (with_("certify.alpha", 0.7), "certify.alpha: must be < 0.5"),
    (with_("resources.workers", 0), "resources.workers: must be >= 1"),
    (with_("resources.shard_size", 2.5), "resources.shard_size: must be an integer"),
    (with_("dataset.name", "mnist"), "dataset.name: must be one of"),
    (
        with_("dataset", {"name": "cifar10", "root": "/nonexistent/cifar"}),
        "dataset: no CIFAR-10 under /nonexistent/cifar",
    ),
    (
        {**with_("models.path", "models/{method}-{training}-{seed}.pt"), "sigmas": [0.25, 0.5]},
        "models.path: the template must contain {sigma}",
    ),
    (with_("models.train", KeyError), "no checkpoint"),
    (with_("name", "Bad Name"), "name: use lower-case letters"),
    (with_("output", KeyError), "output: missing"),
    (with_("training", ["adversarial"]), "training[0]: must be one of"),
    (with_("models.train", {"epochs": 0}), "models.train.epochs: must be >= 1"),
    (
        {**with_("methods", ["laplace"]), "certify": {"multiclass": True}},
        "certify.multiclass: the Laplace certificate is binary only",
    ),
    (with_("models.path", "models/{method}-{training}-{sigma}-{seed[0]}.pt"), "models.path: bad template"),
    (with_("seeds", [2**33]), "seeds[0]: must be < 2**32"),
    (with_("certify", []), "certify: must be a mapping"),
    (with_("certify.compile", "yes"), "certify.compile: must be true, false or auto"),
]


@pytest.mark.parametrize("spec,message", BAD_SPECS, ids=[m.split(":")[0] for _, m in BAD_SPECS])
def test_bad_specs_are_refused_with_one_line_and_exit_code_2(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # A case that validates after all must fail here, not start or use a Ray on this machine.
    monkeypatch.setattr(submission, "connect", lambda *a, **k: pytest.fail("a bad spec reached Ray"))
    result = CliRunner().invoke(main, ["submit-job", str(write_spec(tmp_path, spec))])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists()  # nothing written


def test_unreadable_specs_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    for path, message in ((broken, "not valid YAML at line"), (tmp_path / "missing.yaml", "no such spec file")):
        result = CliRunner().invoke(main, ["submit-job", str(path)])
        assert result.exit_code == 2 and message in result.output


def test_a_checkpoint_whose_card_does_not_match_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    digits = load_digits("test")
    # a model trained at sigma 0.25 stored where the spec expects the sigma 0.5 model
    random_checkpoint(tmp_path / "models" / "dssn-standard-0.5-0.pt", digits, "dssn", 0.25, 0)
    result = CliRunner().invoke(main, ["submit-job", str(write_spec(tmp_path, GOOD))])
    assert result.exit_code == 2
    assert "sigma: trained at 0.25, certifying at 0.5" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_relative_paths_are_refused_for_a_remote_cluster(tmp_path, monkeypatch):
    from tests.helpers import StubDashboard

    monkeypatch.chdir(tmp_path)
    with StubDashboard() as remote:  # a cluster that runs elsewhere (its dashboard says so)
        remote.admit(monkeypatch)
        result = CliRunner().invoke(main, ["submit-job", str(write_spec(tmp_path, GOOD)), "--address", remote.url])
    assert result.exit_code == 2 and "output: give an absolute path on the cluster's shared storage" in result.output


def test_an_unreachable_cluster_is_one_line(tmp_path, monkeypatch):
    from cluster.client.ports import free_port

    monkeypatch.chdir(tmp_path)
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens: whether it is remote cannot be asked
    result = CliRunner().invoke(main, ["submit-job", str(write_spec(tmp_path, GOOD)), "--address", address])
    assert result.exit_code == 2 and f"cannot reach the Ray cluster at {address}" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_console_command_ends_with_clicks_code_and_its_output_written(monkeypatch, capsys):
    """``certify`` skips the interpreter's teardown only where nothing of its own still runs."""
    alone = console_command._alone
    monkeypatch.setattr("sys.argv", ["certify", "status", "a-job", "--address", "http://127.0.0.1:9"])
    monkeypatch.setattr(logging, "shutdown", lambda: None)  # pytest's own log handlers stay open
    ended: list[int] = []
    monkeypatch.setattr(os, "_exit", ended.append)
    monkeypatch.setattr(console_command, "_alone", lambda: True)
    console_command.run()
    assert ended == [2] and "cannot reach the Ray cluster at http://127.0.0.1:9" in capsys.readouterr().err
    monkeypatch.setattr(console_command, "_alone", lambda: False)
    with pytest.raises(SystemExit) as end:
        console_command.run()
    assert end.value.code == 2 and ended == [2]

    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        assert not alone()  # a thread of its own: the usual ending waits for it
    finally:
        release.set()
        worker.join()


def test_submission_ids_are_deterministic():
    assert submission_id('{"a": 1}', "x") == submission_id('{"a": 1}', "x") != submission_id('{"a": 2}', "x")


def test_submit_status_list_logs_cancel_and_resume(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    address = ray_session.dashboard_url
    spec = write_spec(tmp_path, GOOD)
    # The model is there: the jobs certify only (training in a job: the documents' quickstart, test_sweep).
    random_checkpoint(tmp_path / "models" / "dssn-standard-0.5-0.pt", load_digits("test"), "dssn", 0.5, 0)
    runner = CliRunner()

    result = runner.invoke(main, ["submit-job", str(spec), "--address", address, "--wait"])
    assert result.exit_code == 0, result.output
    assert "SUCCEEDED" in result.output and "| dssn / standard (σ=0.5) |" in result.output  # its one sigma, said once
    job_id = next(line.split()[1].rstrip(":") for line in result.output.splitlines() if line.startswith("submitted "))
    assert len(load_results(tmp_path / "out")) == 40

    record = json.loads(progress_file(tmp_path / "out").read_text())
    assert record["job_id"] == job_id and record["state"] == "finished" and record["images_done"] == 40
    with monkeypatch.context() as patched:  # status never downloads the whole log
        from ray.job_submission import JobSubmissionClient

        patched.setattr(JobSubmissionClient, "get_job_logs", lambda *a, **k: pytest.fail("status read the whole log"))
        status = runner.invoke(main, ["status", "cli-test", "--address", address])
        assert status.exit_code == 0 and "SUCCEEDED" in status.output and "40/40 images" in status.output
        progress_file(tmp_path / "out").unlink()  # as on a remote cluster: the last progress line from the log's tail
        status = runner.invoke(main, ["status", "cli-test", "--address", address])
        assert status.exit_code == 0 and "40/40 images" in status.output, status.output
    tail = runner.invoke(main, ["logs", job_id, "--tail", "1", "--address", address])
    assert tail.output.strip().splitlines() == [f"done: 40 of 40 rows in {tmp_path / 'out'}"]
    listed = runner.invoke(main, ["list", "--address", address])
    assert job_id in listed.output
    logs = runner.invoke(main, ["logs", job_id, "--address", address])
    assert "done: 40 of 40 rows" in logs.output

    again = runner.invoke(main, ["submit-job", str(spec), "--address", address, "--wait"])
    assert again.exit_code == 0 and "resubmitting" in again.output, again.output
    assert "2 units already done, 0 to run" in again.output

    bigger = write_spec(
        tmp_path, {**GOOD, "dataset": {"name": "digits", "split": "test"}, "output": "out2"}, "big.yaml"
    )
    submitted = runner.invoke(main, ["submit-job", str(bigger), "--address", address])
    assert submitted.exit_code == 0, submitted.output
    big_id = next(
        line.split()[1].rstrip(":") for line in submitted.output.splitlines() if line.startswith("submitted ")
    )
    # Cancelled once Ray runs it: a stop that reached a job still PENDING was seen to miss its
    # driver, which then ran the whole job under a STOPPED status (Ray 2.60).
    deadline = time.time() + 60
    while "RUNNING" not in runner.invoke(main, ["status", big_id, "--address", address]).output:
        assert time.time() < deadline, "the job never ran"
        time.sleep(0.2)
    cancelled = runner.invoke(main, ["cancel", big_id, "--address", address])
    assert cancelled.exit_code == 0 and "stopping" in cancelled.output
    deadline = time.time() + 60
    while (
        "STOPPED" not in runner.invoke(main, ["status", big_id, "--address", address]).output and time.time() < deadline
    ):
        time.sleep(0.2)
    resumed = runner.invoke(main, ["submit-job", str(bigger), "--address", address, "--wait"])
    assert resumed.exit_code == 0 and "resubmitting" in resumed.output, resumed.output
    assert len(load_results(tmp_path / "out2")) == 360

    missing = runner.invoke(main, ["status", "no-such-job", "--address", address])
    assert missing.exit_code == 2 and "no certify job" in missing.output


def test_cluster_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["head_start_ray_commands"][-1].count("--dashboard-host=127.0.0.1") == 1


@pytest.mark.parametrize(
    "name",
    [
        "quickstart",
        "cifar10-table1",
        "cifar10-table3",
        "imagenet-figure7",
        "cifar10-zhang2020-l1",
        "cifar10-zhang2020-l2-linf",
    ],
)
def test_shipped_job_specs_are_valid(name):
    from cluster.spec import load_spec

    sweep = load_spec(Path(__file__).resolve().parents[1] / "jobs" / f"{name}.yaml")
    assert sweep.name == name


def test_table1_spec_is_the_papers_grid():
    from cluster.spec import load_spec

    sweep = load_spec(Path(__file__).resolve().parents[1] / "jobs" / "cifar10-table1.yaml")
    assert sweep.sigmas == (0.15,) + tuple(0.25 * n for n in range(1, 15))
    assert set(sweep.methods) == {"dssn", "ssn", "uniform"} and set(sweep.training) == {"standard", "stability"}
    assert sweep.certify.n0 == 64 and sweep.certify.n == 100_000 and sweep.certify.alpha == 0.001


@pytest.mark.parametrize("name", ["quickstart", "cifar10-table1", "imagenet-figure7"])
def test_specs_survive_the_round_trip_to_the_driver(name):
    from cluster.plan import resolve_paths
    from cluster.spec import Sweep, load_spec

    sweep = load_spec(Path(__file__).resolve().parents[1] / "jobs" / f"{name}.yaml")
    assert Sweep.from_json(sweep.to_json()) == sweep
    resolved = resolve_paths(sweep, Path("/base"))
    assert Sweep.from_json(resolved.to_json()) == resolved and resolved.models.train == sweep.models.train


def test_a_spec_without_train_section_keeps_none_through_the_round_trip():
    from cluster.spec import Sweep, parse_spec

    sweep = parse_spec(with_("models.train", KeyError))
    assert sweep.models.train is None and Sweep.from_json(sweep.to_json()).models.train is None


def test_status_commands_never_start_a_cluster(monkeypatch):
    from cluster.client import jobs, local_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(jobs, "LOCAL_DASHBOARD", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(local_ray, "start", lambda **kwargs: pytest.fail("a status command started Ray"))
    for args in (["list"], ["status", "x"], ["logs", "x"], ["cancel", "x"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "no local Ray instance" in result.output
    unreachable = CliRunner().invoke(main, ["list", "--address", "http://127.0.0.1:9"])
    assert unreachable.exit_code == 2 and unreachable.output.startswith("error: cannot reach the Ray cluster")


@pytest.mark.parametrize("command", [["status", "a-job"], ["list"]])
def test_status_and_list_import_neither_torch_nor_ray_nor_the_job(command, fresh_python):
    """The client/job boundary and a fast start: ``certify status`` and ``list`` against a
    dashboard address on this machine where nothing answers import the client side only: not
    torch, not the job's executor, pool and workers, and not Ray (its job client is imported
    once a dashboard answers)."""
    script = (
        f"import sys\nfrom cluster.cli import main\ntry:\n    main({command + ['--address', 'http://127.0.0.1:9']})\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m in ('torch', 'ray') or m.startswith('cluster.job')))"
    )
    done = fresh_python.run(script, timeout=120)
    assert "cannot reach the Ray cluster" in done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
