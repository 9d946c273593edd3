"""Shared fixtures: the real data beside the repository, and small real models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDLENS_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (it lives beside the repository as ../shared/data)")
    return path


def tiny_timm_vit(depth: int = 2, **kwargs) -> torch.nn.Module:
    """A small timm ViT (non-square 64x48 input, 3 classes), seeded, in eval mode."""
    import timm

    torch.manual_seed(0)
    opts = dict(img_size=(64, 48), depth=depth, num_classes=3)
    opts.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **opts).eval()


def tiny_torchvision_vit() -> torch.nn.Module:
    """A small torchvision VisionTransformer (64x64, 2 layers, 2 classes), seeded, in eval mode."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=2
    ).eval()


@pytest.fixture
def brain_mri() -> Path:
    return shared_path("brain-tumor-mri")


@pytest.fixture
def hippocampus() -> Path:
    return shared_path("hippocampus")


@pytest.fixture
def chest_dicom() -> Path:
    return shared_path("chest-xray-dicom")


@pytest.fixture(scope="module")
def grey_resnet() -> torch.nn.Module:
    """A 1-channel, 3-class torchvision ResNet-18 with seeded random weights (nothing downloaded)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model.eval()


def smooth_tie_free_maps(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) maps from (B, 1, H, W) images: a 5x5 mean plus seeded 1e-4 noise, so no two
    pixels tie and every library orders them the same way."""
    gen = torch.Generator().manual_seed(3)
    return torch.nn.functional.avg_pool2d(images, 5, 1, 2)[:, 0] + 1e-4 * torch.rand(images.shape[0], *images.shape[2:], generator=gen)


def predicted_classes(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B,) the model's predicted class per image."""
    with torch.no_grad():
        return model(images).argmax(1)


class QuantusReplay:
    """A Quantus perturb_func that returns the given noisy copies, one sample per call."""

    def __init__(self, noise):
        self.noise, self.i = noise, 0

    def __call__(self, arr, indices, **kwargs):
        out = arr + self.noise[self.i].reshape(arr.shape).numpy()
        self.i += 1
        return out


def grey_mri_slices(per_class: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` brain MRI JPEGs of each class (glioma, meningioma, pituitary) from
    ../shared/data as greyscale (N, 1, size, size) in [0, 1] (bilinear), and their classes (N,);
    skips the test when the data is absent."""
    import numpy as np
    from PIL import Image

    root = shared_path("brain-tumor-mri")
    out, labels = [], []
    for c, cls in enumerate(("glioma", "meningioma", "pituitary")):
        for path in sorted((root / cls).glob("*.jpg"))[:per_class]:
            img = torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)
            out.append(torch.nn.functional.interpolate(img[None, None], size=(size, size), mode="bilinear",
                                                       align_corners=False)[0])
            labels.append(c)
    return torch.stack(out), torch.tensor(labels)
