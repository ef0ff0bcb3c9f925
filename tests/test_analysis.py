"""The aggregator: the paper's Table 1 from its published per-image results through the
project's own result schema, seed tables, Theorem 5, re-certification from stored votes,
runtime summaries, plots and the table/plot commands."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from certlib import certificates
from certlib.analysis import (
    ANALYSIS_COLUMNS,
    best_certified_accuracy,
    certified_accuracy,
    curves_figure,
    format_envelope,
    format_tables,
    high_probability_accuracy,
    load_results,
    plot_curves,
    recertify,
    runtime_summary,
    seed_table,
)
from certlib.analysis.tables import envelope_over
from certlib.data import load_digits
from certlib.families import FAMILIES, CertifySettings, Votes, make_noise
from certlib.rows import CONFIG, certification_rows, shard_path
from cluster.cli import main
from cluster.job.worker import UnitRunner
from cluster.plan import expand, model_keys
from cluster.spec import parse_spec
from tests.helpers import RADII, TABLE_1, quickstart_like, random_checkpoint

PAPER_METHODS = {"dssn": "dssn", "uniform_additive": "uniform", "ssn_independent": "ssn"}


def paper_as_results(paper: pd.DataFrame, out) -> None:
    """The authors' per-image file in the project's row schema, written as a Hive dataset."""
    votes = np.stack(paper["votes"].to_numpy()).astype(np.int64)
    selected = votes.argmax(axis=1)  # DSSN: the prediction; Monte Carlo: the n0 samples' class
    exact = (paper["method"] == "dssn").to_numpy()
    published = paper["radius_l1_published"].to_numpy()
    certified = exact | (published > 0)
    frame = pd.DataFrame(
        {
            "method": paper["method"].map(PAPER_METHODS),
            "training": paper["training"],
            "sigma": paper["sigma"],
            "seed": 0,
            "image_index": paper["index"].astype(np.int64),
            "label": paper["label"].astype(np.int64),
            "selected": selected,
            "prediction": np.where(certified, selected, -1),
            "radius_l1": np.where(certified, published, np.nan),
            "radius_l2": np.nan,
            "p_a_lower": paper["prob_lower_published"],
            "alpha": np.where(exact, np.nan, 0.001),
            "seconds": paper["seconds_per_image_published"],
            "device": "2080 Ti",
        }
    )
    table = pa.Table.from_pandas(frame, preserve_index=False)
    # DSSN's votes in `votes`, the Monte Carlo rows' (their n0 counts) in `selection_votes`, each
    # null in the other: built as Arrow lists at once (900,000 Python lists took seconds).
    offsets = pa.array(np.arange(0, votes.size + 1, votes.shape[1], dtype=np.int32))
    for name, present in (("votes", exact), ("selection_votes", ~exact)):
        column = pa.ListArray.from_arrays(offsets, pa.array(votes.ravel()), mask=pa.array(~present))
        table = table.append_column(name, column)
    for config, positions in frame.groupby(list(CONFIG)).indices.items():
        path = shard_path(out, dict(zip(CONFIG, config)), "paper")
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.take(positions), path)


def test_table_1_reproduced_cell_by_cell(dssn_paper, tmp_path):
    paper_as_results(dssn_paper, tmp_path / "paper")
    df = load_results(tmp_path / "paper", columns=ANALYSIS_COLUMNS)
    assert len(df) == 900_000
    text = format_envelope(best_certified_accuracy(df, RADII))
    for (method, training), cells in TABLE_1.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {PAPER_METHODS[method]} / {training} |"))
        printed = [c.strip() for c in row.strip("|").split("|")[1:]]
        expected = [f"{acc:.2f}% ({clean:.2f}% @ σ={sigma})" for acc, clean, sigma in cells]
        assert printed == expected, (method, training)


def test_filters_are_pushed_down(dssn_paper, tmp_path):
    paper_as_results(dssn_paper[dssn_paper.sigma.isin([0.25, 0.5])], tmp_path / "paper")
    df = load_results(
        tmp_path / "paper", filters={"method": "dssn", "sigma": [0.5]}, columns=["image_index", "sigma", "method"]
    )
    assert len(df) == 20_000 and set(df["sigma"]) == {0.5} and set(df["method"]) == {"dssn"}


def toy_rows():
    """Two seeds x two sigmas of a hand-made DSSN sweep: 4 images each."""
    rows = []
    radius = {
        (0, 0.25): [0.1, 0.6, 0.0, 1.2],
        (0, 0.5): [0.9, 0.9, 0.0, 0.0],
        (1, 0.25): [0.2, 0.2, 0.2, 0.2],
        (1, 0.5): [0.7, 0.8, 0.0, 0.5],
    }
    correct = {(0, 0.25): [1, 1, 0, 1], (0, 0.5): [1, 1, 1, 0], (1, 0.25): [1, 1, 1, 0], (1, 0.5): [1, 1, 0, 1]}
    for (seed, sigma), radii in radius.items():
        for i, (r, c) in enumerate(zip(radii, correct[(seed, sigma)])):
            rows.append(
                {
                    "method": "dssn",
                    "training": "standard",
                    "sigma": sigma,
                    "seed": seed,
                    "image_index": i,
                    "label": 1,
                    "selected": 1 if c else 2,
                    "prediction": 1 if c else 2,
                    "radius_l1": r,
                    "radius_l2": np.nan,
                    "alpha": np.nan,
                    "seconds": 0.5,
                    "device": "cpu",
                }
            )
    return pd.DataFrame(rows)


def test_certified_accuracy_and_envelope_by_hand():
    df = toy_rows()
    acc = certified_accuracy(df, [0.0, 0.5], by=["seed", "sigma"]).set_index(["seed", "sigma"])
    assert acc.loc[(0, 0.25), 0.0] == 0.75 and acc.loc[(0, 0.25), 0.5] == 0.5 and acc.loc[(0, 0.5), "clean"] == 0.75
    env = best_certified_accuracy(df[df.seed == 0], [0.0, 0.5, 1.0])
    assert env["certified_accuracy"].tolist() == [0.75, 0.5, 0.25]
    assert env["sigma"].tolist() == [0.25, 0.25, 0.25]  # r = 0.5: both sigmas give 0.5, the smaller wins
    assert env["clean_accuracy"].tolist() == [0.75, 0.75, 0.75]


def test_seed_table_by_hand():
    table = seed_table(toy_rows(), [0.5])
    per_seed = table[table.statistic.isna()].set_index("seed")["certified_accuracy"]
    assert per_seed[0] == 0.5 and per_seed[1] == 0.75  # seed 1: sigma 0.5 certifies 3 of 4 at r = 0.5
    stats = table[table.statistic.notna()].set_index("statistic")["certified_accuracy"]
    assert stats["mean"] == 0.625 and stats["std"] == pytest.approx(0.25 / math.sqrt(2)) and stats["max-min"] == 0.25
    one_seed = seed_table(toy_rows().query("seed == 0"), [0.5])  # no spread measured: no statistics
    assert one_seed["statistic"].isna().all() and one_seed["seed"].tolist() == [0]


def test_tables_never_pool_training_modes_or_training_noises():
    df = toy_rows()
    df.loc[df.seed == 1, "training"] = "stability"
    envelope = best_certified_accuracy(df, [0.5], by=["method"])
    assert sorted(envelope["training"]) == ["stability", "standard"]  # kept apart although not asked for
    assert envelope.set_index("training").loc["standard", "certified_accuracy"] == 0.5
    text = format_tables(df, [0.5], by=["method"])
    assert "| dssn / stability |" in text and "| dssn / standard |" in text
    noisy = toy_rows().assign(training_noise=np.where(toy_rows().seed == 0, "gaussian", "laplace"))
    assert sorted(best_certified_accuracy(noisy, [0.5])["training_noise"]) == ["gaussian", "laplace"]
    # A column that only follows the rows' method adds nothing.
    assert "training_noise" not in best_certified_accuracy(toy_rows().assign(training_noise="dssn"), [0.5])


def test_the_envelope_chooses_over_the_models_training_sigma_and_never_pools_it():
    """models.sigmas: each (sigma, training sigma) is a classifier of its own; pooling two
    models' images into one accuracy would give 0.625 at r = 0.5 where the best model has 0.75."""
    df = toy_rows().assign(training_sigma=np.where(toy_rows().seed == 0, 0.25, 0.5), seed=0)
    assert envelope_over(df) == ["sigma", "training_sigma"] and envelope_over(toy_rows()) == "sigma"
    records = json.loads(format_tables(df, [0.5], fmt="json"))
    assert [(r["certified_accuracy"], r["sigma"], r["training_sigma"]) for r in records] == [(0.75, 0.5, 0.5)]
    per_model = json.loads(format_tables(df, [0.5], by=["method", "training_sigma"], fmt="json"))
    assert [(r["training_sigma"], r["certified_accuracy"]) for r in per_model] == [(0.25, 0.5), (0.5, 0.75)]
    with pytest.raises(ValueError, match="by: sigma is what the table chooses over"):
        format_tables(toy_rows(), [0.5], by=["method", "sigma"])


