"""Hostile and careless input (issue 26): files a user did not write are never trusted as they
are. Shards whose bytes changed after they were written, two jobs writing one results
directory, results certified with different settings in one directory."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from certlib.atomic import owned_lock
from certlib.engine.voting import AUDIT_EVERY, monte_carlo_counts
from certlib.families import CertifySettings, Votes, make_noise
from certlib.rows import (
    DamagedShard,
    certification_rows,
    leftover_files,
    load_results,
    shard_path,
    shard_state,
    write_shard,
)
from certlib.rows.shards import read_shard
from cluster.plan import SweepConflict, preflight
from cluster.record import writer_lock
from cluster.spec import SpecError, parse_spec


def unit_rows(method: str = "uniform", n: int = 400, images: int = 40, seed: int = 0):
    """A unit's rows as a worker builds them, with varied values in every column."""
    rng = np.random.default_rng(seed)
    noise = make_noise(method, 0.5, q=16, seed=0)
    top = rng.integers(n // 2, n, images)
    counts = np.stack([top, n - top, np.zeros(images, np.int64)], axis=1)
    votes = Votes(counts) if noise.exact else Votes(counts, counts // 4)
    settings = CertifySettings(n0=64, n=n, alpha=0.001)
    result = noise.certify(votes, settings)
    return certification_rows(
        noise,
        {**result, "votes": counts, "selection_votes": votes.selection},
        settings,
        indices=np.arange(images) * 3,
        labels=rng.integers(0, 3, images),
        training="standard",
        seed=0,
        dataset="digits",
        split="test",
        q=16,
        seconds=0.25,
        job_id="job-a",
    )


def parameters(n: int = 400) -> str:
    return json.dumps({"model": {"method": "uniform"}, "certify": {"n": n, "n0": 64}, "dataset": {"every": 1}})


def _flip_bits_and_read(tmp_path, choose_positions, *, whole_directory: bool = True) -> dict[str, int]:
    """Write one shard, flip one random bit at each chosen position in turn and read: every read
    either gives exactly the rows written or fails with one line naming the file, and a resume
    never counts the damaged file as done."""
    config = {"method": "uniform", "training": "standard", "sigma": 0.5, "seed": 0}
    path = shard_path(tmp_path / "out", config, "unit-a")
    write_shard(path, unit_rows(), parameters())
    read = (lambda: load_results(tmp_path / "out")) if whole_directory else (lambda: read_shard(path)[0])
    original = read()
    pristine = path.read_bytes()
    rng = random.Random(5)
    outcomes = {"same": 0, "refused": 0}
    for position in choose_positions(pristine, rng):
        damaged = bytearray(pristine)
        damaged[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        try:
            again = read()
        except (DamagedShard, ValueError, OSError) as err:
            assert str(path) in str(err) and "\n" not in str(err), (position, err)
            assert shard_state(path, parameters(), 40) != "valid", position
            outcomes["refused"] += 1
            continue
        # A flip that changes no value: in the column statistics, which the reader does not use.
        if whole_directory:
            pd.testing.assert_frame_equal(again, original)
        else:
            assert again.equals(original), position
        outcomes["same"] += 1
    return outcomes


def test_a_flipped_bit_never_reads_as_other_numbers(tmp_path):
    """Single-bit flips across a whole shard (data pages, page headers, the footer). (Without
    page checksums and digests about 70% of flips in data pages read as silently different
    values.)"""
    outcomes = _flip_bits_and_read(tmp_path, lambda shard, rng: sorted(rng.sample(range(len(shard)), 300)))
    assert outcomes["refused"] > 100, outcomes  # the flips do reach the data


def test_a_flipped_bit_in_the_footer_is_refused_or_harmless(tmp_path):
    """1,500 flips inside the footer (schema, column types, metadata, digests): a flip that
    turns an integer column's type into bytes once escaped as a pyarrow traceback."""

    def footer_positions(shard: bytes, rng: random.Random) -> list[int]:
        footer_length = int.from_bytes(shard[-8:-4], "little")
        return sorted(rng.sample(range(len(shard) - 8 - footer_length, len(shard) - 8), 1500))

    outcomes = _flip_bits_and_read(tmp_path, footer_positions, whole_directory=False)
    assert outcomes["refused"] > 500, outcomes


def test_a_second_job_on_one_results_directory_is_refused_naming_the_first(tmp_path):
    output = tmp_path / "out"
    sweep = parse_spec(
        {
            "name": "two-jobs",
            "output": str(output),
            "dataset": {"name": "digits", "limit": 10},
            "models": {"path": str(tmp_path / "{method}-{sigma}.pt"), "train": {"epochs": 1}},
            "methods": ["uniform"],
            "sigmas": [0.5],
        }
    )
    from cluster.job.executor import run_sweep

    with owned_lock(writer_lock(output), "job certify-first-0123 (process 1 on host, since now)"):
        with pytest.raises(SpecError, match="is being written by job certify-first-0123"):
            preflight(sweep)
        with pytest.raises(SweepConflict, match="is being written by job certify-first-0123"):
            run_sweep(sweep, "certify-second")
    assert not output.exists()  # the refused job wrote nothing


def test_a_directory_mixing_certification_settings_is_refused(tmp_path):
    """Rows of n = 400 and n = 800 under one directory (two jobs, or a hand-made copy): the
    reader refuses with one line naming both files instead of pooling them."""
    output = tmp_path / "out"
    for unit, n in (("a", 400), ("b", 800)):
        config = {"method": "uniform", "training": "standard", "sigma": 0.5, "seed": 0}
        write_shard(shard_path(output, config, unit), unit_rows(n=n), parameters(n))
    with pytest.raises(ValueError, match=r"certify\.n: .*part-a\.parquet and .*part-b\.parquet") as err:
        load_results(output)
    assert "\n" not in str(err.value)


def test_temporary_files_of_interrupted_writes_are_found(tmp_path):
    config = {"method": "uniform", "training": "standard", "sigma": 0.5, "seed": 0}
    path = shard_path(tmp_path / "out", config, "unit-a")
    write_shard(path, unit_rows(), parameters())
    stale = path.with_name(f".{path.name}.x1y2.tmp")
    stale.write_bytes(b"half a shard")
    assert leftover_files(tmp_path / "out") == [stale]
    assert len(load_results(tmp_path / "out")) == 40  # and readers skip it meanwhile


class CancellingNetwork(torch.nn.Module):
    """Two logits, the second computed as (M + s) - M with s the image's mean: exact in float64,
    but in float32 M = 1e8 swallows s (its ulp is 8) wherever the first pixel is above 1/2, and
    M = 0 elsewhere. Its float32 error depends on the input: zero on dark first pixels, 0.5 on
    bright ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        mean = flat.mean(dim=1)
        big = torch.where(flat[:, 0] > 0.5, 1e8, 0.0).to(x.dtype)
        return torch.stack([torch.full_like(mean, 0.5), (big + mean) - big], dim=1)


def test_the_run_time_audit_catches_input_dependent_rounding():
    """The spot check sees the first image (a dark first pixel: no error) and passes fp32; the
    second image's float32 votes are all wrong, by a margin far outside the band (counts
    [2000, 0] where float64 gives [0, 2000], silently, before the audit). The audit stops the
    count with one line naming the precision to use; in float64 the counts are right."""
    images = torch.full((2, 1, 4, 4), 0.3)
    images[1] = 0.8
    noise = make_noise("uniform", 0.01)
    with pytest.raises(RuntimeError, match="certify it with precision: fp64") as err:
        monte_carlo_counts(CancellingNetwork(), images, [0, 1], noise, 2, n0=32, n=2000, seed=0, batch_size=64)
    assert "\n" not in str(err.value) and str(err.value).startswith("fp32 votes differed")
    stats: dict[str, int] = {}
    _, counts = monte_carlo_counts(
        CancellingNetwork(), images, [0, 1], noise, 2, n0=32, n=2000, seed=0, precision="fp64", stats=stats
    )
    assert counts.tolist() == [[2000, 0], [0, 2000]]


def test_the_audit_evaluates_a_fixed_share_of_the_samples_in_float64():
    images = torch.full((3, 1, 4, 4), 0.3)
    stats: dict[str, int] = {}
    monte_carlo_counts(
        CancellingNetwork(), images, [0, 1, 2], make_noise("uniform", 0.01), 2, n0=64, n=4096, seed=0, stats=stats
    )
    assert stats["audited"] == math.ceil(3 * (64 + 4096) / AUDIT_EVERY["cpu"])
