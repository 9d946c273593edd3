"""``hf:<folder>``: transformers image models saved with save_pretrained (random weights, tiny
configs), their attention under eager and sdpa, Chefer against timm with the same weights,
Swin Grad-CAM on its token grid, the image processor's preprocessing, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from medlens import explain  # noqa: E402
from medlens.cli import app  # noqa: E402
from medlens.core.attention import AttentionCapture, attention_maps, find_attention  # noqa: E402
from medlens.core.capture import auto_layer  # noqa: E402
from medlens.core.targets import model_output  # noqa: E402
from medlens.core.tokens import tokens_to_grid  # noqa: E402
from medlens.errors import MedlensError  # noqa: E402
from medlens.methods.vit import vit_relevance  # noqa: E402
from medlens.models import build_model  # noqa: E402
from medlens.models.hf import HFImageModel  # noqa: E402
from medlens.workflows.explain import prepare  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, layer_norm_eps=1e-6)


def _save(model: torch.nn.Module, folder: Path, processor: object | None = None) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    """A tiny ViT classifier (3 classes, named) with an image processor, saved as safetensors."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(**TINY, num_labels=3, id2label={0: "glioma", 1: "meningioma", 2: "pituitary"},
                                    label2id={"glioma": 0, "meningioma": 1, "pituitary": 2})
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    return _save(transformers.ViTForImageClassification(config), tmp_path_factory.mktemp("hf-vit"), processor)


def _eager_and_sdpa(folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The saved model built twice: eager attention and PyTorch's scaled-dot-product attention."""
    return (build_model(f"hf:{folder}", attn_implementation="eager"), build_model(f"hf:{folder}", attn_implementation="sdpa"))


def _x(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_hf_vit_loads_from_the_folder_with_its_preprocessing_and_class_names(vit_dir):
    model = build_model(f"hf:{vit_dir}")
    assert isinstance(model, HFImageModel) and not model.training
    prep = model.preprocessing
    assert prep.size == (32, 32) and prep.in_channels == 3
    assert prep.mean == pytest.approx((0.5, 0.4, 0.3)) and prep.std == pytest.approx((0.2, 0.25, 0.3)) and prep.scale == 1.0
    assert prep.class_names == ["glioma", "meningioma", "pituitary"]
    x = torch.rand(3, 32, 32)
    expected = (x - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    assert torch.allclose(prep(x), expected)
    # the model's logits are the transformers model's own, read from its ModelOutput
    with torch.no_grad():
        out = model.hf(pixel_values=_x())
        assert torch.equal(model(_x()), model_output(out)) and torch.equal(model_output(out), out.logits)


def test_hf_refuses_hub_names_pickles_and_missing_weights(tmp_path):
    with pytest.raises(MedlensError, match="downloads nothing") as err:
        build_model("hf:google/vit-base-patch16-224")
    assert "\n" not in str(err.value)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY, num_labels=2))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(MedlensError, match="pytorch_model.bin .*never loads") as err:
        build_model(f"hf:{tmp_path}")
    assert "\n" not in str(err.value)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(MedlensError, match="no model.safetensors"):
        build_model(f"hf:{tmp_path}")


def test_hf_vit_attention_equals_output_attentions_under_eager_and_sdpa(vit_dir):
    eager, sdpa = _eager_and_sdpa(vit_dir)
    assert eager.hf.config._attn_implementation == "eager" and sdpa.hf.config._attn_implementation == "sdpa"
    x = _x()
    with torch.no_grad():
        reference = eager.hf(pixel_values=x, output_attentions=True).attentions
        logits = sdpa(x)
    assert len(reference) == 2 and reference[0].shape == (2, 2, 17, 17)
    for model in (eager, sdpa):
        ours = attention_maps(model, x)
        diffs = [float((a - b).abs().max()) for a, b in zip(ours, reference)]
        assert max(diffs) < 1e-5, diffs
    # capturing with gradients and LRP records leaves the outputs as they were
    with AttentionCapture(sdpa, grad=True, record=True):
        spliced = sdpa(x)
    assert torch.equal(spliced.detach(), logits)
    assert [s.kind for s in find_attention(sdpa)] == ["hf", "hf"]


def test_hf_dinov2_with_registers_attention_and_token_grid(tmp_path):
    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=4, num_labels=2)
    eager, sdpa = _eager_and_sdpa(_save(transformers.Dinov2WithRegistersForImageClassification(config), tmp_path))
    x = _x()
    with torch.no_grad():
        reference = eager.hf(pixel_values=x, output_attentions=True).attentions
    assert reference[0].shape[-1] == 1 + 4 + 16
    for model in (eager, sdpa):
        assert max(float((a - b).abs().max()) for a, b in zip(attention_maps(model, x), reference)) < 1e-5
    assert sdpa.token_grid(21, (32, 32)) == ((4, 4), 5)
    for method in ("attention", "rollout", "grad-rollout", "gradcam"):
        maps = explain(sdpa, x, method).maps
        assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all()


