"""Attention capture on unmodified timm / torchvision / MONAI ViTs, token reshaping, ViT Grad-CAM."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import medlens
from medlens.core.attention import AttentionCapture, attention_maps, find_attention
from medlens.errors import MedlensError
from medlens.core.tokens import default_token_layer, patch_grid, tokens_to_grid
from conftest import tiny_timm_vit, tiny_torchvision_vit


def tiny_timm(**kwargs) -> nn.Module:
    return tiny_timm_vit(**{"depth": 2, **kwargs})


def tiny_torchvision() -> nn.Module:
    return tiny_torchvision_vit()


def reference_attention(model: nn.Module, x: torch.Tensor, read_site, logit0) -> list[torch.Tensor]:
    """Attention probabilities of a copy, read at the module ``read_site(block.attn)`` returns (the
    classic hook, after switching the copy to its non-fused path), with their gradients of
    ``logit0(output).sum()`` retained."""
    ref = copy.deepcopy(model)
    probs: list[torch.Tensor] = []

    def keep(_m, _i, out):
        out.retain_grad()
        probs.append(out)

    for blk in ref.blocks:
        read_site(blk.attn).register_forward_hook(keep)
    logit0(ref(x)).sum().backward()
    return probs


def _timm_unfused_site(attn: nn.Module) -> nn.Module:
    attn.fused_attn = False
    return attn.attn_drop


def unfused_timm_reference(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Attention of a non-fused copy at its attn_drop, plus its grads of logit 0 w.r.t. each attention."""
    probs = reference_attention(model, x, _timm_unfused_site, lambda out: out[:, 0])
    return probs, torch.stack([p.grad for p in probs])


def test_timm_fused_capture_equals_unfused_reference_and_keeps_outputs() -> None:
    model = tiny_timm()
    assert all(blk.attn.fused_attn for blk in model.blocks), "timm should default to fused attention"
    x = torch.randn(3, 3, 64, 48)
    with torch.no_grad():
        before = model(x)
    probs = attention_maps(model, x)
    ref_probs, _ = unfused_timm_reference(model, x)
    assert len(probs) == 2 and probs[0].shape == (3, 3, 13, 13)
    for ours, ref in zip(probs, ref_probs):
        assert (ours - ref).abs().max() < 1e-5
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert all(blk.attn.fused_attn for blk in model.blocks)
    assert medlens.hook_count(model) == 0


def test_attention_gradients_match_unfused_reference_and_output_is_bit_identical() -> None:
    model = tiny_timm(reg_tokens=4)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        plain = model(x)
    with AttentionCapture(model, grad=True) as cap, torch.enable_grad():
        out = model(x.requires_grad_(True))
    assert torch.equal(out.detach(), plain)  # the splice changes no value
    grads = torch.autograd.grad(out[:, 0].sum(), cap.probs())
    ref_probs, ref_grads = unfused_timm_reference(model, x.detach())
    assert ref_probs[0].shape[-1] == 1 + 4 + 12
    for ours, ref in zip(grads, ref_grads):
        assert (ours - ref).abs().max() < 1e-5 * max(1.0, float(ref.abs().max()))


def test_torchvision_capture_equals_need_weights_reference() -> None:
    model = tiny_torchvision()
    x = torch.randn(2, 3, 64, 64)
    inputs: list[torch.Tensor] = []
    handles = [blk.ln_1.register_forward_hook(lambda _m, _i, out: inputs.append(out)) for blk in model.encoder.layers]
    with torch.no_grad():
        before = model(x)
    for h in handles:
        h.remove()
    probs = attention_maps(model, x)
    for blk, ln_out, ours in zip(model.encoder.layers, inputs, probs):
        with torch.no_grad():
            _, ref = blk.self_attention(ln_out, ln_out, ln_out, need_weights=True, average_attn_weights=False)
        assert ours.shape == ref.shape == (2, 2, 17, 17)
        assert (ours - ref).abs().max() < 1e-5
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_monai_sablock_capture_equals_saved_attention() -> None:
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    model = ViT(in_channels=1, img_size=(32, 32, 32), patch_size=(16, 16, 16), hidden_size=32, mlp_dim=64,
                num_layers=2, num_heads=4, classification=True, num_classes=2, save_attn=True).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    probs = attention_maps(model, x)
    for blk, ours in zip(model.blocks, probs):
        assert (ours - blk.attn.att_mat).abs().max() < 1e-5


