"""LRP against zennit 0.5.1's own composites (built here from zennit's API, as its documentation
does) on real brain MRI and a hippocampus volume, against closed forms (LRP-0 = input x gradient
on a bias-free ReLU net, conservation), and the model left as it was."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from conftest import shared_path, tiny_torchvision_vit
from medlens import MedlensError, explain, get_method, hook_count
from test_deeplift import hippocampus_volume, mri_batch, pearson


def _resnet18() -> nn.Module:
    """A seeded 1-channel ResNet-18 whose batch norms are not the identity (so folding matters)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return _resnet18()


@pytest.fixture(scope="module")
def mri() -> torch.Tensor:
    """Two real brain MRI slices (2, 1, 64, 64) in [0, 1]."""
    return mri_batch(shared_path("brain-tumor-mri"), 2)


def zennit_reference(model: nn.Module, composite: str, x: torch.Tensor, target: torch.Tensor, canonizers: list) -> torch.Tensor:
    """zennit's relevance for ``composite`` (the named zennit composite where one exists), the
    output relevance being the target score, as medlens starts it."""
    from zennit import composites as zc, rules
    from zennit.attribution import Gradient
    from zennit.types import Convolution, Linear

    flat = x.flatten(1)
    shape = (-1,) + (1,) * (x.dim() - 1)
    low, high = flat.amin(1).view(shape), flat.amax(1).view(shape)  # each image's own range, as medlens
    uniform = {"epsilon": rules.Epsilon(), "gamma": rules.Gamma(gamma=0.25),
               "alpha2-beta1": rules.AlphaBeta(2.0, 1.0), "alpha1-beta0": rules.AlphaBeta(1.0, 0.0)}
    if composite in uniform:
        built = zc.LayerMapComposite(zc.layer_map_base() + [(Linear, uniform[composite])], canonizers=canonizers)
    elif composite == "epsilon+zbox":
        built = zc.SpecialFirstLayerMapComposite(zc.layer_map_base() + [(Linear, rules.Epsilon())],
                                                 [(Convolution, rules.ZBox(low, high))], canonizers=canonizers)
    elif composite == "epsilon-gamma-box":
        built = zc.EpsilonGammaBox(low=low, high=high, canonizers=canonizers)
    else:
        named = {"epsilon-plus": zc.EpsilonPlus, "epsilon-plus-flat": zc.EpsilonPlusFlat,
                 "epsilon-alpha2-beta1": zc.EpsilonAlpha2Beta1, "epsilon-alpha2-beta1-flat": zc.EpsilonAlpha2Beta1Flat}
        built = named[composite](canonizers=canonizers)
    with Gradient(model, built) as attributor:
        with torch.no_grad():
            scores = model(x)
        start = torch.zeros_like(scores).scatter(1, target[:, None], scores.gather(1, target[:, None]))
        _, relevance = attributor(x, start)
    return relevance.detach()


def vgg_style(dims: int = 2, classes: int = 3) -> nn.Sequential:
    """A seeded VGG-11-style CNN (conv-BN-ReLU, max pools), BN not the identity."""
    conv, bn, pool = {2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d), 3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d)}[dims]
    torch.manual_seed(dims)
    layers: list[nn.Module] = []
    channels = 1
    for width in (8, "M", 16, "M", 16, 16, "M"):
        layers += [pool(2)] if width == "M" else [conv(channels, width, 3, padding=1), bn(width), nn.ReLU(inplace=True)]
        channels = channels if width == "M" else width
    avg = nn.AdaptiveAvgPool2d(2) if dims == 2 else nn.AdaptiveAvgPool3d(2)
    model = nn.Sequential(nn.Sequential(*layers), avg, nn.Flatten(), nn.Linear(16 * 2 ** dims, 32), nn.ReLU(), nn.Linear(32, classes))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    return vgg_style()


def _agrees(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return pearson(ours, theirs) >= 0.99 and float((ours - theirs).abs().max()) <= 1e-5 * max(1.0, float(theirs.abs().max()))


CASES = [("epsilon", {}), ("gamma", {}), ("alpha2-beta1", {}), ("alpha1-beta0", {}), ("epsilon-plus", {}),
         ("epsilon-plus-flat", {}), ("epsilon-gamma-box", {}), ("epsilon-alpha2-beta1", {}),
         ("epsilon-alpha2-beta1-flat", {}), ("epsilon+zbox", {"first_layer": "zbox"})]


@pytest.mark.parametrize(("composite", "options"), CASES, ids=[c[0] for c in CASES])
def test_lrp_equals_zennit_on_a_vgg_style_cnn_and_real_brain_mri(vgg: nn.Module, mri: torch.Tensor, composite: str, options: dict) -> None:
    from zennit.torchvision import VGGCanonizer

    out = explain(vgg, mri, "lrp", target=[0, 2], composite=composite.split("+")[0], **options)
    theirs = zennit_reference(vgg, composite, mri, torch.tensor([0, 2]), [VGGCanonizer()])
    assert _agrees(out.info["attributions"][:, 0], theirs)
    assert out.maps.shape == (2, 1, 64, 64) and bool(torch.isfinite(out.maps).all())


@pytest.mark.parametrize("composite", ["epsilon-plus-flat", "epsilon-gamma-box"])
def test_lrp_equals_zennit_on_a_resnet18_with_its_canonizer(resnet: nn.Module, mri: torch.Tensor, composite: str) -> None:
    from zennit.torchvision import ResNetCanonizer

    out = explain(resnet, mri[:1], "lrp", target=2, composite=composite)
    theirs = zennit_reference(resnet, composite, mri[:1], torch.tensor([2]), [ResNetCanonizer()])
    assert _agrees(out.info["attributions"][:, 0], theirs)


def test_lrp_in_3d_equals_zennit_on_a_hippocampus_volume() -> None:
    from zennit.canonizers import SequentialMergeBatchNorm

    vol = hippocampus_volume(shared_path("hippocampus"), 1, size=24)
    model = vgg_style(dims=3)
    out = explain(model, vol, "lrp", target=0, composite="epsilon-gamma-box")
    theirs = zennit_reference(model, "epsilon-gamma-box", vol, torch.tensor([0]), [SequentialMergeBatchNorm()])
    assert out.maps.shape == (1, 1, 24, 24, 24) and _agrees(out.info["attributions"][:, 0], theirs)


def _bias_free_relu_cnn() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(128, 3, bias=False)).eval()