def _hf_vit_to_timm(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """HF ViTForImageClassification keys -> timm VisionTransformer keys (q/k/v concatenated)."""
    out = {
        "cls_token": state["vit.embeddings.cls_token"],
        "pos_embed": state["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": state["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["vit.layernorm.weight"],
        "norm.bias": state["vit.layernorm.bias"],
        "head.weight": state["classifier.weight"],
        "head.bias": state["classifier.bias"],
    }
    for i in range(depth):
        hf, tm = f"vit.layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[tm + "attn.qkv." + part] = torch.cat([state[hf + f"attention.{p}_proj.{part}"] for p in "qkv"], 0)
            out[tm + "attn.proj." + part] = state[hf + "attention.o_proj." + part]
            out[tm + "norm1." + part] = state[hf + "layernorm_before." + part]
            out[tm + "norm2." + part] = state[hf + "layernorm_after." + part]
            out[tm + "mlp.fc1." + part] = state[hf + "mlp.fc1." + part]
            out[tm + "mlp.fc2." + part] = state[hf + "mlp.fc2." + part]
    return out


def test_chefer_on_hf_vit_equals_chefer_on_timm_vit_with_the_same_weights(vit_dir):
    from timm.models.vision_transformer import VisionTransformer

    model = build_model(f"hf:{vit_dir}", attn_implementation="sdpa")
    timm_vit = VisionTransformer(img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True).eval()
    timm_vit.load_state_dict(_hf_vit_to_timm(model.hf.state_dict(), 2))
    x = _x()
    with torch.no_grad():
        assert float((timm_vit(x) - model(x)).abs().max()) < 1e-5
    for method in ("chefer", "grad-rollout", "rollout", "attention"):
        ours = vit_relevance(model, x, method, targets="all")
        theirs = vit_relevance(timm_vit, x, method, targets="all")
        assert ours.shape == theirs.shape == (2, 3, 4, 4)
        scale = float(theirs.abs().max())
        assert scale > 0 and float((ours - theirs).abs().max()) <= 1e-5 * scale, method  # relative: Chefer maps are small


def test_hf_deit_distilled_chefer_and_gradcam(tmp_path):
    torch.manual_seed(0)
    config = transformers.DeiTConfig(**TINY, num_labels=2)
    folder = _save(transformers.DeiTForImageClassificationWithTeacher(config), tmp_path)
    model = build_model(f"hf:{folder}")
    assert model.default_token_layer_name == "hf.deit.layers.1.layernorm_before"
    x = _x()
    assert model.token_grid(18, (32, 32)) == ((4, 4), 2)
    for method in ("chefer", "gradcam"):
        maps = explain(model, x, method).maps
        assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all() and float(maps.amax()) > 0


def test_swin_gradcam_finds_the_last_stage_grid(tmp_path):
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3)
    folder = _save(transformers.SwinForImageClassification(config), tmp_path)
    model = build_model(f"hf:{folder}")
    x = _x()
    layer = auto_layer(model, x)
    assert layer == "hf.swin.encoder.layers.1.blocks.0.layernorm_before"
    seen = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.setdefault("tokens", out))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert seen["tokens"].shape == (2, 16, 32)  # 32 / 4 = 8 patches, halved once: a 4x4 grid
    assert tokens_to_grid(seen["tokens"], model, x).shape == (2, 32, 4, 4)
    stage0 = torch.zeros(2, 64, 16)
    assert tokens_to_grid(stage0, model, x).shape == (2, 16, 8, 8)
    for method in ("gradcam", "gradcam++", "layercam"):
        maps = explain(model, x, method, target="all").maps
        assert maps.shape == (2, 3, 32, 32) and torch.isfinite(maps).all()
    with pytest.raises(MedlensError, match="no self-attention module"):
        explain(model, x, "rollout")


@pytest.mark.parametrize("kind", ["resnet", "convnext"])
def test_hf_convolutional_classifiers_pick_a_spatial_layer(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "resnet":
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=2)
        model = transformers.ResNetForImageClassification(config)
    else:
        config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
        model = transformers.ConvNextForImageClassification(config)
    net = build_model(f"hf:{_save(model, tmp_path)}")
    assert net.default_token_layer_name is None
    maps = explain(net, _x(size=64), "gradcam").maps
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all()


def test_hf_segmentation_head_is_explained_with_a_region(tmp_path):
    torch.manual_seed(0)
    config = transformers.SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                                          decoder_hidden_size=32, num_labels=2)
    folder = _save(transformers.SegformerForSemanticSegmentation(config), tmp_path)
    model = build_model(f"hf:{folder}")
    assert model.task == "segmentation"
    x = _x(size=64)
    with torch.no_grad():
        assert model(x).shape == (2, 2, 64, 64)
    maps = explain(model, x, "gradcam", target=1, region=((8, 8), (40, 40))).maps
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all()


