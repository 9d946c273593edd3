"""The extra CAMs (methods/cam_extra.py) against their reference implementations on a real
ResNet-18 and real brain MRI slices: pytorch-grad-cam 1.5.7 (FullGrad, KPCA-CAM, Shapley-CAM,
Finer-CAM, FEM, Random-CAM) and TorchCAM 0.5 (SS-CAM, IS-CAM, Smooth Grad-CAM++, under the same
seed); then 2D/3D runs, batch = single images, option checks and model safety."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from conftest import shared_path
from medlens import MedlensError, explain, hook_count
from medlens.methods.cam_extra import kernel_pca_projection

NEW = ["fullgrad", "kpcacam", "shapleycam", "finercam", "fem", "randomcam", "sscam", "iscam", "smoothgradcampp"]
#: small settings for the sampling methods
LIGHT = {"sscam": dict(num_samples=2), "iscam": dict(num_samples=2), "smoothgradcampp": dict(num_samples=2)}


def pearson(a, b) -> float:
    a, b = torch.as_tensor(a).flatten().double(), torch.as_tensor(b).flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def brain_slices(size: int, n: int = 3) -> torch.Tensor:
    """(n, 1, size, size) real MRI slices (one per tumour class), standardised."""
    root = shared_path("brain-tumor-mri")
    files = [sorted((root / c).glob("*.jpg"))[0] for c in ("glioma", "meningioma", "pituitary")][:n]
    arr = [np.asarray(Image.open(f).convert("L").resize((size, size)), dtype=np.float32) / 255.0 for f in files]
    return (torch.from_numpy(np.stack(arr))[:, None] - 0.5) / 0.25


def with_silu(model: nn.Module) -> nn.Module:
    """The same network with every ReLU replaced by SiLU (curved: a non-zero Hessian)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.SiLU())
    return model


def small_cnn(dims: int) -> nn.Sequential:
    conv, bn, pool, gap = {2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d),
                           3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d)}[dims]
    torch.manual_seed(dims)
    model = nn.Sequential(conv(1, 4, 3, padding=1), bn(4), nn.ReLU(inplace=True), pool(2),
                          conv(4, 8, 3, padding=1), bn(8), nn.ReLU(inplace=True), gap(1), nn.Flatten(), nn.Linear(8, 3))
    for norm in (model[1], model[5]):  # non-trivial running statistics: FullGrad's implicit biases are non-zero
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        nn.init.uniform_(norm.bias, -0.3, 0.3)
    return model.eval()


# ----------------------------------------------------------------------------- pytorch-grad-cam


@pytest.mark.parametrize("method", ["fem", "finercam", "fullgrad"])
def test_agrees_with_pytorch_grad_cam_on_brain_mri(grey_resnet: nn.Module, method: str) -> None:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = brain_slices(64, 2)
    hooks = hook_count(grey_resnet)
    ours = explain(grey_resnet, x, method, layer=None if method == "fullgrad" else "layer3").maps[:, 0]
    assert hook_count(grey_resnet) == hooks
    cls = {"fem": pgc.FEM, "finercam": pgc.FinerCAM, "fullgrad": pgc.FullGrad}[method]
    layers = [] if method == "fullgrad" else [grey_resnet.layer3]
    with cls(model=grey_resnet, target_layers=layers) as cam:
        if method == "finercam":  # its own default: the predicted class against its 3 closest
            theirs = cam(input_tensor=x)
        else:
            pred = grey_resnet(x).argmax(1).tolist()
            theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(p) for p in pred])
    for i in range(len(x)):
        assert pearson(ours[i], theirs[i]) >= 0.99, (method, i)


def test_finercam_differs_from_gradcam_and_explains_the_same_targets(grey_resnet: nn.Module) -> None:
    x = brain_slices(64, 2)
    finer = explain(grey_resnet, x, "finercam", layer="layer3")
    grad = explain(grey_resnet, x, "gradcam", layer="layer3")
    assert max(abs(pearson(finer.raw[i], grad.raw[i])) for i in range(2)) < 0.999  # the comparison changes the map
    assert torch.equal(finer.targets, grad.targets)


