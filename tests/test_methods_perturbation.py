"""Perturbation methods (Score-CAM, Ablation-CAM, occlusion, RISE) against closed forms and
the reference implementations (pytorch-grad-cam, Captum), in 2D and 3D, for classifiers and
segmentation networks, plus the model-safety contract of every method of the catalogue."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from monai.networks.nets import UNet
from torch import nn

from medlens import MedlensError, explain, hook_count, normalise, upsample
from medlens.methods.perturbation import rise_draws, rise_masks, select_channels
from medlens.core.engine import options_for


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.detach().flatten().double(), b.detach().flatten().double()]))[0, 1])


def small_cnn(dims: int = 2, in_channels: int = 1, classes: int = 3, width: int = 8) -> nn.Sequential:
    conv, pool, gap = {2: (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d), 3: (nn.Conv3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d)}[dims]
    return nn.Sequential(
        conv(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), pool(2),
        conv(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
        gap(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


# ----------------------------------------------------------------------------- Score-CAM


def scorecam_by_definition(score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Score-CAM written out channel by channel (one image), the slow obvious way."""
    scores = []
    for c in range(act.shape[1]):
        mask = normalise(upsample(act[:, c : c + 1], x.shape[2:]))
        scores.append(score(x * mask))
    weights = torch.softmax(torch.stack(scores), dim=0)
    return F.relu((weights.view(1, -1, *([1] * (act.dim() - 2))) * act).sum(1))


@pytest.mark.parametrize("dims", [2, 3])
def test_scorecam_equals_its_definition_and_skips_dead_channels_exactly(dims: int) -> None:
    torch.manual_seed(dims)
    model = small_cnn(dims).eval()
    with torch.no_grad():
        model[3].bias[:5] = -1e3  # five channels that never fire
    x = torch.randn(1, 1, *([12] * dims))
    act = model[:5](x).detach()
    assert int((act.flatten(2).amax(2) == 0).sum()) >= 5
    ours = explain(model, x, "scorecam", target=2, layer="4")
    with torch.no_grad():
        expected = scorecam_by_definition(lambda masked: model(masked)[0, 2], x, act)
    torch.testing.assert_close(ours.raw[:, 0], expected, rtol=1e-4, atol=1e-6)


def test_scorecam_on_a_unet_region() -> None:
    torch.manual_seed(5)
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    x = torch.randn(1, 1, 16, 16)
    layer = "model.1.submodule"
    out = explain(unet, x, "scorecam", target=1, layer=layer, region=((2, 3), (9, 12)))
    assert out.task == "segmentation" and out.maps.shape == (1, 1, 16, 16)
    acts = {}
    h = dict(unet.named_modules())[layer].register_forward_hook(lambda _m, _i, o: acts.setdefault("a", o.detach()))
    with torch.no_grad():
        unet(x)
        h.remove()
        expected = scorecam_by_definition(lambda masked: unet(masked)[0, 1, 2:9, 3:12].mean(), x, acts["a"])
    torch.testing.assert_close(out.raw[:, 0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "occlusion", "rise", "smoothgrad", "integrated-gradients"])
@pytest.mark.parametrize("dims", [2, 3])
def test_per_image_regions_follow_their_image_through_the_perturbed_copies(method: str, dims: int) -> None:
    """A (B, 1, *S) region gives each image its own region: the batch must equal the images
    explained one at a time with their own region (the copies of image b pool over region b)."""
    torch.manual_seed(dims)
    unet = UNet(spatial_dims=dims, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    size = 12 if dims == 2 else 8
    x = torch.randn(2, 1, *([size] * dims))
    region = torch.zeros(2, 1, *([size] * dims))
    region[(0, 0, *([slice(0, 4)] * dims))] = 1
    region[(1, 0, *([slice(size - 5, size)] * dims))] = 1
    options = {"n_masks": 12, "window": 4, "samples": 3, "noise_level": 0.0, "steps": 4, "batch_size": 5}
    layer = "model.1.submodule" if method in ("scorecam", "ablationcam") else None
    options = options_for(method, options, ["rise", "occlusion", "smoothgrad", "integrated-gradients", "scorecam"])  # each takes its own
    batched = explain(unet, x, method, target="all", layer=layer, region=region, **options)
    for b in range(2):
        alone = explain(unet, x[b : b + 1], method, target="all", layer=layer, region=region[b : b + 1], **options)
        torch.testing.assert_close(batched.scores[b], alone.scores[0])
        torch.testing.assert_close(batched.raw[b], alone.raw[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched.raw[0], batched.raw[1])


def test_scorecam_agrees_with_pytorch_grad_cam(resnet: nn.Module) -> None:
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, 32)
    targets = [3]
    ours = explain(resnet, x, "scorecam", target=targets, layer="layer2", batch_size=128).maps[:, 0]
    with ScoreCAM(model=resnet, target_layers=[resnet.layer2]) as cam:
        cam.batch_size = 128
        theirs = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets]))
    # pytorch-grad-cam upsamples the masks with align_corners=True, we with False: r, not equality
    for i in range(1):
        assert pearson(ours[i], theirs[i]) >= 0.99


