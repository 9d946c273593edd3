"""The core contract: typed, validated method options (and their CLI form), score kinds for
every method family, ViT methods through the engine, and aug_smooth as a method wrapper."""

from __future__ import annotations

import inspect

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

import medlens
from medlens import MedlensError, explain, hook_count, normalise
from medlens.cli import app
from medlens.core.engine import AttentionMethod, InputMethod, LayerMethod, get_method, options_for
from medlens.core.options import convert, parse_options
from medlens.methods.cam import GradCAM
from medlens.methods.smoothing import AugSmooth
from medlens.metrics.faithfulness import perturbation_curve


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


# --- typed options ---------------------------------------------------------------------------
def test_options_are_typed_keyword_arguments_of_the_constructor() -> None:
    params = inspect.signature(GradCAM).parameters
    assert params["top_k_channels"].default is None and params["eigen_smooth"].default is False
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert GradCAM(top_k_channels=32).top_k_channels == 32


def test_a_misspelt_option_is_refused_at_construction_with_a_suggestion() -> None:
    with pytest.raises(MedlensError, match=r"no option 'top_k_chanels'; did you mean 'top_k_channels'\?.*eigen_smooth"):
        GradCAM(top_k_chanels=3)
    with pytest.raises(MedlensError, match="did you mean 'window'"):
        get_method("occlusion", windoww=3)


@pytest.mark.parametrize(("method", "options", "message"), [
    ("scorecam", {"top_k_channels": -2}, "top_k_channels=-2"),
    ("rollout", {"discard_ratio": 1.5}, r"discard_ratio=1.5 must be in \[0, 1\)"),
    ("grad-rollout", {"head_fusion": "median"}, "head_fusion='median' unknown; use mean, max, min"),
    ("smoothgrad", {"samples": 0}, "samples=0 must be at least 1"),
    ("gradcam", {"eigen_smooth": "yes"}, "must be bool"),
    ("gradcam", {"fusion": "avg"}, "fusion='avg' unknown"),
])
def test_out_of_range_options_are_refused_when_built(method: str, options: dict, message: str) -> None:
    with pytest.raises(MedlensError, match=message):
        get_method(method, **options)


def test_existing_call_style_still_passes_options_through_explain(resnet: nn.Module) -> None:
    x = torch.randn(1, 3, 32, 32)
    out = explain(resnet, x, "scorecam", top_k_channels=4, batch_size=4)
    assert out.maps.shape == (1, 1, 32, 32)
    with pytest.raises(MedlensError, match="did you mean 'top_k_channels'"):
        explain(resnet, x, "scorecam", top_k_channel=4)


def test_cli_strings_become_the_annotated_types() -> None:
    occlusion = medlens.METHODS["occlusion"]
    assert parse_options(occlusion, ["window=4,4", "stride=2", "batch-size=8"]) == {"window": (4, 4), "stride": 2, "batch_size": 8}
    assert parse_options(GradCAM, ["top_k_channels=0.5", "eigen_smooth=true"]) == {"top_k_channels": 0.5, "eigen_smooth": True}
    assert parse_options(GradCAM, ["top_k_channels=none"]) == {"top_k_channels": None}
    assert convert("0.9,1.1", tuple[float, ...]) == (0.9, 1.1)
    with pytest.raises(MedlensError, match="did you mean 'eigen_smooth'"):
        parse_options(GradCAM, ["eigen_smoth=true"])
    with pytest.raises(MedlensError, match="not a bool"):
        parse_options(GradCAM, ["eigen_smooth=maybe"])


def test_one_option_set_for_several_methods_keeps_each_methods_own() -> None:
    shared = {"n_masks": "8", "window": "4,4", "block": -2}
    among = ["rise", "occlusion", "rollout", "gradcam"]
    assert options_for("rise", shared, among) == {"n_masks": 8}
    assert options_for("occlusion", shared, among) == {"window": (4, 4)}
    assert options_for("gradcam", shared, among) == {}
    with pytest.raises(MedlensError, match="did you mean 'n_masks'"):
        options_for("rise", {"n_mask": 8}, among)