def _monai_non_flash_site(attn: nn.Module) -> nn.Module:
    attn.use_flash_attention = False
    return attn.drop_weights


def _monai_reference_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """d logit 0 / d A of every SABlock on a non-flash copy, read at its drop_weights."""
    return [p.grad for p in reference_attention(model, x, _monai_non_flash_site, lambda out: out[0][:, 0])]


@pytest.mark.parametrize("include_fc", [True, False])
def test_monai_flash_attention_and_gradients_on_a_non_square_2d_vit(include_fc: bool) -> None:
    from monai.networks.blocks.transformerblock import TransformerBlock
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    model = ViT(in_channels=1, img_size=(64, 48), patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4,
                classification=True, num_classes=3, spatial_dims=2).eval()
    model.blocks = nn.ModuleList(
        TransformerBlock(32, 64, 4, use_flash_attention=True, include_fc=include_fc) for _ in range(2)
    ).eval()
    x = torch.randn(2, 1, 64, 48)
    with torch.no_grad():
        plain = model(x)[0]
    with AttentionCapture(model, grad=True) as cap, torch.enable_grad():
        out = model(x.requires_grad_(True))[0]
    assert torch.equal(out.detach(), plain)
    assert cap.probs()[0].shape == (2, 4, 13, 13)
    grads = torch.autograd.grad(out[:, 0].sum(), cap.probs())
    for ours, ref in zip(grads, _monai_reference_grads(model, x.detach())):
        assert (ours - ref).abs().max() < 1e-5 * max(1.0, float(ref.abs().max()))
    for method in ("rollout", "grad-rollout", "chefer", "chefer-generic"):
        raw = medlens.explain(model, x.detach(), method=method, target=1).raw
        assert raw.shape == (2, 1, 4, 3) and torch.isfinite(raw).all() and raw.abs().sum() > 0, method


def test_monai_unetr_capture_equals_saved_attention_and_keeps_outputs() -> None:
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    model = UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 16), feature_size=8, hidden_size=32, mlp_dim=64,
                  num_heads=4, save_attn=True).eval()
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        before = model(x)
    probs = attention_maps(model, x)
    assert len(probs) == 12 and probs[0].shape == (2, 4, 4, 4)  # 2 x 2 x 1 patches of 16, no class token
    for blk, ours in zip(model.vit.blocks, probs):
        assert (ours - blk.attn.att_mat).abs().max() < 1e-5
    with torch.no_grad():
        assert torch.equal(model(x), before)
    rollout = medlens.explain(model, x, method="rollout").raw
    assert rollout.shape == (2, 1, 2, 2, 1) and torch.isfinite(rollout).all()
    assert medlens.hook_count(model) == 0


def test_hooks_and_modes_restored_even_when_the_forward_fails() -> None:
    model = tiny_timm()
    model.train()
    model.blocks[0].eval()
    modes = [m.training for m in model.modules()]
    with pytest.raises(Exception):
        medlens.explain(model, torch.randn(1, 3, 40, 40), method="chefer")  # wrong input size
    for method in ("attention", "rollout", "grad-rollout", "chefer", "chefer-generic"):
        medlens.explain(model, torch.randn(2, 3, 64, 48), method=method)
    assert [m.training for m in model.modules()] == modes
    assert medlens.hook_count(model) == 0
    assert all(blk.attn.fused_attn for blk in model.blocks)


def test_unsupported_models_and_bad_blocks_get_one_line_errors() -> None:
    with pytest.raises(MedlensError, match="no self-attention module"):
        find_attention(torchvision.models.resnet18(num_classes=2))
    with pytest.raises(MedlensError, match="block 5 is out of range"):
        medlens.explain(tiny_timm(), torch.randn(1, 3, 64, 48), method="attention", block=5)
    post_norm = tiny_timm(block_fn=timm.models.vision_transformer.ResPostBlock)
    with pytest.raises(MedlensError, match="ResPostBlock; relevance propagation supports pre-norm blocks"):
        medlens.explain(post_norm, torch.randn(1, 3, 64, 48), method="chefer")
    assert medlens.hook_count(post_norm) == 0


