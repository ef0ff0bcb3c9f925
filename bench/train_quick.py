"""Train a WRN-40-2 briefly on a CIFAR-10 subset, for benchmarks that need a trained network.

    python bench/train_quick.py --out bench/.models/wrn40_2-dssn-1.0.pt

A random-init network's logits sit within ~1e-3 of each other, so nearly every sample falls in
a low precision's near-tie band and the bf16 engine's rate says nothing about real use; a few
minutes of DSSN training on a CPU give the margins of a (weak) trained classifier. Not a model
to certify with: the papers train for 120 epochs on the full training set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from certlib.data import load_dataset
from certlib.training.config import TrainConfig
from certlib.training.train import train_model

DEFAULT_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-bin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument(
        "--images", type=int, default=20_000, help="training images (the first ones of the train split)"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    train = load_dataset("cifar10", "train", args.cifar, limit=args.images)
    heldout = load_dataset("cifar10", "test", args.cifar, start=5_000, limit=1_000)  # the suite times images 0..
    config = TrainConfig(
        dataset="cifar10", method="dssn", sigma=args.sigma, epochs=args.epochs, channels_last=True, heldout_limit=None
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    train_model(config, args.out, train, heldout, device=args.device)


if __name__ == "__main__":
    main()
