"""Sequential Monte Carlo certification (issue 27): the anytime-valid sequence holds at its level
under the real stopping rule (simulated), it is never tighter than it may be (its defining
equation by quadrature, and never above the fixed-n bound), the engine's counts do not depend
on the batch or on the other images of a unit, and what cannot run sequentially is refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from certlib import certificates
from certlib.analysis import format_tables, load_results, recertify
from certlib.certificates.sequences import PRIOR, confidence_sequence, reachable_radii, settled
from certlib.engine.voting import MC_BLOCK
from certlib.families import make_noise
from certlib.smooth import Smooth
from cluster.cli import main
from cluster.job.training import ModelTrainer
from cluster.job.worker import UnitRunner
from cluster.plan import expand, model_keys, plan_sweep, select_images
from cluster.spec import SpecError, parse_spec


def uniform_radius(lam: float):
    return lambda p_a, p_b: certificates.l1_uniform_radius(p_a, lam, p_b)


@pytest.mark.parametrize("p_star, cap", [(0.8, 50_000), (0.99, 50_000)])
def test_the_stopping_rule_certifies_a_threshold_at_most_at_rate_alpha(p_star, cap):
    """8,000 Bernoulli streams per case with p exactly at the threshold of a table radius and
    just below it, stopped by the real rule (checked at every block of MC_BLOCK samples, up to
    the cap): the fraction that ends certified at that radius is at most alpha plus three
    standard errors. A fixed-n Clopper-Pearson bound read at each of these 49 looks certifies
    about 7% of the streams at p = p*, five times that limit. With p above the threshold the
    power is reported (printed), not asserted."""
    alpha, streams, lam = 0.01, 8_000, 1.0
    radius = uniform_radius(lam)
    target = 2 * lam * (p_star - 0.5)  # the uniform radius at p_star
    table = reachable_radii([target], cap, alpha, False, 2, radius)
    assert len(table) == 1
    rng = np.random.default_rng(int(p_star * 1000))
    for p, bound_on_rate in ((p_star, alpha), (p_star - 0.002, alpha), (min(1.0, p_star + 0.02), None)):
        successes = np.zeros(streams, dtype=np.int64)
        trials = np.zeros(streams, dtype=np.int64)
        active = np.ones(streams, dtype=bool)
        while active.any() and trials[active][0] < cap:
            block = min(MC_BLOCK, cap - int(trials[active][0]))
            successes[active] += rng.binomial(block, p, active.sum())
            trials[active] += block
            counts = np.stack([successes[active], trials[active] - successes[active]], axis=1)
            stop = settled(
                counts,
                np.zeros(active.sum(), dtype=np.int64),
                alpha=alpha,
                multiclass=False,
                radius=radius,
                radii=table,
            )
            active[np.flatnonzero(active)[stop]] = False
        lower = confidence_sequence(successes, trials, alpha)[0]
        certified = np.nan_to_num(radius(lower, None), nan=-1.0) >= target
        rate = certified.mean()
        print(f"p* {p_star}, true p {p}: certified {rate:.4f}, mean samples {trials.mean():,.0f}")
        if bound_on_rate is not None:
            assert rate <= bound_on_rate + 3 * math.sqrt(bound_on_rate * (1 - bound_on_rate) / streams), (p, rate)


def mixture_evidence(s: int, t: int, p0: float) -> float:
    """M_t(p0) by numerical integration over the prior (mpmath), independent of the closed form
    with betaln. In y = -log(1 - p) the near-one components' density (1 - p)^(b - 1) dp becomes
    the smooth exp(-b y) dy, whose mass spreads over y up to thousands: quadrature in p would
    miss it."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 20  # five guard digits: at 30 the floats it returns are the same, at twice the time
    p0 = mpmath.mpf(p0)
    total = mpmath.mpf(0)
    for weight, a, b in PRIOR:

        def integrand(y, a=a, b=b):
            p = -mpmath.expm1(-y)
            ratio = (p / p0) ** s * (mpmath.exp(-y) / (1 - p0)) ** (t - s)
            return ratio * p ** (a - 1) * mpmath.exp(-b * y) / mpmath.beta(a, b)

        peak = -mpmath.log(1 - mpmath.mpf(s) / t) if s < t else mpmath.mpf(10)
        total += weight * mpmath.quad(integrand, [0, peak / 4, peak, 4 * peak, mpmath.inf])
    return float(total)


