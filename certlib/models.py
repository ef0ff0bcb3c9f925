"""Base-classifier architectures. Every model takes images in pixel scale [0, 1] and
standardizes them in its first layer, so smoothing noise is always applied in pixel space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Standardize(nn.Module):
    """(x - mean) / std per channel: the first layer of every model."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions, (N, C, H, W) -> (N, C, 1, 1). AdaptiveAvgPool2d(1)
    computes the same, but its CUDA backward accumulates with atomics, which deterministic
    training refuses; the mean's backward is a broadcast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True)


# --------------------------------------------------------------------------- WRN-40-2


class _WideBlock(nn.Module):
    """Pre-activation wide-ResNet block (Zagoruyko & Komodakis 2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-depth-widen for 32x32 inputs; WRN-40-2 is the CIFAR-10 model of Yang et al. 2020 and
    Levine & Feizi 2021."""

    def __init__(self, depth: int = 40, widen: int = 2, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        for group, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                layers.append(
                    _WideBlock(
                        widths[group] if i == 0 else widths[group + 1], widths[group + 1], stride if i == 0 else 1
                    )
                )
        layers += [nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True), GlobalAvgPool(), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


# --------------------------------------------------------------------------- ResNet-110


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            None
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016); ResNet-110 is Cohen et al.'s CIFAR-10 model."""

    def __init__(self, depth: int = 110, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        ]
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        layers += [GlobalAvgPool(), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


# --------------------------------------------------------------------------- small CNN (8x8 digits)


class SmallCNN(nn.Module):
    """A small CNN for 8x8 images (scikit-learn digits): fast enough to train on a CPU in seconds."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.LazyLinear(128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.net(x)


def _resnet50(num_classes: int, in_channels: int) -> nn.Module:
    if in_channels != 3:
        raise ValueError("resnet50 expects 3 input channels")
    import torchvision  # here: its import costs a second or two in every process that builds no resnet50

    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    model.avgpool = GlobalAvgPool()
    return model


ARCHITECTURES = {
    "wrn40_2": lambda num_classes, in_channels: WideResNet(40, 2, num_classes, in_channels),
    "resnet110": lambda num_classes, in_channels: CifarResNet(110, num_classes, in_channels),
    "resnet50": _resnet50,
    "small_cnn": lambda num_classes, in_channels: SmallCNN(num_classes, in_channels),
}


def build_model(
    arch: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    input_shape: Sequence[int],
) -> nn.Sequential:
    """``arch`` (one of ARCHITECTURES) behind a Standardize layer with the dataset's channel
    statistics; input_shape is (C, H, W) of pixel-scale images."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    model = nn.Sequential(Standardize(mean, std), ARCHITECTURES[arch](num_classes, input_shape[0]))
    with torch.no_grad():  # materialize lazy layers so that the model has a fixed state dict
        model.eval()(torch.zeros(1, *input_shape))
    return model
