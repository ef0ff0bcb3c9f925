"""The precision cascade: which levels run in which order, which samples each band sends on,
the folded fast network, the spot check, and votes that do not depend on any of it. bf16 is the
fast level these CPU tests ask for; a CUDA-only test checks the host synchronizations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from certlib.data import load_digits
from certlib.engine import cascade as cascade_module
from certlib.engine import voting
from certlib.engine.cascade import LEVELS, Cascade, cascade_levels, fold_batchnorm, resolve_compile, resolve_precision
from certlib.engine.voting import dssn_votes, monte_carlo_counts
from certlib.families import DSSNNoise, UniformNoise, make_noise
from certlib.models import build_model
from tests.helpers import random_cnn


def test_cascade_levels_run_from_fast_to_exact():
    assert cascade_levels("bf16", "cpu") == ("bf16", "fp32", "fp64")
    assert cascade_levels("fp32", "cpu") == ("fp32", "fp64")
    assert cascade_levels("fp64", "cpu") == ("fp64",)
    assert cascade_levels("fp16", "cuda") == ("fp16", "tf32", "fp32", "fp64")
    assert cascade_levels("bf16", "cuda") == ("bf16", "tf32", "fp32", "fp64")
    assert cascade_levels("tf32", "cuda") == ("tf32", "fp32", "fp64")
    for level in ("fp16", "tf32"):
        with pytest.raises(ValueError, match=f"precision {level} needs a CUDA device"):
            cascade_levels(level, "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        cascade_levels("int8", "cpu")


def test_every_band_is_at_least_four_times_its_measured_error():
    for level in LEVELS.values():
        assert level.band >= 4 * level.worst_error
    # each level is more precise than the one it refines
    assert LEVELS["fp16"].band > LEVELS["tf32"].band > LEVELS["fp32"].band > LEVELS["fp64"].band == 0


def test_auto_picks_the_fast_precision_of_the_device(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(cascade_module, "cuda_has_fast_fp16", lambda device: True)
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(cascade_module, "cuda_has_fast_fp16", lambda device: False)
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_compile("auto", cpu) is False and resolve_compile("auto", torch.device("cuda")) is True
    with pytest.raises(ValueError, match="compile must be"):
        resolve_compile("yes", cpu)


def perturbed_wrn() -> torch.nn.Module:
    """WRN-40-2 whose BatchNorms hold non-trivial statistics, as after training."""
    torch.manual_seed(0)
    model = build_model("wrn40_2", 10, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], (3, 32, 32)).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_(1, 0.3)
            module.bias.data.normal_(0, 0.3)
    return model


@torch.inference_mode()
def test_folding_batchnorm_keeps_the_function():
    model = perturbed_wrn()
    folded = fold_batchnorm(model)
    count = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert count(model) == 37 and count(folded) == 18  # conv->BN pairs folded; BNs on a residual sum stay
    x = torch.rand(16, 3, 32, 32)
    exact = model.double()(x.double())
    model.float()
    error = ((folded(x).double() - exact).abs().max(1).values / (1 + exact.abs().max(1).values)).max()
    assert error < 1e-5
    plain = random_cnn(1)
    assert fold_batchnorm(plain) is plain  # nothing to fold: the model itself


def test_an_untraceable_network_runs_unfolded():
    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 2
            return self.bn(self.conv(x)).flatten(1)[:, :3]

    model = Untraceable().eval()
    with pytest.warns(UserWarning, match="BatchNorm not folded"):
        assert fold_batchnorm(model) is model


class GradedMargins(torch.nn.Module):
    """Two logits whose margin is set by the first pixel: under 1/3 a near-tie for every level
    but float64 (1e-6), under 2/3 one for bf16 only (1e-2), else decided at once (1.0). Its
    arithmetic is elementwise, so every precision computes it alike."""

    def forward(self, x):
        first = x.flatten(1)[:, 0]
        margin = torch.where(first < 1 / 3, 1e-6, torch.where(first < 2 / 3, 1e-2, 1.0))
        return torch.stack([torch.zeros_like(first), margin.to(x.dtype)], dim=1)


def test_each_band_sends_on_exactly_its_near_ties():
    images = load_digits("test").pixels(range(5))
    noise = DSSNNoise(0.5, q=16)
    pair = torch.arange(len(images) * noise.levels)
    x_int = torch.round(images.double() * 16).int().flatten(1)
    first = noise.copies(x_int[pair // noise.levels], pair % noise.levels)[:, 0]
    samples = len(pair)
    for batch_size in (1, 7, 64, 1000):
        stats = {}
        votes = dssn_votes(GradedMargins(), images, noise, 2, batch_size=batch_size, precision="bf16", stats=stats)
        assert stats["bf16"] == samples
        assert stats["fp32"] == int((first < 2 / 3).sum()) > 0
        assert stats["fp64"] == int((first < 1 / 3).sum()) > 0
        assert stats["fp16"] == stats["tf32"] == 0
        assert (votes[:, 1] == noise.levels).all()  # every margin favours class 1, however small


class Constant(torch.nn.Module):
    """Logits all equal: every prediction is an exact tie."""

    def forward(self, x):
        return x.flatten(1)[:, :1].expand(-1, 3) * 0


def test_an_exact_tie_goes_through_every_level_to_the_lower_class():
    images = load_digits("test").pixels(range(3))
    noise = DSSNNoise(0.25, q=16)
    samples = len(images) * noise.levels
    stats = {}
    votes = dssn_votes(Constant(), images, noise, 3, batch_size=8, precision="bf16", stats=stats)
    # The audit evaluates the first sample of each non-final level's stream in float64 too.
    assert stats == {"fp16": 0, "bf16": samples, "tf32": 0, "fp32": samples, "fp64": samples, "audited": 2}
    assert (votes[:, 0] == noise.levels).all()
    stats = {}
    counts = monte_carlo_counts(
        Constant(), images[:2], [0, 1], UniformNoise(0.5), 3, n0=8, n=40, seed=0, precision="bf16", stats=stats
    )
    assert stats["bf16"] == stats["fp32"] == stats["fp64"] == 2 * 48 and (counts[1][:, 0] == 40).all()


def test_votes_do_not_depend_on_precision_batch_or_queue_size(monkeypatch):
    """bf16 and fp32 cascades, batch sizes from 1 up, and refinement queues small enough to fill
    and drain many times: the votes are the pure float64 network's. Batches of one sample (a
    forward pass each: two thirds of the time) run with the smallest queue only."""
    images = load_digits("test").pixels(range(6))
    model = random_cnn(1, seed=6)
    noise = DSSNNoise(0.25, q=16, seed=2)
    exact = dssn_votes(model, images, noise, 10, precision="fp64")
    mc_exact = monte_carlo_counts(
        model, images, range(6), UniformNoise(0.25), 10, n0=16, n=300, seed=3, precision="fp64"
    )
    for queue_batches in (1, 2, 4):  # 1: taken as 2, the least that holds a drained queue and a batch
        monkeypatch.setattr(voting, "QUEUE_BATCHES", queue_batches)
        for precision in ("bf16", "fp32"):
            for batch_size in (1, 5, 64, 333) if queue_batches == 1 else (5, 64, 333):
                stats = {}
                votes = dssn_votes(model, images, noise, 10, batch_size=batch_size, precision=precision, stats=stats)
                np.testing.assert_array_equal(votes, exact)
                counts = monte_carlo_counts(
                    model,
                    images,
                    range(6),
                    UniformNoise(0.25),
                    10,
                    n0=16,
                    n=300,
                    seed=3,
                    batch_size=batch_size,
                    precision=precision,
                )
                np.testing.assert_array_equal(counts[0], mc_exact[0])
                np.testing.assert_array_equal(counts[1], mc_exact[1])
    assert stats["fp32"] > 0  # the random network's small margins did reach the refinement levels
    as_float64 = monte_carlo_counts(
        model, images.double(), range(6), UniformNoise(0.25), 10, n0=16, n=300, seed=3, precision="bf16"
    )
    np.testing.assert_array_equal(as_float64[1], mc_exact[1])  # images of another dtype are taken as float32


def test_synchronizations_are_few_not_per_batch(monkeypatch):
    images = load_digits("test").pixels(range(8))
    noise = DSSNNoise(0.5, q=16)  # L = 27: 216 samples, 27 batches of 8
    syncs = []
    original = voting._Tally._synchronize
    monkeypatch.setattr(voting._Tally, "_synchronize", lambda self: (syncs.append(1), original(self))[1])
    dssn_votes(random_cnn(1, seed=7), images, noise, 10, batch_size=8, precision="bf16")
    batches = math.ceil(len(images) * noise.levels / 8)
    assert len(syncs) <= math.ceil(batches / (voting.QUEUE_BATCHES - 1)) + 3
    assert len(syncs) < batches / 2


class WideMargin(torch.nn.Module):
    def forward(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([1000 * m + 10, torch.zeros_like(m)], dim=1)


def test_a_cascade_is_checked_and_builds_its_reference_once():
    images = load_digits("test").pixels(range(3))
    cascade = Cascade(WideMargin(), 2, 16, device="cpu", precision="bf16")
    calls = []
    reference = cascade.reference_logits
    cascade.reference_logits = lambda x: (calls.append(len(x)), reference(x))[1]
    for sigma in (0.25, 0.5):
        votes = dssn_votes(cascade, images, DSSNNoise(sigma, q=16), 2)
        assert (votes[:, 0] == DSSNNoise(sigma, q=16).levels).all()
    monte_carlo_counts(cascade, images, range(3), UniformNoise(0.5), 2, n0=4, n=20, seed=0)
    # The spot check, once; after it float64 sees only the audit's samples, one per batch here
    # (batches of 16, far shorter than the audit's stride): no sample needed it otherwise.
    assert calls[0] == cascade_module.BAND_CHECK_SAMPLES and set(calls[1:]) == {1}
    with pytest.raises(ValueError, match="batch_size: set these on the Cascade"):
        dssn_votes(cascade, images, DSSNNoise(0.5, q=16), 2, batch_size=8)
    with pytest.raises(ValueError, match="the cascade has 2 classes, the call 3"):
        dssn_votes(cascade, images, DSSNNoise(0.5, q=16), 3)


class OffInFloat32(torch.nn.Module):
    """A network whose float32 evaluation is off by 1e-3 (as TF32 would be) but whose float64
    evaluation is exact: the fp32 band (1e-4) cannot make its votes batch-invariant."""

    def forward(self, x):
        logits = torch.stack([x.flatten(1).mean(1), 0.5 - x.flatten(1).mean(1)], dim=1)
        return logits + 1e-3 * logits.abs() if logits.dtype == torch.float32 else logits


def test_an_evaluation_less_precise_than_its_band_is_refused_or_left_out():
    images = torch.full((1, 1, 2, 2), 0.75)
    noise = DSSNNoise(0.5, q=16)
    message = (
        r"fp32 logits on this device differ from the float64 network's by \d\.\de-04 \(relative\), "
        r"more than the 5\.0e-05 its near-tie band 1e-04 allows: votes could depend on the batching; "
        r"refusing to count them"
    )
    with pytest.raises(RuntimeError, match=message):
        dssn_votes(OffInFloat32(), images, noise, 2, precision="fp32")
    with pytest.raises(RuntimeError, match="near-tie band"):
        monte_carlo_counts(OffInFloat32(), images, [0], UniformNoise(0.5), 2, n0=4, n=8, seed=0, precision="fp32")
    # auto: the level that fails is left out and the next takes its samples, so the votes stand
    cascade = Cascade(OffInFloat32(), 2, 4, device="cpu", precision="auto")
    with pytest.warns(UserWarning, match="leaving fp32 out of the cascade"):
        votes = dssn_votes(cascade, images, noise, 2)
    assert "fp32" not in cascade.levels and cascade.levels[-1] == "fp64"
    np.testing.assert_array_equal(votes, dssn_votes(OffInFloat32(), images, noise, 2, precision="fp64"))
    # a level after the requested first one is left out whatever the precision: it only refines
    cascade = Cascade(OffInFloat32(), 2, 4, device="cpu", precision="bf16")
    with pytest.warns(UserWarning, match="leaving fp32 out of the cascade"):
        np.testing.assert_array_equal(dssn_votes(cascade, images, noise, 2), votes)
    assert cascade.levels == ("bf16", "fp64")


def test_nan_logits_are_refused_whatever_the_precision():
    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 3), float("nan"))

    class LateNaN(torch.nn.Module):
        """Finite on the spot-checked samples, NaN later: caught at a synchronization."""

        def forward(self, x):
            first = x.flatten(1)[:, :1]
            return torch.cat([first, first * 0, torch.where(first > 0.9, float("nan"), 0.0)], dim=1)

    images = load_digits("test").pixels(range(2))
    for precision in ("auto", "fp32", "fp64"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # refused outright, not left out of the cascade
            with pytest.raises(ValueError, match="NaN"):
                dssn_votes(Broken(), images, DSSNNoise(0.5, q=16), 3, precision=precision)
            with pytest.raises(ValueError, match="NaN"):
                monte_carlo_counts(
                    Broken(), images, [0, 1], UniformNoise(0.5), 3, n0=4, n=10, seed=0, precision=precision
                )
    late = torch.zeros(1, 1, 8, 8)
    late[0, 0, 0, 0] = 1.0
    images = torch.cat([torch.zeros(1, 1, 8, 8), late])  # the second image's copies reach above 0.9
    with pytest.raises(ValueError, match="NaN"):
        dssn_votes(LateNaN(), images, DSSNNoise(0.5, q=16), 3, batch_size=4)


def test_the_gpu_engine_synchronizes_rarely(cuda):
    """Host synchronizations are a CUDA matter: without a GPU this test is skipped."""
    images = load_digits("test").pixels(range(16)).to(cuda)
    model = random_cnn(1, seed=8).to(cuda)
    noise = DSSNNoise(1.0, q=16)  # L = 55: 880 samples, 55 batches of 16
    cascade = Cascade(model, 10, 16, precision="auto", compile=False)
    dssn_votes(cascade, images[:1], noise, 10)  # the spot check (and cuDNN's set-up) synchronize once
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            dssn_votes(cascade, images, noise, 10)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    assert syncs <= 55 / (voting.QUEUE_BATCHES - 1) + 10, f"{syncs} synchronizations for 55 batches"


def test_fp32_means_ieee_even_after_code_asked_for_tf32_globally():
    """Since torch 2.9 the legacy flags leave cuDNN convolutions at a global "tf32" precision set
    by any code in the process: the cascade sets the per-backend precisions itself."""
    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("this torch has no per-backend fp32_precision settings")
    before = torch.backends.fp32_precision
    try:
        torch.backends.fp32_precision = "tf32"
        cascade_module.disable_tf32()
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.fp32_precision = before
        cascade_module.disable_tf32()


def test_a_failed_compilation_is_reported_with_its_cause_and_votes_eagerly(monkeypatch):
    """torch.compile's BackendCompilerFailed says only "backend='inductor' raised:" on its first
    line; under compile: auto the warning names the cause (no Triton, no C compiler) and the
    counts are the eager ones."""
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(*args, **kwargs):
        def call(x):
            raise BackendCompilerFailed(call, RuntimeError("Cannot find a working triton installation"), None)

        return call

    network = random_cnn(1, 10, seed=3)
    digits = load_digits("test")
    images = digits.pixels(range(4))
    noise = make_noise("gaussian", 0.5)
    count = dict(num_classes=10, n0=8, n=64, seed=0)
    eager = voting.monte_carlo_counts(Cascade(network, 10, 256), images, digits.indices[:4], noise, **count)
    cascade = Cascade(network, 10, 256, compile="auto")
    cascade.compiled = True  # as on a GPU, where auto compiles
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="RuntimeError: Cannot find a working triton installation"):
        counts = voting.monte_carlo_counts(cascade, images, digits.indices[:4], noise, **count)
    assert not cascade.compiled
    np.testing.assert_array_equal(counts[0], eager[0])
    np.testing.assert_array_equal(counts[1], eager[1])