def test_kpcacam_is_scikit_learns_kernel_pca_with_a_fixed_sign(grey_resnet: nn.Module) -> None:
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_kernel

    x = brain_slices(64, 2)
    acts = {}
    handle = grey_resnet.layer3.register_forward_hook(lambda _m, _i, o: acts.setdefault("a", o.detach()))
    with torch.no_grad():
        grey_resnet(x)
    handle.remove()
    act = acts["a"]
    for kernel in ("sigmoid", "rbf"):
        ours = explain(grey_resnet, x, "kpcacam", layer="layer3", kernel=kernel)
        projection = kernel_pca_projection(act, kernel)
        torch.testing.assert_close(ours.raw[:, 0], projection.clamp_min(0))
        reference = get_2d_projection_kernel(act.numpy(), kernel, None)  # sign left to the solver
        for i in range(len(x)):
            r = pearson(projection[i], reference[i])
            assert abs(r) >= 0.999
            # our sign: positive correlation with the channel sum
            assert pearson(projection[i], act[i].sum(0)) > 0
            aligned = np.maximum(np.sign(r) * reference[i : i + 1], 0)
            theirs = scale_cam_image(aligned, (64, 64))[0]  # the reference's ReLU + scaling
            assert pearson(ours.maps[i, 0], theirs) >= 0.99


def test_shapleycam_agrees_with_pytorch_grad_cam_where_the_hessian_matters(grey_resnet: nn.Module) -> None:
    from pytorch_grad_cam import ShapleyCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    x = brain_slices(64, 2)
    # ReLU network, logit score: piecewise linear, H = 0, so Shapley-CAM is Grad-CAM exactly
    shap = explain(grey_resnet, x, "shapleycam", layer="layer3")
    torch.testing.assert_close(shap.raw, explain(grey_resnet, x, "gradcam", layer="layer3").raw, rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)
    curved = with_silu(torchvision.models.resnet18(num_classes=3))
    curved.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    curved.eval()
    ours = explain(curved, x, "shapleycam", layer="layer3", score="probability")
    grad = explain(curved, x, "gradcam", layer="layer3", score="probability")
    assert float((ours.raw - grad.raw).abs().max()) > 0.02 * float(grad.raw.abs().max())  # the H A term is there
    pred = curved(x).argmax(1).tolist()
    with ShapleyCAM(model=curved, target_layers=[curved.layer3]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputSoftmaxTarget(p) for p in pred])
    for i in range(len(x)):
        assert pearson(ours.maps[i, 0], theirs[i]) >= 0.99


def test_randomcam_is_the_reference_pipeline_on_its_seeded_uniform_draws(grey_resnet: nn.Module) -> None:
    from pytorch_grad_cam import RandomCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = brain_slices(64, 2)
    ours = explain(grey_resnet, x, "randomcam", target=0, layer="layer3", seed=5)
    # the documented draw: w = 2 U - 1 from torch.Generator().manual_seed(seed), one per target and channel
    draws = 2 * torch.rand((1, 256), generator=torch.Generator().manual_seed(5)) - 1

    class SameDraws(RandomCAM):  # the reference's pipeline (ReLU, scaling) on those weights
        def get_cam_weights(self, *args):
            return draws.expand(len(x), -1).numpy()

    with SameDraws(model=grey_resnet, target_layers=[grey_resnet.layer3]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * len(x))
    for i in range(len(x)):
        assert pearson(ours.maps[i, 0], theirs[i]) >= 0.99
    seeds = torch.stack([explain(grey_resnet, x[:1], "randomcam", target=0, layer="layer3", seed=s).raw[0, 0] for s in range(4)])
    assert torch.equal(seeds[1], explain(grey_resnet, x[:1], "randomcam", target=0, layer="layer3", seed=1).raw[0, 0])
    assert len({tuple(m.flatten().tolist()) for m in seeds}) >= 3  # other seeds, other maps (all-negative ones vanish)


# ----------------------------------------------------------------------------- TorchCAM


@pytest.mark.parametrize("method", ["sscam", "iscam", "smoothgradcampp"])
def test_agrees_with_torchcam_under_the_same_seed(grey_resnet: nn.Module, method: str) -> None:
    import torchcam.methods as tc

    x = brain_slices(64, 2)
    options = dict(num_samples=1 if method == "sscam" else 2, **({"batch_size": 64} if method != "smoothgradcampp" else {}))
    cls = {"sscam": tc.SSCAM, "iscam": tc.ISCAM, "smoothgradcampp": tc.SmoothGradCAMpp}[method]
    for i in range(len(x)):
        xi = x[i : i + 1]
        with cls(grey_resnet, "layer1", input_shape=tuple(xi.shape[1:]), **options) as extractor:
            scores = grey_resnet(xi)
            torch.manual_seed(11)
            theirs = extractor(class_idx=int(scores.argmax()), scores=scores)[0]
        seeded = {} if method == "iscam" else {"seed": 11}
        ours = explain(grey_resnet, xi, method, layer="layer1", **options, **seeded)
        assert pearson(ours.raw[0, 0], theirs[0]) >= 0.99, (method, i)