def test_prepare_applies_the_model_preprocessing(vit_dir):
    from medlens.io.loaded import Loaded

    model = build_model(f"hf:{vit_dir}")
    loaded = Loaded(torch.rand(1, 40, 48))
    item = prepare(Path("x.png"), loaded, 3, model.preprocessing.size, model.preprocessing)
    assert item.tensor.shape == (3, 32, 32)
    resized = torch.nn.functional.interpolate(loaded.display().float().expand(3, -1, -1)[None], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.allclose(item.tensor, model.preprocessing(resized), atol=1e-5)


def test_cli_explains_an_hf_folder_with_its_own_preprocessing(vit_dir, tmp_path):
    png = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)).save(png)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", f"hf:{vit_dir}", "none", str(png), "-m", "gradcam", "-m", "chefer", "-o", str(out)])
    assert result.exit_code == 0, result.output
    index = (out / "index.html").read_text()
    assert "glioma" in index or "meningioma" in index or "pituitary" in index  # class names from id2label
    assert len(list(out.rglob("*.png"))) >= 2
    result = CliRunner().invoke(app, ["explain", "hf:no/such-model", "none", str(png), "-o", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "downloads nothing" in result.output


def test_hf_beit_attention_with_layer_scale_equals_output_attentions(tmp_path):
    torch.manual_seed(0)
    config = transformers.BeitConfig(**TINY, num_labels=2, layer_scale_init_value=0.5)
    eager, sdpa = _eager_and_sdpa(_save(transformers.BeitForImageClassification(config), tmp_path))
    x = _x()
    with torch.no_grad():
        reference = eager.hf(pixel_values=x, output_attentions=True).attentions
    for model in (eager, sdpa):
        assert max(float((a - b).abs().max()) for a, b in zip(attention_maps(model, x), reference)) < 1e-5
    maps = explain(sdpa, x, "grad-rollout").maps
    assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all()
    with pytest.raises(MedlensError, match="chefer supports"):
        explain(sdpa, x, "chefer")


def test_served_hf_model_uses_its_own_preprocessing(vit_dir, tmp_path):
    """`medlens serve --model hf:DIR` builds the model through served_model: the model's channels,
    size, normalisation and class names; attention and CAM methods answer over the REST API."""
    from fastapi.testclient import TestClient

    from medlens.serve.app import create_app, served_model

    Image.fromarray((np.random.default_rng(0).random((40, 48)) * 255).astype(np.uint8)).save(tmp_path / "scan.png")
    served = served_model(f"hf:{vit_dir}")
    assert served.in_channels == 3 and served.size == (32, 32) and served.class_names == ["glioma", "meningioma", "pituitary"]
    client = TestClient(create_app([served], data_dir=tmp_path))
    for method in ("gradcam", "rollout"):
        answer = client.post("/api/explain", data={"path": "scan.png", "method": method})
        assert answer.status_code == 200, answer.text
        assert answer.json()["prediction"]["name"] in served.class_names
