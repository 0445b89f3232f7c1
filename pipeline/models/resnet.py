"""CIFAR-style ResNets (He et al., 2016), as in the CRD and mdistiller repositories.

Depth 6n + 2 with basic blocks in three stages of n blocks; ``resnet20/32/56/110`` use widths
16-16-32-64, ``resnet8x4/32x4`` four times that (32-64-128-256). The only changes from the
reference code: the first convolution takes ``in_channels`` and the fixed ``AvgPool2d(8)`` is an
adaptive average pool, so 1×28×28 and 3×32×32 inputs both work, and only the logits are returned.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus the (projected) input, then ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet of depth ``6n + 2`` with stage widths ``filters`` (stem, stage 1, 2, 3)."""

    def __init__(
        self, depth: int, filters: tuple[int, int, int, int], num_classes: int, in_channels: int
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = filters[0]
        self.layer1 = self._make_layer(filters[1], n, stride=1)
        self.layer2 = self._make_layer(filters[2], n, stride=2)
        self.layer3 = self._make_layer(filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, f0, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, f3, H/4, W/4)
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, K)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet20(
    num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)
) -> CifarResNet:
    del image_size  # any size: the pool is adaptive
    return CifarResNet(20, _NARROW, num_classes, in_channels)


def resnet32(
    num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)
) -> CifarResNet:
    del image_size  # any size: the pool is adaptive
    return CifarResNet(32, _NARROW, num_classes, in_channels)


def resnet56(
    num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)
) -> CifarResNet:
    del image_size  # any size: the pool is adaptive
    return CifarResNet(56, _NARROW, num_classes, in_channels)


def resnet110(
    num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)
) -> CifarResNet:
    del image_size  # any size: the pool is adaptive
    return CifarResNet(110, _NARROW, num_classes, in_channels)


def resnet8x4(
    num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)
) -> CifarResNet:
    del image_size  # any size: the pool is adaptive
    return CifarResNet(8, _WIDE, num_classes, in_channels)


def resnet32x4(
    num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)
) -> CifarResNet:
    del image_size  # any size: the pool is adaptive
    return CifarResNet(32, _WIDE, num_classes, in_channels)
