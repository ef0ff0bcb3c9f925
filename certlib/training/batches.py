"""Where a training epoch's batches come from: the split held on the device, or decoded by
DataLoader worker processes when it does not fit there (ImageNet).

Both give a batch as (uint8 grid values (B, C, H, W), int64 labels (B,)) on the training
device, in the order of the epoch's permutation, so the same seed trains the same model
whichever source feeds it.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from certlib.data import QuantizedDataset

DEVICE_SHARE = 0.25  # at most this share of a GPU's memory holds a resident training split


def fits_on_device(data: QuantizedDataset, device: torch.device) -> bool:
    """Whether ``data``'s grid values can live on ``device``: always in a CPU's memory when
    they are already loaded; on a GPU when they take at most DEVICE_SHARE of its memory
    (CIFAR-10's training split is 150 MB). Image folders decode on demand and never do."""
    if data.values is None:
        return False
    if device.type != "cuda":
        return True
    return (
        data.values.numel() * data.values.element_size()
        <= DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory
    )


class ResidentBatches:
    """The training split resident on the device. Full batches are gathered on the device at a
    cursor that advances on the device, so a captured CUDA graph can replay the gather."""

    def __init__(self, data: QuantizedDataset, device: torch.device, batch_size: int):
        self.values = data.values.to(device)
        self.labels = data.labels.to(device)
        self.batch_size = batch_size
        self.full_batches, remainder = divmod(len(self.labels), batch_size)
        self.order = torch.zeros(len(self.labels), dtype=torch.int64, device=device)
        self._grid = self.order[: self.full_batches * batch_size].view(self.full_batches, batch_size)
        self._rest = self.order[self.full_batches * batch_size :] if remainder else None
        self.cursor = torch.zeros(1, dtype=torch.int64, device=device)

    def start_epoch(self, order: torch.Tensor) -> None:
        """Set the epoch's permutation of the rows and rewind to its first batch."""
        self.order.copy_(order)
        self.cursor.zero_()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next full batch of the epoch; advances the cursor without reading it back."""
        rows = self._grid.index_select(0, self.cursor).view(-1)
        self.cursor += 1
        return self.values.index_select(0, rows), self.labels.index_select(0, rows)

    def last_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The epoch's final, shorter batch (None when the batch size divides the split)."""
        if self._rest is None:
            return None
        return self.values.index_select(0, self._rest), self.labels.index_select(0, self._rest)


class _GridImages(Dataset):
    def __init__(self, data: QuantizedDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.grid_values([row])[0], self.data.labels[row]


class _EpochOrder(Sampler):
    """Batches of row indices in the current epoch's order (set before each epoch)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.order: list[int] = []

    def __iter__(self):
        for start in range(0, len(self.order), self.batch_size):
            yield self.order[start : start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)


class LoadedBatches:
    """Batches decoded by ``workers`` DataLoader processes (kept alive across epochs) into
    pinned memory and copied to the device without blocking the host."""

    def __init__(self, data: QuantizedDataset, device: torch.device, batch_size: int, workers: int):
        self.device = device
        self.sampler = _EpochOrder(batch_size)
        self.loader = DataLoader(
            _GridImages(data),
            batch_sampler=self.sampler,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def start_epoch(self, order: torch.Tensor) -> None:
        """Set the epoch's permutation of the rows (the epoch's one host read of it)."""
        self.sampler.order = order.tolist()

    def batches(self):
        """The epoch's batches, in its order, on the device."""
        for values, labels in self.loader:
            yield values.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
