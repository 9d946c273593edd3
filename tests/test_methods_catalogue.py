"""SmoothGrad-squared, VarGrad and feature ablation against Captum on real brain MRI; 3D runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medlens import explain
from medlens.methods.ablation import FeatureAblation, segments_for
from medlens.methods.noise_tunnel import SmoothGradSquared, VarGrad

from conftest import shared_path


@pytest.fixture(scope="module")
def mri():
    from PIL import Image

    path = sorted((shared_path("brain-tumor-mri") / "glioma").glob("*.jpg"))[0]
    img = torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)
    return torch.nn.functional.interpolate(img[None, None], size=(48, 48), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("kind", ["smoothgrad_sq", "vargrad"])
def test_second_moment_noise_tunnels_equal_captum(grey_resnet, mri, kind):
    from captum.attr import NoiseTunnel, Saliency

    cls = SmoothGradSquared if kind == "smoothgrad_sq" else VarGrad
    method = cls(samples=6, stdev=0.2, seed=11, batch_size=4)
    out = explain(grey_resnet, mri, method, target=1)
    torch.manual_seed(11)  # Captum draws from the global generator
    theirs = NoiseTunnel(Saliency(grey_resnet)).attribute(mri, nt_type=kind, nt_samples=6, stdevs=0.2, target=1)
    torch.testing.assert_close(out.info["attributions"][:, 0], theirs, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(out.raw[:, 0], theirs[:, 0], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("segments", ["grid", "slic"])
def test_feature_ablation_equals_captum(grey_resnet, mri, segments):
    from captum.attr import FeatureAblation as CaptumFA

    x = torch.cat([mri, mri.flip(-1)])
    opts = dict(patch=8) if segments == "grid" else dict(n_segments=30)
    method = FeatureAblation(segments=segments, batch_size=16, **opts)
    out = explain(grey_resnet, x, method, target=torch.tensor([[0], [2]]))
    seg = segments_for(x, {"segments": segments, "patch": 8, "n_segments": 30})
    for i, t in enumerate((0, 2)):
        theirs = CaptumFA(grey_resnet).attribute(x[i : i + 1], target=t, feature_mask=seg[i][None, None])
        torch.testing.assert_close(out.raw[i, 0], theirs[0, 0], rtol=1e-4, atol=1e-5)


def test_methods_run_in_3d():
    from medlens.models import build_model

    torch.manual_seed(0)
    model = build_model("medlens.models:phantom_net", num_classes=2, in_channels=1, spatial_dims=3).eval()
    x = torch.rand(2, 1, 12, 12, 12)
    for name, opts in (("smoothgrad-sq", dict(samples=3)), ("vargrad", dict(samples=3)),
                       ("feature-ablation", dict(patch=4)), ("feature-ablation", dict(segments="slic", n_segments=8)),
                       ("shapley-sampling", dict(patch=6, samples=2)), ("gradient-shap", dict(samples=3, stdev=0.05))):
        out = explain(model, x, name, **opts)
        assert out.maps.shape == (2, 1, 12, 12, 12) and torch.isfinite(out.maps).all(), name


def test_shapley_sampling_equals_captum(grey_resnet, mri):
    from captum.attr import ShapleyValueSampling

    from medlens.methods.shap import ShapleySampling

    method = ShapleySampling(patch=12, samples=3, seed=4, batch_size=32)
    out = explain(grey_resnet, mri, method, target=1)
    seg = segments_for(mri, {"segments": "grid", "patch": 12})
    torch.manual_seed(4)
    theirs = ShapleyValueSampling(grey_resnet).attribute(mri, target=1, feature_mask=seg[:, None], n_samples=3,
                                                         perturbations_per_eval=16)
    torch.testing.assert_close(out.raw[0, 0], theirs[0, 0], rtol=1e-4, atol=1e-5)
    # efficiency: the segment values sum to f(x) - f(baseline) for every order
    with torch.no_grad():
        gap = grey_resnet(mri)[0, 1] - grey_resnet(torch.zeros_like(mri))[0, 1]
    assert abs(float(out.raw[0, 0][::12, ::12].sum()) - float(gap)) < 1e-3


def test_gradient_shap_equals_captum_under_shared_draws(grey_resnet, mri):
    from captum.attr import GradientShap

    from medlens.methods.shap import GradientSHAP

    gen = torch.Generator().manual_seed(0)
    baselines = torch.rand(5, 1, 48, 48, generator=gen) * 0.2
    samples = 6
    np.random.seed(9)  # Captum: the baseline indices, then the alphas, from NumPy
    index = np.random.choice(5, samples)
    alphas = np.random.uniform(0.0, 1.0, samples)
    method = GradientSHAP(baselines=baselines, samples=samples, stdev=0.1, seed=9, batch_size=4,
                          baseline_index=torch.from_numpy(index), alphas=torch.from_numpy(alphas).float())
    out = explain(grey_resnet, mri, method, target=2)
    np.random.seed(9)
    torch.manual_seed(9)
    theirs = GradientShap(grey_resnet).attribute(mri, baselines=baselines, n_samples=samples, stdevs=0.1, target=2)
    torch.testing.assert_close(out.info["attributions"][:, 0], theirs, rtol=1e-4, atol=1e-6)
