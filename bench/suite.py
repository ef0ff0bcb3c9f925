"""The speed benchmark suite: every measurement side by side in one run, printed as tables.

    python bench/suite.py                      # CPU (about 6 minutes on 2 cores)
    python bench/suite.py --device cuda        # a GPU: larger batches, the full n = 100,000
    python bench/suite.py --checkpoint bench/.models/wrn40_2-dssn-1.0.pt   # a trained network

1. Forward ceiling: WRN-40-2's own best forward rate over batch sizes and dtypes, eager and
   compiled, the limit no certifier on that model can beat.
2. DSSN exact voting at sigma 0.25, 1.0, 3.5 on CIFAR-10 images: samples/s, seconds per image,
   efficiency (samples/s / the ceiling of the same precision and compilation), against the
   reference code's naive strategy (one image at a time, 128 noisy copies per forward pass, fp32
   NCHW, noise made per chunk, counts on the host); each engine variant (fp32/bf16, eager or
   torch.compile) with the share of samples its near-tie band refined and how many votes differ
   from fp32.
3. Monte Carlo CERTIFY (n0 = 64, n = 100,000) for uniform and Gaussian noise, against Cohen et
   al.'s loop (one image at a time, noise per chunk); on a CPU n is reduced and the time per
   image projected linearly.
4. The whole pipeline through Ray with one worker against the bare engine on the same images
   (overhead fraction), and with more workers (scaling efficiency).
5. The projected time of the full DSSN Table 1 sweep (15 sigmas x 10,000 images).
Benchmarks never assert on timing; the votes of the strategies compared are checked equal.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from certlib.checkpoint import load_checkpoint
from certlib.data import load_cifar10
from certlib.models import build_model
from certlib.noise import DSSNNoise, GaussianNoise, UniformNoise, quantize
from certlib.voting import (PRECISIONS, REFINE, TIE_TOLERANCE, default_batch_size, disable_tf32, dssn_votes,
                            monte_carlo_counts)

DEFAULT_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-bin"
TABLE1_SIGMAS = [0.15] + [0.25 * n for n in range(1, 15)]
PAPER_DSSN_SECONDS_AT_3_5 = 0.41  # Levine & Feizi, 2080 Ti
PAPER_UNIFORM_SECONDS = 13.44


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# Engine variants compared in sections 2, 3 and 5: (evaluation precision, torch.compile).
VARIANTS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def variant_name(precision: str, compiled: bool) -> str:
    return precision + (" compiled" if compiled else "")


# --------------------------------------------------------------------------- 1. forward ceiling

@torch.inference_mode()
def forward_rate(model, x, precision: str, device, repeats: int) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(x)  # warm-up (and compilation)
        times = [timed(lambda: model(x), device)[1] for _ in range(repeats)]
    return len(x) / statistics.median(times)


def forward_ceiling(model, device, batch_sizes, engine_batch: int, repeats: int) -> tuple[dict, str]:
    """Eager rates over batch sizes and dtypes; compiled rates at the engine's batch size (each
    batch shape is a compilation). Compiling here also keeps compilation out of the engines'
    timings below (same model, shape and precision: a cache hit), as a worker compiles once."""
    rates, rows = {}, []
    compiled = torch.compile(model, dynamic=False)
    for precision in ("fp32", "bf16"):
        for batch in batch_sizes:
            x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
            rates[(precision, False, batch)] = forward_rate(model, x, precision, device, repeats)
        x = torch.rand(engine_batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        rates[(precision, True, engine_batch)] = forward_rate(compiled, x, precision, device, repeats)
    for (precision, is_compiled, batch), rate in rates.items():
        rows.append([variant_name(precision, is_compiled), str(batch), f"{rate:,.0f}"])
    ceilings = {(p, c): max(v for (p2, c2, _), v in rates.items() if (p2, c2) == (p, c)) for p, c in VARIANTS}
    return ceilings, table(["forward", "batch", "samples/s (median)"], rows)


# --------------------------------------------------------------------------- 2. DSSN

@torch.inference_mode()
def naive_dssn_votes(model, images, noise: DSSNNoise, chunk: int = 128) -> np.ndarray:
    """The reference code's loop: per image, chunks of offsets, argmax counted on the host."""
    votes = np.zeros((len(images), 10), dtype=np.int64)
    for i, image in enumerate(images):
        x_int = quantize(image[None], noise.q).flatten(1)
        for start in range(0, noise.levels, chunk):
            s_base = torch.arange(start, min(start + chunk, noise.levels), device=image.device)
            noisy = noise.copies(x_int.expand(len(s_base), -1), s_base).view(-1, *image.shape)
            votes[i] += np.bincount(model(noisy).argmax(1).cpu().numpy(), minlength=10)
    return votes


