"""Attention of Hugging Face transformers vision models, recomputed from their own q and k.

transformers runs attention through an interchangeable kernel (``eager``, ``sdpa``, flash, ...);
only ``eager`` materialises the probabilities. Here a forward pre-hook on each attention module
(``ViTAttention``, ``DeiTAttention``, ``Dinov2Attention``, ``BeitAttention`` ... the modules with
``q_proj``/``k_proj``/``v_proj``/``o_proj``) recomputes ``A = softmax(q k^T * scaling)`` from the
module's input and its projection weights, whatever the implementation, without changing the
model's outputs. Gradients are spliced in before ``o_proj`` exactly as for timm
(see :mod:`medlens.core.attention`).

Swin's windowed attention (relative position bias over local windows) is not a global token
map and is not an attention site; Grad-CAM on Swin's token layers works (see
:mod:`medlens.models.hf`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.errors import MedlensError


#: Pre-norm residual blocks of transformers vision models: x + attn(norm_a(x)), then x + mlp(norm_b(x)).
HF_BLOCKS = ("ViTLayer", "DeiTLayer", "BeitLayer", "Dinov2Layer", "Dinov2WithRegistersLayer", "ViTMSNLayer", "ViTMAELayer", "Data2VecVisionLayer")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def is_hf_projection_attention(module: nn.Module) -> bool:
    """True for a transformers attention module with separate q/k/v/o projections (Swin included)."""
    return (
        type(module).__module__.startswith("transformers.")
        and all(isinstance(getattr(module, p, None), nn.Linear) for p in _PROJ)
        and hasattr(module, "scaling")
        and hasattr(module, "head_dim")
    )


#: Attention modules whose probabilities are softmax(q k^T * scaling) over the block's own tokens.
HF_ATTENTIONS = tuple(name[: -len("Layer")] + "Attention" for name in HF_BLOCKS)


def is_hf_attention(module: nn.Module) -> bool:
    """True for a global self-attention module of a transformers ViT-family model (an attention site).

    Windowed (Swin) and sequence-reduced (SegFormer) attention are not: their maps are not one
    token-by-token matrix of the layer, so they are left to the CAM methods.
    """
    return type(module).__name__ in HF_ATTENTIONS and is_hf_projection_attention(module) and getattr(module, "relative_position_bias", None) is None


def check_hf_site(name: str, attn: nn.Module) -> None:
    config = getattr(attn, "config", None)
    if getattr(attn, "is_causal", False):
        raise MedlensError(f"attention module {name!r} is causal; medlens reads bidirectional vision attention only")
    if config is not None and (getattr(config, "use_relative_position_bias", False) or getattr(config, "use_shared_relative_position_bias", False)):
        raise MedlensError(f"attention module {name!r} adds a relative position bias; medlens cannot recompute its attention exactly")


def heads_and_scale(attn: nn.Module) -> tuple[int, float]:
    heads = getattr(attn, "num_attention_heads", None) or getattr(attn, "num_heads", None)
    if heads is None:
        heads = attn.q_proj.out_features // attn.head_dim
    return int(heads), float(attn.scaling)


def _norms(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    for first, second in (("layernorm_before", "layernorm_after"), ("norm1", "norm2")):
        if isinstance(getattr(block, first, None), nn.Module) and isinstance(getattr(block, second, None), nn.Module):
            return getattr(block, first), getattr(block, second)
    raise MedlensError(f"block {type(block).__name__} has no pre-attention/pre-MLP norms medlens knows")


def hf_norm2(site: "AttentionSite") -> nn.Module:
    return _norms(site.block)[1]


def hf_mlp_linears(site: "AttentionSite") -> tuple[nn.Module, nn.Module]:
    mlp = getattr(site.block, "mlp", None)
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        raise MedlensError(f"block {type(site.block).__name__} has no mlp.fc1/fc2 (a gated MLP?); relevance propagation needs a two-layer MLP")
    return fc1, fc2


def hf_qkv(site: "AttentionSite") -> tuple[Tensor, Tensor | None]:
    """The q, k, v projections concatenated as one (3*H*D, C) Linear (missing biases are zeros),
    cached on the site until a weight changes."""
    a = site.attn
    lins = [a.q_proj, a.k_proj, a.v_proj]
    version = tuple((id(lin.weight), lin.weight._version, None if lin.bias is None else lin.bias._version) for lin in lins)
    cached = site.__dict__.get("_hf_qkv")
    if cached is not None and cached[0] == version:
        return cached[1], cached[2]
    weight = torch.cat([lin.weight for lin in lins], 0)
    if all(lin.bias is None for lin in lins):
        bias = None
    else:
        bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in lins], 0)
    site.__dict__["_hf_qkv"] = (version, weight, bias)
    return weight, bias


def hf_linears(site: "AttentionSite") -> dict[str, tuple[Tensor, Tensor | None]]:
    fc1, fc2 = hf_mlp_linears(site)
    o = site.attn.o_proj
    return {"qkv": hf_qkv(site), "proj": (o.weight, o.bias), "fc1": (fc1.weight, fc1.bias), "fc2": (fc2.weight, fc2.bias)}


def _first(out: object) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


def hook_hf_site(cap: "AttentionCapture", index: int, site: "AttentionSite") -> None:
    """Register the hooks of one transformers attention site on ``cap`` (removed when it closes)."""
    from medlens.core.tokens import split_heads

    attn = site.attn

    def on_input(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None:
            raise MedlensError(f"attention module {site.name!r} was called with an attention mask; medlens reads unmasked vision attention only")
        parts = 3 if cap.grad or cap.record else 2  # v only when gradients or LRP need it
        weight, bias = hf_qkv(site)
        rows = parts * attn.q_proj.out_features
        qkv = F.linear(x, weight[:rows], None if bias is None else bias[:rows])
        q, k, *v = split_heads(qkv, site.num_heads, parts)
        cap._attend(index, site, q, k, v[0] if v else None)
        if cap.record:
            cap._keep(index, "qkv_in", x)
            cap._keep(index, "qkv_out", qkv)

    cap._hooks.forward_pre(attn, on_input, with_kwargs=True)
    if cap.grad:
        cap._add(attn.o_proj, lambda _m, inputs: (cap._spliced(index, site, inputs[0]), *inputs[1:]), pre=True)
    if cap.record:
        if type(site.block).__name__ not in HF_BLOCKS:
            raise MedlensError(f"block {site.name.rsplit('.', 1)[0]!r} is a {type(site.block).__name__}; relevance propagation supports "
                               f"the pre-norm blocks {', '.join(HF_BLOCKS)}")
        fc1, fc2 = hf_mlp_linears(site)
        cap._add(attn.o_proj, lambda _m, _i, out: cap._keep(index, "proj_out", out))
        cap._add(site.block, lambda _m, inputs: cap._keep(index, "x_in", inputs[0]), pre=True)
        cap._add(hf_norm2(site), lambda _m, inputs: cap._keep(index, "x_mid", inputs[0]), pre=True)
        cap._add(site.block, lambda _m, _i, out: cap._keep(index, "x_out", _first(out)))
        for key, lin in (("fc1", fc1), ("fc2", fc2)):
            cap._add(lin, cap._linear_keeper(index, key))

