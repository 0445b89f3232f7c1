"""The model zoo: CIFAR-style teachers and students of the distillation papers, plus test models.

Every entry of ``MODELS`` is a factory ``(num_classes, in_channels, image_size) -> nn.Module``
returning logits ``(B, num_classes)`` for inputs ``(B, in_channels, H, W)``. The architectures
follow the CRD / mdistiller CIFAR code; each is adapted to the input's channels, and ends with an
adaptive average pool so 1×28×28 (Fashion-MNIST) and 3×32×32 (CIFAR) both work. None has
data-dependent control flow, so all export to ONNX with a dynamic batch axis.

    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=28)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.errors import ModelError
from pipeline.models.checkpoint import (
    Checkpoint,
    load_model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pipeline.models.mobilenetv2 import mobilenetv2
from pipeline.models.resnet import resnet8x4, resnet20, resnet32, resnet32x4, resnet56, resnet110
from pipeline.models.shufflenetv2 import shufflenetv2
from pipeline.models.small import mlp, small_cnn
from pipeline.models.vgg import VGG, vgg8, vgg13
from pipeline.models.wrn import wrn_16_2, wrn_40_1, wrn_40_2

ModelFactory = Callable[[int, int, tuple[int, int]], nn.Module]

#: name → factory(num_classes, in_channels, image_size). Names as in METHODS.md's pairs.
MODELS: dict[str, ModelFactory] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg13": vgg13,
    "MobileNetV2": mobilenetv2,
    "ShuffleNetV2": shufflenetv2,
    "small_cnn": small_cnn,
    "mlp": mlp,
}

#: Smallest input side a model accepts (default 1: strided convs on a 1-pixel map stay 1 pixel).
_MIN_SIZE: dict[str, int] = {"vgg8": VGG.min_size, "vgg13": VGG.min_size}


def list_models() -> list[str]:
    """The registered model names, in registry order."""
    return list(MODELS)


def _size_pair(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    if len(image_size) == 2 and all(isinstance(s, int) for s in image_size):
        return (int(image_size[0]), int(image_size[1]))
    raise ModelError(f"image_size must be an int or (H, W), got {image_size!r}")


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | tuple[int, int] = 32,
) -> nn.Module:
    """Build a registered model, in training mode, for ``(B, in_channels, H, W)`` inputs.

    Args:
        name: a key of ``MODELS``.
        num_classes: K, the width of the logits.
        in_channels: C of the input images (1 for Fashion-MNIST, 3 for CIFAR).
        image_size: H = W, or (H, W). Only the MLP's size is fixed by it; VGG uses it to decide
            its fourth max pool and needs at least 8 pixels.

    Raises:
        ModelError: an unknown name (the message lists the known ones) or an invalid size.
    """
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    size = _size_pair(image_size)
    if num_classes < 1 or in_channels < 1:
        raise ModelError(
            f"model {name}: num_classes and in_channels must be ≥ 1, got {num_classes}, "
            f"{in_channels}"
        )
    min_size = _MIN_SIZE.get(name, 1)
    if min(size) < min_size:
        raise ModelError(
            f"model {name} needs images of at least {min_size}×{min_size} pixels, got "
            f"{size[0]}×{size[1]}; choose a model without max pools (e.g. resnet20)"
        )
    return MODELS[name](num_classes, in_channels, size)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (the figure the papers' tables report)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "MODELS",
    "Checkpoint",
    "build_model",
    "count_parameters",
    "list_models",
    "load_model_from_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]