def test_tokens_to_grid_drops_prefix_tokens_on_non_square_grids() -> None:
    model = tiny_timm(reg_tokens=4)  # class + 4 registers, 4 x 3 patches
    x = torch.zeros(2, 3, 64, 48)
    assert patch_grid(model, (64, 48)) == (4, 3)
    tokens = torch.arange(2 * 17 * 5, dtype=torch.float32).view(2, 17, 5)
    grid = tokens_to_grid(tokens, model, x)
    assert grid.shape == (2, 5, 4, 3)
    assert torch.equal(grid[1, :, 2, 1], tokens[1, 5 + 2 * 3 + 1])
    channels_last = torch.randn(2, 4, 3, 5)  # Swin-style (B, H, W, C)
    assert torch.equal(tokens_to_grid(channels_last, model, x), channels_last.permute(0, 3, 1, 2))
    with pytest.raises(MedlensError, match="fewer than"):
        tokens_to_grid(torch.randn(2, 5, 5), model, x)


def test_default_token_layers_and_patch_sizes() -> None:
    assert default_token_layer(tiny_timm()) == "blocks.1.norm1"
    tv = tiny_torchvision()
    assert default_token_layer(tv) == "encoder.layers.encoder_layer_1.ln_1"
    assert patch_grid(tv, (64, 64)) == (4, 4)
    assert default_token_layer(torchvision.models.resnet18()) is None
    swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=24, depths=(1, 1), num_heads=(1, 2), num_classes=2)
    assert default_token_layer(swin) == "layers.1.blocks.0.norm1"
    assert medlens.auto_layer(tiny_timm(), torch.randn(1, 3, 64, 48)) == "blocks.1.norm1"


def _reshape(height: int, width: int, prefix: int):
    def transform(t: torch.Tensor) -> torch.Tensor:
        return t[:, prefix:].reshape(t.shape[0], height, width, t.shape[2]).permute(0, 3, 1, 2)

    return transform


@pytest.mark.parametrize("kind", ["timm-fused", "timm-unfused", "torchvision"])
def test_vit_gradcam_agrees_with_pytorch_grad_cam(kind: str) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if kind == "torchvision":
        model, x, grid, prefix = tiny_torchvision(), torch.randn(3, 3, 64, 64), (4, 4), 1
        layer = model.encoder.layers[-1].ln_1
    else:
        model, x, grid, prefix = tiny_timm(reg_tokens=2), torch.randn(3, 3, 64, 48), (4, 3), 3
        for blk in model.blocks:
            blk.attn.fused_attn = kind == "timm-fused"
        layer = model.blocks[-1].norm1
    ours = medlens.explain(model, x, method="gradcam", target=1)
    assert ours.layers == [default_token_layer(model)]
    with GradCAM(model=model, target_layers=[layer], reshape_transform=_reshape(*grid, prefix)) as cam:
        theirs = torch.as_tensor(cam(input_tensor=x, targets=[ClassifierOutputTarget(1)] * 3))
    for a, b in zip(ours.maps[:, 0], theirs):
        if b.max() == 0:
            continue
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert r >= 0.99


def test_swin_channels_last_gradcam_agrees_with_pytorch_grad_cam() -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=112, embed_dim=24, depths=(1, 1), num_heads=(1, 2), num_classes=2).eval()
    x = torch.randn(2, 3, 112, 112)
    ours = medlens.explain(swin, x, method="gradcam", target=1)
    assert ours.layers == ["layers.1.blocks.0.norm1"] and ours.raw.shape == (2, 1, 14, 14)
    layer = swin.layers[1].blocks[0].norm1
    with GradCAM(model=swin, target_layers=[layer], reshape_transform=lambda t: t.permute(0, 3, 1, 2)) as cam:
        theirs = torch.as_tensor(cam(input_tensor=x, targets=[ClassifierOutputTarget(1)] * 2))
    for a, b in zip(ours.maps[:, 0], theirs):
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] >= 0.99