def test_scorecam_batches_masked_inputs_and_fast_mode_runs_fewer_passes() -> None:
    torch.manual_seed(0)
    model = small_cnn(width=16).eval()
    calls: list[int] = []
    x = torch.randn(2, 1, 16, 16)
    handle = model[0].register_forward_pre_hook(lambda _m, inp: calls.append(inp[0].shape[0]))
    try:
        full = explain(model, x, "scorecam", target="all", layer="4", batch_size=16)
        passes = calls[1:]
        n_live = int(select_channels(model[:5](x).detach())[1].shape[1])
        chunks = math.ceil(n_live / 8)  # 8 channels x 2 images per pass
        assert sum(passes[:chunks]) == 2 * n_live and set(passes[: chunks - 1]) == {16}
        assert passes[chunks:] in ([], [2])  # one pass of the zero image when some channel is dead
        calls.clear()
        fast = explain(model, x, "scorecam", target="all", layer="4", batch_size=16, top_k_channels=8)
        assert calls[1:] == [16]  # the 8 strongest channels of both images in one pass
    finally:
        handle.remove()
    assert fast.maps.shape == full.maps.shape == (2, 3, 16, 16)
    assert all(pearson(fast.maps[i], full.maps[i]) > 0.5 for i in range(2))


# ----------------------------------------------------------------------------- Ablation-CAM


def test_ablationcam_agrees_with_pytorch_grad_cam(resnet: nn.Module) -> None:
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, 32)
    targets = [2]
    ours = explain(resnet, x, "ablationcam", target=targets, layer="layer2", batch_size=128)
    with AblationCAM(model=resnet, target_layers=[resnet.layer2], batch_size=128) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets]))
    assert isinstance(resnet.layer2, nn.Sequential)  # the reference swaps the layer back
    for i in range(1):
        assert pearson(ours.maps[i, 0], theirs[i]) >= 0.99


def test_ablationcam_on_a_unet_falls_back_to_repeating_the_input() -> None:
    """U-Net skips mix batch-B tensors after the layer: the result must equal ablating by hand."""
    torch.manual_seed(0)
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0, act="RELU").eval()
    x = torch.randn(2, 1, 16, 16)
    layer = "model.1.submodule"
    out = explain(unet, x, "ablationcam", target=1, layer=layer)
    assert out.task == "segmentation" and out.maps.shape == (2, 1, 16, 16)
    module = dict(unet.named_modules())[layer]
    acts = {}
    h = module.register_forward_hook(lambda _m, _i, o: acts.setdefault("a", o.detach()))
    with torch.no_grad():
        base = unet(x)[:, 1].mean((1, 2))
    h.remove()
    act = acts["a"]
    weights = []
    for c in range(act.shape[1]):
        h = module.register_forward_hook(lambda _m, _i, o, c=c: o * (torch.arange(o.shape[1]) != c).view(1, -1, 1, 1))
        with torch.no_grad():
            weights.append((base - unet(x)[:, 1].mean((1, 2))) / base)
        h.remove()
    expected = F.relu(torch.einsum("cb,bchw->bhw", torch.stack(weights), act))
    torch.testing.assert_close(out.raw[:, 0], expected, rtol=1e-4, atol=1e-6)


def test_ablationcam_batch_equals_single_images() -> None:
    torch.manual_seed(3)
    model = small_cnn(dims=3).eval()
    x = torch.randn(2, 1, 8, 8, 8)
    both = explain(model, x, "ablationcam", target="all", layer="4", batch_size=8)
    for i in range(2):
        one = explain(model, x[i : i + 1], "ablationcam", target="all", layer="4")
        torch.testing.assert_close(both.raw[i], one.raw[0], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- Occlusion


@pytest.mark.parametrize("dims,size,window,stride", [(2, 15, 4, 3), (3, 9, 4, 3)])
def test_occlusion_equals_captum(dims: int, size: int, window: int, stride: int) -> None:
    from captum.attr import Occlusion

    torch.manual_seed(dims)
    model = small_cnn(dims, in_channels=2).eval()
    x = torch.randn(2, 2, *([size] * dims))
    ours = explain(model, x, "occlusion", target=[1, 2], window=window, stride=stride, baseline=0.5, batch_size=20)
    theirs = Occlusion(model).attribute(x, sliding_window_shapes=(2, *([window] * dims)), strides=(2, *([stride] * dims)),
                                        baselines=0.5, target=torch.tensor([1, 2]))
    # an occlusion over all channels gives every channel the same attribution: compare one
    torch.testing.assert_close(ours.raw[:, 0], theirs[:, 0], rtol=1e-4, atol=1e-5)


def test_occlusion_on_a_linear_model_is_the_window_sum_of_w_times_x() -> None:
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).eval()
    x = torch.randn(3, 2, 8, 8)
    w = linear[1].weight.detach().view(3, 2, 8, 8)
    pixelwise = explain(linear, x, "occlusion", target="all", window=1, stride=1)
    torch.testing.assert_close(pixelwise.raw, torch.einsum("kchw,bchw->bkhw", w, x), rtol=1e-4, atol=1e-5)
    blocks = explain(linear, x, "occlusion", target="all", window=2, stride=2)
    contribution = torch.einsum("kchw,bchw->bkhw", w, x)
    block_sum = F.avg_pool2d(contribution, 2) * 4
    torch.testing.assert_close(blocks.raw, block_sum.repeat_interleave(2, 2).repeat_interleave(2, 3), rtol=1e-4, atol=1e-5)


