"""Result files as data: every reader a user reaches for (pandas, pyarrow, DuckDB, Polars)
reads a results directory typed, with no partition column turned into a string."""

from __future__ import annotations

import keyword
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from certlib.analysis import load_results
from certlib.families import CertifySettings, make_noise
from certlib.rows import CONFIG, DIGESTS_KEY, ROW_SCHEMA, certification_rows, shard_config, shard_path, write_shard
from cluster.plan import SweepConflict, plan_sweep, preflight
from cluster.spec import SpecError, parse_spec


def _rows(noise, training: str, seed: int, images: int = 3) -> pa.Table:
    exact = noise.exact
    votes = np.tile([[noise.describe().get("levels", 100) or 100, 0]], (images, 1))
    result = {
        "prediction": np.zeros(images, np.int64),
        "radius": np.full(images, 0.25),
        "certificate": "standard",
        "multiclass": None if exact else False,
        "selected": np.zeros(images, np.int64),
        "votes": votes,
        "selection_votes": None if exact else votes,
        "p_a_lower": np.full(images, np.nan if exact else 0.9),
        "p_b_upper": np.full(images, np.nan),
    }
    settings = CertifySettings(n0=10, n=100, alpha=0.001)
    return certification_rows(
        noise,
        result,
        settings,
        indices=np.arange(images),
        labels=np.zeros(images, np.int64),
        training=training,
        seed=seed,
        dataset="digits",
        split="test",
        q=16,
    )


@pytest.fixture
def results(tmp_path):
    """A results directory with exact (DSSN) and Monte Carlo (uniform) rows, two sigmas."""
    out = tmp_path / "results"
    for method in ("dssn", "uniform"):
        for sigma in (0.25, 0.5):
            noise = make_noise(method, sigma, q=16, seed=1)
            config = {"method": method, "training": "standard", "sigma": sigma, "seed": 1}
            write_shard(shard_path(out, config, f"{method}-{sigma}"), _rows(noise, "standard", 1), "{}")
    return out


def test_pandas_reads_typed_columns_and_filters_on_sigma(results):
    df = pd.read_parquet(results)
    assert len(df) == 12 and len(df[df.sigma == 0.5]) == 6
    assert df["sigma"].dtype == np.float64 and df["seed"].dtype == np.int64
    # Nullable integers stay integers: null n0 for DSSN, null levels for Monte Carlo.
    assert str(df["levels"].dtype) == "Int64" and str(df["n0"].dtype) == "Int64"
    assert df.loc[df.method == "dssn", "n0"].isna().all() and (df.loc[df.method == "uniform", "n0"] == 10).all()
    assert df.query("sigma == 0.5 and noise_lambda > 0").shape[0] == 6  # no keyword columns break query
    # Whether the bounds were multiclass: a nullable boolean, null where it does not apply (exact).
    assert str(df["multiclass"].dtype) == "boolean" and df.loc[df.method == "dssn", "multiclass"].isna().all()
    assert (df.loc[df.method == "uniform", "multiclass"] == False).all()  # noqa: E712
    pd.testing.assert_frame_equal(
        load_results(results).sort_values(["method", "sigma"]).reset_index(drop=True),
        df.sort_values(["method", "sigma"]).reset_index(drop=True),
    )


