"""The engine: capture, targets, model safety, N-D inputs, segmentation, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from monai.networks.nets import UNet
from torch import nn

from medlens import MedlensError, explain, hook_count, normalise
from medlens.core.capture import auto_layer, trace_layers
from medlens.core.targets import resolve_targets


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


def small_cnn3d(classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool3d(2),
        nn.Conv3d(4, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, classes),
    )


def test_model_is_left_exactly_as_it_was(resnet: nn.Module) -> None:
    model = copy.deepcopy(resnet).train()
    model.layer2.eval()  # a mixed-mode model must come back mixed
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inplace = {n: m.inplace for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    for method in ("gradcam", "saliency", "cam", "layercam"):
        explain(model, torch.randn(2, 3, 64, 64), method, target="top2")
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: m.inplace for n, m in model.named_modules() if isinstance(m, nn.ReLU)} == inplace
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN stats untouched
    assert hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())


def test_hooks_and_modes_restored_when_the_call_fails(resnet: nn.Module) -> None:
    model = copy.deepcopy(resnet).train()
    with pytest.raises(MedlensError, match="out of range"):
        explain(model, torch.randn(1, 3, 32, 32), "gradcam", target=7, layer="layer3")
    assert hook_count(model) == 0 and model.training and model.layer3.training
    assert torch.is_grad_enabled()


def test_several_targets_come_from_one_forward_pass(resnet: nn.Module) -> None:
    calls = []
    handle = resnet.register_forward_hook(lambda *a: calls.append(1))
    try:
        x = torch.randn(2, 3, 64, 64)
        every = explain(resnet, x, "gradcam", target="all", layer="layer4")
    finally:
        handle.remove()
    assert len(calls) == 1
    assert every.maps.shape == (2, 5, 64, 64) and every.targets.tolist() == [[0, 1, 2, 3, 4]] * 2
    for k in (0, 3):
        single = explain(resnet, x, "gradcam", target=k, layer="layer4")
        torch.testing.assert_close(every.raw[:, k], single.raw[:, 0], rtol=1e-5, atol=1e-7)


def test_batch_equals_single_images(resnet: nn.Module) -> None:
    x = torch.randn(3, 3, 64, 64)
    batch = explain(resnet, x, "gradcam++", target="pred", layer="layer3")
    for i in range(3):
        one = explain(resnet, x[i : i + 1], "gradcam++", target="pred", layer="layer3")
        torch.testing.assert_close(batch.maps[i], one.maps[0], rtol=1e-4, atol=1e-5)
        assert batch.targets[i, 0] == one.targets[0, 0]


def test_inplace_relu_after_the_layer_does_not_corrupt_the_capture() -> None:
    torch.manual_seed(2)
    vgg = torchvision.models.vgg11(num_classes=3).eval()
    assert vgg.features[9].inplace  # the conv at features.8 feeds an in-place ReLU
    x = torch.randn(1, 3, 64, 64)
    out = explain(vgg, x, "hirescam", target=0, layer="features.8")
    act = vgg.features[:9](x).detach().requires_grad_(True)
    rest = copy.deepcopy(vgg)
    for m in rest.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # only on our private copy, for the reference computation
    score = rest.classifier(torch.flatten(rest.avgpool(rest.features[9:](act)), 1))[:, 0].sum()
    (grad,) = torch.autograd.grad(score, act)
    torch.testing.assert_close(out.raw[0, 0], torch.relu((grad * act).sum(1)[0]).detach(), rtol=1e-4, atol=1e-6)
    assert act.min() < 0  # the captured values are the conv's, before the ReLU
    assert vgg.features[9].inplace


def test_3d_volumes(resnet: nn.Module) -> None:
    torch.manual_seed(0)
    model = small_cnn3d().eval()
    x = torch.randn(2, 1, 16, 20, 24)
    for method in ("gradcam", "hirescam", "gradcam++", "xgradcam", "layercam", "cam", "saliency"):
        out = explain(model, x, method, target="all")
        assert out.maps.shape == (2, 3, 16, 20, 24), method
        assert 0 <= float(out.maps.min()) and float(out.maps.max()) <= 1
        assert torch.isfinite(out.maps).all()
    assert explain(model, x).info["auto_layer"] == "4"  # the last feature map, after its ReLU


def test_segmentation_targets_on_a_monai_unet() -> None:
    torch.manual_seed(0)
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()
    x = torch.randn(2, 1, 32, 32)
    whole = explain(unet, x, "gradcam", target=1)
    assert whole.task == "segmentation" and whole.maps.shape == (2, 1, 32, 32)
    logits = unet(x).detach()
    torch.testing.assert_close(whole.scores[:, 0], logits[:, 1].mean((1, 2)), rtol=1e-5, atol=1e-6)

    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[4:12, 20:30] = True
    masked = explain(unet, x, "gradcam", target=2, region=mask)
    torch.testing.assert_close(masked.scores[:, 0], logits[:, 2][:, mask].mean(1), rtol=1e-5, atol=1e-6)
    boxed = explain(unet, x, "gradcam", target=2, region=((4, 20), (12, 30)))
    torch.testing.assert_close(boxed.raw, masked.raw)

    unet3d = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    vol = torch.randn(1, 1, 16, 16, 16)
    out = explain(unet3d, vol, "hirescam", target="all", layer="model.1.submodule")
    assert out.maps.shape == (1, 2, 16, 16, 16) and out.task == "segmentation"
    with pytest.raises(MedlensError, match="classifiers only"):
        explain(unet, x, "cam")


def test_auto_layer_and_trace(resnet: nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64)
    assert auto_layer(resnet, x) == "layer4"
    assert auto_layer(torchvision.models.vgg11(num_classes=2), x) == "features"
    infos = {i.name: i for i in trace_layers(resnet, x)}
    assert infos["layer4"].shape == (1, 512, 2, 2) and infos["layer4"].spatial
    assert infos["fc"].params == 512 * 5 + 5 and not infos["fc"].spatial


def test_resolve_targets() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 4.0]])
    assert resolve_targets("pred", logits).tolist() == [[1], [0]]
    assert resolve_targets("top2", logits).tolist() == [[1, 2], [0, 2]]
    assert resolve_targets("all", logits).tolist() == [[0, 1, 2]] * 2
    assert resolve_targets([2, 1], logits).tolist() == [[2], [1]]
    assert resolve_targets([[0, 2], [1, 0]], logits).tolist() == [[0, 2], [1, 0]]
    assert resolve_targets("0,2", logits).tolist() == [[0, 2]] * 2
    with pytest.raises(MedlensError, match="out of range"):
        resolve_targets(3, logits)
    with pytest.raises(MedlensError, match="3 entries for a batch of 2"):
        resolve_targets([1, 2, 0], logits)
    with pytest.raises(MedlensError, match="not understood"):
        resolve_targets("best", logits)


@pytest.mark.parametrize(
    ("x", "kwargs", "message"),
    [
        (torch.randn(1, 1, 32, 32), {}, "3 input channel"),
        (torch.randn(1, 3, 8, 32, 32), {}, "2D inputs"),
        (torch.full((1, 3, 32, 32), float("nan")), {}, "NaN"),
        (torch.randn(1, 3, 32, 32), {"layer": "layer5"}, "did you mean 'layer4'"),
        (torch.randn(1, 3, 32, 32), {"method": "gradcamm"}, "did you mean|unknown method"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), {}, "float"),
    ],
)
def test_bad_input_gets_one_clear_line(resnet: nn.Module, x: torch.Tensor, kwargs: dict, message: str) -> None:
    with pytest.raises(MedlensError, match=message) as info:
        explain(resnet, x, **kwargs)
    assert "\n" not in str(info.value)
    assert hook_count(resnet) == 0


def test_a_layer_no_gradient_reaches_is_named() -> None:
    class SideBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.unused = nn.Conv2d(4, 4, 1)  # called, but its output is thrown away
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x))
            self.unused(h)
            return self.fc(h.mean((2, 3)))

    with pytest.raises(MedlensError, match="no gradient reaches 'unused'"):
        explain(SideBranch(), torch.randn(1, 1, 8, 8), "gradcam", layer=["conv", "unused"])


def test_several_layers_are_fused(resnet: nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64)
    fused = explain(resnet, x, "layercam", target=0, layer=["layer3", "layer4"], fusion="mean")
    l3 = explain(resnet, x, "layercam", target=0, layer="layer3").maps
    l4 = explain(resnet, x, "layercam", target=0, layer="layer4").maps
    torch.testing.assert_close(fused.maps, normalise((l3 + l4) / 2), rtol=1e-5, atol=1e-5)
    assert fused.layers == ["layer3", "layer4"]
    assert 0.3 < float(torch.corrcoef(torch.stack([fused.maps.flatten(), l3.flatten()]))[0, 1])


def test_flat_evidence_gives_zeros_not_nan() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(1.0)
    out = explain(model, torch.randn(2, 1, 16, 16), "gradcam", layer="0", target="all")
    assert torch.equal(out.maps, torch.zeros_like(out.maps))