def _cells(text: str) -> dict[str, list[str]]:
    """A Markdown table's cells by row name."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]
    return {row[0]: row[1:] for row in rows}


def test_cells_name_only_what_tells_a_rows_candidates_apart():
    """The quickstart's models are certified at the sigma they were trained at: a cell reads
    "@ σ=0.5", never "training_sigma=0.5" beside it, and the exports carry no training_sigma
    column. Where a sweep certifies a model at another sigma (models.sigmas) it is named."""
    trained_at_sigma = toy_rows().assign(training_sigma=toy_rows()["sigma"])
    assert envelope_over(trained_at_sigma) == "sigma"
    cells = _cells(format_tables(trained_at_sigma, [0.5, 1.0]))
    assert cells == {"dssn / standard": ["62.50% (75.00% @ σ=0.5)", "12.50% (75.00% @ σ=0.25)"]}
    assert "training_sigma" not in json.loads(format_tables(trained_at_sigma, [0.5], fmt="json"))[0]
    assert "training_sigma" not in format_tables(trained_at_sigma, [0.5], fmt="csv").splitlines()[0]
    # one model of each seed, seed 1's (trained at 0.5) certified at 0.25 too: the training sigma
    # tells (0.25, 0.25) from (0.25, 0.5) apart; (0.5, 0.5) pools both seeds' models, 5 of 8 at r = 0.5
    elsewhere = toy_rows().assign(training_sigma=np.where(toy_rows().seed == 0, toy_rows()["sigma"], 0.5), seed=0)
    cells = _cells(format_tables(elsewhere, [0.5]))
    assert cells == {"dssn / standard": ["62.50% (75.00% @ σ=0.5, training_sigma=0.5)"]}


def test_a_parameter_every_candidate_shares_is_said_once_with_the_rows_name():
    """One sigma left (a filter): no cell repeats it; the row's name says it. Each row is judged
    on its own candidates: the training sigma is named in the row whose models were certified at
    other sigmas only."""
    one_sigma = toy_rows().query("sigma == 0.5")
    text = format_tables(one_sigma, [0.5, 1.0])
    assert _cells(text) == {"dssn / standard (σ=0.5)": ["62.50% (75.00%)", "0.00% (75.00%)"]}
    assert "@" not in text
    mixed = pd.concat(
        [
            toy_rows().assign(training_sigma=toy_rows()["sigma"]),
            toy_rows().assign(training="stability", training_sigma=0.25),
        ]
    )
    cells = _cells(format_tables(mixed.query("seed == 0"), [0.5]))
    assert cells == {
        "dssn / stability (training_sigma=0.25)": ["50.00% (75.00% @ σ=0.25)"],
        "dssn / standard": ["50.00% (75.00% @ σ=0.25)"],
    }


def test_zhang_cells_name_k_where_it_varies(coarse_zhang_curves):
    counts = one_smoothing_counts(400, [390, 360, 300])
    rows = pd.concat([synthetic_rows("zhang-l2", 0.5, q=255, seed=0, k=k, counts=counts) for k in (0.0, 40.0)])
    cells = _cells(format_tables(rows, [0.1]))
    assert list(cells) == ["zhang-l2 / standard (σ=0.5)"]
    assert cells["zhang-l2 / standard (σ=0.5)"][0].endswith("@ k=0.0)")


def test_csv_and_json_tables_hold_numbers():
    df = toy_rows()
    records = json.loads(format_tables(df, [0.5, 1.0], fmt="json"))
    assert records[0] == {
        "norm": "l1",
        "method": "dssn",
        "training": "standard",
        "radius": 0.5,
        "certified_accuracy": 0.625,
        "clean_accuracy": 0.75,
        "sigma": 0.5,
    }
    frame = pd.read_csv(io.StringIO(format_tables(df, [0.5, 1.0], fmt="csv", seeds=True)))
    assert frame["certified_accuracy"].dtype == np.float64 and frame["radius"].dtype == np.float64
    means = frame[frame.statistic == "mean"].set_index("radius")["certified_accuracy"]
    assert means[0.5] == 0.625 and frame["seed"].dropna().tolist() == [0, 0, 1, 1]


def test_high_probability_accuracy():
    df = toy_rows()
    exact = high_probability_accuracy(df, [0.5], rho=0.001)
    assert (exact["lower_bound"] == exact["approximate"]).all()  # DSSN: no correction
    mc = df.assign(method="uniform", alpha=0.001)
    bounds = high_probability_accuracy(mc, [0.0], rho=0.001)
    row = bounds.iloc[0]
    assert row["lower_bound"] == pytest.approx(float(certificates.certified_accuracy_lower_bound(3, 4, 0.001, 0.001)))
    assert row["lower_bound"] < row["approximate"]


def test_high_probability_accuracy_keeps_zhang_k_apart_and_states_its_confidence(coarse_zhang_curves):
    counts = one_smoothing_counts(400, [390, 360, 300])
    rows = pd.concat(
        [synthetic_rows("zhang-l2", 0.5, q=255, seed=0, k=k, counts=counts) for k in (0.0, 40.0)]
        + [synthetic_rows("gaussian", 0.5, q=255, seed=0, k=None, counts=counts)]
    )
    bounds = high_probability_accuracy(rows, [0.1], rho=0.001)
    assert len(bounds) == 3 and sorted(bounds["k"].dropna()) == [0.0, 40.0]
    zhang, gaussian = bounds[bounds.method == "zhang-l2"], bounds[bounds.method == "gaussian"]
    assert zhang["confidence"].tolist() == pytest.approx([1 - 0.001 - 0.001] * 2)
    assert gaussian["confidence"].tolist() == pytest.approx([1 - 0.001])


def test_runtime_summary():
    summary = runtime_summary(toy_rows(), by=["seed"])
    assert summary["images"].tolist() == [8, 8] and summary["total_seconds"].tolist() == [4.0, 4.0]


@pytest.fixture(scope="module")
def own_results(tmp_path_factory):
    """A sweep of the project's own (digits, random-init models; every method) run in-process:
    12 images and n = 500 are enough for rows of every kind, certified and not."""
    tmp = tmp_path_factory.mktemp("own")
    sweep = parse_spec(
        {
            "name": "own",
            "output": str(tmp / "out"),
            "dataset": {"name": "digits", "split": "test", "limit": 12},
            "models": {"path": str(tmp / "{method}-{training}-{sigma}-{seed}.pt")},
            "methods": ["dssn", "uniform", "ssn", "gaussian", "laplace"],
            "sigmas": [0.5, 1.5],
            "certify": {"n0": 32, "n": 500, "alpha": 0.001},
            "resources": {"shard_size": 6},
        }
    )
    digits = load_digits("test")
    for key in model_keys(sweep):
        random_checkpoint(key.checkpoint(sweep), digits, key.method, key.sigma, key.seed)
    runner = UnitRunner(sweep.to_json(), "own-job")
    for unit in expand(sweep, 12):
        runner.certify(unit)
    return sweep, load_results(sweep.output)


def test_recertify_with_the_same_certificate_reproduces_the_sweep(own_results):
    _, df = own_results
    again = recertify(df, "standard")
    for column in ("prediction", "radius_l1", "radius_l2", "p_a_lower"):
        np.testing.assert_array_equal(again[column].to_numpy(), df[column].to_numpy())
    dssn = df[df.method == "dssn"]
    np.testing.assert_array_equal(recertify(dssn, "standard")["radius_l1"].to_numpy(), dssn["radius_l1"].to_numpy())


def test_box_constrained_recertification_never_shrinks_a_radius(own_results):
    _, df = own_results
    l1 = df[df.method.isin(["uniform", "ssn"])]
    plain = l1["radius_l1"].to_numpy()
    box = recertify(l1, "box")
    box_input = recertify(l1, "box_input")
    certified = ~np.isnan(plain)
    assert certified.any()
    assert (box["radius_l1"].to_numpy()[certified] >= plain[certified]).all()
    assert (box_input["radius_l1"].to_numpy()[certified] >= box["radius_l1"].to_numpy()[certified] - 1e-12).all()
    assert (box["radius_l1"].to_numpy()[certified] > plain[certified]).any(), "radii above 1 should grow"
    assert set(box["certificate"]) == {"box"} and set(box_input["certificate"]) == {"box_input"}
    assert not box["multiclass"].any() and not box_input["multiclass"].any()


def test_recertify_multiclass_and_alpha(own_results):
    sweep, df = own_results
    uniform = df[df.method == "uniform"]
    multi = recertify(uniform, multiclass=True)
    assert set(multi["certificate"]) == {"standard"} and multi["multiclass"].all() and multi["p_b_upper"].notna().all()
    counts = np.stack(uniform["votes"].to_numpy())
    top = counts[np.arange(len(counts)), uniform["selected"].to_numpy()]
    np.testing.assert_allclose(multi["p_a_lower"], certificates.clopper_pearson_lower(top, sweep.certify.n, 0.0005))
    looser = recertify(uniform, alpha=0.05)
    assert (looser["p_a_lower"].to_numpy() >= uniform["p_a_lower"].to_numpy()).all() and set(looser["alpha"]) == {0.05}


def synthetic_rows(method: str, sigma: float, *, q: int, seed: int, k: float | None, counts) -> pd.DataFrame:
    """Rows certified the way a worker writes them, from given counts (digits: 10 classes,
    d = 64): what ``recertify`` must reproduce from the rows alone."""
    digits = load_digits("test")
    noise = make_noise(method, sigma, q=q, seed=seed, k=k, dim=64)
    counts = np.asarray(counts, dtype=np.int64)
    if noise.exact:
        votes = Votes(counts)
    else:
        votes = Votes(counts, selection=(counts * 64 // counts.sum(axis=1, keepdims=True)))
    settings = CertifySettings(n0=64, n=int(counts.sum(axis=1)[0]), alpha=0.001)
    result = noise.certify(votes, settings)
    table = certification_rows(
        noise,
        {**result, "votes": counts, "selection_votes": votes.selection},
        settings,
        indices=digits.indices[: len(counts)],
        labels=np.zeros(len(counts), dtype=np.int64),
        training="standard",
        seed=seed,
        dataset="digits",
        split="test",
        q=q,
    )
    return table.to_pandas()


def one_smoothing_counts(total: int, tops: list[int]) -> np.ndarray:
    counts = np.zeros((len(tops), 10), dtype=np.int64)
    counts[:, 0] = tops
    counts[:, 1] = total - np.asarray(tops)
    return counts


def test_recertify_keeps_each_zhang_k_apart_in_either_order(coarse_zhang_curves):
    """The audit's case: zhang-l2, sigma 0.5, n = 400, counts 390/360/300 at k = 0 and k = 40.
    Grouped without k, every row got one k's curve (the k = 40 rows 1.68x too large)."""
    counts = one_smoothing_counts(400, [390, 360, 300])
    flat = synthetic_rows("zhang-l2", 0.5, q=255, seed=0, k=0.0, counts=counts)
    shaped = synthetic_rows("zhang-l2", 0.5, q=255, seed=0, k=40.0, counts=counts)
    assert (shaped["radius_l2"] < flat["radius_l2"]).all()
    for rows in (pd.concat([flat, shaped]), pd.concat([shaped, flat])):
        again = recertify(rows.reset_index(drop=True))
        np.testing.assert_array_equal(again["radius_l2"].to_numpy(), rows["radius_l2"].to_numpy())


