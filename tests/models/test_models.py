"""The model zoo: every registered model builds and runs on Fashion-MNIST and CIFAR shapes;
parameter counts match the CRD / mdistiller CIFAR-100 tables; checkpoints round-trip through
``weights_only`` loading and refuse what does not fit."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ModelError, UserError
from pipeline.models import (
    MODELS,
    build_model,
    count_parameters,
    load_model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from tests.test_bad_inputs import flip_a_tensor_bit

SHAPES = [(1, 28), (3, 32)]  # Fashion-MNIST, CIFAR

# Millions of parameters at 100 classes, 3×32×32, as in the CRD paper's / mdistiller's tables.
KNOWN_PARAMS_M = {
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "MobileNetV2": 0.81,
    "ShuffleNetV2": 1.36,
}


@pytest.mark.parametrize("channels,size", SHAPES, ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_gives_logits(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS_M))
def test_parameter_counts_match_the_papers(name: str) -> None:
    millions = count_parameters(build_model(name, 100, 3, 32)) / 1e6
    assert millions == pytest.approx(KNOWN_PARAMS_M[name], abs=0.006)


def test_registry_is_complete_for_the_method_pairs() -> None:
    assert set(KNOWN_PARAMS_M) | {"small_cnn", "mlp"} == set(MODELS)


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ModelError, match="unknown model 'resnet21'.*resnet20.*wrn_40_2"):
        build_model("resnet21", 10)


def test_bad_sizes_are_model_errors() -> None:
    with pytest.raises(ModelError, match="at least 8×8"):
        build_model("vgg8", 10, 1, 4)
    with pytest.raises(ModelError, match="image_size"):
        build_model("resnet20", 10, 1, (28, 28, 1))  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="num_classes"):
        build_model("resnet20", 0)
    assert issubclass(ModelError, UserError)


def test_non_square_images() -> None:
    model = build_model("mlp", 4, 1, (20, 12)).eval()
    assert model(torch.randn(2, 1, 20, 12)).shape == (2, 4)


KWARGS = {"num_classes": 10, "in_channels": 1, "image_size": 28}


def _trained_ish(name: str = "resnet20") -> torch.nn.Module:
    """A model with non-default BN statistics, so a round trip that drops buffers shows."""
    torch.manual_seed(1)
    model = build_model(name, **KWARGS)
    with torch.no_grad():
        model(torch.randn(8, 1, 28, 28) * 3 + 1)  # training-mode forward updates running stats
    return model.eval()


def test_checkpoint_round_trip(tmp_path) -> None:
    model = _trained_ish()
    path = save_checkpoint(
        tmp_path / "teacher.pt",
        model,
        model_name="resnet20",
        model_kwargs=KWARGS,
        extra={"epoch": 3, "accuracy": 0.5, "milestones": [5, 8], "note": None},
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.pt"]  # no temp file left
    # A plain dict of tensors and Python values: loadable by anyone with weights_only=True.
    raw = torch.load(path, weights_only=True)
    assert raw["model_name"] == "resnet20" and raw["model_kwargs"]["num_classes"] == 10
    loaded = load_model_from_checkpoint(path)
    assert not loaded.training
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    ckpt = read_checkpoint(path)
    assert ckpt.extra == {"epoch": 3, "accuracy": 0.5, "milestones": [5, 8], "note": None}


def _tamper(path, **changes) -> None:
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)


def test_checkpoint_of_another_model_names_keys(tmp_path) -> None:
    path = save_checkpoint(
        tmp_path / "c.pt", _trained_ish(), model_name="resnet20", model_kwargs=KWARGS
    )
    _tamper(path, model_name="resnet32")
    with pytest.raises(
        ModelError, match=r"does not fit model resnet32: missing \(72\): layer1\.3\.conv1"
    ):
        load_model_from_checkpoint(path)


def test_checkpoint_with_other_classes_names_shapes(tmp_path) -> None:
    path = save_checkpoint(
        tmp_path / "c.pt", _trained_ish(), model_name="resnet20", model_kwargs=KWARGS
    )
    _tamper(path, model_kwargs={**KWARGS, "num_classes": 100})
    with pytest.raises(ModelError, match=r"mis-shaped \(2\): fc\.weight \(10, 64\)≠\(100, 64\)"):
        load_model_from_checkpoint(path)


def test_save_refuses_a_wrong_model_name_and_non_plain_metadata(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not fit model wrn_16_2.*unexpected"):
        save_checkpoint(
            tmp_path / "c.pt", _trained_ish(), model_name="wrn_16_2", model_kwargs=KWARGS
        )
    import numpy as np

    with pytest.raises(ModelError, match=r"extra\['acc'\] is a float32"):
        save_checkpoint(
            tmp_path / "c.pt",
            _trained_ish(),
            model_name="resnet20",
            model_kwargs=KWARGS,
            extra={"acc": np.float32(0.5)},
        )
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_corrupt_checkpoints(tmp_path) -> None:
    path = save_checkpoint(
        tmp_path / "c.pt", _trained_ish("small_cnn"), model_name="small_cnn", model_kwargs=KWARGS
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_model_from_checkpoint(path)
    # One flipped bit inside a weight tensor: torch.load would load another value, silently.
    path.write_bytes(data)
    flip_a_tensor_bit(path)
    with pytest.raises(ModelError, match=r"truncated or corrupt \(the bytes of .* CRC-32"):
        load_model_from_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="not a PyTorch checkpoint"):
        load_model_from_checkpoint(path)
    with pytest.raises(ModelError, match="not found"):
        load_model_from_checkpoint(tmp_path / "missing.pt")


class _Payload:
    """Not a tensor or plain value: ``weights_only`` loading must refuse to unpickle it."""


def test_checkpoint_with_pickled_objects_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "logitbank-checkpoint", "obj": _Payload()}, path)
    with pytest.raises(ModelError, match="pickled Python objects .*it names .*_Payload"):
        read_checkpoint(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ModelError, match="not a logitbank checkpoint"):
        read_checkpoint(path)
