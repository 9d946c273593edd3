"""EigenCAM, EigenGradCAM, eigen-smoothing, test-time-augmentation smoothing and Grad-CAM
element-wise against pytorch-grad-cam, with the sign of the principal component fixed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from monai.networks.nets import UNet
from torch import nn

from medlens import explain, normalise, upsample
from medlens.methods.smoothing import principal_component


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.detach().flatten().double(), b.detach().flatten().double()]))[0, 1])


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


def layer_and_grads(model: nn.Module, x: torch.Tensor, targets: list[int], layer: str = "layer2") -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's activations and the gradients of the target logits w.r.t. them."""
    store = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda _m, _i, out: store.setdefault("act", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), store["act"])
    return store["act"].detach(), grad


def reference_projection(stack: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's projection, with the sign our rule picks: positive correlation with the evidence."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    proj = torch.from_numpy(get_2d_projection(stack.numpy().astype(np.float32)))
    signs = [1.0 if pearson(p, e) > 0 else -1.0 for p, e in zip(proj, evidence)]
    return proj * torch.tensor(signs).view(-1, 1, 1)


def assert_agrees_with_reference(reference, resnet, x, targets, expected, ours) -> None:
    """pytorch-grad-cam's eigen-smoothed map at ``layer2`` agrees with ``ours`` (B, H, W) wherever the
    reference's arbitrary SVD sign happens to match our (sign-fixed) ``expected`` raw maps."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with reference(model=resnet, target_layers=[resnet.layer2]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets], eigen_smooth=True))
    for i in range(len(targets)):
        if pearson(theirs[i], normalise(upsample(expected[i][None, None], tuple(x.shape[2:])))[0, 0]) > 0:
            assert pearson(ours[i], theirs[i]) >= 0.99


def test_eigencam_is_the_reference_projection_with_the_evidence_sign(resnet: nn.Module) -> None:
    from pytorch_grad_cam import EigenCAM

    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    act, _ = layer_and_grads(resnet, x, [0, 0])
    ours = explain(resnet, x, "eigencam", target="top2", layer="layer2")
    expected = F.relu(reference_projection(act, act.sum(1)))
    assert ours.raw.shape == (2, 2, 4, 4)  # layer2 of a 32 px input
    torch.testing.assert_close(ours.raw[:, 0], expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ours.raw[:, 1], ours.raw[:, 0])  # class-agnostic
    with EigenCAM(model=resnet, target_layers=[resnet.layer2]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=None))
    for i in range(2):  # where the reference's arbitrary SVD sign happens to match ours, the maps agree
        if pearson(theirs[i], normalise(upsample(expected[i][None, None], (32, 32)))[0, 0]) > 0:
            assert pearson(ours.maps[i, 0], theirs[i]) >= 0.99


def test_eigengradcam_is_the_reference_projection_with_the_class_evidence_sign(resnet: nn.Module) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    targets = [1, 3]
    act, grad = layer_and_grads(resnet, x, targets)
    ours = explain(resnet, x, "eigengradcam", target=targets, layer="layer2")
    expected = F.relu(reference_projection(grad * act, (grad * act).sum(1)))
    torch.testing.assert_close(ours.raw[:, 0], expected, rtol=1e-3, atol=1e-4)


def test_principal_component_sign_does_not_depend_on_the_svd() -> None:
    torch.manual_seed(3)
    stack = torch.randn(2, 3, 16, 5, 5) + torch.linspace(0, 2, 25).view(1, 1, 1, 5, 5)
    proj = principal_component(stack)
    shuffled = principal_component(stack[:, :, torch.randperm(16)])  # same data, another SVD sign
    torch.testing.assert_close(proj, shuffled, rtol=1e-4, atol=1e-5)
    for b in range(2):
        for k in range(3):
            assert pearson(proj[b, k], stack[b, k].sum(0)) > 0
    flat = principal_component(torch.zeros(1, 1, 4, 3, 3))
    assert bool((flat == 0).all())


def test_eigen_smooth_is_the_projection_of_the_weighted_activations(resnet: nn.Module) -> None:
    from pytorch_grad_cam import GradCAM

    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 32)
    targets = [2, 0]
    smooth = explain(resnet, x, "gradcam", target=targets, layer="layer2", eigen_smooth=True)
    act, grad = layer_and_grads(resnet, x, targets)
    weighted = grad.mean((2, 3), keepdim=True) * act
    expected = F.relu(reference_projection(weighted, weighted.sum(1)))
    torch.testing.assert_close(smooth.raw[:, 0], expected, rtol=1e-3, atol=1e-5)
    assert_agrees_with_reference(GradCAM, resnet, x, targets, expected, smooth.maps[:, 0])


def test_eigen_smooth_with_perturbation_cams_in_3d() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    vol = torch.randn(2, 1, 8, 8, 8)
    for name in ("scorecam", "ablationcam"):
        smooth = explain(model, vol, name, target="all", layer="3", eigen_smooth=True)
        plain = explain(model, vol, name, target="all", layer="3")
        assert smooth.raw.shape == plain.raw.shape == (2, 2, 4, 4, 4)
        assert bool(torch.isfinite(smooth.maps).all()) and not torch.allclose(smooth.raw, plain.raw)


def test_gradcam_elementwise_agrees_with_pytorch_grad_cam(resnet: nn.Module) -> None:
    from pytorch_grad_cam import GradCAMElementWise
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(5)
    x = torch.randn(2, 3, 32, 32)
    targets = [0, 3]
    ours = explain(resnet, x, "gradcam-elementwise", target=targets, layer="layer2")
    act, grad = layer_and_grads(resnet, x, targets)
    torch.testing.assert_close(ours.raw[:, 0], F.relu(grad * act).sum(1), rtol=1e-4, atol=1e-6)
    with GradCAMElementWise(model=resnet, target_layers=[resnet.layer2]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets]))
    for i in range(2):
        assert pearson(ours.maps[i, 0], theirs[i]) >= 0.99


def test_aug_smooth_agrees_with_pytorch_grad_cam(resnet: nn.Module) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(6)
    x = torch.randn(2, 3, 32, 32)
    targets = [1, 2]
    ours = explain(resnet, x, "gradcam", target=targets, layer="layer2", aug_smooth=True)
    plain = explain(resnet, x, "gradcam", target=targets, layer="layer2")
    with GradCAM(model=resnet, target_layers=[resnet.layer2]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets], aug_smooth=True))
    assert ours.info["augmentations"] == 6
    torch.testing.assert_close(ours.scores, plain.scores)
    for i in range(2):
        assert pearson(ours.maps[i, 0], theirs[i]) >= 0.99
    assert not torch.allclose(ours.maps, plain.maps)


def test_aug_smooth_keeps_the_original_targets_and_flips_the_region_3d() -> None:
    torch.manual_seed(7)
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    vol = torch.randn(2, 1, 8, 8, 8)
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[2:6, 1:5, 0:3] = True  # not symmetric left-right: a flipped copy must pool over a flipped mask
    plain = explain(unet, vol, "gradcam", target="pred", region=mask, layer="model.1.submodule")
    smooth = explain(unet, vol, "gradcam", target="pred", region=mask, layer="model.1.submodule", aug_smooth=True, aug_scales=(1.0,))
    assert smooth.maps.shape == (2, 1, 8, 8, 8) and torch.equal(smooth.targets, plain.targets)
    torch.testing.assert_close(smooth.scores, plain.scores)
    flipped = explain(unet, vol.flip(-1), "gradcam", target=plain.targets, region=mask.flip(-1), layer="model.1.submodule")
    expected = normalise((plain.maps + flipped.maps.flip(-1)) / 2)
    torch.testing.assert_close(smooth.maps, expected, rtol=1e-4, atol=1e-5)


def test_top_k_channels_restricts_any_weighted_cam() -> None:
    """The seed course's exercise: Grad-CAM from the k most active channels only."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)).eval()
    x = torch.randn(2, 1, 8, 8)
    act = model[:2](x).detach()
    full = explain(model, x, "gradcam", target=1, layer="1")
    assert torch.equal(explain(model, x, "gradcam", target=1, layer="1", top_k_channels=6).raw, full.raw)
    top2 = explain(model, x, "gradcam", target=1, layer="1", top_k_channels=2)
    weights = model[4].weight.detach()[1] / 64  # Grad-CAM weights of a GAP + linear head
    keep = torch.zeros(2, 6).scatter_(1, act.mean((2, 3)).topk(2, dim=1).indices, 1.0)
    expected = F.relu(torch.einsum("bc,bchw->bhw", keep * weights, act))
    torch.testing.assert_close(top2.raw[:, 0], expected, rtol=1e-5, atol=1e-7)
    half = explain(model, x, "gradcam", target=1, layer="1", top_k_channels=0.34)  # a fraction: 2 of 6
    torch.testing.assert_close(half.raw, top2.raw)


@pytest.mark.parametrize("name", ["hirescam", "layercam"])
def test_eigen_smooth_of_the_elementwise_cams_agrees_with_pytorch_grad_cam(resnet: nn.Module, name: str) -> None:
    """pytorch-grad-cam projects g * A (HiResCAM) and ReLU(g) * A (LayerCAM) when eigen_smooth is set."""
    import pytorch_grad_cam

    torch.manual_seed(10)
    x = torch.randn(2, 3, 32, 32)
    targets = [3, 1]
    smooth = explain(resnet, x, name, target=targets, layer="layer2", eigen_smooth=True)
    plain = explain(resnet, x, name, target=targets, layer="layer2")
    act, grad = layer_and_grads(resnet, x, targets)
    stack = grad * act if name == "hirescam" else F.relu(grad) * act
    expected = F.relu(reference_projection(stack, stack.sum(1)))
    torch.testing.assert_close(smooth.raw[:, 0], expected, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(smooth.raw, plain.raw)
    reference = {"hirescam": pytorch_grad_cam.HiResCAM, "layercam": pytorch_grad_cam.LayerCAM}[name]
    assert_agrees_with_reference(reference, resnet, x, targets, expected, smooth.maps[:, 0])


def test_cam_eigen_smooth_and_top_k_for_the_elementwise_cams_in_3d() -> None:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 2)).eval()
    vol = torch.randn(2, 1, 6, 6, 6)
    act = model[:2](vol).detach()
    weights = model[4].weight.detach()[1]
    weighted = (weights.view(1, 6, 1, 1, 1) * act).unsqueeze(1)  # (B, 1, C, *s)
    cam = explain(model, vol, "cam", target=1, layer="1", eigen_smooth=True)
    torch.testing.assert_close(cam.raw, principal_component(weighted), rtol=1e-4, atol=1e-6)
    keep = torch.zeros(2, 6).scatter_(1, act.mean((2, 3, 4)).topk(2, dim=1).indices, 1.0)
    grad = (weights / act[0, 0].numel()).view(1, 6, 1, 1, 1)  # d logit / dA of a GAP + linear head
    top2 = explain(model, vol, "hirescam", target=1, layer="1", top_k_channels=2)
    torch.testing.assert_close(top2.raw[:, 0], F.relu((keep.view(2, 6, 1, 1, 1) * grad * act).sum(1)), rtol=1e-4, atol=1e-7)
    for name in ("layercam", "gradcam-elementwise"):
        assert not torch.allclose(explain(model, vol, name, target=1, layer="1", top_k_channels=2).raw,
                                  explain(model, vol, name, target=1, layer="1").raw)