def refined_share(stats: dict, precision: str, samples: int) -> str:
    """Share of the samples the near-tie band sent from ``precision`` to the next precision."""
    return f"{stats[REFINE[precision]] / samples:.2%}"


def dssn_section(model, reference_model, images_by_sigma, device, batch_size, ceilings):
    rows, rates = [], {}
    for sigma, images in images_by_sigma.items():
        noise = DSSNNoise(sigma)
        samples = len(images) * noise.levels
        naive, tn = timed(lambda: naive_dssn_votes(reference_model, images, noise), device)
        reference = None
        for precision, compiled in VARIANTS:
            stats = {}
            votes, t = timed(lambda: dssn_votes(model, images, noise, 10, batch_size=batch_size, precision=precision,
                                                compile=compiled, stats=stats), device)
            reference = votes if reference is None else reference
            rate = samples / t
            rates[(sigma, precision, compiled)] = rate
            rows.append([str(sigma), str(noise.levels), str(len(images)), variant_name(precision, compiled), f"{rate:,.0f}",
                         f"{rate / ceilings[(precision, compiled)]:.2f}", f"{t / len(images):.3f}",
                         refined_share(stats, precision, samples), f"{int(np.abs(votes - reference).sum() // 2)}/{samples}",
                         f"{tn / t:.2f}x"])
        note = "" if np.array_equal(naive, reference) else " *"
        rows.append([str(sigma), str(noise.levels), str(len(images)), "naive loop (fp32)" + note, f"{samples / tn:,.0f}",
                     f"{samples / tn / ceilings[('fp32', False)]:.2f}", f"{tn / len(images):.3f}", "-", "-", "1.00x"])
    text = table(["sigma", "L", "images", "engine", "samples/s", "efficiency (vs its own ceiling)", "s/image",
                  "refined in the next precision", "votes != fp32", "speed-up vs naive"], rows)
    if any(r[3].endswith("*") for r in rows):
        text += "\n* the naive loop's plain float32 argmax differs from the engine's near-tie-repaired votes"
    return rates, text


