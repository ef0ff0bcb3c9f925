"""The notebook API as a user drives it: the quickstart submitted as a dict, followed with a
progress bar, read back as a DataFrame, a table and a plot; a bad spec refused with one line
before anything is written; a failing job that makes ``wait`` raise."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from certlib.data import load_digits
from cluster.client import submission
from cluster.notebook import ClusterError, JobFailed, SpecError, attach, submit
from tests.helpers import random_checkpoint

QUICKSTART = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml"


def small_quickstart(tmp_path: Path) -> dict:
    """The quickstart with its files in ``tmp_path``, shrunk to seconds on 2 CPUs: 2 models
    (DSSN and uniform at one sigma and seed), 20 images. Named apart from the documents'
    quickstart, whose `certify status quickstart` runs on the same Ray."""
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec["name"] = "notebook-quickstart"
    spec["output"] = str(tmp_path / "results")
    spec["models"]["path"] = str(tmp_path / "models" / Path(spec["models"]["path"]).name)
    spec["dataset"]["limit"] = 20
    spec["sigmas"], spec["seeds"] = [0.5], [0]
    spec["resources"]["workers"] = 1
    return spec


@pytest.fixture
def no_ray_address(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)


def test_the_quickstart_from_a_notebook(ray_session, tmp_path, no_ray_address, capsys):
    """Its models made beforehand: the job certifies only (the documents' quickstart trains
    its models in its job, and tests/test_sweep.py follows training there)."""
    spec = small_quickstart(tmp_path)
    for method in spec["methods"]:
        path = Path(spec["models"]["path"].format(method=method, training="standard", sigma=0.5, seed=0))
        random_checkpoint(path, load_digits("test"), method, 0.5, 0)
    job = submit(spec, address=ray_session.dashboard_url)
    assert f"submitted {job.job_id}: notebook-quickstart -> {tmp_path / 'results'}" in capsys.readouterr().out

    assert job.wait() is job
    assert "40/40" in capsys.readouterr().err  # the bar reached the total: 20 images x 2 configurations
    assert job.status() == "SUCCEEDED"
    assert job.progress()["images_done"] == 40 and job.progress()["models_to_train"] == 0
    assert job.logs(tail=1).strip() == f"done: 40 of 40 rows in {tmp_path / 'results'}"

    df = job.results()
    assert len(df) == 20 * 2 and set(df["method"]) == {"dssn", "uniform"}
    table = job.table()
    assert "| dssn / standard (σ=0.5) |" in table and "| uniform / standard (σ=0.5) |" in table
    assert table.splitlines()[0].endswith("| r = 1 | r = 1.5 |")  # the sweep's radii, as `certify table` uses
    assert job.table(radii=[0.25]).splitlines()[0].endswith("| r = 0.25 |")

    assert "uniform / standard" not in job.table(rows=df[df["method"] == "dssn"])

    before = set(tmp_path.rglob("*"))
    saved = job.plot(tmp_path / "curves.svg")  # beside the results
    assert saved == tmp_path / "curves.svg" and "<svg" in saved.read_text()
    figure = job.plot()  # for a notebook to show inline
    assert figure.axes[0].get_ylabel() == "certified accuracy (%)" and len(figure.axes[0].get_legend().texts) == 2
    assert set(tmp_path.rglob("*")) == before | {saved}  # nothing else written
    with pytest.raises(ValueError, match="inside the results directory"):
        job.plot(tmp_path / "results" / "curves.svg")

    again = attach(job.job_id, address=ray_session.dashboard_url)
    assert again.sweep == job.sweep and again.status() == "SUCCEEDED"
    with pytest.raises(ClusterError, match="no job 'certify-nothing'"):
        attach("certify-nothing", address=ray_session.dashboard_url)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"colour": "blue"}, "colour: unknown key"),
        ({"sigmas": [0.5, -1]}, r"sigmas\[1\]: must be > 0"),
        ({"dataset": {"name": "digits", "limit": 0}}, "dataset.limit: must be >= 1"),
    ],
)
def test_a_bad_spec_raises_one_line_and_writes_nothing(tmp_path, no_ray_address, monkeypatch, change, message):
    monkeypatch.setattr(submission, "connect", lambda *a, **k: pytest.fail("a bad spec reached the cluster"))
    with pytest.raises(SpecError, match=message) as refused:
        submit({**small_quickstart(tmp_path), **change})
    assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_spec_file_is_one_line(tmp_path, no_ray_address):
    with pytest.raises(SpecError, match="no such spec file"):
        submit(tmp_path / "missing.yaml")


def test_a_failing_job_makes_wait_raise(ray_session, tmp_path, no_ray_address):
    models = tmp_path / "models"
    spec = {
        "name": "notebook-fails",
        "output": str(tmp_path / "results"),
        "dataset": {"name": "digits", "limit": 4},
        "models": {"path": str(models / "{method}-{sigma}-{seed}-{training}.pt")},
        "methods": ["uniform"],
        "sigmas": [0.5],
        "certify": {"n0": 8, "n": 100},
        "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "shard_size": 4},
    }
    # NaN weights: every unit fails, and with it the job
    random_checkpoint(models / "uniform-0.5-0-standard.pt", load_digits("test"), "uniform", 0.5, 0, poison=True)
    job = submit(spec, address=ray_session.dashboard_url, quiet=True)
    with pytest.raises(JobFailed, match=f"{job.job_id}: FAILED.*job.logs()") as failed:
        job.wait(progress=False)
    assert failed.value.ending.state == "FAILED" and "\n" not in str(failed.value)
    assert job.status() == "FAILED" and "1 task(s) failed" in job.logs()
