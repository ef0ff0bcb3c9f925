"""The certification-engine steps of ``bench/gpu_check.py``: the engine against its forward
ceilings and float64, Monte Carlo CERTIFY with Gaussian and Zhang et al.'s noise, sequential
against fixed-n certification. Shared pieces are in ``bench/gpu_steps.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.gpu_steps import DSSN_SIGMAS, MODEL_SIGMA, TARGETS, Context, Row  # noqa: E402
from bench.suite import timed  # noqa: E402

# --------------------------------------------------------------------------- the engine


def engine_step(ctx: Context) -> list[Row]:
    """Forward ceilings (fp32, the fast precision, compiled) and DSSN ``precision: auto`` at sigma
    0.25 and 1.0 (samples/s, share of the best ceiling, samples per cascade level, votes against
    float64), all on the same engine as bench/suite.py measures it."""
    from bench.suite import autocast_forward, checked_cascade, dssn_cell, forward_rate, ground_truth, vote_differences
    from certlib.engine.voting import default_batch_size

    s = ctx.sizes
    model, note = ctx.model()
    model.to(memory_format=torch.channels_last)
    test = ctx.test()
    batch = default_batch_size(ctx.device, 3 * 32 * 32)
    ctx.progress("the precision: auto cascade (compiled where auto compiles) and its spot check")
    auto, setup = timed(lambda: checked_cascade(model, test, ctx.device, batch), ctx.device)
    fast = "fp16" if ctx.gpu else "bf16"
    cells = {f"{level} eager": autocast_forward(auto.fast_network(), level, ctx.device) for level in ("fp32", fast)}
    if auto.compiled:
        cells[f"{auto.levels[0]} compiled (the engine's forward)"] = lambda x: auto.logits(auto.levels[0], x)
    x = torch.rand(batch, 3, 32, 32, device=ctx.device).contiguous(memory_format=torch.channels_last)
    ctx.progress("forward ceilings")
    ceilings = {name: forward_rate(fn, x, ctx.device, s.ceiling_seconds) for name, fn in cells.items()}
    best = max(ceilings.values())
    rows = [Row(f"engine set-up: folding, compilation ({auto.compiled}), float64 copy, spot check (s)", f"{setup:.1f}")]
    rows += [Row(f"forward ceiling, {name}, batch {batch} (samples/s)", f"{r:,.0f}") for name, r in ceilings.items()]
    ctx.progress("DSSN cells")
    dssn = [dssn_cell("auto", auto, test, sigma, ctx.device, s.cell_seconds, s.truth_images) for sigma in DSSN_SIGMAS]
    ctx.progress("the float64 ground truth")
    # On a CPU the error table keeps the levels auto runs there: bf16 (not among them) runs at a
    # tenth of fp32's rate on a CPU and would take most of the quick run's engine step.
    levels = None if ctx.gpu else auto.levels[:-1]
    truth, _, errors = ground_truth(model, auto, test, ctx.device, s.truth_images, batch, 0, DSSN_SIGMAS, (), levels)
    print(f"Worst logit error of each level against float64 (headroom = band / twice the error):\n{errors}")
    for cell in dssn:
        what = f"DSSN auto ({auto.name}{', compiled' if auto.compiled else ''}), sigma {cell.sigma}"
        differ, _ = vote_differences([cell], truth, {}, 0)
        checked = min(s.truth_images, cell.images)
        rows += [
            Row(
                f"{what}: samples/s ({cell.images} images, {cell.seconds:.1f} s)",
                f"{cell.rate:,.0f}",
                f">= {TARGETS['samples_per_s']:,}",
                cell.rate >= TARGETS["samples_per_s"],
                note=note,
            ),
            Row(
                f"{what}: share of the best ceiling",
                f"{cell.rate / best:.2f}",
                f">= {TARGETS['ceiling_ratio']}",
                cell.rate >= TARGETS["ceiling_ratio"] * best,
            ),
            Row(f"{what}: samples evaluated per level", cell.shares()),
            Row(
                f"{what}: votes differing from float64 ({checked} images, every copy)",
                str(differ),
                "0",
                differ == 0,
                exact=True,
            ),
        ]
    return rows


# --------------------------------------------------------------------------- Monte Carlo


def monte_carlo_step(ctx: Context) -> list[Row]:
    """Gaussian CERTIFY (n0 = 100, n = 100,000 at full size) seconds per image, and Zhang et
    al.'s l2 and l-infinity families against it on the same images (bench/zhang.py)."""
    import certlib.families.zhang
    from bench.zhang import per_image_seconds

    s = ctx.sizes
    if s.zhang_curve_samples is not None:  # tiny sizes: a coarser radius curve (the tests' coarse_zhang_curves)
        certlib.families.zhang.CURVE_SAMPLES = s.zhang_curve_samples
    model, note = ctx.model()
    test = ctx.test(s.mc_images)
    k = 1536.0  # issue 14's setting for CIFAR-10 (bench/zhang.py's default)
    ctx.progress("Gaussian, zhang-l2 and zhang-linf cells (radius curves first)")
    results = per_image_seconds(model, test.pixels().to(ctx.device), test.indices, ctx.device, 0.5, k, s.mc_n)
    gaussian = results[0][2]
    at_target_n = gaussian * (100 + 100_000) / (100 + s.mc_n)  # the same rate at n = 100,000
    projected = f"projected from n = {s.mc_n:,}" if s.mc_n != 100_000 else ""
    rows = [
        Row(
            f"Gaussian CERTIFY, n0 100, n 100,000, sigma 0.5: s/image ({len(test.labels)} images)",
            f"{at_target_n:.3f}",
            f"<= {TARGETS['mc_seconds_per_image']}",
            at_target_n <= TARGETS["mc_seconds_per_image"],
            note=f"{projected} {note}".strip(),
        )
    ]
    for name, curve, per_image in results[1:]:
        ratio = per_image / gaussian
        has_target = name.startswith(("zhang-l2 k=1536", "zhang-linf"))
        rows.append(
            Row(
                f"{name}: s/image over Gaussian's (radius curve {curve:.1f} s, once)",
                f"{ratio:.2f}",
                f"<= {TARGETS['zhang_ratio']}" if has_target else "",
                ratio <= TARGETS["zhang_ratio"] if has_target else None,
            )
        )
    return rows


