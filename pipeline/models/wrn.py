"""Wide residual networks (Zagoruyko & Komodakis, 2016), CIFAR variant as in CRD / mdistiller.

``wrn_D_W``: depth D = 6n + 4, widen factor W; three stages of n pre-activation blocks with widths
16W, 32W, 64W. Changes from the reference: ``in_channels`` for the stem and an adaptive average
pool in place of ``avg_pool2d(8)``, so the input size does not matter; dropout is off (as in every
distillation recipe), which also keeps the exported graph free of training-only ops.
"""

from __future__ import annotations

import torch
from torch import nn


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 plus the input (1×1-projected when the shape changes)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.equal_in_out = in_planes == out_planes
        self.shortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        # As in the reference: the pre-activated input is projected when widths differ,
        # the raw input is added otherwise.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = self._stage(widths[0], widths[1], n, stride=1)
        self.block2 = self._stage(widths[1], widths[2], n, stride=2)
        self.block3 = self._stage(widths[2], widths[3], n, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    @staticmethod
    def _stage(in_planes: int, out_planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [PreActBlock(in_planes, out_planes, stride)]
        blocks += [PreActBlock(out_planes, out_planes, 1) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))  # (B, 64W, H/4, W/4)
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, K)


def wrn_16_2(
    num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)
) -> WideResNet:
    del image_size  # any size: the pool is adaptive
    return WideResNet(16, 2, num_classes, in_channels)


def wrn_40_1(
    num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)
) -> WideResNet:
    del image_size  # any size: the pool is adaptive
    return WideResNet(40, 1, num_classes, in_channels)


def wrn_40_2(
    num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)
) -> WideResNet:
    del image_size  # any size: the pool is adaptive
    return WideResNet(40, 2, num_classes, in_channels)
