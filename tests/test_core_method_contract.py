"""The method contract: what the engine captures comes from the method's base class (no
capability flags), old flags still work through a one-time translation, and one hook idiom
(core.hooks.Hooks) leaves no hook behind on any module, even when a forward pass fails midway."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import Tensor, nn

import medlens
from medlens import MedlensError, explain
from medlens.core.capture import LayerCapture, trace_layers
from medlens.core.engine import (ActivationMethod, AttentionGradientMethod, AttentionMethod, Context, InputGradientMethod, InputMethod,
                                 LayerMethod, Method, Needs, PerturbationMethod)
from medlens.core.hooks import Hooks
from medlens.core.targets import scored
from medlens.methods.attribution import guided_relus
from conftest import tiny_timm_vit


def module_hooks(model: nn.Module) -> dict[str, int]:
    """Per module, the number of forward, forward-pre and backward hooks (nonzero only)."""
    counts = {name: len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for name, m in model.named_modules()}
    return {name: n for name, n in counts.items() if n}


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


class Explode(nn.Module):
    """Identity until armed, then raises in the middle of the forward pass."""

    def __init__(self, when: str = "always") -> None:
        super().__init__()
        self.when = when

    def forward(self, x: Tensor) -> Tensor:
        if self.when == "always" or (self.when == "big-batch" and x.shape[0] > 2):
            raise RuntimeError("boom mid-forward")
        return x


# --- the contract comes from the base class ------------------------------------------------------
@pytest.mark.parametrize(("name", "base", "needs"), [
    ("gradcam", LayerMethod, Needs(layers=True, layer_gradients=True)),
    ("eigencam", ActivationMethod, Needs(layers=True)),
    ("scorecam", ActivationMethod, Needs(layers=True)),
    ("ablationcam", ActivationMethod, Needs(layers=True)),
    ("cam", ActivationMethod, Needs(layers=True)),
    ("saliency", InputGradientMethod, Needs(input_gradients=True)),
    ("inputxgradient", InputGradientMethod, Needs(input_gradients=True)),
    ("integrated-gradients", InputMethod, Needs()),
    ("occlusion", PerturbationMethod, Needs()),
    ("rise", PerturbationMethod, Needs()),
    ("feature-ablation", PerturbationMethod, Needs()),
    ("rollout", AttentionMethod, Needs(attention=True)),
    ("chefer", AttentionGradientMethod, Needs(attention=True, attention_gradients=True)),
])
def test_each_method_family_declares_what_it_needs_by_its_base(name: str, base: type, needs: Needs) -> None:
    cls = medlens.METHODS[name]
    assert issubclass(cls, base) and cls.needs() == needs
    assert not any(flag in vars(klass) for klass in cls.__mro__ for flag in ("uses_layer", "uses_gradients", "uses_input_gradients",
                                                                             "classification_only", "reads_score"))


def test_a_gradient_free_layer_method_gets_activations_only_and_no_graph(resnet: nn.Module) -> None:
    seen = {}

    class Mean(ActivationMethod):
        name = "test-mean-activation"

        def layer_map(self, activation, gradient, ctx, layer):
            seen.update(gradient=gradient, grads=dict(ctx.gradients), graph=activation.requires_grad, inputs=ctx.input_gradients)
            return activation.mean(1, keepdim=True).expand(-1, ctx.targets.shape[1], *activation.shape[2:])

    out = explain(resnet, torch.randn(2, 3, 64, 64), Mean(), layer="layer3")
    assert seen == {"gradient": None, "grads": {}, "graph": False, "inputs": None}
    assert out.layers == ["layer3"] and out.maps.shape == (2, 1, 64, 64)


def test_a_perturbation_method_scores_copies_through_ctx_score(resnet: nn.Module) -> None:
    class HalfDrop(PerturbationMethod):
        """The drop of the target score when the image is halved, as a constant map."""

        name = "test-half-drop"

        def compute(self, ctx: Context) -> Tensor:
            drop = ctx.scores - ctx.score(ctx.x * 0.5)  # (B, K)
            return drop.view(*drop.shape, 1, 1).expand(-1, -1, *ctx.x.shape[2:])

    x = torch.randn(2, 3, 32, 32)
    out = explain(resnet, x, HalfDrop(), target=1)
    with torch.no_grad():
        expected = resnet(x)[:, 1] - resnet(x * 0.5)[:, 1]
    torch.testing.assert_close(out.raw[:, 0, 0, 0], expected, rtol=1e-4, atol=1e-5)
    assert out.layers == [] and "auto_layer" not in out.info


# --- deprecated flags: translated once, so code written against them still works ----------------
def test_old_flags_are_translated_once_into_the_same_contract(resnet: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        class OldEigen(LayerMethod):
            name = "test-old-eigen"
            uses_gradients = False
            layer_map = medlens.METHODS["eigencam"].layer_map

        class OldSaliency(InputMethod):
            name = "test-old-saliency"
            uses_input_gradients = True
            compute = medlens.METHODS["saliency"].compute

    assert len([w for w in caught if issubclass(w.category, DeprecationWarning)]) == 2
    assert OldEigen.needs() == Needs(layers=True) and OldSaliency.needs() == Needs(input_gradients=True)
    torch.testing.assert_close(explain(resnet, x, OldEigen(), layer="layer3").raw, explain(resnet, x, "eigencam", layer="layer3").raw)
    torch.testing.assert_close(explain(resnet, x, OldSaliency(), target=2).raw, explain(resnet, x, "saliency", target=2).raw)


def test_old_classification_only_and_reads_score_flags_become_checks(resnet: nn.Module) -> None:
    from monai.networks.nets import UNet

    class OldHeadOnly(LayerMethod):
        name = "test-old-head-only"
        uses_gradients = False
        classification_only = True
        reads_score = False
        layer_map = medlens.METHODS["eigencam"].layer_map

    unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    with pytest.raises(MedlensError, match="test-old-head-only applies to classifiers only, not segmentation outputs"):
        explain(unet, torch.randn(1, 1, 16, 16), OldHeadOnly(), target=1)
    with pytest.raises(MedlensError, match=r"test-old-head-only reads the model's weights, not a score: score='probability'"):
        explain(resnet, torch.randn(1, 3, 64, 64), OldHeadOnly(), score="probability")
    assert explain(resnet, torch.randn(1, 3, 64, 64), OldHeadOnly(), layer="layer3").maps.shape == (1, 1, 64, 64)
    assert module_hooks(unet) == {} and module_hooks(resnet) == {}


def test_a_wrapper_asks_the_wrapped_method_whether_the_score_applies(resnet: nn.Module) -> None:
    with pytest.raises(MedlensError, match="cam reads the head's weights"):
        explain(resnet, torch.randn(1, 3, 64, 64), "cam", score="probability", aug_smooth=True)


# --- a custom attention method written against the engine's provider ------------------------------
def test_a_custom_attention_method_reads_the_provider_and_gradients() -> None:
    model = tiny_timm_vit(depth=2)
    x = torch.randn(2, 3, 64, 48)

    class LastGradAttention(AttentionGradientMethod):
        """|dY/dA ⊙ A| of the last block's class-token row, mean over heads."""

        name = "test-last-grad-attention"

        def compute(self, ctx: Context) -> Tensor:
            probs, grads = ctx.attention.probs()[-1], ctx.attention_gradients[-1]  # (B, H, N, N), (B, K, H, N, N)
            row = (grads * probs.unsqueeze(1))[..., 0, 1:].abs().mean(2)  # (B, K, N - 1)
            return row.unflatten(-1, (4, 3))

    out = explain(model, x, LastGradAttention(), target=torch.tensor([[0, 1], [1, 0]]))
    # the same quantities by hand: autograd through the captured attention of an unfused copy
    from medlens.core.attention import AttentionCapture

    with AttentionCapture(model, grad=True) as cap, torch.enable_grad():
        logits = model(x.requires_grad_(True))
    probs = cap.probs()[-1]
    for b, k in ((0, 0), (0, 1), (1, 1)):
        (g,) = torch.autograd.grad(logits[b, int(out.targets[b, k])], probs, retain_graph=True)
        expected = (g[b] * probs[b])[:, 0, 1:].abs().mean(0).view(4, 3)
        torch.testing.assert_close(out.raw[b, k], expected.detach(), rtol=1e-4, atol=1e-7)
    assert out.task == "classification" and module_hooks(model) == {}