@pytest.mark.parametrize("s, t", [(9, 10), (480, 500), (1000, 1000), (50, 2000)])
def test_the_sequence_ends_solve_its_defining_equation(s, t):
    """At each end of the interval the mixture martingale M_t equals 1/alpha (computed here by
    quadrature); just inside the interval it is below, so the ends are as tight as the mixture
    allows and no tighter."""
    alpha = 0.01
    low, high = confidence_sequence(s, t, alpha)
    for end, inside in ((low, low + 1e-6), (high, high - 1e-6)):
        if 0 < end < 1:
            assert mixture_evidence(s, t, float(end)) == pytest.approx(1 / alpha, rel=1e-4)
            assert mixture_evidence(s, t, float(inside)) < 1 / alpha


def test_the_sequence_is_never_tighter_than_the_fixed_n_bound():
    """Anytime validity costs width: on a grid of counts the sequence's lower end is never above
    the Clopper-Pearson bound at the same n and alpha, nor its upper end below."""
    t = np.repeat([10, 100, 1000, 10_000, 100_000], 41)
    s = np.round(t * np.tile(np.linspace(0, 1, 41), 5)).astype(np.int64)
    low, high = confidence_sequence(s, t, 0.001)
    assert (low <= certificates.clopper_pearson_lower(s, t, 0.001) + 1e-12).all()
    assert (high >= certificates.clopper_pearson_upper(s, t, 0.001) - 1e-12).all()


