"""Datasets on their quantization grid.

Every dataset yields integer pixel values on {0, ..., q} together with q, so that
``pixels(indices)`` (values / q, pixel scale [0, 1]) lies exactly on the 1/q grid that DSSN
certifies on.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS_MEAN, DIGITS_STD = (0.305,), (0.38,)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What is known of a dataset without reading it: its grid 1/q, its splits (``heldout``: the
    one models are evaluated on after training), the input shape (C, H, W) models see, the
    class count and the channel statistics of its models' input normalization."""

    q: int
    splits: tuple[str, ...]
    heldout: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    needs_root: bool


DATASETS = {
    "digits": DatasetInfo(16, SPLITS, "test", (1, 8, 8), 10, DIGITS_MEAN, DIGITS_STD, needs_root=False),
    "cifar10": DatasetInfo(255, SPLITS, "test", (3, 32, 32), 10, CIFAR10_MEAN, CIFAR10_STD, needs_root=True),
    # ImageNet's "test" is its validation split, as in the papers.
    "imagenet": DatasetInfo(
        255, ("train", "val", "test"), "val", (3, 224, 224), 1000, IMAGENET_MEAN, IMAGENET_STD, needs_root=True
    ),
}


def quantize(x: torch.Tensor, q: int) -> torch.Tensor:
    """Integer grid values x * q of images on the 1/q grid of [0, 1], as int32.

    Raises ValueError when a value lies outside [0, 1] or off the grid: DSSN's exactness
    (Levine & Feizi 2021, Corollary 1) holds on the quantized domain only.
    """
    if not torch.is_floating_point(x):
        raise ValueError(f"images must be a float tensor in [0, 1], got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"image values must lie in [0, 1] (pixel scale), got range [{lo:.4g}, {hi:.4g}]")
    scaled = x.double() * q
    grid = torch.round(scaled)
    off = float((scaled - grid).abs().max())
    if off > 1e-4:  # float32 stores i/q to within ~1e-5/q; anything further is off the grid
        raise ValueError(f"images are not on the 1/q grid for q={q}: a value is {off:.3g}/q away from it")
    return grid.to(torch.int32)


@dataclass
class QuantizedDataset:
    """Images held as integers on the grid {0..q}: ``values`` (N, C, H, W) uint8, ``labels`` (N,)."""

    name: str
    split: str
    values: torch.Tensor
    labels: torch.Tensor
    q: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # The dataset index of each row (official order); None: 0..N-1, filled in by __post_init__.
    indices: np.ndarray = field(default=None)  # type: ignore[arg-type]

    def __post_init__(self):
        if self.indices is None:
            self.indices = np.arange(len(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def grid_values(self, rows) -> torch.Tensor:
        """Integer grid values (uint8, (len(rows), C, H, W)) of the given rows."""
        index = rows.long() if isinstance(rows, torch.Tensor) else torch.from_numpy(np.array(rows, dtype=np.int64))
        return self.values[index]

    def pixels(self, rows=None) -> torch.Tensor:
        """Float images in [0, 1] (values / q) for the given rows (all when None)."""
        v = self.grid_values(range(len(self)) if rows is None else rows)
        return v.to(torch.float32) / self.q

    def subset(self, rows) -> QuantizedDataset:
        """The rows ``rows`` of this dataset, keeping their original dataset indices."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"subset rows must lie in [0, {len(self)}), got [{rows.min()}, {rows.max()}]")
        t = torch.as_tensor(rows)
        return QuantizedDataset(
            self.name,
            self.split,
            self.values[t],
            self.labels[t],
            self.q,
            self.class_names,
            self.mean,
            self.std,
            self.indices[rows],
        )


def every_kth(n: int, k: int = 1, start: int = 0, limit: int | None = None) -> np.ndarray:
    """Rows start, start + k, ... of n rows, at most ``limit`` of them (Cohen et al.'s ImageNet
    subset is every 100th validation image)."""
    if k < 1 or start < 0:
        raise ValueError(f"every-k-th subset needs k >= 1 and start >= 0, got k={k}, start={start}")
    rows = np.arange(start, n, k)
    return rows if limit is None else rows[:limit]


# --------------------------------------------------------------------------- CIFAR-10


def _read_cifar10_binary(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    files = [root / f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else [root / "test_batch.bin"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 binary file not found: {missing[0]}")
    raw = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files])
    if raw.size % 3073:
        raise ValueError(
            f"CIFAR-10 binary files under {root} are truncated ({raw.size} bytes is not a multiple of 3073)"
        )
    records = raw.reshape(-1, 3073)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def verify_md5(root: Path) -> None:
    """Check the files listed in ``md5sums.txt`` (when present) against their md5 sums."""
    listing = Path(root) / "md5sums.txt"
    if not listing.is_file():
        return
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        expected, name = line.split()[:2]
        path = Path(root) / name.lstrip("*")
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        if digest != expected:
            raise ValueError(f"{path} has md5 {digest}, expected {expected}: the file is corrupt")


def load_cifar10(root: str | Path, split: str = "test", download: bool = False) -> QuantizedDataset:
    """CIFAR-10 from the official binary version directory (``data_batch_*.bin``,
    ``test_batch.bin``) or, failing that, torchvision's python version under ``root``
    (downloaded when ``download`` is set). q = 255; index i is the i-th official record."""
    if split not in SPLITS:
        raise ValueError(f"CIFAR-10 split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    binary = next((d for d in (root, root / "cifar-10-batches-bin") if (d / "test_batch.bin").is_file()), None)
    if binary is not None:
        values, labels = _read_cifar10_binary(binary, split)
    else:
        import torchvision

        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download)
        except RuntimeError:
            raise FileNotFoundError(
                f"no CIFAR-10 under {root}: neither the binary version (test_batch.bin) "
                "nor torchvision's python version"
            ) from None
        values, labels = ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets, dtype=np.int64)
    info = DATASETS["cifar10"]
    return QuantizedDataset(
        "cifar10",
        split,
        torch.from_numpy(np.ascontiguousarray(values)),
        torch.from_numpy(labels),
        info.q,
        CIFAR10_CLASSES,
        info.mean,
        info.std,
    )


# --------------------------------------------------------------------------- digits (offline)


# SHA-256 of scikit-learn's digits as load_digits returns them (uint8 values, then int64 labels).
DIGITS_SHA256 = "65e5b4619795efb40c1082f4c350c049e4ad552200d369b6ae99e21eef5e72c5"


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(values (1797, 8, 8) uint8, labels int64) of scikit-learn's digits. Read from the CSV that
    ships with scikit-learn, without importing it (a second per process: it imports
    scipy.stats), when those bytes are the ones scikit-learn gives (DIGITS_SHA256); else, or if
    the file is not where scikit-learn keeps it, through ``sklearn.datasets.load_digits``."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        try:
            with gzip.open(Path(folder, "datasets", "data", "digits.csv.gz"), "rt") as file:
                table = np.loadtxt(file, delimiter=",", max_rows=1797)
        except (OSError, ValueError):
            continue
        if table.shape == (1797, 65):
            values, labels = table[:, :-1].astype(np.uint8).reshape(-1, 8, 8), table[:, -1].astype(np.int64)
            if hashlib.sha256(values.tobytes() + labels.tobytes()).hexdigest() == DIGITS_SHA256:
                return values, labels
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _digits_read_once() -> tuple[np.ndarray, np.ndarray]:
    """``_digits_arrays`` once per process, read-only: parsing the CSV takes 20 ms, and a job's
    worker, the plan and the tests ask for the digits many times."""
    values, labels = _digits_arrays()
    for array in (values, labels):
        array.flags.writeable = False
    return values, labels


def load_digits(split: str = "test") -> QuantizedDataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, values 0..16, so q = 16); it ships
    with scikit-learn and works offline. The test split is every 5th image (index % 5 == 0),
    the train split the rest; indices refer to scikit-learn's order."""
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
    images, labels = _digits_read_once()
    values = images[:, None, :, :]  # rows are taken below: copies, which the caller may change
    all_rows = np.arange(len(labels))
    rows = all_rows[all_rows % 5 == 0] if split == "test" else all_rows[all_rows % 5 != 0]
    info = DATASETS["digits"]
    return QuantizedDataset(
        "digits",
        split,
        torch.from_numpy(values[rows]),
        torch.from_numpy(labels[rows]),
        info.q,
        [str(c) for c in range(info.num_classes)],
        info.mean,
        info.std,
        rows,
    )


# --------------------------------------------------------------------------- ImageNet


class ImageFolderImages(QuantizedDataset):
    """ImageNet-style images decoded on demand from their files (too many to hold in memory):
    resized to 256, center-cropped to 224, uint8 on the 1/255 grid."""

    def __init__(self, split: str, files: list[str], labels: list[int], class_names: list[str], indices: np.ndarray):
        info = DATASETS["imagenet"]
        # No values in memory (None): grid_values decodes the rows asked for.
        super().__init__(
            "imagenet",
            split,
            None,  # type: ignore[arg-type]
            torch.tensor(labels, dtype=torch.int64),
            info.q,
            class_names,
            info.mean,
            info.std,
            np.asarray(indices),
        )
        self.files = files

    @property
    def input_shape(self) -> tuple[int, ...]:
        return DATASETS["imagenet"].input_shape

    def grid_values(self, rows) -> torch.Tensor:
        from PIL import Image
        from torchvision import transforms

        prep = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])
        rows = rows.numpy() if isinstance(rows, torch.Tensor) else np.array(rows, dtype=np.int64)
        if not len(rows):
            return torch.zeros(0, *self.input_shape, dtype=torch.uint8)
        return torch.stack([prep(Image.open(self.files[r]).convert("RGB")) for r in rows])

    def subset(self, rows) -> ImageFolderImages:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"subset rows must lie in [0, {len(self)}), got [{rows.min()}, {rows.max()}]")
        return ImageFolderImages(
            self.split, [self.files[r] for r in rows], self.labels[rows].tolist(), self.class_names, self.indices[rows]
        )


