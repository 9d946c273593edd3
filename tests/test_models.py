"""Models by name and safe weights: real torchvision/timm/MONAI models, real files on disk."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch

from medlens.errors import MedlensError
from medlens.models import build_model, load_weights, read_state_dict, save_weights


def _outputs_equal(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_torchvision_spec_with_greyscale_input_and_class_count() -> None:
    model = build_model("torchvision:resnet18", num_classes=3, in_channels=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 3
    assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_timm_spec() -> None:
    model = build_model("timm:efficientnet_b0", num_classes=4, in_channels=1)
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 4)


def test_monai_unet_3d_with_defaults_and_overrides() -> None:
    small = build_model("monai:UNet", num_classes=3, in_channels=1, spatial_dims=3, channels=(4, 8, 16), strides=(2, 2))
    assert small.eval()(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    default = build_model("monai:UNet", num_classes=2, in_channels=1, spatial_dims=2)
    assert default.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_monai_densenet_and_factory_spec() -> None:
    dense = build_model("monai:DenseNet121", num_classes=2, in_channels=1, spatial_dims=2)
    assert dense.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 2)
    factory = build_model("torchvision.models:resnet18", num_classes=5)
    assert factory.fc.out_features == 5


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("resnet50", {}, "is not 'source:name'"),
        ("torchvision:resnt18", {}, "did you mean resnet18"),
        ("timm:efficientnet_b99", {}, "unknown timm model"),
        ("monai:UNett", {}, "did you mean UNet"),
        ("no_such_package.models:net", {}, "cannot import"),
        ("torchvision:resnet18", {"weights": "IMAGENET1K_V1"}, "never downloads"),
        ("timm:resnet18", {"pretrained": True}, "never downloads"),
    ],
)
def test_bad_specs_are_one_line_errors(spec: str, kwargs: dict, message: str) -> None:
    with pytest.raises(MedlensError, match=message) as info:
        build_model(spec, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    trained = build_model("torchvision:resnet18", num_classes=3, in_channels=1)
    with torch.no_grad():
        trained.fc.bias.add_(1.0)
    path = save_weights(trained, tmp_path / f"weights{suffix}")
    fresh = load_weights(build_model("torchvision:resnet18", num_classes=3, in_channels=1), path)
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert _outputs_equal(trained, fresh, torch.randn(2, 1, 32, 32))
    assert [p.name for p in tmp_path.iterdir()] == [f"weights{suffix}"]  # no temporary file left behind


def test_lightning_checkpoint_is_unwrapped(tmp_path: Path) -> None:
    trained = build_model("torchvision:resnet18", num_classes=2)
    ckpt = {
        "epoch": 3,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()} | {"loss.weight": torch.ones(2)},
        "optimizer_states": [],
    }
    torch.save(ckpt, tmp_path / "best.ckpt")
    fresh = load_weights(build_model("torchvision:resnet18", num_classes=2), tmp_path / "best.ckpt")
    assert _outputs_equal(trained, fresh, torch.randn(1, 3, 32, 32))


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": Fraction(1, 3)}, path)
    with pytest.raises(MedlensError, match=r"evil\.pth: refused to unpickle, it pickles fractions\.Fraction"):
        read_state_dict(path)


def test_mismatched_weights_list_keys_and_shapes(tmp_path: Path) -> None:
    state = build_model("torchvision:resnet18", num_classes=3).state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "other.safetensors"
    save_weights(state, path)
    target = build_model("torchvision:resnet18", num_classes=5)
    with pytest.raises(MedlensError) as info:
        load_weights(target, path)
    message = str(info.value)
    assert "other.safetensors does not fit ResNet" in message
    assert "missing 1: fc.bias" in message and "unexpected 1: extra.weight" in message
    assert "fc.weight (5, 512) vs (3, 512)" in message and "\n" not in message
    state.pop("fc.weight")
    save_weights(state, path)
    before = target.fc.weight.clone()
    load_weights(target, path, strict=False)  # a head left out is fine when not strict
    assert torch.equal(target.fc.weight, before)
    assert torch.equal(target.conv1.weight, state["conv1.weight"])


def test_missing_and_damaged_files(tmp_path: Path) -> None:
    model = build_model("torchvision:resnet18", num_classes=2)
    with pytest.raises(MedlensError, match="nothing.pth not found"):
        load_weights(model, tmp_path / "nothing.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(MedlensError, match="cut.safetensors: not a readable safetensors file"):
        load_weights(model, tmp_path / "cut.safetensors")
    save_weights(model, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(MedlensError, match="half.pth: not a readable torch file"):
        load_weights(model, tmp_path / "half.pth")
