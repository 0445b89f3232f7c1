"""MobileNetV2 (Sandler et al., 2018), the CIFAR "mobile_half" of CRD / mdistiller.

Expansion T = 6, width multiplier 0.5, stride-2 stem, last 1×1 conv to 1280 channels. As in the
reference every inverted residual has its 1×1 expansion conv, even with expansion 1. Changes:
``in_channels`` for the stem, an adaptive average pool for the reference's size-specific
``AvgPool2d(input_size // 16, ceil_mode=True)`` (the same thing at 32 px), no assert on 32 | size.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1×1 expand - 3×3 depthwise - 1×1 linear projection; identity skip when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self, num_classes: int, in_channels: int = 3, expand: int = 6, width: float = 0.5
    ) -> None:
        super().__init__()
        setting = [  # expansion t, channels c, repeats n, first stride s
            (1, 16, 1, 1),
            (expand, 24, 2, 1),
            (expand, 32, 3, 2),
            (expand, 64, 4, 2),
            (expand, 96, 3, 1),
            (expand, 160, 3, 2),
            (expand, 320, 1, 1),
        ]
        channels = int(32 * width)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        blocks: list[nn.Module] = []
        for t, c, n, s in setting:
            out = int(c * width)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(channels, out, stride, t))
                channels = out
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.blocks(self.conv1(x)))  # (B, 1280, H/16, W/16)
        return self.classifier(torch.flatten(self.avgpool(x), 1))  # (B, K)


def mobilenetv2(
    num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)
) -> MobileNetV2:
    del image_size  # any size: the pool is adaptive
    return MobileNetV2(num_classes, in_channels)
