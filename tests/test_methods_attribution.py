"""Gradient attributions (SmoothGrad, Integrated Gradients, Input x Gradient, Guided Backprop,
Guided Grad-CAM) against closed forms and Captum / pytorch-grad-cam on the same models."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from monai.networks.nets import UNet
from torch import nn

from medlens import MedlensError, explain, hook_count
from medlens.methods.attribution import GuidedBackprop, GuidedGradCAM, InputXGradient, IntegratedGradients, SmoothGrad


def small_cnn(dims: int = 2, in_channels: int = 2, classes: int = 3) -> nn.Sequential:
    conv, pool = (nn.Conv2d, nn.AdaptiveAvgPool2d) if dims == 2 else (nn.Conv3d, nn.AdaptiveAvgPool3d)
    return nn.Sequential(conv(in_channels, 6, 3, padding=1), nn.ReLU(inplace=True), conv(6, 8, 3, stride=2, padding=1),
                         nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(8, classes))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


# ----------------------------------------------------------------------------- Integrated Gradients


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid", "riemann_middle"])
def test_integrated_gradients_on_a_linear_model_is_x_minus_baseline_times_w(rule: str) -> None:
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    x = torch.randn(2, 2, 6, 6)
    baseline = torch.randn(1, 2, 6, 6)
    method = IntegratedGradients(baseline=baseline, steps=5, rule=rule, internal_batch_size=3)
    out = explain(linear, x, method, target="all")
    w = linear[1].weight.detach().view(3, 2, 6, 6)
    expected = (x - baseline).unsqueeze(1) * w  # (B, K, C, H, W)
    torch.testing.assert_close(out.info["attributions"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.raw, expected.sum(2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_integrated_gradients_equals_captum_and_is_complete(dims: int) -> None:
    from captum.attr import IntegratedGradients as CaptumIG

    torch.manual_seed(dims)
    model = small_cnn(dims).eval()
    x = torch.randn(2, 2, *([10] * dims))
    method = IntegratedGradients(steps=16, internal_batch_size=7)
    out = explain(model, x, method, target=[0, 2])
    theirs = CaptumIG(model).attribute(x, target=torch.tensor([0, 2]), n_steps=16, method="gausslegendre")
    torch.testing.assert_close(out.info["attributions"][:, 0], theirs, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x))).gather(1, torch.tensor([[0], [2]]))[:, 0]
    torch.testing.assert_close(out.raw.flatten(1).sum(1), gap, rtol=2e-2, atol=2e-3)


def test_integrated_gradients_all_targets_at_once_equal_one_by_one() -> None:
    torch.manual_seed(1)
    model = small_cnn().eval()
    x = torch.randn(2, 2, 8, 8)
    both = explain(model, x, "integrated-gradients", target="all", steps=8)
    for k in range(3):
        one = explain(model, x, "integrated-gradients", target=k, steps=8)
        torch.testing.assert_close(both.raw[:, k], one.raw[:, 0], rtol=1e-4, atol=1e-6)


def test_integrated_gradients_on_a_3d_unet_region_is_complete() -> None:
    torch.manual_seed(0)
    # batch norm (affine in eval): instance norm would make the network scale-invariant, hence
    # discontinuous at the zero baseline, and no path integral from it can be complete
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch").eval()
    vol = torch.randn(1, 1, 12, 12, 12)
    box = ((2, 2, 2), (8, 8, 8))
    out = explain(unet, vol, "integrated-gradients", target=1, region=box, steps=32)
    assert out.task == "segmentation" and out.maps.shape == (1, 1, 12, 12, 12)
    with torch.no_grad():
        gap = (unet(vol) - unet(torch.zeros_like(vol)))[0, 1, 2:8, 2:8, 2:8].mean()
    torch.testing.assert_close(out.raw.sum(), gap, rtol=2e-2, atol=2e-3)


def test_bad_integration_options_say_why() -> None:
    model = small_cnn().eval()
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(MedlensError, match="unknown integration rule"):
        explain(model, x, "integrated-gradients", rule="simpson")
    with pytest.raises(MedlensError, match="does not broadcast"):
        explain(model, x, "integrated-gradients", baseline=torch.zeros(3, 3))


# ----------------------------------------------------------------------------- Input x Gradient, SmoothGrad


def test_input_x_gradient_equals_captum(resnet: nn.Module) -> None:
    from captum.attr import InputXGradient as CaptumIxG

    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    method = InputXGradient()
    out = explain(resnet, x, method, target=[1, 3])
    theirs = CaptumIxG(resnet).attribute(x, target=torch.tensor([1, 3]))
    torch.testing.assert_close(out.info["attributions"][:, 0], theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("absolute", [True, False])
def test_smoothgrad_equals_captum_noise_tunnel_with_the_same_noise(resnet: nn.Module, absolute: bool) -> None:
    from captum.attr import NoiseTunnel, Saliency

    torch.manual_seed(3)
    x = torch.randn(1, 3, 32, 32)
    method = SmoothGrad(samples=6, stdev=0.3, seed=11, absolute=absolute, batch_size=4)
    out = explain(resnet, x, method, target=2)
    torch.manual_seed(11)  # Captum draws its noise from the global generator
    theirs = NoiseTunnel(Saliency(resnet)).attribute(x, nt_type="smoothgrad", nt_samples=6, stdevs=0.3, target=2, abs=absolute)
    torch.testing.assert_close(out.info["attributions"][:, 0], theirs, rtol=1e-4, atol=1e-6)


def test_smoothgrad_noise_is_relative_to_the_image_range_and_seeded() -> None:
    torch.manual_seed(4)
    model = small_cnn().eval()
    x = torch.randn(2, 2, 8, 8)
    a = explain(model, x, "smoothgrad", target="all", samples=5, seed=1)
    b = explain(model, x * 100, "smoothgrad", target="all", samples=5, seed=1)
    c = explain(model, x, "smoothgrad", target="all", samples=5, seed=2)
    assert torch.equal(a.raw, explain(model, x, "smoothgrad", target="all", samples=5, seed=1).raw)
    assert not torch.equal(a.raw, c.raw)
    assert b.maps.shape == (2, 3, 8, 8) and bool(torch.isfinite(b.maps).all())


# ----------------------------------------------------------------------------- Guided Backprop


def test_guided_backprop_equals_captum_and_pytorch_grad_cam_without_touching_the_model(resnet: nn.Module) -> None:
    from captum.attr import GuidedBackprop as CaptumGB
    from pytorch_grad_cam import GuidedBackpropReLUModel

    torch.manual_seed(5)
    x = torch.randn(2, 3, 32, 32)
    relus = [(name, m.inplace) for name, m in resnet.named_modules() if isinstance(m, nn.ReLU)]
    hooks = hook_count(resnet)
    method = GuidedBackprop()
    out = explain(resnet, x, method, target=[0, 3])
    assert [(n, m.inplace) for n, m in resnet.named_modules() if isinstance(m, nn.ReLU)] == relus and hook_count(resnet) == hooks
    captum = CaptumGB(resnet).attribute(x, target=torch.tensor([0, 3]))
    torch.testing.assert_close(out.info["attributions"][:, 0], captum, rtol=1e-4, atol=1e-7)
    reference = GuidedBackpropReLUModel(copy.deepcopy(resnet), device="cpu")  # it swaps modules: give it a copy
    pgc = torch.from_numpy(reference(x[1:2].clone(), target_category=3)).permute(2, 0, 1)
    torch.testing.assert_close(out.info["attributions"][1, 0], pgc, rtol=1e-4, atol=1e-7)
    assert out.maps.shape == (2, 1, 32, 32)
    plain = explain(resnet, x, "saliency", target=[0, 3])
    assert not torch.allclose(plain.raw, out.raw)  # the guidance did change the gradient


def test_guided_gradcam_equals_captum(resnet: nn.Module) -> None:
    from captum.attr import GuidedGradCam

    torch.manual_seed(6)
    x = torch.randn(2, 3, 32, 32)
    method = GuidedGradCAM()
    out = explain(resnet, x, method, target=[2, 1], layer="layer3")
    theirs = GuidedGradCam(resnet, resnet.layer3).attribute(x, target=torch.tensor([2, 1]), interpolate_mode="bilinear")
    torch.testing.assert_close(out.info["attributions"][:, 0], theirs, rtol=1e-4, atol=1e-7)


def test_guided_backprop_on_unets_2d_and_3d() -> None:
    torch.manual_seed(0)
    relu_unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0, act="RELU").eval()
    out = explain(relu_unet, torch.randn(2, 1, 16, 16), "guided-backprop", target=1)
    assert out.task == "segmentation" and out.maps.shape == (2, 1, 16, 16) and bool(torch.isfinite(out.maps).all())
    relu_unet3d = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0, act="RELU").eval()
    out3d = explain(relu_unet3d, torch.randn(1, 1, 8, 8, 8), "guided-gradcam", target="all", layer="model.1.submodule")
    assert out3d.maps.shape == (1, 2, 8, 8, 8)
    prelu_unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    with pytest.raises(MedlensError, match="needs nn.ReLU modules"):
        explain(prelu_unet, torch.randn(1, 1, 16, 16), "guided-backprop")
    assert hook_count(prelu_unet) == 0


def test_guided_gradcam_passes_gradcam_options_on_and_counts_them_as_used() -> None:
    import warnings

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)).eval()
    x = torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an option reported as unused would raise here
        top2 = explain(model, x, "guided-gradcam", target=1, layer="1", top_k_channels=2)
    plain = explain(model, x, "guided-gradcam", target=1, layer="1")
    cam2 = explain(model, x, "gradcam", target=1, layer="1", top_k_channels=2)
    cam = explain(model, x, "gradcam", target=1, layer="1")
    inside = cam.raw > 1e-4  # the layer keeps the input resolution: L is the raw Grad-CAM itself
    guided = plain.raw[inside] / cam.raw[inside]  # max_c |R_c(s)|, the guided-backprop part
    torch.testing.assert_close(top2.raw[inside], guided * cam2.raw[inside], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(top2.raw, plain.raw)
