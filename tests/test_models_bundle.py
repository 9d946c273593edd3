"""``bundle:<folder>``: a MONAI bundle written here (a small 2D UNet, configs/inference.json,
metadata, models/model.pt or model.safetensors) built by monai.bundle.ConfigParser, its weights
loaded safely, its preprocessing transforms applied, and its segmentation explained over regions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medlens import explain
from medlens.cli import app
from medlens.errors import MedlensError
from medlens.models import build_model, save_weights
from medlens.models.bundle import load_bundle

NETWORK = {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
PREPROCESSING = {
    "_target_": "Compose",
    "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "ScaleIntensityd", "keys": "@image_key", "minv": -1.0, "maxv": 1.0},
        {"_target_": "Resized", "keys": "@image_key", "spatial_size": [64, 64]},
    ],
}


def write_bundle(root: Path, weights: str = "model.pt") -> tuple[Path, torch.nn.Module]:
    """A bundle folder with a seeded UNet's state dict; returns (folder, the network written)."""
    from monai.networks.nets import UNet

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    config = {"image_key": "image", "bundle_root": ".", "device": "$torch.device('cpu')", "network_def": NETWORK,
              "network": "$@network_def.to(@device)", "preprocessing": PREPROCESSING}
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    meta = {"version": "0.1.0", "network_data_format": {"outputs": {"pred": {"type": "image", "num_channels": 2,
            "channel_def": {"0": "background", "1": "lesion"}}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    net = UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"}).eval()
    if weights.endswith(".safetensors"):
        save_weights(net, root / "models" / weights)
    else:
        torch.save(net.state_dict(), root / "models" / weights)
    return root, net


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    return write_bundle(tmp_path_factory.mktemp("bundle") / "unet_bundle")


def test_bundle_builds_network_def_with_its_weights_and_preprocessing(bundle):
    root, written = bundle
    net = build_model(f"bundle:{root}")
    assert type(net).__name__ == "UNet" and not net.training
    for key, value in written.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    prep = net.preprocessing
    assert prep.class_names == ["background", "lesion"]
    image = torch.rand(1, 40, 48) * 0.5 + 0.2
    out = prep(image)
    assert out.shape == (1, 64, 64) and type(out) is torch.Tensor
    from monai.transforms import Compose, Resize, ScaleIntensity

    expected = Compose([ScaleIntensity(minv=-1.0, maxv=1.0), Resize((64, 64))])(image)
    assert torch.allclose(out, torch.as_tensor(expected), atol=1e-6) and float(out.min()) < -0.99


def test_bundle_weights_from_safetensors_and_refusals(tmp_path):
    root, written = write_bundle(tmp_path / "st", "model.safetensors")
    net = load_bundle(str(root))
    assert torch.equal(net.state_dict()["model.0.conv.unit0.conv.weight"], written.state_dict()["model.0.conv.unit0.conv.weight"])
    pickled, _ = write_bundle(tmp_path / "pickled")
    torch.save(written, pickled / "models" / "model.pt")  # a whole pickled module, not a state dict
    with pytest.raises(MedlensError, match="refused to unpickle"):
        build_model(f"bundle:{pickled}")
    (pickled / "models" / "model.pt").rename(pickled / "models" / "model.ts")
    with pytest.raises(MedlensError, match="TorchScript"):
        build_model(f"bundle:{pickled}")
    with pytest.raises(MedlensError, match="no such folder"):
        build_model("bundle:spleen_ct_segmentation")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedlensError, match="configs/inference.json"):
        build_model(f"bundle:{tmp_path / 'empty'}")


def test_bundle_segmentation_is_explained_over_regions(bundle):
    root, _ = bundle
    net = build_model(f"bundle:{root}")
    x = torch.stack([net.preprocessing(torch.rand(1, 48, 40, generator=torch.Generator().manual_seed(i))) for i in range(2)])
    assert x.shape == (2, 1, 64, 64)
    top = explain(net, x, "gradcam", target=1, region=((0, 0), (16, 64))).maps
    mask = torch.zeros(64, 64)
    mask[40:, 20:50] = 1
    bottom = explain(net, x, "gradcam", target=1, region=mask).maps
    whole = explain(net, x, "saliency", target="all").maps
    assert top.shape == bottom.shape == (2, 1, 64, 64) and whole.shape == (2, 2, 64, 64)
    assert torch.isfinite(top).all() and torch.isfinite(bottom).all()
    assert not torch.allclose(top, bottom)


def test_cli_explains_a_bundle_with_its_own_transforms(bundle, tmp_path):
    root, _ = bundle
    png = tmp_path / "slice.png"
    Image.fromarray((np.random.default_rng(0).random((50, 44)) * 255).astype(np.uint8)).save(png)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", f"bundle:{root}", "none", str(png), "-m", "gradcam", "-t", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    maps = list(out.rglob("*.npy"))
    assert maps and np.load(maps[0]).shape[-2:] == (50, 44)  # written back at the input's own size
    assert "lesion" in (out / "index.html").read_text()
