"""Certification time per image of Zhang et al. 2020's families against Gaussian CERTIFY with
the same n, side by side in one run (issue 14's target: within 1.2x).

    python bench/zhang.py                          # CPU: WRN-40-2, CIFAR-10 images, n = 2,000
    python bench/zhang.py --device cuda --images 100 --n 100000 --checkpoint <Gaussian-trained WRN or ResNet>

The radius curve of each (family, sigma, k) is computed once per sweep configuration and cached
(``certlib.certificates.dual.radius_curve``); its time is printed apart, then each family's
per-image time is measured with the curve warm, as a sweep's units see it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certlib.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from certlib.data import load_dataset  # noqa: E402
from certlib.engine.voting import make_cascade  # noqa: E402
from certlib.families import make_noise  # noqa: E402
from certlib.models import build_model  # noqa: E402
from certlib.smooth import Smooth  # noqa: E402

DEFAULT_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-bin"


def timed(fn, device: torch.device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - started


def per_image_seconds(
    model: torch.nn.Module, images: torch.Tensor, indices, device: torch.device, sigma: float, k: float, n: int
) -> list[tuple[str, float, float]]:
    """(smoothing, seconds of its radius curve, seconds per image) for Gaussian CERTIFY and
    Zhang et al.'s l2 (k = 0 and ``k``) and l-infinity (``k``) families at ``sigma``, n0 = 100
    and ``n`` estimation samples, each on ``images`` after a warm-up call. One cascade serves
    every family, so compilation and the float64 reference are paid once, as a worker does."""
    cascade = make_cascade(model, images, 10, device=device)
    dim = int(np.prod(images.shape[1:]))
    rows = []
    for method, k_ in (("gaussian", None), ("zhang-l2", 0.0), ("zhang-l2", k), ("zhang-linf", k)):
        noise = make_noise(method, sigma, k=k_, dim=dim if k_ is not None else None)
        smooth = Smooth(cascade, noise, 10)
        curve = 0.0
        if k_ is not None:  # the radius curve, once per configuration
            _, curve = timed(lambda noise=noise: noise.certified_radius(np.array([0.9])), device)
        smooth.certify(images[:1], indices[:1], n0=16, n=256)  # warm-up
        _, seconds = timed(lambda smooth=smooth: smooth.certify(images, indices, n0=100, n=n), device)
        rows.append((f"{method}" + ("" if k_ is None else f" k={k_:g}"), curve, seconds / len(images)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--k", type=float, default=1536.0)
    parser.add_argument("--checkpoint", type=Path, help="a CIFAR-10 model card checkpoint (default: a random WRN-40-2)")
    args = parser.parse_args()
    device = torch.device(args.device)
    test = load_dataset("cifar10", "test", args.cifar, limit=args.images)
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint, device=device)
    else:
        torch.manual_seed(0)
        model = build_model("wrn40_2", 10, test.mean, test.std, test.input_shape).to(device).eval()
    rows = per_image_seconds(model, test.pixels().to(device), test.indices, device, args.sigma, args.k, args.n)
    print(f"device {device}, {len(test.labels)} images, n0 100, n {args.n}, sigma {args.sigma}")
    print("| smoothing | radius curve (s, once) | seconds per image | ratio to Gaussian CERTIFY |")
    print("|---|---:|---:|---:|")
    for name, curve, per_image in rows:
        print(f"| {name} | {curve:.1f} | {per_image:.3f} | {per_image / rows[0][2]:.2f} |")


if __name__ == "__main__":
    main()
