"""DeepLIFT (rescale rule) and DeepLIFT-SHAP against Captum on real brain MRI and hippocampus
volumes, against closed forms (a one-hidden-layer ReLU net, summation-to-delta on a ResNet-18),
and the model left as it was."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from conftest import shared_path
from medlens import MedlensError, explain, get_method, hook_count
from medlens.io import read_image
from medlens.methods.deeplift import DeepLift, DeepLiftShap


def mri_batch(root: Path, n: int, size: int = 64) -> torch.Tensor:
    """n real brain MRI slices (n, 1, size, size) in [0, 1], from the three tumour classes."""
    files = [f for cls in ("glioma", "meningioma", "pituitary") for f in sorted((root / cls).glob("*.jpg"))[:2]]
    images = [F.interpolate(read_image(f).image[None] / 255, size=(size, size), mode="bilinear", antialias=True) for f in files[:n]]
    return torch.cat(images)


def hippocampus_volume(root: Path, n: int = 1, size: int = 24) -> torch.Tensor:
    """n real hippocampus MRI volumes (n, 1, size, size, size), scaled to [0, 1]."""
    files = sorted((root / "imagesTr").glob("*.nii.gz"))[:n]
    vols = [read_image(f).image[None] for f in files]
    vols = [F.interpolate(v / v.max(), size=(size,) * 3, mode="trilinear") for v in vols]
    return torch.cat(vols)


def captum_cnn(dims: int = 2, classes: int = 3) -> nn.Sequential:
    """A seeded CNN with batch norm, in-place ReLUs and max pools, no two nonlinear modules in a
    row (Captum's backward hooks lose summation-to-delta when one feeds another)."""
    conv, bn, pool = {2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d), 3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d)}[dims]
    torch.manual_seed(dims)
    model = nn.Sequential(
        conv(1, 8, 3, padding=1), bn(8), nn.ReLU(inplace=True), conv(8, 8, 3, padding=1), pool(2),
        conv(8, 16, 3, padding=1), nn.ReLU(), conv(16, 16, 3, padding=1), pool(2),
        nn.Flatten(), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, classes))
    return model


def _realistic_batch_norm(model: nn.Module) -> nn.Module:
    torch.manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def _captum(cls: type, model: nn.Module, *args, **kwargs) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model).attribute(*args, **kwargs).detach()


@pytest.fixture(scope="module")
def mri() -> torch.Tensor:
    """Five real brain MRI slices (5, 1, 64, 64)."""
    return mri_batch(shared_path("brain-tumor-mri"), 5)


def test_deeplift_equals_captum_on_real_brain_mri(mri: torch.Tensor) -> None:
    from captum.attr import DeepLift as CaptumDeepLift

    model = captum_cnn()
    model(mri[:1])  # materialise the lazy layer
    model = _realistic_batch_norm(model)
    x, reference = mri[:2], mri[2:4] * 0.5
    out = explain(model, x, DeepLift(baseline=reference, batch_size=1), target=[0, 2])
    theirs = _captum(CaptumDeepLift, model, x, baselines=reference, target=torch.tensor([0, 2]))
    ours = out.info["attributions"][:, 0]
    assert pearson(ours, theirs) >= 0.99
    assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, float(theirs.abs().max()))
    assert out.info["rescaled_calls"] == 5 and out.maps.shape == (2, 1, 64, 64)


def test_deeplift_shap_equals_captum_under_shared_baselines(mri: torch.Tensor) -> None:
    from captum.attr import DeepLiftShap as CaptumDeepLiftShap

    model = captum_cnn()
    model(mri[:1])
    model = _realistic_batch_norm(model)
    x, baselines = mri[:2], mri[2:5]
    out = explain(model, x, "deeplift-shap", target=1, baselines=baselines, batch_size=4)
    theirs = _captum(CaptumDeepLiftShap, model, x, baselines=baselines, target=1)
    ours = out.info["attributions"][:, 0]
    assert pearson(ours, theirs) >= 0.99
    assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, float(theirs.abs().max()))
    with torch.no_grad():  # summation-to-delta against the mean reference score
        gap = model(x)[:, 1] - model(baselines)[:, 1].mean()
    torch.testing.assert_close(ours.flatten(1).sum(1), gap, rtol=1e-4, atol=1e-6)


def test_deeplift_on_a_one_hidden_layer_relu_net_is_the_closed_form() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    x, ref = torch.randn(3, 2, 5, 5), torch.randn(3, 2, 5, 5)
    out = explain(net, x, "deeplift", target="all", baseline=ref)
    w1, b1, w2 = net[1].weight.detach(), net[1].bias.detach(), net[3].weight.detach()
    h, h_ref = x.flatten(1) @ w1.T + b1, ref.flatten(1) @ w1.T + b1
    m = (h.relu() - h_ref.relu()) / (h - h_ref)  # (B, 7) the rescale multipliers
    expected = (x - ref).flatten(1)[:, None] * ((m[:, None, :] * w2[None]) @ w1)  # (B, K, C*H*W)
    torch.testing.assert_close(out.info["attributions"].flatten(2), expected, rtol=1e-5, atol=1e-6)


