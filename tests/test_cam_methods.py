"""The first methods against closed forms and the reference implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from medlens import explain, normalise


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.detach().flatten().double(), b.detach().flatten().double()]))[0, 1])


class GapLinear(nn.Module):
    """conv features -> global average pool -> linear: CAM and Grad-CAM have closed forms."""

    def __init__(self, in_channels: int = 1, channels: int = 6, classes: int = 3, dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.features = nn.Sequential(conv(in_channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(2).mean(2))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


@pytest.mark.parametrize("dims", [2, 3])
def test_cam_and_gradcam_closed_form_on_gap_linear(dims: int) -> None:
    torch.manual_seed(dims)
    model = GapLinear(dims=dims).eval()
    x = torch.randn(2, 1, *([8] * dims))
    acts = model.features(x)  # (B, C, *S)
    weights = model.fc.weight.detach()  # (K, C)
    cam_expected = torch.einsum("kc,bc...->bk...", weights, acts.detach())
    n_pixels = acts[0, 0].numel()

    cam = explain(model, x, "cam", target="all", layer="features")
    grad = explain(model, x, "gradcam", target="all", layer="features")

    assert cam.raw.shape == (2, 3, *([8] * dims))
    torch.testing.assert_close(cam.raw, cam_expected, rtol=1e-5, atol=1e-6)
    # Grad-CAM weights on a GAP+linear head are W / n_pixels, so Grad-CAM = ReLU(CAM) / n.
    torch.testing.assert_close(grad.raw, F.relu(cam_expected) / n_pixels, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.maps, normalise(F.relu(cam_expected)), rtol=1e-5, atol=1e-5)


def test_hirescam_is_gradient_times_activation(resnet: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    exp = explain(resnet, x, "hirescam", target=1, layer="layer3")
    act = resnet.layer3(resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x)))))))
    act = act.detach().requires_grad_(True)
    score = resnet.fc(resnet.avgpool(resnet.layer4(act)).flatten(1))[:, 1].sum()
    (grad,) = torch.autograd.grad(score, act)
    torch.testing.assert_close(exp.raw[:, 0], F.relu((grad * act).sum(1)).detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["gradcam", "hirescam", "gradcam++", "xgradcam", "layercam"])
def test_agrees_with_pytorch_grad_cam(resnet: nn.Module, name: str) -> None:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    reference = {"gradcam": pgc.GradCAM, "hirescam": pgc.HiResCAM, "gradcam++": pgc.GradCAMPlusPlus,
                 "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM}[name]
    torch.manual_seed(1)
    x = torch.randn(3, 3, 96, 96)
    targets = [0, 2, 3]
    ours = explain(resnet, x, name, target=targets, layer="layer4").maps[:, 0]
    with reference(model=resnet, target_layers=[resnet.layer4]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets]))
    for i in range(3):
        assert pearson(ours[i], theirs[i]) > 0.999
    if name != "gradcam++":  # the reference adds its epsilon in a different place
        assert float((ours - theirs).abs().max()) < 1e-4


def test_gradcam_agrees_with_captum_layer_gradcam(resnet: nn.Module) -> None:
    from captum.attr import LayerAttribution, LayerGradCam

    x = torch.randn(2, 3, 64, 64)
    ours = explain(resnet, x, "gradcam", target=2, layer="layer4")
    attr = LayerGradCam(resnet, resnet.layer4).attribute(x, target=2, relu_attributions=True)
    theirs = LayerAttribution.interpolate(attr, (64, 64), interpolate_mode="bilinear")
    torch.testing.assert_close(ours.raw, attr.detach(), rtol=1e-4, atol=1e-6)
    for i in range(2):  # both upsample bilinearly with align_corners=False
        assert pearson(ours.maps[i, 0], theirs[i, 0].detach()) > 0.999


def test_saliency_agrees_with_captum(resnet: nn.Module) -> None:
    from captum.attr import Saliency

    x = torch.randn(2, 3, 48, 48)
    ours = explain(resnet, x, "saliency", target=3)
    theirs = Saliency(resnet).attribute(x, target=3, abs=True).amax(dim=1)
    torch.testing.assert_close(ours.raw[:, 0], theirs, rtol=1e-4, atol=1e-7)


def test_cam_agrees_with_torchcam(resnet: nn.Module) -> None:
    from torchcam.methods import CAM as TorchCAM

    x = torch.randn(1, 3, 64, 64)
    ours = explain(resnet, x, "cam", target=1, layer="layer4")
    with TorchCAM(resnet, target_layer="layer4", fc_layer="fc") as extractor:
        scores = resnet(x)
        (theirs,) = extractor(class_idx=1, scores=scores, normalized=False)
    assert pearson(ours.raw[0, 0], theirs[0]) > 0.999


def test_cam_top_k_channels_uses_only_the_strongest_channels() -> None:
    torch.manual_seed(3)
    model = GapLinear(channels=8).eval()
    x = torch.randn(1, 1, 10, 10)
    acts = model.features(x).detach()
    keep = acts.mean((2, 3)).topk(3, dim=1).indices[0]
    expected = torch.einsum("c,chw->hw", model.fc.weight.detach()[0, keep], acts[0, keep])
    out = explain(model, x, "cam", target=0, layer="features", top_k_channels=3)
    torch.testing.assert_close(out.raw[0, 0], expected, rtol=1e-5, atol=1e-6)


def test_cam_without_linear_head_says_why() -> None:
    from medlens import MedlensError

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(MedlensError, match="linear head"):
        explain(model, torch.randn(1, 1, 16, 16), "cam", layer="0")