# --------------------------------------------------------------------------- sequential


def sequential_step(ctx: Context) -> list[Row]:
    """Sequential against fixed-n Monte Carlo certification (uniform noise at the model's sigma,
    L1 table radii, cap = n): estimation samples per image and samples/s of each."""
    from bench.sequential import RADII
    from certlib.engine.voting import make_cascade
    from certlib.families import make_noise
    from certlib.smooth import Smooth

    s = ctx.sizes
    model, note = ctx.model()
    test = ctx.test(s.sequential_images)
    images = test.pixels().to(ctx.device)
    smooth = Smooth(make_cascade(model, images, 10, device=ctx.device), make_noise("uniform", MODEL_SIGMA), 10)
    common = {"n0": 100, "n": s.mc_n, "alpha": 0.001, "seed": 0}
    smooth.certify(images[:1], test.indices[:1], n0=16, n=256)  # compilation, float64 reference, spot check
    ctx.progress("fixed n")
    fixed, fixed_s = timed(lambda: smooth.certify(images, test.indices, **common), ctx.device)
    ctx.progress("sequential")
    seq, seq_s = timed(
        lambda: smooth.certify(images, test.indices, **common, sampling="sequential", radii=RADII), ctx.device
    )
    used = float(np.mean(seq["n"]))
    fixed_rate, seq_rate = len(images) * s.mc_n / fixed_s, len(images) * used / seq_s
    what = f"uniform sigma {MODEL_SIGMA}, {len(images)} images, cap n = {s.mc_n:,}"
    return [
        Row(
            f"sequential ({what}): estimation samples per image (mean)",
            f"{used:,.0f} ({s.mc_n / used:.1f}x fewer)",
            note="issue 27's 10x needs a well-trained model " + note,
        ),
        Row(f"fixed n ({what}): estimation samples/s", f"{fixed_rate:,.0f}"),
        Row(
            f"sequential ({what}): estimation samples/s over fixed n's",
            f"{seq_rate / fixed_rate:.2f}",
            f">= {TARGETS['sequential_rate_ratio']:.2f}",
            seq_rate >= TARGETS["sequential_rate_ratio"] * fixed_rate,
        ),
    ]