class Stripes(torch.nn.Module):
    """A fixed classifier with real margins: the class is the band the mean pixel falls in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.flatten(1).mean(dim=1, keepdim=True)
        return -((mean - torch.tensor([[0.2, 0.5, 0.8]])) ** 2) * 100


def test_sequential_votes_do_not_depend_on_batch_or_unit():
    images = torch.stack([torch.full((1, 4, 4), v) for v in (0.2, 0.45, 0.62, 0.8, 0.35)])
    indices = [3, 7, 11, 19, 23]
    noise = make_noise("gaussian", 0.25)
    options = {"n0": 32, "n": 20_000, "alpha": 0.001, "seed": 5, "sampling": "sequential", "radii": [0.0, 0.1, 0.3]}
    whole = Smooth(Stripes(), noise, 3, batch_size=512).certify(images, indices, **options)
    assert 0 < whole["n"].min() < 20_000  # some stopped early
    small = Smooth(Stripes(), noise, 3, batch_size=96).certify(images, indices, **options)
    apart = [
        Smooth(Stripes(), noise, 3, batch_size=256).certify(images[[i]], indices[i : i + 1], **options)
        for i in range(5)
    ]
    for other in (small, {key: np.concatenate([a[key] for a in apart]) for key in ("votes", "n", "radius")}):
        np.testing.assert_array_equal(other["votes"], whole["votes"])
        np.testing.assert_array_equal(other["n"], whole["n"])
        np.testing.assert_array_equal(other["radius"], whole["radius"])
    assert set(whole["sampling"] if isinstance(whole["sampling"], set) else {whole["sampling"]}) == {"sequential"}


def test_what_cannot_run_sequentially_is_refused():
    images = torch.full((1, 1, 4, 4), 0.5)
    with pytest.raises(ValueError, match="sequential sampling is for Monte Carlo families"):
        Smooth(Stripes(), make_noise("dssn", 0.5, q=16), 3).certify(images, sampling="sequential", radii=[0.1])
    with pytest.raises(ValueError, match=r"no radius of \[5.0\] can be certified with 1000 samples"):
        Smooth(Stripes(), make_noise("gaussian", 0.25), 3).certify(images, n=1000, sampling="sequential", radii=[5.0])
    with pytest.raises(ValueError, match="no radius of"):
        Smooth(Stripes(), make_noise("gaussian", 0.25), 3).certify(images, n=1000, sampling="sequential", radii=[])
    with pytest.raises(ValueError, match="sampling must be one of"):
        Smooth(Stripes(), make_noise("gaussian", 0.25), 3).certify(images, sampling="adaptive")


def test_a_cap_is_reachable_exactly_where_the_bound_at_the_cap_reaches():
    """reachable_radii against the Gaussian closed form of the sequence's bound with every
    sample correct: sigma Phi^-1(L) with L = the lower end at (n, n)."""
    radius = lambda p_a, p_b: certificates.l2_gaussian_radius(p_a, 0.25, p_b)  # noqa: E731
    best = 0.25 * stats.norm.ppf(confidence_sequence(10_000, 10_000, 0.001)[0])
    table = reachable_radii(
        [0.25, 0.5, float(best) * 0.999, float(best) * 1.001, 2.0], 10_000, 0.001, False, 10, radius
    )
    assert table.tolist() == [0.25, 0.5, float(best) * 0.999]


def sequential_sweep(tmp_path, **certify):
    return parse_spec(
        {
            "name": "sequential",
            "output": str(tmp_path / "out"),
            "dataset": {"name": "digits", "split": "test", "every": 24},
            "models": {"path": str(tmp_path / "{method}-{training}-{sigma}-{seed}.pt"), "train": {"epochs": 3}},
            "methods": ["gaussian", "uniform"],
            "sigmas": [0.25],
            "certify": {"n0": 64, "n": 20_000, "sampling": "sequential", **certify},
            "radii": [0.0, 0.25, 0.5],
            "resources": {"shard_size": 30},
        }
    )


def test_a_sequential_sweep_writes_rows_resumes_and_recertifies(tmp_path, train_model):
    """The digits quickstart's models (trained here), certified sequentially: rows record the
    samples each image used (fewer than the cap for most), the table prints, a resume finds
    every shard done, and re-certification at another alpha uses the sequence again: never
    above the stopping time's own bound, and identical to it at the same alpha."""
    sweep = sequential_sweep(tmp_path)
    trainer = ModelTrainer(sweep, torch.device("cpu"))
    for key in model_keys(sweep):
        trainer.train(key)
    units = expand(sweep, len(select_images(sweep)))
    runner = UnitRunner(sweep.to_json(), "sequential-job")
    for unit in units:
        runner.certify(unit)
    df = load_results(sweep.output)
    assert set(df["sampling"]) == {"sequential"} and (df["n"] <= 20_000).all()
    assert df["n"].mean() < 10_000 and df["n"].min() < 2_000, df["n"].describe()
    assert "| gaussian / standard (σ=0.25) |" in format_tables(df, sweep.radii)
    plan = plan_sweep(sweep, len(select_images(sweep)), log=lambda line: None)
    assert plan.skipped == len(units) and not plan.pending
    spec = tmp_path / "sequential.yaml"
    spec.write_text(json.dumps(json.loads(sweep.to_json())))  # JSON is YAML
    printed = CliRunner().invoke(main, ["plan", str(spec), "--rate", "1000"])
    mean = df.loc[df.method == "gaussian", "n"].mean()
    assert printed.exit_code == 0 and f"n0 + at most n = 20,064 (earlier run: n0 + {mean:,.0f})" in printed.output
    again = recertify(df)
    np.testing.assert_array_equal(again["p_a_lower"].to_numpy(), df["p_a_lower"].to_numpy())
    looser = recertify(df, alpha=0.01)
    assert (looser["p_a_lower"].to_numpy() >= df["p_a_lower"].to_numpy()).all()
    counts = np.stack(df["votes"].to_numpy())
    top = counts[np.arange(len(df)), df["selected"].to_numpy()]
    expected = confidence_sequence(top, df["n"].to_numpy(), 0.01)[0]
    np.testing.assert_allclose(looser["p_a_lower"].to_numpy(), expected)
    assert (
        looser["p_a_lower"].to_numpy() <= certificates.clopper_pearson_lower(top, df["n"].to_numpy(), 0.01) + 1e-12
    ).all()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"methods": ["dssn", "gaussian"]}, "certify.sampling: dssn counts exact votes"),
        ({"radii": []}, "radii: must be a non-empty list"),
        ({"certify": {"n": 100}, "radii": [1.0, 2.0]}, r"certify\.n: sequential sampling: no radius of \[1\.0, 2\.0\]"),
        ({"certify": {"epsilon": 0}}, "certify.epsilon: must be > 0"),
        (
            {"certify": {"sampling": "fixed", "epsilon": 0.1}},
            "certify.epsilon: a precision target for sampling: sequential only",
        ),
        ({"certify": {"sampling": "adaptive"}}, "certify.sampling: must be one of"),
    ],
)
def test_a_spec_that_cannot_run_sequentially_is_refused(tmp_path, change, message):
    spec = json.loads(sequential_sweep(tmp_path).to_json())
    for key, value in change.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)