def test_medlens_methods_lists_every_method_with_options_defaults_and_reference() -> None:
    result = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in medlens.METHODS:
        assert name in result.output
    assert "top_k_channels" in result.output and "Selvaraju" in result.output and "aug_smooth" in result.output
    one = CliRunner().invoke(app, ["methods", "rise"], env={"COLUMNS": "200"})
    assert one.exit_code == 0 and "n_masks" in one.output and "1000" in one.output and "gradcam" not in one.output


def test_method_families_are_classes_not_flags() -> None:
    assert issubclass(medlens.METHODS["gradcam"], LayerMethod) and issubclass(medlens.METHODS["scorecam"], LayerMethod)
    assert issubclass(medlens.METHODS["saliency"], InputMethod) and issubclass(medlens.METHODS["rise"], InputMethod)
    assert issubclass(medlens.METHODS["chefer"], AttentionMethod)
    assert medlens.Method is not None and medlens.register is not None


# --- score kinds -----------------------------------------------------------------------------
#: one method per family (gradient CAM, perturbation CAM, input gradients, path/noise gradients,
#: input perturbations, composed), each score kind twice
FAMILIES = [("gradcam", {}, "layer4", "probability"), ("layercam", {}, "layer3", "log-probability"),
            ("scorecam", {"batch_size": 16, "top_k_channels": 16}, "layer4", "probability"), ("saliency", {}, None, "log-probability"),
            ("integrated-gradients", {"steps": 4}, None, "probability"), ("smoothgrad", {"samples": 3}, None, "log-probability"),
            ("occlusion", {"window": 16}, None, "log-probability"), ("rise", {"n_masks": 16}, None, "probability"),
            ("guided-gradcam", {}, "layer4", "probability")]


@pytest.mark.parametrize(("method", "options", "layer", "kind"), FAMILIES)
def test_score_kinds_equal_explaining_the_model_followed_by_softmax(resnet: nn.Module, method: str, options: dict, layer: str | None, kind: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    final = nn.Softmax(dim=1) if kind == "probability" else nn.LogSoftmax(dim=1)
    reference = explain(nn.Sequential(resnet, final).eval(), x, method, target=[1, 3], layer=None if layer is None else f"0.{layer}", **options)
    hooks = hook_count(resnet)
    ours = explain(resnet, x, method, target=[1, 3], layer=layer, score=kind, **options)
    assert hook_count(resnet) == hooks
    torch.testing.assert_close(ours.raw, reference.raw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.scores, reference.scores)
    assert ours.info["score"] == kind


def test_score_kinds_for_attention_methods_and_refused_for_cam() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    logit = explain(vit, x, "grad-rollout", target=2)
    prob = explain(vit, x, "grad-rollout", target=2, score="probability")
    torch.testing.assert_close(prob.logits, logit.logits.softmax(dim=1))
    assert prob.task == "classification" and not torch.allclose(prob.raw, logit.raw)
    with pytest.raises(MedlensError, match="cam reads the head's weights"):
        explain(torchvision.models.resnet18(num_classes=3).eval(), torch.randn(1, 3, 32, 32), "cam", score="probability")
    with pytest.raises(MedlensError, match="unknown score 'odds'"):
        explain(vit, x, "rollout", score="odds")


def test_faithfulness_takes_the_same_score_kinds(resnet: nn.Module) -> None:
    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, 32)
    maps = explain(resnet, x, "gradcam", target=1).maps[:, 0]
    prob = perturbation_curve(resnet, x, maps, targets=1, score="probability", steps=4)
    soft = perturbation_curve(resnet, x, maps, targets=1, score="softmax", steps=4)
    log = perturbation_curve(resnet, x, maps, targets=1, score="log-probability", steps=4)
    torch.testing.assert_close(prob.scores, soft.scores)
    torch.testing.assert_close(log.scores, prob.scores.log(), rtol=1e-4, atol=1e-5)


# --- ViT through the engine --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["attention", "rollout", "grad-rollout"])
def test_a_segmentation_vit_gives_a_segmentation_explanation(method: str) -> None:
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    model = UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 16), feature_size=8, hidden_size=32, mlp_dim=64,
                  num_heads=2, proj_type="conv").eval()
    x = torch.randn(1, 1, 32, 32, 16)
    region = torch.zeros(1, 1, 32, 32, 16)
    region[..., 8:20, 8:20, 4:12] = 1
    out = explain(model, x, method, target=1, region=region)
    assert out.task == "segmentation" and out.maps.shape == (1, 1, 32, 32, 16)
    assert hook_count(model) == 0


