"""Kernel SHAP and LIME over regions: Captum (KernelShap, Lime) on shared coalitions, exact
Shapley values by enumeration, efficiency, 3D supervoxels, bad options; real brain MRI and a
real hippocampus volume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medlens import explain
from medlens.errors import MedlensError
from medlens.methods.ablation import grid_segments, segments_for
from medlens.methods.surrogate import (LIME, KernelSHAP, consecutive_regions, lime_coalitions,
                                       shapley_kernel_coalitions)

from conftest import shared_path


@pytest.fixture(scope="module")
def mri() -> torch.Tensor:
    """(2, 1, 64, 64) two real brain MRI slices (glioma, meningioma) in [0, 1]."""
    from PIL import Image

    root = shared_path("brain-tumor-mri")
    paths = [sorted((root / kind).glob("*.jpg"))[0] for kind in ("glioma", "meningioma")]
    imgs = [torch.from_numpy(np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0) for p in paths]
    return torch.cat([nn.functional.interpolate(i[None, None], size=(64, 64), mode="bilinear", align_corners=False) for i in imgs])


def replay(rows: torch.Tensor):
    """A Captum perturb_func generator that yields our coalitions (1, F) one by one."""
    def generate(_inputs, **_kwargs):
        for row in rows.long():
            yield row[None]
    return generate


def slic_regions(x: torch.Tensor, n: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seg = segments_for(x, {"segments": "slic", "n_segments": n})
    labels, counts = consecutive_regions(seg)
    return labels.view(seg.shape), counts, seg


def test_kernel_shap_equals_captum_on_shared_coalitions(grey_resnet, mri):
    from captum.attr import KernelShap

    labels, counts, _ = slic_regions(mri, 12)
    z = shapley_kernel_coalitions(counts, 48, torch.Generator().manual_seed(3))
    out = explain(grey_resnet, mri, KernelSHAP(segments=labels, coalitions=z, batch_size=32), target=torch.tensor([[0], [2]]))
    for i, t in enumerate((0, 2)):
        f = int(counts[i])
        ks = KernelShap(grey_resnet)
        ks.perturb_func = replay(z[i, :, :f])
        coef = ks.attribute(mri[i : i + 1], target=t, feature_mask=labels[i][None, None], n_samples=48,
                            perturbations_per_eval=16, return_input_shape=False).flatten()
        torch.testing.assert_close(out.info["coefficients"][i, 0, :f], coef, rtol=0, atol=1e-4)
        torch.testing.assert_close(out.raw[i, 0], coef[labels[i]], rtol=0, atol=1e-4)  # Captum's input-shape map
        assert float(coef.abs().max()) > 1e-3  # a real, non-trivial attribution


@pytest.mark.parametrize("distance, width, alpha", [("cosine", 1.0, 1.0), ("euclidean", 20.0, 0.1)])
def test_lime_equals_captum_ridge_on_shared_coalitions(grey_resnet, mri, distance, width, alpha):
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime
    from captum.attr._core.lime import get_exp_kernel_similarity_function

    labels, counts, _ = slic_regions(mri, 12)
    z = lime_coalitions(counts, 40, torch.Generator().manual_seed(5))
    method = LIME(segments=labels, coalitions=z, batch_size=32, distance=distance, kernel_width=width, alpha=alpha)
    out = explain(grey_resnet, mri, method, target=torch.tensor([[1], [2]]))
    for i, t in enumerate((1, 2)):
        f = int(counts[i])
        lime = Lime(grey_resnet, interpretable_model=SkLearnRidge(alpha=alpha),
                    similarity_func=get_exp_kernel_similarity_function(distance, width), perturb_func=replay(z[i, :, :f]))
        coef = lime.attribute(mri[i : i + 1], target=t, feature_mask=labels[i][None, None], n_samples=40,
                              perturbations_per_eval=16, return_input_shape=False)
        torch.testing.assert_close(out.info["coefficients"][i, 0, :f], coef.flatten(), rtol=0, atol=1e-4)


def test_seeded_draws_follow_the_shapley_kernel_and_are_reproducible(grey_resnet, mri):
    counts = torch.tensor([10, 7])
    z = shapley_kernel_coalitions(counts, 20002, torch.Generator().manual_seed(0))
    assert z[:, 0].sum(-1).tolist() == [10, 7] and z[:, 1].sum().item() == 0
    assert not z[1, :, 7:].any()  # padded regions never join
    for i, f in enumerate((10, 7)):
        sizes = z[i, 2:].sum(-1)
        p = torch.tensor([1 / (k * (f - k)) for k in range(1, f)])
        freq = torch.bincount(sizes, minlength=f)[1:f].double() / sizes.numel()
        assert (freq - p / p.sum()).abs().max() < 0.01
        member = z[i, 2:, :f].double().mean(0)  # uniform membership given the size: every region alike
        assert (member - member.mean()).abs().max() < 0.02
    x = mri[:1]
    seeded = explain(grey_resnet, x, "kernel-shap", target=1, patch=16, samples=24, seed=7, batch_size=64)
    labels, counts = consecutive_regions(grid_segments((64, 64), 16)[None])
    given = shapley_kernel_coalitions(counts, 24, torch.Generator().manual_seed(7))
    replayed = explain(grey_resnet, x, "kernel-shap", target=1, patch=16, coalitions=given, batch_size=7)
    torch.testing.assert_close(seeded.raw, replayed.raw, rtol=0, atol=1e-5)
    other = explain(grey_resnet, x, "lime", target=1, patch=16, samples=24, seed=8)
    again = explain(grey_resnet, x, "lime", target=1, patch=16, coalitions=lime_coalitions(counts, 24, torch.Generator().manual_seed(8)))
    torch.testing.assert_close(other.raw, again.raw, rtol=0, atol=1e-5)


def brute_force_shapley(model: nn.Module, x: torch.Tensor, seg: torch.Tensor, target: int, baseline: float) -> torch.Tensor:
    """Shapley values of the M regions of one image (1, C, *S) from the definition, by enumeration."""
    m = int(seg.max()) + 1
    codes = torch.arange(2**m)
    bits = ((codes[:, None] >> torch.arange(m)) & 1).bool()  # (2^M, M)
    keep = bits[:, seg.flatten()].view(-1, 1, *x.shape[2:])
    with torch.no_grad():
        v = torch.cat([model(torch.where(k, x, torch.full_like(x, baseline)))[:, target] for k in keep.split(128)]).double()
    phi = torch.zeros(m, dtype=torch.float64)
    size = bits.sum(1)
    for j in range(m):
        without = ~bits[:, j]
        s = size[without]
        weight = torch.tensor([math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m) for k in s.tolist()])
        phi[j] = (weight * (v[codes[without] | (1 << j)] - v[codes[without]])).sum()
    return phi


def test_exhaustive_kernel_shap_is_the_exact_shapley_value(grey_resnet, mri):
    x = nn.functional.interpolate(mri[:1], size=(48, 48), mode="bilinear", align_corners=False)
    seg = grid_segments((48, 48), 16) % 7  # 7 regions (two of them in two pieces): all 128 coalitions
    out = explain(grey_resnet, x, "kernel-shap", target=2, segments=seg, samples=128, baseline=0.1, batch_size=64)
    exact = brute_force_shapley(grey_resnet, x, seg, 2, 0.1)
    torch.testing.assert_close(out.info["coefficients"][0, 0].double(), exact, rtol=0, atol=1e-4)
    assert float(exact.abs().max()) > 1e-3
    with torch.no_grad():
        gap = grey_resnet(x)[0, 2] - grey_resnet(torch.full_like(x, 0.1))[0, 2]
    assert abs(float(exact.sum()) - float(gap)) < 1e-4


def test_on_a_linear_model_both_recover_w_times_x_minus_baseline_per_region(mri):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64 * 64, 3)).eval()
    baseline = 0.3
    seg = grid_segments((64, 64), 16)  # 16 regions
    w = model[1].weight.detach().view(3, 64, 64)
    truth = torch.zeros(2, 16).index_add_(1, seg.flatten(), (w[1] * (mri[:, 0] - baseline)).flatten(1))
    for method, opts in (("kernel-shap", dict(samples=60)), ("lime", dict(samples=60, alpha=0.0))):
        out = explain(model, mri, method, target=1, patch=16, baseline=baseline, seed=2, **opts)
        torch.testing.assert_close(out.info["coefficients"][:, 0], truth, rtol=0, atol=1e-4)
    small = grid_segments((64, 64), 32)  # 4 regions: every coalition, Shapley-kernel weighted
    exact = torch.zeros(2, 4).index_add_(1, small.flatten(), (w[1] * (mri[:, 0] - baseline)).flatten(1))
    out = explain(model, mri, "kernel-shap", target=1, segments=small, samples=16, baseline=baseline)
    torch.testing.assert_close(out.info["coefficients"][:, 0], exact, rtol=0, atol=1e-4)


def test_sampled_kernel_shap_is_efficient_for_every_target(grey_resnet, mri):
    targets = torch.tensor([[0, 1], [2, 1]])
    out = explain(grey_resnet, mri, "kernel-shap", target=targets, segments="slic", n_segments=30, samples=50, seed=1)
    with torch.no_grad():
        gap = (grey_resnet(mri) - grey_resnet(torch.zeros_like(mri))).gather(1, targets)
    torch.testing.assert_close(out.info["coefficients"].sum(-1), gap, rtol=0, atol=1e-4)
    labels, _, _ = slic_regions(mri, 30)
    for i in range(2):  # one value per superpixel
        for r in labels[i].unique()[:5]:
            assert out.raw[i, 0][labels[i] == r].unique().numel() == 1


def test_3d_supervoxels_on_a_real_hippocampus_volume(hippocampus):
    from medlens.io.nifti import read_nifti
    from medlens.models import build_model

    vol = read_nifti(sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[0]).image
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    x = nn.functional.interpolate(vol[None], size=(16, 16, 16), mode="trilinear", align_corners=False)
    torch.manual_seed(0)
    model = build_model("medlens.models:phantom_net", num_classes=2, in_channels=1, spatial_dims=3).eval()
    shap = explain(model, x, "kernel-shap", target=1, segments="slic", n_segments=12, samples=64, batch_size=32)
    lime = explain(model, x, "lime", target=1, segments="slic", n_segments=12, samples=48)
    seg = segments_for(x, {"segments": "slic", "n_segments": 12})
    assert shap.maps.shape == lime.maps.shape == (1, 1, 16, 16, 16) and seg.unique().numel() > 3
    assert torch.isfinite(shap.raw).all() and torch.isfinite(lime.raw).all()
    with torch.no_grad():
        gap = model(x)[0, 1] - model(torch.zeros_like(x))[0, 1]
    assert abs(float(shap.info["coefficients"].sum()) - float(gap)) < 1e-4
    for r in seg.unique():  # one value per supervoxel
        assert shap.raw[0, 0][seg[0] == r].unique().numel() == 1


@pytest.mark.parametrize("build", [
    lambda: KernelSHAP(samples=1), lambda: KernelSHAP(batch_size=0), lambda: KernelSHAP(segments="quickshift"),
    lambda: KernelSHAP(n_segments=0), lambda: KernelSHAP(patch=0), lambda: KernelSHAP(coalitions=torch.rand(4, 3)),
    lambda: LIME(kernel_width=0.0), lambda: LIME(alpha=-1.0), lambda: LIME(distance="manhattan"),
    lambda: LIME(samples="many"), lambda: LIME(segments=torch.rand(8, 8)), lambda: LIME(compactness=0.0),
])
def test_bad_options_are_refused_when_built(build):
    with pytest.raises(MedlensError):
        build()


def test_coalitions_of_the_wrong_width_are_refused(grey_resnet, mri):
    with pytest.raises(MedlensError, match="coalitions"):
        explain(grey_resnet, mri, "kernel-shap", patch=32, coalitions=torch.ones(5, 3))


@pytest.mark.parametrize("method", ["kernel-shap", "lime"])
def test_per_image_segmentation_regions_follow_their_image_across_chunks(method):
    """On a U-Net, image b's coalitions pool over region b even when a chunk mixes images: the
    batch equals each image explained alone with its own region and coalitions."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    x = torch.randn(2, 1, 12, 12)
    region = torch.zeros(2, 1, 12, 12)
    region[0, 0, :4, :4] = 1
    region[1, 0, 7:, 7:] = 1
    _, counts = consecutive_regions(grid_segments((12, 12), 4).expand(2, 12, 12))
    z = (shapley_kernel_coalitions if method == "kernel-shap" else lime_coalitions)(counts, 30, torch.Generator().manual_seed(1))
    batched = explain(unet, x, method, target="all", region=region, patch=4, coalitions=z, batch_size=7)
    for b in range(2):
        alone = explain(unet, x[b : b + 1], method, target="all", region=region[b : b + 1], patch=4, coalitions=z[b : b + 1])
        torch.testing.assert_close(batched.raw[b], alone.raw[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched.raw[0], batched.raw[1])
