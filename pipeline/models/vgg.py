"""VGG with batch norm for CIFAR (Simonyan & Zisserman, 2015), as in CRD / mdistiller.

``vgg8`` is configuration "S" (one conv per stage), ``vgg13`` configuration "B" (two); the
reference's ``vgg8``/``vgg13`` keys both mean the ``_bn`` variants. Five conv stages; max pools
after stages 0-2 (and after stage 3 only for inputs of 64 px or more, as the reference does for
64×64), then a global average pool and one linear layer. The pool-3 decision is taken from
``image_size`` at build time, not from the tensor, so the exported graph has no branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CFG: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _stage(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
        ]
        in_channels = w
    # The stage's last ReLU is applied in forward(), as in the reference (its pre-activations
    # are the features some methods read).
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    #: Smallest input side: three 2×2 max pools must leave at least one pixel.
    min_size = 8

    def __init__(
        self, cfg: list[list[int]], num_classes: int, in_channels: int, image_size: int
    ) -> None:
        super().__init__()
        self.block0 = _stage(cfg[0], in_channels)
        self.block1 = _stage(cfg[1], cfg[0][-1])
        self.block2 = _stage(cfg[2], cfg[1][-1])
        self.block3 = _stage(cfg[3], cfg[2][-1])
        self.block4 = _stage(cfg[4], cfg[3][-1])
        self.pool = nn.MaxPool2d(2, 2)
        self.pool3: nn.Module = nn.MaxPool2d(2, 2) if image_size >= 64 else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.block0(x)))  # (B, 64, H/2, W/2)
        x = self.pool(F.relu(self.block1(x)))  # (B, 128, H/4, W/4)
        x = self.pool(F.relu(self.block2(x)))  # (B, 256, H/8, W/8)
        x = self.pool3(F.relu(self.block3(x)))
        x = F.relu(self.block4(x))  # (B, 512, h, w)
        return self.classifier(torch.flatten(self.avgpool(x), 1))  # (B, K)


def vgg8(num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)) -> VGG:
    return VGG(_CFG["S"], num_classes, in_channels, min(image_size))


def vgg13(num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)) -> VGG:
    return VGG(_CFG["B"], num_classes, in_channels, min(image_size))