# --- aug_smooth as a wrapper -------------------------------------------------------------------
def _aug_smooth_by_hand(model: nn.Module, x: torch.Tensor, target: int, layer: str) -> torch.Tensor:
    """The definition: explain flipped/scaled copies, flip the maps back, average, renormalise."""
    maps = []
    for flip in (False, True):
        for scale in (0.9, 1.0, 1.1):
            copy = (x.flip(-1) if flip else x) * scale
            m = explain(model, copy, "gradcam", target=target, layer=layer).maps
            maps.append(m.flip(-1) if flip else m)
    return normalise(torch.stack(maps).mean(0))


def test_aug_smooth_is_a_wrapper_equal_to_its_definition(resnet: nn.Module) -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 3, 32, 32)
    flag = explain(resnet, x, "gradcam", target=2, layer="layer3", aug_smooth=True)
    wrapped = explain(resnet, x, AugSmooth(method="gradcam"), target=2, layer="layer3")
    torch.testing.assert_close(flag.maps, wrapped.maps)
    torch.testing.assert_close(flag.maps, _aug_smooth_by_hand(resnet, x, 2, "layer3"), rtol=1e-4, atol=1e-5)
    assert flag.info["augmentations"] == 6 and flag.method == "gradcam"
    with pytest.raises(MedlensError, match="did you mean 'aug_scales'"):
        AugSmooth(method="gradcam", aug_scale=(1.0,))
    one = explain(resnet, x, "gradcam", target=2, layer="layer3", aug_smooth=True, aug_scales=(1.0,), top_k_channels=8)
    assert one.info["augmentations"] == 2


def test_the_engine_module_imports_no_method_module() -> None:
    import ast
    from pathlib import Path

    import medlens.core.engine as engine

    tree = ast.parse(Path(engine.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("medlens.methods")]


# --- all-class maps: closed-form gradients through a proven GAP -> Linear head -------------------
@pytest.mark.parametrize("method", ["gradcam", "hirescam", "gradcam++"])
def test_all_class_maps_from_the_closed_form_equal_the_autograd_maps(method: str) -> None:
    torch.manual_seed(4)
    model = torchvision.models.resnet18(num_classes=12).eval()
    x = torch.randn(2, 3, 32, 32)
    everything = explain(model, x, method, target="all", layer="layer4")
    assert everything.info.get("closed_form_gradients") is True
    for k in (0, 5, 11):
        alone = explain(model, x, method, target=k, layer="layer4")  # one target: the autograd path
        assert "closed_form_gradients" not in alone.info
        torch.testing.assert_close(everything.raw[:, k : k + 1], alone.raw, rtol=1e-4, atol=1e-6)


def test_a_head_that_is_not_gap_linear_keeps_the_autograd_path() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                          nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(6, 10)).eval()
    out = explain(model, torch.randn(1, 1, 8, 8), "gradcam", target="all", layer="2")
    assert "closed_form_gradients" not in out.info
    prob = explain(torchvision.models.resnet18(num_classes=12).eval(), torch.randn(1, 3, 32, 32), "gradcam",
                   target="all", layer="layer4", score="probability")
    assert "closed_form_gradients" not in prob.info  # softmax couples the classes: no closed form


def test_the_readme_custom_method_still_works_and_takes_no_unknown_option(resnet: nn.Module) -> None:
    import torch.nn.functional as F

    @medlens.register
    class GradNormCAM(medlens.Method):
        name = "test-gradnorm-cam"

        def layer_map(self, activation, gradient, ctx, layer):  # (B, C, *s), (B, K, C, *s)
            weights = gradient.flatten(3).norm(dim=3)  # (B, K, C)
            return F.relu(torch.einsum("bkc,bc...->bk...", weights, activation))

    out = explain(resnet, torch.randn(1, 3, 32, 32), "test-gradnorm-cam", target=torch.tensor([[0, 1]]), layer=["layer3", "layer4"])
    assert out.maps.shape == (1, 2, 32, 32) and out.method == "test-gradnorm-cam"
    with pytest.raises(MedlensError, match="test-gradnorm-cam has no option 'alpha'"):
        explain(resnet, torch.randn(1, 3, 32, 32), "test-gradnorm-cam", alpha=1)