def test_occlusion_3d_segmentation_and_bad_window() -> None:
    torch.manual_seed(0)
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    vol = torch.randn(1, 1, 16, 16, 16)
    box = ((4, 4, 4), (12, 12, 12))
    out = explain(unet, vol, "occlusion", target=1, region=box, window=4, stride=4)
    assert out.task == "segmentation" and out.maps.shape == (1, 1, 16, 16, 16)
    assert bool(torch.isfinite(out.maps).all())
    with pytest.raises(MedlensError, match="window 32 is larger"):
        explain(unet, vol, "occlusion", window=32)
    with pytest.raises(MedlensError, match="window"):
        explain(unet, vol, "occlusion", window=(4, 4))


# ----------------------------------------------------------------------------- RISE


@pytest.mark.parametrize("dims", [2, 3])
def test_rise_masks_are_smooth_random_and_seeded(dims: int) -> None:
    size = [20] * dims
    masks = rise_masks(*rise_draws(200, dims, 5, 0.5, [4] * dims, torch.Generator().manual_seed(0)), size)
    again = rise_masks(*rise_draws(200, dims, 5, 0.5, [4] * dims, torch.Generator().manual_seed(0)), size)
    assert masks.shape == (200, *size) and torch.equal(masks, again)
    assert 0 <= float(masks.min()) and float(masks.max()) <= 1
    assert abs(float(masks.mean()) - 0.5) < 0.05
    assert not torch.equal(masks[0], masks[1])


def test_rise_finds_the_evidence_of_a_linear_model() -> None:
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 2)).eval()
    with torch.no_grad():
        linear[1].weight.zero_()
        linear[1].weight.view(2, 32, 32)[0, 4:14, 18:30] = 1.0  # class 0 looks at one box
    x = torch.rand(1, 1, 32, 32)
    out = explain(linear, x, "rise", target=0, n_masks=500, cells=6, batch_size=250, seed=1)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[4:14, 18:30] = True
    raw = out.raw[0, 0]
    assert float(raw[inside].mean()) > float(raw[~inside].mean()) + 3 * float(raw[~inside].std())
    same = explain(linear, x, "rise", target=0, n_masks=500, cells=6, batch_size=100, seed=1)
    torch.testing.assert_close(same.raw, out.raw, rtol=1e-4, atol=1e-5)  # chunking does not change it


def test_rise_on_a_2d_unet() -> None:
    torch.manual_seed(0)
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    out = explain(unet, torch.randn(2, 1, 16, 16), "rise", target=1, n_masks=64)
    assert out.maps.shape == (2, 1, 16, 16) and bool(torch.isfinite(out.maps).all())


# ----------------------------------------------------------------------------- all methods: safety


class Fragile(nn.Module):
    """A small CNN (train mode, with dropout and batch norm) that can be made to fail on its
    second forward call, i.e. inside a method after the engine's own forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        self.calls = 0
        self.fail_from = math.inf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.fail_from:
            raise RuntimeError("simulated failure inside the method")
        return self.net(x)


ALL_METHODS = ["scorecam", "ablationcam", "eigencam", "eigengradcam", "gradcam-elementwise", "occlusion", "rise",
               "smoothgrad", "integrated-gradients", "inputxgradient", "guided-backprop", "guided-gradcam"]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_leaves_the_model_as_it_was_even_when_it_fails(method: str) -> None:
    torch.manual_seed(0)
    model = Fragile().train()
    model.net[4].eval()  # a mixed-mode model: each flag must come back as it was
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_count(model)
    x = torch.randn(2, 1, 12, 12)
    options = options_for(method, {"n_masks": 16, "samples": 4, "steps": 4, "window": 4}, ALL_METHODS)
    out = explain(model, x, method, target="all", layer="net.5", **options)
    assert out.maps.shape == (2, 3, 12, 12) and bool(torch.isfinite(out.maps).all())
    assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1
    model.calls, model.fail_from = 0, 2
    try:
        explain(model, x, method, target="all", layer="net.5", **options)
    except RuntimeError as err:
        assert "simulated failure" in str(err)
    assert [m.training for m in model.modules()] == modes
    assert hook_count(model) == hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ALL_METHODS)
def test_flat_evidence_gives_zero_maps_never_nan(method: str) -> None:
    model = small_cnn().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    out = explain(model, torch.zeros(1, 1, 8, 8), method, target=0, layer="4",
                  **options_for(method, dict(n_masks=8, samples=2, steps=2, window=2), ALL_METHODS))
    assert bool(torch.isfinite(out.raw).all()) and bool((out.maps == 0).all())
