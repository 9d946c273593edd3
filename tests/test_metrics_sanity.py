"""Adebayo et al.'s parameter randomisation on a real torchvision ResNet: Grad-CAM's maps change,
an input-only edge detector is flagged, the user's model is untouched; Spearman/SSIM vs SciPy/skimage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import medlens
from medlens.core.engine import Context, Method
from medlens.errors import MedlensError
from medlens.metrics import max_sensitivity, method_explainer, model_randomisation, spearman, ssim
from medlens.metrics.sanity import randomisation_units


class EdgeDetector(Method):
    """A 'method' that ignores the model: Sobel gradient magnitude of the input."""

    name = "test-edges"
    uses_layer = False
    uses_gradients = False

    def compute(self, ctx: Context) -> torch.Tensor:
        img = ctx.x.mean(dim=1, keepdim=True)
        kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=img.dtype).view(1, 1, 3, 3)
        gx, gy = F.conv2d(img, kx, padding=1), F.conv2d(img, kx.transpose(2, 3), padding=1)
        edges = (gx**2 + gy**2).sqrt()
        return edges.expand(-1, ctx.targets.shape[1], -1, -1)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.rand(2, 1, 64, 64, generator=gen), 3, 1, 1)
    return model, x


def test_gradcam_changes_and_edges_are_flagged(setup):
    model, x = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = medlens.hook_count(model)
    units = ["layer3", "layer4", "fc"]
    cam = model_randomisation(model, x, "gradcam", layer="layer3", units=units)
    edges = model_randomisation(model, x, EdgeDetector(), units=units)
    assert cam.steps == ["fc", "layer4", "layer3"]  # cascading: output first
    assert cam.spearman.shape == (3, 2) and cam.ssim.shape == (3, 2)
    assert not cam.flagged and float(cam.spearman[-1].mean()) < 0.5
    assert edges.flagged and torch.allclose(edges.spearman, torch.ones_like(edges.spearman))
    assert torch.allclose(edges.ssim, torch.ones_like(edges.ssim), atol=1e-6)
    independent = model_randomisation(model, x, "gradcam", layer="layer3", units=units, mode="independent")
    assert independent.steps == units and not independent.flagged
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert medlens.hook_count(model) == hooks and not model.training


def test_randomisation_units_of_a_resnet(setup):
    model, _ = setup
    units = randomisation_units(model)
    assert units[0] == "conv1" and units[-1] == "fc" and "layer2.1" in units and "layer2" not in units
    with pytest.raises(MedlensError, match="no such module"):
        model_randomisation(model, torch.rand(1, 1, 32, 32), "gradcam", units=["layer9"])


def test_spearman_and_ssim_agree_with_scipy_and_skimage():
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 24, 24, generator=gen)
    b = 0.6 * a + 0.4 * torch.rand(3, 24, 24, generator=gen)
    b[0] = (b[0] * 4).round() / 4  # ties
    ours = spearman(a, b)
    theirs = [spearmanr(a[i].flatten(), b[i].flatten())[0] for i in range(3)]
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)
    ref = [structural_similarity(a[i].double().numpy(), b[i].double().numpy(), data_range=1.0, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False) for i in range(3)]
    np.testing.assert_allclose(ssim(a, b).numpy(), ref, atol=1e-6)
    vol = torch.rand(1, 16, 16, 16, generator=gen)
    ref3 = structural_similarity(vol[0].double().numpy(), (vol[0] * 0.5).double().numpy(), data_range=1.0,
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(vol, vol * 0.5).item() == pytest.approx(ref3, abs=1e-6)
    flat = torch.zeros(1, 8, 8)
    assert spearman(flat, flat).item() == 1.0 and spearman(flat, a[:1, :8, :8]).item() == 0.0


def test_max_sensitivity(setup):
    model, x = setup
    targets = torch.tensor([0, 1])
    constant = max_sensitivity(lambda xs, t: torch.ones(xs.shape[0], *xs.shape[2:]), x, targets, n_samples=3)
    assert torch.equal(constant, torch.zeros(2))
    identity = max_sensitivity(lambda xs, t: xs[:, 0], x, targets, n_samples=4, radius=0.01)
    bound = 0.01 * (64 * 64) ** 0.5 / x.flatten(1).norm(dim=1)  # ||noise|| <= r sqrt(N)
    assert (identity > 0).all() and (identity <= bound + 1e-6).all()
    cam = max_sensitivity(method_explainer(model, "gradcam", layer="layer3"), x, targets, n_samples=2)
    assert cam.shape == (2,) and torch.isfinite(cam).all()