def load_imagenet(
    root: str | Path, split: str = "val", every: int = 1, start: int = 0, limit: int | None = None
) -> ImageFolderImages:
    """ImageNet from an ImageFolder tree ``root/<split>/<wnid>/*.JPEG`` (q = 255), images decoded
    when used. ``every=100`` gives Cohen et al.'s 500-image validation subset (every 100th image
    in ImageFolder order); indices refer to that order."""
    import torchvision

    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"no ImageNet split folder {folder}")
    ds = torchvision.datasets.ImageFolder(str(folder))
    rows = every_kth(len(ds), every, start, limit)
    return ImageFolderImages(
        split, [ds.samples[r][0] for r in rows], [ds.samples[r][1] for r in rows], list(ds.classes), rows
    )


def load_dataset(
    name: str,
    split: str = "test",
    root: str | Path | None = None,
    every: int = 1,
    start: int = 0,
    limit: int | None = None,
) -> QuantizedDataset:
    """Dataset by name: ``digits`` (offline), ``cifar10`` (root: binary or python version
    directory), ``imagenet`` (root: ImageFolder tree with ``val``/``train``); optionally only
    every k-th image from ``start``, at most ``limit`` (see ``every_kth``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "digits":
        data = load_digits(split)
    elif root is None:
        raise ValueError(f"dataset {name!r} needs a root directory")
    elif name == "imagenet":
        return load_imagenet(root, "val" if split == "test" else split, every, start, limit)
    else:
        data = load_cifar10(root, split)
    if (every, start, limit) == (1, 0, None):
        return data
    return data.subset(every_kth(len(data), every, start, limit))