# --- one hook idiom: nothing left on any module after a failure mid-forward -----------------------
def test_hooks_is_a_list_of_handles_removed_on_exit_even_on_exceptions() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(ValueError), Hooks() as hooks:
        hooks.forward(model[0], lambda *_: None)
        hooks.forward_pre(model[1], lambda *_: None)
        hooks.backward(model[1], lambda *_: None)
        assert len(hooks) == 3 and sum(module_hooks(model).values()) == 3
        raise ValueError("fails inside")
    assert module_hooks(model) == {} and len(hooks) == 0
    hooks.remove()  # idempotent


def _broken_resnet(when: str = "always") -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    model.layer4 = nn.Sequential(model.layer4, Explode(when))
    return model


@pytest.mark.parametrize(("method", "options"), [
    ("gradcam", {"layer": "layer3"}), ("layercam", {"layer": ["layer2", "layer3"]}), ("saliency", {}), ("guided-backprop", {}),
    ("guided-gradcam", {"layer": "layer3"}), ("scorecam", {"layer": "layer3", "top_k_channels": 2}),
    ("occlusion", {"window": 16}), ("gradcam", {"layer": "layer3", "score": "probability"}),
    ("gradcam", {"layer": "layer3", "aug_smooth": True}),
])
def test_no_hook_remains_after_an_exception_mid_forward(method: str, options: dict) -> None:
    model = _broken_resnet()
    with pytest.raises(RuntimeError, match="boom mid-forward"):
        explain(model, torch.randn(1, 3, 64, 64), method, **options)
    assert module_hooks(model) == {}