def test_lrp_zero_is_input_times_gradient_and_conserves_the_score(mri: torch.Tensor) -> None:
    # LRP-0 (epsilon -> 0) on a ReLU net without biases is x * df/dx (Ancona et al., ICLR 2018), and
    # relevance is conserved layer by layer: it adds up to the score it started from
    model = _bias_free_relu_cnn()
    lrp = explain(model, mri, "lrp", target="all", composite="epsilon", epsilon=1e-9, stabilizer=1e-12)
    ixg = explain(model, mri, "inputxgradient", target="all")
    torch.testing.assert_close(lrp.info["attributions"], ixg.info["attributions"], rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(lrp.raw.flatten(2).sum(2), lrp.scores, rtol=1e-4, atol=1e-7)
    plus = explain(model, mri, "lrp", target="all", composite="alpha1-beta0", batch_size=4)  # also conservative
    torch.testing.assert_close(plus.raw.flatten(2).sum(2), plus.scores, rtol=1e-3, atol=1e-6)
    # z+ on non-negative pixels: every pixel's relevance has the sign of the score it came from
    assert bool((plus.info["attributions"] * plus.scores.sign()[..., None, None, None] >= 0).all())


def test_lrp_all_targets_at_once_equal_one_by_one(vgg: nn.Module, mri: torch.Tensor) -> None:
    both = explain(vgg, mri, "lrp", target="all", composite="epsilon-plus-flat", batch_size=4)
    one = explain(vgg, mri, "lrp", target=1, composite="epsilon-plus-flat", batch_size=1)
    torch.testing.assert_close(one.raw[:, 0], both.raw[:, 1], rtol=1e-5, atol=1e-9)


class SharedConv(nn.Module):
    """A real CNN that applies one convolution twice: zennit's rules cannot handle it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        self.bn.running_mean.uniform_(-0.3, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.relu(self.shared(self.bn(self.stem(x))))))


def test_model_is_left_unchanged_after_a_call_and_after_an_exception(resnet: nn.Module, mri: torch.Tensor) -> None:
    resnet.train()
    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    explain(resnet, mri[:1], "lrp", composite="epsilon-gamma-box")
    assert hook_count(resnet) == 0 and all(m.training for m in resnet.modules())
    assert all(torch.equal(state[k], v) for k, v in resnet.state_dict().items())
    assert not any(hasattr(m, "canonizer_sum") for m in resnet.modules())
    resnet.eval()

    model = SharedConv().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(mri)
    with pytest.raises(MedlensError, match="'shared' \\(2 calls\\) is called more than once"):
        explain(model, mri, "lrp")  # raised with the batch norm folded in and the hooks on
    assert hook_count(model) == 0 and set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(mri), expected)


@pytest.mark.parametrize(("options", "fragment"), [
    (dict(composite="epsilon-plus-flatt"), "did you mean 'epsilon-plus-flat'"),
    (dict(first_layer="box"), "first_layer='box' unknown; use zbox, flat"),
    (dict(canonizer="vgg"), "canonizer='vgg' unknown"),
    (dict(epsilon=0.0), "epsilon=0.0 must be > 0"),
    (dict(gamma=-1.0), "gamma=-1.0 must be >= 0"),
    (dict(low=0.0), "low=0.0 and high must be given together"),
    (dict(low=1.0, high=0.0), "low=1.0 must be below high=0.0"),
    (dict(batch_size=0), "batch_size=0 must be at least 1"),
    (dict(composite=3), "composite=3 must be str"),
    (dict(rule="epsilon"), "no option 'rule'"),
])
def test_bad_options_are_refused_when_the_method_is_built(options: dict, fragment: str) -> None:
    with pytest.raises(MedlensError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        get_method("lrp", **options)


def test_lrp_refuses_transformers_in_one_line() -> None:
    vit = tiny_torchvision_vit()
    with pytest.raises(MedlensError, match="not attention layers") as info:
        explain(vit, torch.rand(1, 3, 64, 64), "lrp")
    assert "\n" not in str(info.value) and hook_count(vit) == 0
