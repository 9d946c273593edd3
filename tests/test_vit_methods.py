"""ViT explanation methods: closed forms, an independent re-implementation of Chefer et al.'s
relevance propagation, batch/target consistency, and localisation on a ViT trained here."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import medlens
from medlens.errors import MedlensError
from conftest import tiny_timm_vit, tiny_torchvision_vit

METHODS = ("attention", "rollout", "grad-rollout", "chefer", "chefer-generic")


def tiny_timm(**kwargs) -> nn.Module:
    return tiny_timm_vit(**{"depth": 3, **kwargs})


def tiny_torchvision() -> nn.Module:
    return tiny_torchvision_vit()


def test_uniform_attention_gives_the_closed_form_rollout() -> None:
    """q = k = 0 makes every attention uniform, A = 11^T/N. Rollout's (A + I)/2 then gives
    Ā^L = (I + (2^L - 1) A) / 2^L: every patch of the class row is (1 - 2^-L) / N."""
    model = tiny_timm(depth=2)
    with torch.no_grad():
        for blk in model.blocks:
            dim = blk.attn.qkv.in_features
            blk.attn.qkv.weight[: 2 * dim] = 0
            blk.attn.qkv.bias[: 2 * dim] = 0
    x = torch.randn(2, 3, 64, 48)
    n_tokens = 1 + 4 * 3
    rollout = medlens.explain(model, x, method="rollout").raw
    assert rollout.shape == (2, 1, 4, 3)
    torch.testing.assert_close(rollout, torch.full_like(rollout, (1 - 2**-2) / n_tokens))
    raw = medlens.explain(model, x, method="attention", head_fusion="max").raw
    torch.testing.assert_close(raw, torch.full_like(raw, 1 / n_tokens))
    assert float(rollout.amax() - rollout.amin()) < 1e-6  # uniform up to float rounding


# --- an independent reference: Chefer et al.'s relprop rules, written the way their code is
# (autograd "gradprop" on each op, batch size 1), on a non-fused replay of the timm model ---------
def _safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def _gradprop(z, xs, s):
    return torch.autograd.grad(z, xs, s, retain_graph=True)


def _ref_linear(x, weight, r):
    px = x.detach().clamp(min=0).requires_grad_(True)
    nx = x.detach().clamp(max=0).requires_grad_(True)
    z1, z2 = F.linear(px, weight.detach().clamp(min=0)), F.linear(nx, weight.detach().clamp(max=0))
    s = _safe_divide(r, z1 + z2)
    return px * _gradprop(z1, px, s)[0] + nx * _gradprop(z2, nx, s)[0]


def _ref_add(x0, x1, r):
    x0, x1 = x0.detach().requires_grad_(True), x1.detach().requires_grad_(True)
    z = x0 + x1
    c0, c1 = _gradprop(z, (x0, x1), _safe_divide(r, z))
    a, b = x0 * c0, x1 * c1
    fa = _safe_divide(a.sum().abs(), a.sum().abs() + b.sum().abs()) * r.sum()
    fb = _safe_divide(b.sum().abs(), a.sum().abs() + b.sum().abs()) * r.sum()
    return a * _safe_divide(fa, a.sum()), b * _safe_divide(fb, b.sum())


def _ref_einsum(eq, a, b, r):
    a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    z = torch.einsum(eq, a, b)
    ca, cb = _gradprop(z, (a, b), _safe_divide(r, z))
    return a * ca / 2, b * cb / 2


def reference_explanations(model: nn.Module, x: torch.Tensor, target: int) -> dict[str, torch.Tensor]:
    """Transformer attribution, generic explainability and gradient rollout for ONE image."""
    ref = copy.deepcopy(model)
    t = ref.norm_pre(ref.patch_drop(ref._pos_embed(ref.patch_embed(x))))
    saved = []
    for blk in ref.blocks:
        a = blk.attn
        n1 = blk.norm1(t)
        q, k, v = a.qkv(n1).reshape(1, t.shape[1], 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) * a.scale).softmax(-1)
        attn.retain_grad()
        ctx = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).flatten(2)
        branch1 = a.proj(ctx)
        mid = t + branch1
        n2 = blk.norm2(mid)
        hidden = blk.mlp.act(blk.mlp.fc1(n2))
        branch2 = blk.mlp.fc2(hidden)
        saved.append(dict(x=t, n1=n1, q=q, k=k, v=v, attn=attn, ctx=ctx, b1=branch1, mid=mid, n2=n2, h=hidden, b2=branch2))
        t = mid + branch2
    feature = ref.norm(t)[:, 0]
    logits = ref.head(feature)
    logits[0, target].backward()
    r_feat = _ref_linear(feature, ref.head.weight, F.one_hot(torch.tensor([target]), logits.shape[1]).float())
    cam = torch.zeros_like(t)
    cam[:, 0] = r_feat
    cams = []
    for blk, s in zip(reversed(ref.blocks), reversed(saved)):
        r_mid, r2 = _ref_add(s["mid"], s["b2"], cam)
        r2 = _ref_linear(s["n2"], blk.mlp.fc1.weight, _ref_linear(s["h"], blk.mlp.fc2.weight, r2))
        r_in, r1 = _ref_add(s["x"], s["b1"], r_mid + r2)
        r1 = _ref_linear(s["ctx"], blk.attn.proj.weight, r1).unflatten(-1, (blk.attn.num_heads, -1)).transpose(1, 2)
        r_attn, r_v = _ref_einsum("bhij,bhjd->bhid", s["attn"], s["v"], r1)
        cams.insert(0, (s["attn"].grad * r_attn).clamp(min=0).mean(1)[0])
        r_q, r_k = _ref_einsum("bhid,bhjd->bhij", s["q"], s["k"], r_attn)
        r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).flatten(2)
        cam = r_in + _ref_linear(s["n1"], blk.attn.qkv.weight, r_qkv)
    eye = torch.eye(t.shape[1])
    joint = eye + cams[0]
    for c in cams[1:]:
        joint = (eye + c) @ joint
    generic = eye.clone()
    rollout = eye.clone()
    for s in saved:
        attn, grad = s["attn"][0].detach(), s["attn"].grad[0]
        generic = generic + (grad * attn).clamp(min=0).mean(0) @ generic
        fused = (grad * attn).mean(0).clamp(min=0)
        a = (fused + eye) / 2
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    return {"chefer": joint[0, 1:], "chefer-generic": generic[0, 1:], "grad-rollout": rollout[0, 1:]}


def test_chefer_and_gradient_methods_match_an_independent_reference() -> None:
    model = tiny_timm()
    assert model.blocks[0].attn.fused_attn
    x = torch.randn(2, 3, 64, 48)
    targets = [2, 0]
    for method in ("chefer", "chefer-generic", "grad-rollout"):
        ours = medlens.explain(model, x, method=method, target=targets).raw  # (2, 1, 4, 3)
        for i, target in enumerate(targets):
            ref = reference_explanations(model, x[i : i + 1], target)[method]
            got = ours[i, 0].flatten()
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), method
            assert ref.abs().max() > 0


@pytest.mark.parametrize("kind", ["timm", "torchvision"])
def test_batch_results_equal_per_image_results_for_every_target(kind: str) -> None:
    model = tiny_timm() if kind == "timm" else tiny_torchvision()
    x = torch.randn(2, 3, 64, 48) if kind == "timm" else torch.randn(2, 3, 64, 64)
    for method in METHODS:
        batch = medlens.explain(model, x, method=method, target="all")
        assert batch.raw.shape[:2] == (2, batch.logits.shape[1])
        for i in range(2):
            single = medlens.explain(model, x[i : i + 1], method=method, target="all")
            torch.testing.assert_close(batch.raw[i : i + 1], single.raw, atol=1e-6, rtol=1e-4)
        one = medlens.explain(model, x, method=method, target=1)
        torch.testing.assert_close(batch.raw[:, 1:2], one.raw, atol=1e-6, rtol=1e-4)


def test_models_with_registers_distillation_or_no_class_token() -> None:
    x = torch.randn(2, 3, 64, 48)
    models = {
        "registers": tiny_timm(reg_tokens=4),
        "no-class-token": tiny_timm(class_token=False, global_pool="avg"),
        "distilled": timm.create_model("deit_tiny_distilled_patch16_224", img_size=(64, 48), depth=2, num_classes=3).eval(),
    }
    for name, model in models.items():
        for method in METHODS:
            e = medlens.explain(model, x, method=method)
            assert e.raw.shape == (2, 1, 4, 3), (name, method)
            assert torch.isfinite(e.raw).all() and e.raw.abs().sum() > 0, (name, method)


def test_options_block_head_fusion_and_discard_ratio() -> None:
    model = tiny_timm()
    x = torch.randn(2, 3, 64, 48)
    per_head = medlens.explain(model, x, method="attention", head_fusion="none", block=0).raw
    assert per_head.shape == (2, 3, 4, 3)
    for fusion, reduce in (("mean", torch.mean), ("max", torch.amax), ("min", torch.amin)):
        fused = medlens.explain(model, x, method="attention", head_fusion=fusion, block=0).raw
        torch.testing.assert_close(fused[:, 0], reduce(per_head, dim=1))
    assert not torch.allclose(per_head, medlens.explain(model, x, method="attention", head_fusion="none").raw)
    kept = medlens.explain(model, x, method="rollout", discard_ratio=0.0).raw
    dropped = medlens.explain(model, x, method="rollout", discard_ratio=0.9).raw
    assert not torch.allclose(kept, dropped)
    with pytest.raises(MedlensError, match="head_fusion"):
        medlens.explain(model, x, method="rollout", head_fusion="median")
    with pytest.raises(MedlensError, match="discard_ratio"):
        medlens.explain(model, x, method="rollout", discard_ratio=1.5)


def _squares(n: int, seed: int, size: int = 32, side: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images with one square; a bright square is class 1, a faint one class 0."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.2 * torch.randn(n, 1, size, size, generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    corner = torch.randint(0, size - side + 1, (n, 2), generator=gen)
    coords = torch.arange(size)
    rows = (coords >= corner[:, :1]) & (coords < corner[:, :1] + side)
    cols = (coords >= corner[:, 1:]) & (coords < corner[:, 1:] + side)
    masks = (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)
    return x + masks * torch.where(labels == 1, 2.0, 0.5).view(-1, 1, 1, 1), labels, masks


def test_maps_of_a_trained_vit_point_at_the_lesion() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, embed_dim=32,
                              depth=2, num_heads=2, mlp_ratio=2, num_classes=2)
    x, y, _ = _squares(1024, seed=0)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    model.train()
    for _ in range(2):
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt, yt, masks = _squares(128, seed=1)
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean()
    assert accuracy >= 0.9
    lesion = yt == 1
    chance = masks[lesion].float().mean()
    for method in ("rollout", "grad-rollout", "chefer", "chefer-generic"):
        maps = medlens.explain(model, xt[lesion], method=method, target=1).maps[:, 0].flatten(1)
        hits = masks[lesion].flatten(1).gather(1, maps.argmax(1, keepdim=True)).float().mean()
        assert hits >= max(0.6, 5 * chance), (method, float(hits), float(chance))


def test_attention_paper_protocol_writes_224_maps(tmp_path) -> None:
    from medlens.workflows.protocols.attention_paper import run_protocol

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=2).eval()
    images = [(f"img{i}", torch.randn(3, 224, 224)) for i in range(2)]
    written = run_protocol(model, images, tmp_path, methods=("attention", "gradcam", "chefer"))
    import numpy as np

    for name, _ in images:
        for method in ("attention", "gradcam", "chefer"):
            arr = np.load(tmp_path / method / f"{name}.npy")
            assert arr.shape == (224, 224) and arr.min() >= 0 and arr.max() <= 1
    attention = np.load(tmp_path / "attention" / "img0.npy")
    assert (attention[:16, :16] == attention[0, 0]).all()  # each patch repeated as a 16x16 block
    assert len(written) == 6


def test_torchvision_and_timm_with_the_same_weights_give_the_same_maps() -> None:
    """The torchvision path (MultiheadAttention, EncoderBlock) against the timm path, on one network."""
    tv = tiny_torchvision()
    tm = timm.create_model("vit_tiny_patch16_224", img_size=64, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=2).eval()
    pairs = {"patch_embed.proj": "conv_proj", "norm": "encoder.ln", "head": "heads.head"}
    for i, name in enumerate(tv.encoder.layers._modules):
        src = f"encoder.layers.{name}"
        pairs.update({f"blocks.{i}.norm1": f"{src}.ln_1", f"blocks.{i}.norm2": f"{src}.ln_2", f"blocks.{i}.attn.proj": f"{src}.self_attention.out_proj",
                      f"blocks.{i}.mlp.fc1": f"{src}.mlp.0", f"blocks.{i}.mlp.fc2": f"{src}.mlp.3"})
    tv_modules, tm_modules = dict(tv.named_modules()), dict(tm.named_modules())
    with torch.no_grad():
        for dst, src in pairs.items():
            tm_modules[dst].weight.copy_(tv_modules[src].weight)
            tm_modules[dst].bias.copy_(tv_modules[src].bias)
        for blk, layer in zip(tm.blocks, tv.encoder.layers):
            blk.attn.qkv.weight.copy_(layer.self_attention.in_proj_weight)
            blk.attn.qkv.bias.copy_(layer.self_attention.in_proj_bias)
        tm.cls_token.copy_(tv.class_token)
        tm.pos_embed.copy_(tv.encoder.pos_embedding)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tm(x), tv(x), atol=1e-5, rtol=1e-4)
    for method in METHODS:
        ours_tv = medlens.explain(tv, x, method=method, target=1).raw
        ours_tm = medlens.explain(tm, x, method=method, target=1).raw
        torch.testing.assert_close(ours_tv, ours_tm, atol=1e-6, rtol=1e-3, msg=method)
