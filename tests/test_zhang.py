"""Zhang et al. 2020's families in the product: the device samplers follow the laws the
certificate assumes, and a sweep certifies Gaussian-trained models with them (the paper's
setting), writing rows in each family's norm and one table per norm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from certlib.analysis import load_results
from certlib.certificates.dual import sample_statistics, truncated_normal
from certlib.data import load_digits
from certlib.families import make_noise
from certlib.families.zhang import _truncated_normal
from cluster.cli import main
from cluster.job.worker import UnitRunner
from cluster.plan import expand, model_keys
from cluster.spec import SpecError, parse_spec
from tests.helpers import random_checkpoint

D = 10


def draw(method: str, k: float, sigma: float, count: int = 20_000) -> torch.Tensor:
    noise = make_noise(method, sigma, k=k, dim=D)
    return noise.sample(torch.zeros(count, D, dtype=torch.float64), torch.Generator().manual_seed(4))


@pytest.mark.parametrize("k", [0.0, 4.0])
def test_device_samplers_follow_the_certificates_laws(k):
    """Radius and first coordinate of the family's noise against the certificate's exact
    statistics (two-sample KS): what is certified is what is sampled."""
    z = draw("zhang-l1", k, 0.6).numpy()
    reference = sample_statistics("l1", k, 0.6 / math.sqrt(2), D, 20_000, seed=5)
    assert stats.ks_2samp(np.abs(z).sum(1), reference["norm"]).pvalue > 1e-3
    assert stats.ks_2samp(z[:, 0], reference["z1"]).pvalue > 1e-3
    z = draw("zhang-l2", k, 0.6).numpy()
    reference = sample_statistics("l2", k, 0.6, D, 20_000, seed=5)
    assert stats.ks_2samp((z**2).sum(1), reference["square"]).pvalue > 1e-3
    assert stats.ks_2samp(z[:, 0], reference["z1"]).pvalue > 1e-3
    z = draw("zhang-linf", k, 0.6).numpy()
    reference = sample_statistics("linf", k, 0.6, D, 20_000, seed=5)
    for mine, theirs in (
        (np.abs(z).max(1), reference["t"]),
        (z.sum(1), reference["sum"]),
        (z.max(1), reference["max"]),
    ):
        assert stats.ks_2samp(mine, theirs).pvalue > 1e-3


def test_device_truncated_normal_is_the_certificates():
    """The device's truncated normal against the certificate's, from 1e-12 sigma (where the
    tail formula collapsed) to the tails."""
    u = np.random.default_rng(6).random((7, 500))
    t = np.array([1e-12, 1e-8, 1e-3, 0.5, 0.999, 1.0, 4.0])[:, None] * np.ones((1, 500))
    device = _truncated_normal(torch.from_numpy(u), torch.from_numpy(t), 0.8).numpy()
    np.testing.assert_allclose(device, truncated_normal(u, t, 0.8), rtol=1e-9, atol=0)


def test_sampling_is_a_function_of_the_generator_and_k_is_validated():
    a, b = draw("zhang-linf", 2.0, 0.5, 50), draw("zhang-linf", 2.0, 0.5, 50)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="at most the input dimension d = 10 less 0.05"):
        make_noise("zhang-l2", 0.5, k=9.99, dim=10)
    with pytest.raises(ValueError, match="has no shape parameter k"):
        make_noise("gaussian", 0.5, k=1.0)


def zhang_spec(tmp_path, **extra):
    return parse_spec(
        {
            "name": "zhang",
            "output": str(tmp_path / "out"),
            "dataset": {"name": "digits", "limit": 24},
            "models": {"path": str(tmp_path / "models" / "{method}-{training}-{sigma}-{seed}.pt"), "noise": "gaussian"},
            "methods": ["zhang-l2", "zhang-linf"],
            "sigmas": [0.5],
            "ks": [0.0, 16.0],
            "certify": {"n0": 16, "n": 400, "compile": False},
            "resources": {"shard_size": 12},
            **extra,
        }
    )


def test_a_sweep_certifies_gaussian_trained_models_with_the_families(coarse_zhang_curves, tmp_path):
    sweep = zhang_spec(tmp_path)
    digits = load_digits("test")
    keys = model_keys(sweep)
    assert {(key.method, key.k) for key in keys} == {(m, k) for m in sweep.methods for k in (0.0, 16.0)}
    assert len({key.checkpoint(sweep) for key in keys}) == 1  # every k certifies the one Gaussian model
    random_checkpoint(keys[0].checkpoint(sweep), digits, "gaussian", 0.5, 0)
    runner = UnitRunner(sweep.to_json(), "zhang-test")
    units = expand(sweep, 24)
    assert len({unit.unit_id for unit in units}) == len(units) == 8
    for unit in units:
        runner.certify(unit)
    df = load_results(sweep.output)
    assert len(df) == 4 * 24 and set(df["k"]) == {0.0, 16.0} and set(df["delta"]) == {0.001}
    assert set(df["training_noise"]) == {"gaussian"}
    l2, linf = df[df.method == "zhang-l2"], df[df.method == "zhang-linf"]
    assert set(l2["norm"]) == {"l2"} and l2["radius_linf"].isna().all() and l2["radius_l1"].isna().all()
    assert set(linf["norm"]) == {"linf"} and linf["radius_l2"].isna().all()
    gaussian_l2 = l2[l2.k == 0]
    certified = gaussian_l2["prediction"] >= 0
    closed = 0.5 * stats.norm.ppf(gaussian_l2["p_a_lower"])  # k = 0 is Gaussian: never above Cohen's radius
    assert (gaussian_l2.loc[certified, "radius_l2"] <= closed[certified] + 1e-12).all()
    table = CliRunner().invoke(main, ["table", sweep.output, "--radii", "0,0.1"])
    assert table.exit_code == 0, table.output
    assert "L2 radius:" in table.output and "LINF radius:" in table.output and "r = 2/255" in table.output
    assert ", k=" in table.output


def test_the_spec_names_ks_only_for_shaped_families(tmp_path):
    with pytest.raises(SpecError, match="ks: only the methods zhang-l1, zhang-l2, zhang-linf take a shape k"):
        zhang_spec(tmp_path, methods=["gaussian"])
    with pytest.raises(SpecError, match=r"ks\[1\]: k must be at most the input dimension d = 64 less 0.05"):
        zhang_spec(tmp_path, ks=[0, 64])
    with pytest.raises(SpecError, match="models.noise: must be one of"):
        zhang_spec(tmp_path, models={"path": str(tmp_path / "{method}-{training}-{sigma}-{seed}.pt"), "noise": "gauss"})


def test_models_that_share_a_checkpoint_are_trained_once(tmp_path):
    """Every k certifies the same Gaussian model: the plan trains it once, and all their
    units wait for that one training."""
    from cluster.plan import plan_sweep

    sweep = zhang_spec(
        tmp_path,
        models={
            "path": str(tmp_path / "models" / "{method}-{training}-{sigma}-{seed}.pt"),
            "noise": "gaussian",
            "train": {},
        },
    )
    plan = plan_sweep(sweep, 24, log=lambda line: None)
    assert len(plan.to_train) == 1 and plan.ready == []
    assert plan.waiting == {plan.to_train[0]: plan.pending} and len(plan.pending) == 8
    assert plan.progress().models_to_train == 1


def test_one_model_is_certified_at_sigmas_other_than_its_own(coarse_zhang_curves, tmp_path):
    """models.sigmas: a plain path names one Gaussian model trained at sigma_0 = 0.5, and the
    family certifies it at each (sigma, k) of the grid (Zhang et al.'s search); rows record the
    model's sigma and the table takes the best over sigma and k."""
    model = tmp_path / "cohen-sigma0.5.pt"
    sweep = zhang_spec(
        tmp_path,
        models={"path": str(model), "noise": "gaussian", "sigmas": [0.5]},
        methods=["zhang-l2"],
        sigmas=[0.5, 0.75],
    )
    keys = model_keys(sweep)
    assert {key.checkpoint(sweep) for key in keys} == {model} and len(keys) == 4
    random_checkpoint(model, load_digits("test"), "gaussian", 0.5, 0)
    runner = UnitRunner(sweep.to_json(), "zhang-sigmas")
    for unit in expand(sweep, 24):
        runner.certify(unit)
    df = load_results(sweep.output)
    assert set(df["sigma"]) == {0.5, 0.75} and set(df["training_sigma"]) == {0.5} and len(df) == 4 * 24
    assert set(df["noise_scale"]) == {0.5, 0.75}  # certified with the grid's sigma, not the model's
    table = CliRunner().invoke(main, ["table", sweep.output, "--radii", "0,0.1", "--format", "csv"])
    assert table.exit_code == 0, table.output
    header = table.output.splitlines()[0].split(",")
    assert {"sigma", "k"} <= set(header) and "training_sigma" not in header  # one model: nothing to choose


def test_models_of_several_sigmas_each_need_their_file_and_are_chosen_over(tmp_path):
    template = str(tmp_path / "{method}-{sigma}.pt")
    sweep = zhang_spec(
        tmp_path, models={"path": template, "noise": "gaussian", "sigmas": [0.25, 0.5]}, methods=["zhang-l2"]
    )
    keys = model_keys(sweep)
    assert sorted(str(key.checkpoint(sweep)) for key in keys) == sorted(
        [str(tmp_path / "gaussian-0.25.pt"), str(tmp_path / "gaussian-0.5.pt")] * 2
    )
    units = expand(sweep, 24)
    assert len({unit.unit_id for unit in units}) == len(units) == 8
    with pytest.raises(SpecError, match=r"models.path: the template must contain \{sigma\}"):
        zhang_spec(tmp_path, models={"path": str(tmp_path / "one.pt"), "noise": "gaussian", "sigmas": [0.25, 0.5]})
    with pytest.raises(SpecError, match=r"models.path: the template must contain \{sigma\}"):
        zhang_spec(tmp_path, models={"path": str(tmp_path / "one.pt"), "noise": "gaussian"}, sigmas=[0.25, 0.5])
    with pytest.raises(SpecError, match=r"models.sigmas\[1\]: must be > 0"):
        zhang_spec(tmp_path, models={"path": template, "noise": "gaussian", "sigmas": [0.25, 0]})