def test_deeplift_sums_to_delta_on_a_resnet18_with_reused_relus(mri: torch.Tensor) -> None:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=3)
    resnet.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    resnet = _realistic_batch_norm(resnet)
    x = mri[:2]
    out = explain(resnet, x, "deeplift", target="all")  # zero reference
    with torch.no_grad():
        gap = resnet(x) - resnet(torch.zeros_like(x))
    # ReLU -> MaxPool in a row and each block's relu called twice: Captum cannot run this model
    torch.testing.assert_close(out.raw.flatten(2).sum(2), gap, rtol=1e-4, atol=1e-5)
    assert out.info["rescaled_calls"] == 1 + 1 + 2 * 8  # stem relu, max pool, 2 calls per block


def test_deeplift_in_3d_equals_captum_on_a_hippocampus_volume(hippocampus: Path) -> None:
    from captum.attr import DeepLift as CaptumDeepLift

    vol = hippocampus_volume(hippocampus, 2)
    model = captum_cnn(dims=3)
    model(vol[:1])
    model = _realistic_batch_norm(model)
    out = explain(model, vol, "deeplift", target=0)
    theirs = _captum(CaptumDeepLift, model, vol, baselines=torch.zeros_like(vol), target=0)
    ours = out.info["attributions"][:, 0]
    assert out.maps.shape == (2, 1, 24, 24, 24) and pearson(ours, theirs) >= 0.99
    assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, float(theirs.abs().max()))
    with torch.no_grad():
        gap = model(vol)[:, 0] - model(torch.zeros_like(vol))[:, 0]
    torch.testing.assert_close(ours.flatten(1).sum(1), gap, rtol=1e-4, atol=1e-6)


def test_deeplift_shap_default_references_are_seeded_and_in_range(mri: torch.Tensor) -> None:
    model = captum_cnn()
    model(mri[:1])
    model = model.eval()
    x = mri[:2]
    method = DeepLiftShap(samples=3, seed=3)
    refs = method.references(x)
    assert refs.shape == (2, 3, 1, 64, 64)
    assert bool((refs >= x.flatten(1).amin(1).view(2, 1, 1, 1, 1)).all() and (refs <= x.flatten(1).amax(1).view(2, 1, 1, 1, 1)).all())
    assert torch.equal(refs, DeepLiftShap(samples=3, seed=3).references(x))
    assert not torch.equal(refs, DeepLiftShap(samples=3, seed=4).references(x))
    both = explain(model, x, method, target="all")
    with torch.no_grad():
        gap = model(x) - model(refs.flatten(0, 1)).view(2, 3, -1).mean(1)
    torch.testing.assert_close(both.raw.flatten(2).sum(2), gap, rtol=1e-4, atol=1e-6)
    one = explain(model, x, method, target=2)  # all targets at once (batched backward) = one by one
    torch.testing.assert_close(one.raw[:, 0], both.raw[:, 2], rtol=1e-4, atol=1e-8)


class FailsOnLargeBatches(nn.Sequential):
    """A real CNN that raises in its forward for more than two rows (DeepLIFT's paired batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise RuntimeError("out of memory (simulated by the model's own forward)")
        return super().forward(x)


def test_model_is_left_unchanged_after_a_call_and_after_an_exception(mri: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = FailsOnLargeBatches(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                nn.Flatten(), nn.LazyLinear(2))
    model(mri[:1])
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    explain(model, mri[:1], "deeplift", target=0)
    with pytest.raises(RuntimeError, match="simulated"):
        explain(model, mri[:2], "deeplift", target=0)
    assert hook_count(model) == 0 and model.training and all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("method", "options", "fragment"), [
    ("deeplift", dict(eps=0.0), "eps=0.0 must be > 0"),
    ("deeplift", dict(batch_size=0), "batch_size=0"),
    ("deeplift", dict(baseline="black"), "baseline='black' must be a number or a tensor"),
    ("deeplift", dict(baselines=torch.zeros(2, 1, 8, 8)), "no option 'baselines'"),
    ("deeplift-shap", dict(baselines=torch.zeros(1, 1, 8, 8)), "R >= 2"),
    ("deeplift-shap", dict(samples=1), "samples=1 must be at least 2"),
])
def test_bad_options_are_refused_when_the_method_is_built(method: str, options: dict, fragment: str) -> None:
    with pytest.raises(MedlensError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        get_method(method, **options)


def test_references_that_do_not_fit_the_input_say_so() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(MedlensError, match="does not broadcast"):
        explain(model, x, "deeplift", baseline=torch.zeros(3, 1, 8, 8))
    with pytest.raises(MedlensError, match="do not match the input"):
        explain(model, x, "deeplift-shap", baselines=torch.zeros(3, 1, 6, 6))


def test_deeplift_explains_a_3d_unet_region_and_sums_to_delta(hippocampus: Path) -> None:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    # PReLU activations (rescaled), concatenated skips; batch norm, as instance norm is not linear
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch").eval()
    vol = hippocampus_volume(hippocampus, 1, size=16)
    box = ((4, 4, 4), (12, 12, 12))
    out = explain(unet, vol, "deeplift", target=1, region=box)
    assert out.task == "segmentation" and out.maps.shape == (1, 1, 16, 16, 16) and out.info["rescaled_calls"] >= 2
    with torch.no_grad():
        gap = (unet(vol) - unet(torch.zeros_like(vol)))[0, 1, 4:12, 4:12, 4:12].mean()
    torch.testing.assert_close(out.raw.sum(), gap, rtol=1e-4, atol=1e-6)
