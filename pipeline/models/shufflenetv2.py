"""ShuffleNetV2 (Ma et al., 2018), the CIFAR variant of CRD / mdistiller (net size 1).

1×1 stem to 24 channels (no stride, no max pool: CIFAR images are small), three stages of a
down-sampling block plus (3, 7, 3) basic blocks with widths 116-232-464, a 1×1 conv to 1024, an
average pool, one linear layer. Changes: ``in_channels`` for the stem, an adaptive average pool in
place of ``avg_pool2d(4)``, and the channel shuffle reshapes with a -1 batch so the exported graph
takes any batch size without shape arithmetic on the batch dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    _, c, h, w = x.shape  # c, h, w are static at export; the batch stays symbolic
    return x.reshape(-1, groups, c // groups, h, w).transpose(1, 2).reshape(-1, c, h, w)


def _bn_conv(inp: int, oup: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
    )


class BasicBlock(nn.Module):
    """Split the channels in half; transform one half (1×1, depthwise 3×3, 1×1); concat; shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        c = channels - self.half
        self.branch = nn.Sequential(
            _bn_conv(c, c, 1), nn.ReLU(inplace=True), _bn_conv(c, c, 3, groups=c), _bn_conv(c, c, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.half], x[:, self.half :]
        return _shuffle(torch.cat([x1, F.relu(self.branch(x2))], 1))


class DownBlock(nn.Module):
    """Two stride-2 branches, each giving half of ``out_channels``; concat; shuffle."""

    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        mid = out // 2
        self.left = nn.Sequential(_bn_conv(inp, inp, 3, 2, groups=inp), _bn_conv(inp, mid, 1))
        self.right = nn.Sequential(
            _bn_conv(inp, mid, 1),
            nn.ReLU(inplace=True),
            _bn_conv(mid, mid, 3, 2, groups=mid),
            _bn_conv(mid, mid, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _shuffle(torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], 1))


class ShuffleNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
        blocks: tuple[int, int, int] = (3, 7, 3),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(_bn_conv(in_channels, 24, 1), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        inp = 24
        for out, n in zip(widths[:3], blocks):
            stages.append(nn.Sequential(DownBlock(inp, out), *[BasicBlock(out) for _ in range(n)]))
            inp = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(_bn_conv(inp, widths[3], 1), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.stages(self.stem(x)))  # (B, 1024, H/8, W/8)
        return self.linear(torch.flatten(self.avgpool(x), 1))  # (B, K)


def shufflenetv2(
    num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)
) -> ShuffleNetV2:
    del image_size  # any size: the pool is adaptive
    return ShuffleNetV2(num_classes, in_channels)
