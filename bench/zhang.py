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
    images = test.pixels().to(device)
    dim = int(np.prod(test.input_shape))
    rows = []
    baseline = None
    for method, k in (("gaussian", None), ("zhang-l2", 0.0), ("zhang-l2", args.k), ("zhang-linf", args.k)):
        noise = make_noise(method, args.sigma, k=k, dim=dim if k is not None else None)
        smooth = Smooth(model, noise, 10, device=device)
        curve = 0.0
        if k is not None:  # the radius curve, once per configuration
            _, curve = timed(lambda noise=noise: noise.certified_radius(np.array([0.9])), device)
        smooth.certify(images[:1], test.indices[:1], n0=16, n=256)  # warm-up
        _, seconds = timed(lambda smooth=smooth: smooth.certify(images, test.indices, n0=100, n=args.n), device)
        per_image = seconds / len(images)
        baseline = baseline or per_image
        rows.append((f"{method}" + ("" if k is None else f" k={k:g}"), curve, per_image, per_image / baseline))
    print(f"device {device}, {len(images)} images, n0 100, n {args.n}, sigma {args.sigma}")
    print("| smoothing | radius curve (s, once) | seconds per image | ratio to Gaussian CERTIFY |")
    print("|---|---:|---:|---:|")
    for name, curve, per_image, ratio in rows:
        print(f"| {name} | {curve:.1f} | {per_image:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