def test_pyarrow_duckdb_and_polars_read_typed_columns(results):
    table = pds.dataset(results, format="parquet").to_table(filter=pds.field("sigma") == 0.5)
    assert table.num_rows == 6 and table.schema.field("sigma").type == pa.float64()
    duckdb = pytest.importorskip("duckdb")  # the test extra's; the GPU machine has none
    con = duckdb.connect()
    source = f"read_parquet('{results}/**/*.parquet', hive_partitioning = true)"
    types = {row[0]: row[1] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    assert types["sigma"] == "DOUBLE" and types["seed"] == "BIGINT" and types["levels"] == "BIGINT"
    assert con.execute(f"SELECT count(*) FROM {source} WHERE sigma = 0.5").fetchone() == (6,)
    polars = pytest.importorskip("polars")
    frame = polars.read_parquet(results)  # the directory itself: nothing but shards in it
    assert frame.schema["sigma"] == polars.Float64 and frame.filter(polars.col("sigma") == 0.5).height == 6


def test_column_names_are_not_keywords_and_the_layout_round_trips(tmp_path):
    assert not [name for name in ROW_SCHEMA.names if keyword.iskeyword(name) or name == "index"]
    config = {"method": "zhang-l2", "training": "stability", "sigma": 0.12, "seed": 3}
    assert shard_config(tmp_path, shard_path(tmp_path, config, "u1")) == config
    assert "=" not in str(shard_path(tmp_path, config, "u1").relative_to(tmp_path))  # no Hive strings
    assert set(CONFIG) <= set(ROW_SCHEMA.names)


def test_results_of_the_old_hive_layout_are_refused_with_one_line(tmp_path):
    (tmp_path / "out" / "method=dssn" / "training=standard").mkdir(parents=True)
    with pytest.raises(ValueError, match="Hive layout of certify 0.1"):
        load_results(tmp_path / "out")
    spec = {
        "name": "old",
        "output": str(tmp_path / "out"),
        "dataset": {"name": "digits", "split": "test", "limit": 4},
        "models": {"path": str(tmp_path / "{method}-{training}-{sigma}-{seed}.pt"), "train": {"epochs": 1}},
        "methods": ["dssn"],
        "sigmas": [0.5],
        "resources": {"shard_size": 4},
    }
    with pytest.raises(SpecError, match="output: .*Hive layout"):  # nor extended by a new sweep
        preflight(parse_spec(spec))
    with pytest.raises(SweepConflict, match="output: .*Hive layout"):
        plan_sweep(parse_spec(spec), 4, log=lambda line: None)


def test_the_reference_documents_every_column():
    reference = (Path(__file__).parents[1] / "docs" / "results.md").read_text()
    table = reference[reference.index("| column | meaning |") :].split("\n\n")[0]
    documented = set(re.findall(r"`([a-z0-9_]+)`", "\n".join(line.split("|")[1] for line in table.splitlines()[2:])))
    assert set(ROW_SCHEMA.names) <= documented, set(ROW_SCHEMA.names) - documented


def test_shards_of_certify_0_2_read_with_their_certificate_split(results):
    """certify 0.2 stored "binary_box" where rows now store certificate "box" and multiclass
    False (and no multiclass column at all): load_results reads such shards as today's."""
    path = next(results.rglob("part-uniform-0.25.parquet"))
    table = pq.read_table(path)
    old = table.drop_columns(["multiclass"]).set_column(
        table.schema.get_field_index("certificate"), "certificate", pa.array(["multiclass_box"] * len(table))
    )
    metadata = {k: v for k, v in table.schema.metadata.items() if k != DIGESTS_KEY}  # certify 0.2 wrote none
    pq.write_table(old.replace_schema_metadata(metadata), path)
    df = load_results(results)
    rows = df[(df.method == "uniform") & (df.sigma == 0.25)]
    assert set(rows["certificate"]) == {"box"} and rows["multiclass"].tolist() == [True] * 3
    assert set(df.loc[df.method == "dssn", "certificate"]) == {"standard"}


def test_column_digests_are_those_earlier_versions_wrote():
    """A shard's digests are in its footer: a change to how they are computed would read every
    existing results directory as damaged. Pinned for each kind of column, with and without
    nulls (computed by certify before the no-null fast path)."""
    from certlib.rows.shards import column_digest

    columns = {
        "radius": (
            pa.array([0.5, None, 1.25], pa.float64()),
            "a888acb1c925322674a9ac22965afcb07064d881a844dc8d190a6379c013ea99",
        ),
        "label": (pa.array([3, 1, 4], pa.int64()), "02be8925f1a27a4e7006dbcaf4213d21450a9d231bb5a0a9eb0ea5eeb14f5f44"),
        "correct": (pa.array([True, False, None]), "d842bcedd868e88dcd38ba22e2279b703eb4dfaedfd527c87724546734413cf2"),
        "method": (
            pa.array(["dssn", "uniform", "dssn"]),
            "82b0ba18816a102179dcc1e42d3830e8a481495c3f084395521080154d774553",
        ),
        "votes": (
            pa.array([[1, 2], None, []], pa.list_(pa.int64())),
            "70e82618e934004c8c45039ca68675d262208ea8d256b10ce81e45215ee436bc",
        ),
        "counts": (
            pa.array([[0.25], [0.5, None], [1.0]]),
            "245bd044327891daf493eabdc0cc95ce925bb757b01eb89c0adea62d0bd0c2a8",
        ),
    }
    assert {name: column_digest(array) for name, (array, _) in columns.items()} == {
        name: digest for name, (_, digest) in columns.items()
    }
