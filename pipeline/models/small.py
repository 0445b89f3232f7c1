"""Two tiny models for tests and smoke runs: a small CNN and an MLP.

Both build in milliseconds and export to ONNX in well under a second, so the tests of the
export and the ONNX Runtime session can use them freely.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-BN-ReLU ×2 (the second with stride 2), global average pool, linear."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))  # (B, K)


class MLP(nn.Module):
    """Flatten (C·H·W), one hidden ReLU layer, linear. Its input size is fixed at build time."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: tuple[int, int] = (28, 28),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(in_channels * image_size[0] * image_size[1], hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, K)


def small_cnn(
    num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)
) -> SmallCNN:
    del image_size  # any size: the pool is adaptive
    return SmallCNN(num_classes, in_channels)


def mlp(num_classes: int, in_channels: int = 1, image_size: tuple[int, int] = (28, 28)) -> MLP:
    return MLP(num_classes, in_channels, image_size)