def test_ablation_cam_removes_its_ablation_hook_when_the_ablated_pass_fails() -> None:
    model = _broken_resnet("big-batch")  # the clean pass (batch 1) runs; the ablated copies raise
    with pytest.raises(RuntimeError, match="boom mid-forward"):
        explain(model, torch.randn(1, 3, 64, 64), "ablationcam", layer="layer3", top_k_channels=4)
    assert module_hooks(model) == {}


def test_capture_guided_relus_score_and_trace_clean_up_after_failures() -> None:
    model = _broken_resnet()
    x = torch.randn(1, 3, 64, 64)
    for context in (lambda: LayerCapture(model, ["layer1", "layer3"]), lambda: guided_relus(model), lambda: scored(model, "probability")):
        with pytest.raises(RuntimeError, match="boom"), context():
            model(x)
        assert module_hooks(model) == {}
    with pytest.raises(RuntimeError, match="boom"):
        trace_layers(model, x)
    assert module_hooks(model) == {}


@pytest.mark.parametrize("method", ["attention", "rollout", "grad-rollout", "chefer", "chefer-generic"])
def test_attention_capture_leaves_no_hook_when_a_block_fails(method: str) -> None:
    model = tiny_timm_vit(depth=3)
    model.blocks[1].ls2 = Explode()  # after block 1's attention and MLP: blocks 0 and 1 were captured
    with pytest.raises(RuntimeError, match="boom mid-forward"):
        explain(model, torch.randn(1, 3, 64, 48), method)
    assert module_hooks(model) == {}


def test_a_failing_forward_of_a_custom_method_keeps_the_model_as_it_was(resnet: nn.Module) -> None:
    class Fails(Method):  # a bare Method is a layer method (the README's custom-method contract)
        name = "test-fails-in-compute"

        def layer_map(self, activation, gradient, ctx, layer):
            assert gradient is not None and gradient.shape[:3] == (1, 1, activation.shape[1])
            raise MedlensError("fails in the method")

    with pytest.raises(MedlensError, match="fails in the method"):
        explain(resnet, torch.randn(1, 3, 64, 64), Fails(), layer="layer3")
    assert module_hooks(resnet) == {} and not resnet.training