@pytest.mark.parametrize("method", sorted(FAMILIES))
def test_recertify_rebuilds_every_familys_smoothing_from_its_rows(coarse_zhang_curves, method):
    """Two smoothings of one family that differ in every parameter its constructor takes
    (sigma, q, seed and, for the shaped families, k), in both orders: re-certifying the mixed
    rows gives back each row's own radius."""
    cls = FAMILIES[method]
    first = {"sigma": 0.5, "q": 255, "seed": 0, "k": 0.0 if "k" in cls.parameters else None}
    second = {"sigma": 0.7, "q": 127, "seed": 3, "k": 40.0 if "k" in cls.parameters else None}
    rows = []
    for options in (first, second):
        levels = make_noise(method, options["sigma"], q=options["q"]).describe().get("levels")
        total = levels if cls.exact else 400
        tops = [total - 2, total * 3 // 4, total * 2 // 3]
        rows.append(synthetic_rows(method, **options, counts=one_smoothing_counts(total, tops)))
    norm_column = f"radius_{cls.norm}"
    assert not np.array_equal(rows[0][norm_column].to_numpy(), rows[1][norm_column].to_numpy())
    for mixed in (pd.concat(rows), pd.concat(rows[::-1])):
        again = recertify(mixed.reset_index(drop=True))
        np.testing.assert_array_equal(again[norm_column].to_numpy(), mixed[norm_column].to_numpy())


def test_recertify_refuses_rows_without_a_parameter_column(coarse_zhang_curves):
    rows = synthetic_rows("zhang-l1", 0.5, q=255, seed=0, k=8.0, counts=one_smoothing_counts(400, [390]))
    with pytest.raises(ValueError, match="lack the 'k' column"):
        recertify(rows.drop(columns=["k"]))


def test_recertify_refusals(own_results):
    _, df = own_results
    with pytest.raises(ValueError, match="'box' certificate does not apply to dssn rows"):
        recertify(df[df.method == "dssn"], "box")
    with pytest.raises(ValueError, match="does not apply to gaussian rows .it applies to uniform, ssn rows"):
        recertify(df[df.method == "gaussian"], "box")
    with pytest.raises(ValueError, match="binary only"):
        recertify(df[df.method == "laplace"], multiclass=True)
    with pytest.raises(ValueError, match="certificate must be one of"):
        recertify(df, "uniform++")


def test_plot_and_table_commands(own_results, tmp_path):
    sweep, df = own_results
    png = plot_curves(df[df.method != "gaussian"], tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runner = CliRunner()
    result = runner.invoke(main, ["plot", sweep.output, "-o", str(tmp_path / "curves.svg"), "--norm", "l1"])
    assert result.exit_code == 0 and (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")
    table = runner.invoke(main, ["table", sweep.output, "--radii", "0,0.5,1.5"])
    assert table.exit_code == 0 and "| dssn / standard |" in table.output and "@ σ=" in table.output
    csv = runner.invoke(main, ["table", sweep.output, "--radii", "0.5", "--format", "csv", "--certificate", "box"])
    assert (
        csv.exit_code == 2 and "it applies to uniform, ssn rows" in csv.output
    )  # gaussian rows cannot be box-certified
    l1_only = tmp_path / "l1"
    for path in (Path(sweep.output) / "uniform", Path(sweep.output) / "dssn"):
        shutil.copytree(path, l1_only / path.name)
    csv = runner.invoke(main, ["table", str(l1_only), "--radii", "0.5,1.5", "--format", "csv", "--certificate", "box"])
    assert csv.exit_code == 0 and "l1,uniform,standard,box,0.5," in csv.output
    assert csv.output.startswith("norm,method,training,certificate,radius,certified_accuracy,clean_accuracy,sigma")
    latex = runner.invoke(main, ["table", sweep.output, "--format", "latex", "--seeds"])
    assert latex.exit_code == 0 and r"\begin{tabular}" in latex.output and "seed = 0" in latex.output
    assert "mean" not in latex.output  # one seed: no spread to report
    bad = runner.invoke(main, ["table", sweep.output, "--radii", "half"])
    assert bad.exit_code == 2 and bad.output.startswith("error: --radii")


def test_table_filter_json_and_plot_formats(own_results, tmp_path):
    sweep, df = own_results
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "table",
            sweep.output,
            "--radii",
            "0,0.5",
            "--format",
            "json",
            "--filter",
            "method == 'dssn' and sigma == 0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert {(r["method"], r["sigma"]) for r in records} == {("dssn", 0.5)} and len(records) == 2
    mine = best_certified_accuracy(df.query("method == 'dssn' and sigma == 0.5"), [0.0, 0.5])
    assert [r["certified_accuracy"] for r in records] == mine["certified_accuracy"].tolist()
    for expression, message in (("sigma ==", "--filter 'sigma =='"), ("sigma > 9", "no result rows match")):
        bad = runner.invoke(main, ["table", sweep.output, "--filter", expression])
        assert bad.exit_code == 2 and message in bad.output and len(bad.output.strip().splitlines()) == 1
    for suffix, magic in ((".pdf", b"%PDF"), (".png", b"\x89PNG"), (".svg", b"<?xml")):
        out = tmp_path / f"curves{suffix}"
        args = ["plot", sweep.output, "-o", str(out), "--filter", "method in ['dssn', 'uniform']"]
        assert runner.invoke(main, args).exit_code == 0 and out.read_bytes().startswith(magic)
    inside = runner.invoke(main, ["plot", sweep.output, "-o", str(Path(sweep.output) / "c.png"), "--norm", "l1"])
    assert (
        inside.exit_code == 2 and "result shards only" in inside.output and not (Path(sweep.output) / "c.png").exists()
    )
    jpeg = runner.invoke(main, ["plot", sweep.output, "-o", str(tmp_path / "c.jpg"), "--norm", "l1"])
    assert jpeg.exit_code == 2 and ".png, .pdf, .svg" in jpeg.output


@pytest.mark.parametrize("command", ["table", "plot"])
def test_table_and_plot_import_neither_torch_nor_ray(own_results, tmp_path, command, fresh_python):
    """A fast start: `certify table` and `plot` of stored results read rows and draw, so they
    import neither torch (the families' implementations, re-certification) nor Ray, nor the
    certificates' scipy and statsmodels; matplotlib only for a plot."""
    sweep, _ = own_results
    args = [command, sweep.output] + (["-o", str(tmp_path / "c.svg"), "--norm", "l1"] if command == "plot" else [])
    script = (
        f"import sys\nfrom cluster.cli import main\ntry:\n    main({args})\nexcept SystemExit as end:\n"
        "    assert not end.code, end.code\n"
        "print(sorted(m for m in ('torch', 'ray', 'scipy', 'statsmodels', 'matplotlib') if m in sys.modules))"
    )
    done = fresh_python.run(script)
    expected = "['matplotlib']" if command == "plot" else "[]"
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == expected, done.stdout + done.stderr


def _drawn(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_the_plots_legend_never_covers_a_curve_and_names_each_sigma():
    fig = curves_figure(quickstart_like())
    renderer = _drawn(fig)
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent(renderer)
    for line in ax.get_lines():
        points = line.get_transform().transform(line.get_xydata())
        inside = (legend.x0 <= points[:, 0]) & (points[:, 0] <= legend.x1)
        inside &= (legend.y0 <= points[:, 1]) & (points[:, 1] <= legend.y1)
        assert not inside.any(), line.get_label()
    assert not legend.overlaps(ax.bbox) and fig.bbox.contains(legend.x0, legend.y0)
    assert fig.bbox.contains(legend.x1, legend.y1)  # not cut off by the figure's edge
    labels = [text.get_text().strip() for text in ax.get_legend().get_texts()]
    assert labels == ["dssn / standard: best", "σ=0.25", "σ=0.5", "σ=1"] + ["uniform / standard: best"] + labels[5:]
    assert labels[5:] == ["σ=0.25", "σ=0.5", "σ=1"]
    assert ax.get_xlabel() == "L1 radius (pixel scale [0, 1])" and ax.get_ylabel() == "certified accuracy (%)"
    assert ax.get_title() == "digits (test): certified accuracy against L1 radius"


def test_plot_labels_zhangs_k_and_draws_user_text_as_it_is(coarse_zhang_curves):
    counts = one_smoothing_counts(400, [390, 360, 300])
    rows = pd.concat([synthetic_rows("zhang-l2", 0.5, q=255, seed=0, k=k, counts=counts) for k in (0.0, 40.0)])
    fig = curves_figure(rows, over=["sigma", "k"])
    _drawn(fig)
    labels = [text.get_text().strip() for text in fig.axes[0].get_legend().get_texts()]
    assert labels == ["zhang-l2 / standard: best", "k=0", "k=40"]
    # a "$" in a user's name would start matplotlib's math mode: drawn as it is, not parsed (and failing)
    _drawn(curves_figure(quickstart_like(training="a$\\frac{$b")))


def test_plot_names_each_rows_norm_after_recertification(own_results, tmp_path):
    """Re-certified Gaussian rows are L2: the axis says so (it once said L1 after --certificate)."""
    sweep, _ = own_results
    gaussian = tmp_path / "l2"
    shutil.copytree(Path(sweep.output) / "gaussian", gaussian / "gaussian")
    runner = CliRunner()
    for certificate in ("stored", "standard"):
        out = tmp_path / f"l2-{certificate}.svg"
        result = runner.invoke(main, ["plot", str(gaussian), "-o", str(out), "--certificate", certificate])
        assert result.exit_code == 0, result.output
        svg = out.read_text()
        assert "L2 radius (pixel scale [0, 1])" in svg and "L1 radius" not in svg
    mixed = runner.invoke(main, ["plot", sweep.output, "-o", str(tmp_path / "mixed.svg"), "--certificate", "standard"])
    assert mixed.exit_code == 2 and "plot one norm at a time" in mixed.output  # a plot never mixes norms
    l1 = runner.invoke(main, ["plot", sweep.output, "-o", str(tmp_path / "l1.svg"), "--norm", "l1"])
    assert l1.exit_code == 0 and "L1 radius (pixel scale [0, 1])" in (tmp_path / "l1.svg").read_text()


def test_stored_rows_give_back_their_smoothing_and_votes():
    """Re-certification rebuilds a row's smoothing through the registry and refuses rows whose
    stored L contradicts their sigma and q (another convention's rows would certify wrongly)."""
    from certlib.families import DSSNNoise
    from certlib.rows import stored_noise, stored_votes

    rows = pd.DataFrame(
        {
            "method": ["dssn"],
            "sigma": [0.5],
            "seed": [3],
            "q": [16],
            "levels": [27],
            "votes": [[20, 7]],
            "selection_votes": [None],
        }
    )
    noise = stored_noise(rows)
    assert isinstance(noise, DSSNNoise) and (noise.levels, noise.q, noise.seed) == (27, 16, 3)
    np.testing.assert_array_equal(stored_votes(rows, exact=True).counts, [[20, 7]])
    with pytest.raises(ValueError, match="store L=99, but sigma=0.5 at q=16 gives L=27"):
        stored_noise(rows.assign(levels=[99]))
    with pytest.raises(ValueError, match="without stored counts"):
        stored_votes(rows.assign(selection_votes=[None]), exact=False)
