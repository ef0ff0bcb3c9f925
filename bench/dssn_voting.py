"""DSSN voting throughput: certlib's packed engine against the naive strategy of the reference
code (one image at a time, 128 noisy copies per forward pass, noise generated per chunk),
measured side by side on the same images and model.

    python bench/dssn_voting.py --images 4 --sigmas 0.25 1.0          # CPU here
    python bench/dssn_voting.py --device cuda --images 64              # on a GPU

Prints one table row per sigma: noisy samples per second of each strategy and their ratio.
The two strategies must produce identical votes; the script checks it.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from certlib.data import load_cifar10
from certlib.models import build_model
from certlib.noise import DSSNNoise, quantize
from certlib.voting import default_batch_size, dssn_votes

DEFAULT_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-bin"


@torch.inference_mode()
def naive_votes(model, images, noise: DSSNNoise, num_classes: int, chunk: int = 128) -> np.ndarray:
    """The reference code's loop: per image, chunks of ``chunk`` offsets, argmax counted on the host."""
    votes = np.zeros((len(images), num_classes), dtype=np.int64)
    for i, image in enumerate(images):
        x_int = quantize(image[None], noise.q).flatten(1)
        for start in range(0, noise.levels, chunk):
            s_base = torch.arange(start, min(start + chunk, noise.levels), device=image.device)
            noisy = noise.copies(x_int.expand(len(s_base), -1), s_base).view(-1, *image.shape)  # contiguous NCHW, fp32
            predictions = model(noisy).argmax(1).cpu().numpy()
            votes[i] += np.bincount(predictions, minlength=num_classes)
    return votes


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR, help="CIFAR-10 binary-version directory")
    parser.add_argument("--arch", default="wrn40_2")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--batch-size", type=int, default=None, help="engine batch size (default: sized to the device)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    ds = load_cifar10(args.cifar, "test")
    torch.manual_seed(0)
    model = build_model(args.arch, 10, ds.mean, ds.std, ds.input_shape).to(device).eval()
    reference_model = copy.deepcopy(model)  # the naive loop keeps the reference code's NCHW layout
    images = ds.pixels(range(args.images)).to(device)
    batch_size = args.batch_size or default_batch_size(device, int(np.prod(ds.input_shape)))
    dssn_votes(model, images[:1], DSSNNoise(0.25), 10, batch_size=batch_size)  # warm-up

    print(f"device={device} ({torch.get_num_threads()} CPU threads), arch={args.arch}, images={args.images}, "
          f"engine batch={batch_size}, naive chunk=128, fp32")
    print("| sigma | L | engine samples/s | naive samples/s | speed-up | engine s/image |")
    print("|---:|---:|---:|---:|---:|---:|")
    for sigma in args.sigmas:
        noise = DSSNNoise(sigma)
        samples = args.images * noise.levels
        engine, t_engine = timed(lambda: dssn_votes(model, images, noise, 10, batch_size=batch_size))
        naive, t_naive = timed(lambda: naive_votes(reference_model, images, noise, 10))
        if not np.array_equal(engine, naive):
            differing = int((engine != naive).any(axis=1).sum())
            print(f"note: votes differ on {differing} of {args.images} images (near-tie logits; the engine repairs them in float64)")
        print(f"| {sigma} | {noise.levels} | {samples / t_engine:,.0f} | {samples / t_naive:,.0f} | "
              f"{t_naive / t_engine:.2f}x | {t_engine / args.images:.3f} |")


if __name__ == "__main__":
    main()