@torch.inference_mode()
def band_check(model, images, noise: DSSNNoise, device, batch_size: int) -> str:
    """Is each precision's near-tie band wide enough on this device and network? The worst
    |logit - float64 logit| / (1 + |top float64 logit|) over all noisy copies of ``images``,
    evaluated at two batch sizes (eager) or the engine's (compiled). A prediction outside the
    band is kept only if it equals the float64 network's, which holds while headroom =
    band / (2 x worst error) > 1."""
    x_int = quantize(images, noise.q).flatten(1)
    pair = torch.arange(len(images) * noise.levels, device=device)
    x = noise.copies(x_int[pair // noise.levels], pair % noise.levels).view(-1, *images.shape[1:])
    model64 = copy.deepcopy(model).double()
    reference = torch.cat([model64(chunk.double()) for chunk in x.split(batch_size)])
    scale = 1 + reference.max(dim=1).values.abs()
    compiled = torch.compile(model, dynamic=False)
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    rows = []
    for precision in precisions:
        for is_compiled in (False, True):
            net = compiled if is_compiled else model
            worst = 0.0
            for batch in ([batch_size] if is_compiled else [batch_size, 7]):
                chunks = [c for c in x.split(batch) if len(c) == batch] if is_compiled else x.split(batch)
                with torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32"):
                    logits = torch.cat([net(c.contiguous(memory_format=torch.channels_last)).float() for c in chunks])
                error = (logits.double() - reference[:len(logits)]).abs().max(dim=1).values / scale[:len(logits)]
                worst = max(worst, float(error.max()))
            band = TIE_TOLERANCE[precision]
            rows.append([variant_name(precision, is_compiled), f"{worst:.2e}", f"{band:.0e}", f"{band / (2 * worst):,.0f}"])
    return table(["evaluation", "worst relative logit error vs float64", "near-tie band", "headroom"], rows)


# --------------------------------------------------------------------------- 3. Monte Carlo

@torch.inference_mode()
def naive_monte_carlo(model, images, noise, n0: int, n: int, chunk: int, seed: int) -> np.ndarray:
    """Cohen et al.'s core.py loop: per image, noise drawn per chunk, counts on the host."""
    counts = np.zeros((len(images), 10), dtype=np.int64)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    for i, image in enumerate(images):
        for total in (n0, n):
            for start in range(0, total, chunk):
                batch = image[None].expand(min(chunk, total - start), *image.shape)
                counts[i] += np.bincount(model(noise.sample(batch, generator)).argmax(1).cpu().numpy(), minlength=10)
    return counts


def monte_carlo_section(model, reference_model, images, device, batch_size, n: int, ceilings):
    rows = []
    for noise in (UniformNoise(0.5), GaussianNoise(0.5)):
        samples = len(images) * (64 + n)
        _, tn = timed(lambda: naive_monte_carlo(reference_model, images, noise, 64, n, 400, 0), device)
        for precision, compiled in VARIANTS:
            stats = {}
            _, te = timed(lambda: monte_carlo_counts(model, images, range(len(images)), noise, 10, n0=64, n=n, seed=0,
                                                     batch_size=batch_size, precision=precision, compile=compiled,
                                                     stats=stats), device)
            rate = samples / te
            rows.append([noise.name, variant_name(precision, compiled), f"{n:,}", f"{rate:,.0f}",
                         f"{rate / ceilings[(precision, compiled)]:.2f}", f"{(64 + 100_000) / rate:.2f}",
                         refined_share(stats, precision, samples), f"{tn / te:.2f}x"])
        rows.append([noise.name, "Cohen loop (fp32, chunks of 400)", f"{n:,}", f"{samples / tn:,.0f}",
                     f"{samples / tn / ceilings[('fp32', False)]:.2f}", f"{(64 + 100_000) / (samples / tn):.2f}", "-", "1.00x"])
    return table(["noise", "engine", "n measured", "samples/s", "efficiency (vs its own ceiling)", "s/image at n=100,000",
                  "refined in the next precision", "speed-up vs Cohen loop"], rows) + \
        f"\npaper: {PAPER_UNIFORM_SECONDS} s/image (uniform, n = 100,000, 2080 Ti)"


# --------------------------------------------------------------------------- 4. pipeline

def pipeline_section(cifar: Path, images: int, workers: list[int], sigma: float, arch: str) -> str:
    import ray

    from certlib.analysis import load_results
    from certlib.checkpoint import ModelCard, load_checkpoint, save_checkpoint
    from certlib.smooth import Smooth
    from cluster.driver import run_sweep
    from cluster.spec import model_keys, parse_spec

    test = load_cifar10(cifar, "test")
    noise = DSSNNoise(sigma)
    work = Path(tempfile.mkdtemp(prefix="certify-bench-"))
    torch.manual_seed(0)
    model = build_model(arch, 10, test.mean, test.std, test.input_shape)
    template = str(work / "{method}-{training}-{sigma}-{seed}.pt")
    card = ModelCard(architecture=arch, dataset="cifar10", class_names=test.class_names, input_shape=list(test.input_shape),
                     mean=list(test.mean), std=list(test.std), q=255, method="dssn", sigma=sigma, lam=noise.lam,
                     levels=noise.levels, seed=0, training="standard")
    checkpoint = Path(template.format(method="dssn", training="standard", sigma=sigma, seed=0))
    save_checkpoint(checkpoint, model, card)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker's share, as each Ray worker gets one CPU
    bare_model, _ = load_checkpoint(checkpoint)
    pixels = test.pixels(range(images))
    _, bare = timed(lambda: Smooth(bare_model, noise, 10).certify(pixels), torch.device("cpu"))
    torch.set_num_threads(threads)

    rows = []
    start = time.perf_counter()
    ray.init(address="local", num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - start
    bare_rate = images / bare
    for k in workers:
        spec = parse_spec({
            "name": "bench", "output": str(work / f"out-{k}"),
            "dataset": {"name": "cifar10", "split": "test", "root": str(cifar), "limit": images},
            "models": {"path": template}, "methods": ["dssn"], "sigmas": [sigma],
            "resources": {"workers": k, "cpus_per_worker": 1, "gpus_per_worker": 0, "shard_size": max(1, images // (4 * k))},
        })
        assert model_keys(spec)[0].checkpoint(spec) == checkpoint
        _, wall = timed(lambda: run_sweep(spec, f"bench-{k}", log=lambda line: None), torch.device("cpu"))
        engine = float(load_results(spec.output, columns=["seconds"])["seconds"].sum())
        rate = images / wall
        rows.append([str(k), f"{wall:.1f}", f"{engine:.1f}", f"{1 - engine / (k * wall):.1%}",
                     f"{1 - engine / (k * (wall + startup)):.1%}", f"{rate:.2f}", f"{rate / (k * bare_rate):.2f}"])
    ray.shutdown()
    header = (f"{images} CIFAR-10 images, DSSN sigma={sigma} (L={noise.levels}), {arch}; bare engine (1 thread, no Ray): "
              f"{bare:.1f} s; Ray start-up {startup:.1f} s (not in the walls below)\n")
    return header + table(["workers", "sweep wall s", "certification s (all workers)", "outside certification",
                           "same, with Ray start-up", "images/s", "scaling efficiency (vs k x bare engine)"], rows)


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", type=Path, help="a trained CIFAR-10 WRN-40-2 (bench/train_quick.py); default: random init")
    parser.add_argument("--sections", default="1,2,3,4,5", help="which sections to run (comma-separated numbers)")
    parser.add_argument("--pipeline-images", type=int, default=400)
    parser.add_argument("--pipeline-workers", default="1,2", help="worker counts for section 4")
    args = parser.parse_args()
    sections = {int(v) for v in args.sections.split(",")}
    device = torch.device(args.device)
    gpu = device.type == "cuda"

    test = load_cifar10(args.cifar, "test")
    if args.checkpoint:
        model, card = load_checkpoint(args.checkpoint, device=device, dataset="cifar10")
        if card.architecture != "wrn40_2":
            raise SystemExit(f"{args.checkpoint}: a {card.architecture}; the suite measures WRN-40-2")
        described = (f"WRN-40-2 trained with {card.method} sigma={card.sigma} for {card.epochs_done} epochs "
                     f"(held-out noisy accuracy {card.noisy_accuracy:.1%})")
    else:
        torch.manual_seed(0)
        model = build_model("wrn40_2", 10, test.mean, test.std, test.input_shape).to(device).eval()
        described = "WRN-40-2 (random init)"
    reference_model = copy.deepcopy(model)  # NCHW, as the reference code runs it
    model.to(memory_format=torch.channels_last)
    disable_tf32()  # as the engines run: the ceiling must not use TF32 either, and compiled code guards on it
    batch_size = default_batch_size(device, 3 * 32 * 32)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# certify benchmark suite: {name}, torch {torch.__version__}, {described}, CIFAR-10 test images\n")

    if sections & {1, 2, 3, 5}:
        batches = [256, 1024, 2048, 4096, 8192] if gpu else [16, 32, 64, 128]
        ceilings, text = forward_ceiling(model, device, batches, batch_size, repeats=10 if gpu else 3)
        print(f"## 1. Forward ceiling (channels_last, inference mode)\n{text}\n"
              + ", ".join(f"{variant_name(*v)} ceiling {r:,.0f}" for v, r in ceilings.items()) + " samples/s\n")
    if sections & {2, 5}:
        counts = {0.25: 8, 1.0: 4, 3.5: 2} if gpu else {0.25: 4, 1.0: 1, 3.5: 1}
        images = {s: test.pixels(range(k)).to(device) for s, k in counts.items()}
        dssn_rates, text = dssn_section(model, reference_model, images, device, batch_size, ceilings)
        best = max(VARIANTS, key=lambda v: dssn_rates[(3.5, *v)])
        print(f"## 2. DSSN exact voting (engine batch {batch_size}; naive loop: one image, 128 offsets per forward)\n{text}\n"
              f"paper: {PAPER_DSSN_SECONDS_AT_3_5} s/image at sigma 3.5 (2080 Ti); here, fastest engine "
              f"({variant_name(*best)}): {DSSNNoise(3.5).levels / dssn_rates[(3.5, *best)]:.3f} s\n")
        print(f"### Near-tie bands on this device (all {DSSNNoise(1.0).levels * len(images[1.0])} noisy copies at sigma 1.0)\n"
              f"{band_check(model, images[1.0], DSSNNoise(1.0), device, batch_size)}\n")
    if 3 in sections:
        n = 100_000 if gpu else 2_000
        mc_images = test.pixels(range(2 if gpu else 1)).to(device)
        print(f"## 3. Monte Carlo CERTIFY (n0 = 64)\n"
              f"{monte_carlo_section(model, reference_model, mc_images, device, batch_size, n, ceilings)}\n")
    if 4 in sections:
        workers = [int(v) for v in args.pipeline_workers.split(",")]
        print("## 4. Pipeline through Ray against the bare engine (CPU workers)\n"
              f"{pipeline_section(args.cifar, args.pipeline_images, workers, 0.25, 'small_cnn')}\n")
    if 5 in sections:
        total = sum(DSSNNoise(s).levels for s in TABLE1_SIGMAS) * 10_000
        rows = [[variant_name(*v), f"{total / dssn_rates[(1.0, *v)] / 3600:.2f}"] for v in VARIANTS]
        print(f"## 5. Projected DSSN Table 1 sweep ({total:.3g} forward passes, at the sigma 1.0 rate, one device)\n"
              + table(["engine", "hours"], rows))


if __name__ == "__main__":
    main()