# ----------------------------------------------------------------------------- 2D / 3D, batches


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", NEW)
def test_runs_in_2d_and_3d_and_a_batch_equals_its_images(method: str, dims: int) -> None:
    model = small_cnn(dims)
    torch.manual_seed(10 + dims)
    x = torch.randn(3, 1, *([10] * dims))
    layer = None if method == "fullgrad" else "6"
    hooks = hook_count(model)
    batched = explain(model, x, method, target="all", layer=layer, **LIGHT.get(method, {}))
    assert batched.maps.shape == (3, 3, *x.shape[2:]) and bool(torch.isfinite(batched.maps).all())
    assert float(batched.maps.min()) >= 0 and float(batched.maps.max()) <= 1 and float(batched.maps.max()) > 0
    single = torch.cat([explain(model, x[i : i + 1], method, target="all", layer=layer, **LIGHT.get(method, {})).raw for i in range(3)])
    torch.testing.assert_close(batched.raw, single, rtol=1e-4, atol=1e-5)
    assert hook_count(model) == hooks and all(p.grad is None for p in model.parameters())


class Fragile(nn.Module):
    """A small CNN that can be made to fail inside a method (after the engine's forward pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn(2)
        self.calls, self.fail_from = 0, math.inf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.fail_from:
            raise RuntimeError("simulated failure inside the method")
        return self.net(x)


@pytest.mark.parametrize("method", ["fullgrad", "shapleycam", "finercam", "smoothgradcampp", "sscam"])
def test_own_passes_leave_the_model_as_it_was_even_when_they_fail(method: str) -> None:
    model = Fragile().train()
    modes = [m.training for m in model.modules()]
    hooks = hook_count(model)
    model.fail_from = 2
    with pytest.raises(RuntimeError, match="simulated failure"):
        explain(model, torch.randn(2, 1, 10, 10), method, layer=None if method == "fullgrad" else "net.6", **LIGHT.get(method, {}))
    assert [m.training for m in model.modules()] == modes and hook_count(model) == hooks
    assert torch.is_grad_enabled()


@pytest.mark.parametrize(("method", "options", "match"), [
    ("kpcacam", {"kernel": "gauss"}, "kernel"),
    ("kpcacam", {"gamma": -1.0}, "gamma"),
    ("fem", {"k": float("nan")}, "k="),
    ("finercam", {"base": "eigencam"}, "base"),
    ("finercam", {"comparisons": (0, 1)}, "comparisons"),
    ("sscam", {"num_samples": 0}, "num_samples"),
    ("sscam", {"std": -1.0}, "std"),
    ("iscam", {"batch_size": 0}, "batch_size"),
    ("iscam", {"seed": 1}, "no option 'seed'"),
    ("smoothgradcampp", {"num_samples": 0}, "num_samples"),
    ("randomcam", {"seed": "one"}, "seed"),
    ("shapleycam", {"top_k_channels": -2}, "top_k_channels"),
    ("fullgrad", {"layers": "all"}, "no option"),
])
def test_bad_options_are_one_line_medlens_errors(method: str, options: dict, match: str) -> None:
    model = small_cnn(2)
    with pytest.raises(MedlensError, match=match) as err:
        explain(model, torch.randn(1, 1, 10, 10), method, layer=None if method == "fullgrad" else "6", **options)
    assert "\n" not in str(err.value)


def test_models_the_methods_cannot_explain_are_refused_in_one_line() -> None:
    no_bias = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(MedlensError, match="fullgrad needs 2D convolutions or batch norms with biases"):
        explain(no_bias, torch.randn(1, 1, 8, 8), "fullgrad")
    one_class = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)).eval()
    with pytest.raises(MedlensError, match="finercam compares the target with other classes"):
        explain(one_class, torch.randn(1, 1, 8, 8), "finercam", layer="1")
