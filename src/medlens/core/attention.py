"""Attention probabilities of every transformer block, recomputed exactly from the block's own q and k.

Fused attention (``F.scaled_dot_product_attention``, timm's default, MONAI's flash option,
torchvision's fast path) never materialises the attention matrix, so hooks on a dropout or a
softmax see nothing. Here a forward hook on the block's q/k/v projection recomputes
``A = softmax(q k^T / sqrt(d))`` from the very tensors the model uses; no flag is flipped and
the model's outputs are untouched.

For gradients with respect to ``A`` (``grad=True``), the attention output ``A @ v`` rebuilt
from the captured ``A`` is spliced into the forward pass as ``out.detach() + (ours - ours.detach())``:
the value is bit-for-bit the model's own output while the backward pass runs through ``A``.

Supported attention modules: timm ``Attention`` (``vit_*``, ``deit_*``, with registers,
distillation tokens or no class token), torchvision ``nn.MultiheadAttention`` self-attention
(``vit_b_16`` and friends) and MONAI ``SABlock`` (``ViT``, ``UNETR``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.core.hooks import Hooks
from medlens.core.tokens import merge_heads, split_heads  # noqa: F401  (re-exported)
from medlens.errors import MedlensError


@dataclass
class AttentionSite:
    """One self-attention module and the residual block around it.

    Attributes:
        name: dotted path of the attention module.
        kind: ``"timm"``, ``"torchvision"``, ``"monai"`` or ``"hf"`` (transformers, see :mod:`medlens.core.hf_attention`).
        attn: the attention module; block: its enclosing residual block.
        num_heads: heads; scale: the softmax temperature 1/sqrt(head_dim).
    """

    name: str
    kind: str
    attn: nn.Module
    block: nn.Module
    num_heads: int
    scale: float

    def linears(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """(weight, bias) of the block's qkv, output projection, and two MLP layers."""
        a, b = self.attn, self.block
        if self.kind == "hf":
            from medlens.core.hf_attention import hf_linears

            return hf_linears(self)
        if self.kind == "timm":
            fc1, fc2 = b.mlp.fc1, b.mlp.fc2
            qkv, proj = (a.qkv.weight, a.qkv.bias), (a.proj.weight, a.proj.bias)
        elif self.kind == "monai":
            fc1, fc2 = b.mlp.linear1, b.mlp.linear2
            qkv = (a.qkv.weight, a.qkv.bias)
            proj = (a.out_proj.weight, a.out_proj.bias) if isinstance(a.out_proj, nn.Linear) else (None, None)
        else:
            fc1, fc2 = b.mlp[0], b.mlp[3]
            qkv, proj = (a.in_proj_weight, a.in_proj_bias), (a.out_proj.weight, a.out_proj.bias)
        return {"qkv": qkv, "proj": proj, "fc1": (fc1.weight, fc1.bias), "fc2": (fc2.weight, fc2.bias)}

    def mlp_linears(self) -> tuple[nn.Module, nn.Module]:
        b = self.block
        if self.kind == "hf":
            from medlens.core.hf_attention import hf_mlp_linears

            return hf_mlp_linears(self)
        if self.kind == "timm":
            return b.mlp.fc1, b.mlp.fc2
        if self.kind == "monai":
            return b.mlp.linear1, b.mlp.linear2
        return b.mlp[0], b.mlp[3]

    def norm2(self) -> nn.Module:
        if self.kind == "hf":
            from medlens.core.hf_attention import hf_norm2

            return hf_norm2(self)
        return self.block.ln_2 if self.kind == "torchvision" else self.block.norm2


def _timm_attention_type() -> type | None:
    try:
        from timm.layers.attention import Attention
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return Attention


def _monai_attention_type() -> type | None:
    try:
        from monai.networks.blocks.selfattention import SABlock
    except ImportError:  # pragma: no cover
        return None
    return SABlock


def _site_kind(module: nn.Module) -> str | None:
    timm_attn, monai_attn = _timm_attention_type(), _monai_attention_type()
    if timm_attn is not None and type(module) is timm_attn:
        return "timm"
    if monai_attn is not None and isinstance(module, monai_attn):
        return "monai"
    if isinstance(module, nn.MultiheadAttention):
        return "torchvision"
    from medlens.core.hf_attention import is_hf_attention  # transformers models (no import of transformers)

    if is_hf_attention(module):
        return "hf"
    return None


def _check_site(name: str, kind: str, attn: nn.Module) -> None:
    """Refuse variants whose attention cannot be recomputed from q and k alone."""
    problem = None
    if kind == "hf":
        from medlens.core.hf_attention import check_hf_site

        check_hf_site(name, attn)
    elif kind == "timm" and getattr(attn, "gate", None) is not None:
        problem = "gated attention"
    elif kind == "monai" and not getattr(attn, "use_combined_linear", True):
        problem = "separate q/k/v projections (use_combined_linear=False)"
    elif kind == "monai" and (attn.rel_positional_embedding is not None or attn.causal):
        problem = "relative positional embedding or causal masking"
    elif kind == "torchvision" and not (attn._qkv_same_embed_dim and attn.batch_first and attn.bias_k is None):
        problem = "a MultiheadAttention without batch_first, shared q/k/v size, or with bias_k"
    if problem:
        raise MedlensError(f"attention module {name!r} uses {problem}; medlens cannot recompute its attention exactly")


def find_attention(model: nn.Module) -> list[AttentionSite]:
    """Every supported self-attention module of ``model``, in definition (= forward) order.

    Raises:
        MedlensError: if the model has no attention module medlens can read.
    """
    modules = dict(model.named_modules())
    sites = []
    for name, module in modules.items():
        kind = _site_kind(module)
        if kind is None:
            continue
        _check_site(name, kind, module)
        parent = modules[name.rsplit(".", 1)[0]] if "." in name else model
        if kind == "hf":
            from medlens.core.hf_attention import heads_and_scale

            heads, scale = heads_and_scale(module)
            sites.append(AttentionSite(name, kind, module, parent, heads, scale))
            continue
        if kind == "torchvision":
            heads, head_dim = module.num_heads, module.head_dim
        elif kind == "timm":
            heads, head_dim = module.num_heads, module.head_dim
        else:
            heads, head_dim = module.num_heads, module.dim_head
        sites.append(AttentionSite(name, kind, module, parent, heads, head_dim**-0.5))
    if not sites:
        raise MedlensError(
            f"{type(model).__name__} has no self-attention module medlens can read "
            "(timm Attention, torch MultiheadAttention, MONAI SABlock, transformers ViT/DeiT/BEiT/DINOv2 attention)"
        )
    return sites


def block_indices(n_blocks: int, blocks: int | Sequence[int] | None) -> list[int]:
    """Normalise block selections (negative indices allowed) to sorted non-negative indices."""
    if blocks is None:
        return list(range(n_blocks))
    chosen = [blocks] if isinstance(blocks, int) else list(blocks)
    out = []
    for b in chosen:
        b = int(b)
        if not -n_blocks <= b < n_blocks:
            raise MedlensError(f"block {b} is out of range: the model has {n_blocks} attention blocks")
        out.append(b % n_blocks)
    return sorted(set(out))


_PRE_NORM_BLOCKS = ("Block", "EncoderBlock", "TransformerBlock")  # x + attn(norm1(x)), then x + mlp(norm2(x))


@dataclass
class BlockRecord:
    """Tensors of one block's forward pass, kept for gradients and relevance propagation.

    Attributes:
        probs: (B, H, N, N) attention probabilities (part of the graph when ``grad=True``).
        q, k, v: (B, H, N, D) as used by the model (after any q/k norm).
        tensors: with ``record=True``: ``x_in``, ``x_mid``, ``x_out`` (B, N, C) residual stream
            before the block, after attention, after the MLP; ``qkv_in``/``qkv_out``,
            ``proj_out``, ``fc1_in``/``fc1_out``, ``fc2_in``/``fc2_out`` of the block's linears.
    """

    probs: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    tensors: dict[str, Tensor] = field(default_factory=dict)


class AttentionCapture:
    """Context manager recording each block's attention probabilities during forward passes.

    Args:
        model: a timm / torchvision / MONAI vision transformer (not modified).
        blocks: block indices to capture (negative allowed); None for all.
        grad: splice the captured attention into the forward pass so that gradients of the
            output with respect to ``records[i].probs`` exist (run the forward with grad on).
        record: also keep the block tensors needed for LRP (see :class:`BlockRecord`).
        transform: optional function applied to each (B, H, N, N) attention in the hook
            (e.g. head fusion), to keep less memory; ignored when ``grad`` or ``record``.

    Attributes:
        sites: all attention sites of the model; records: block index -> :class:`BlockRecord`.

    Example:
        >>> with AttentionCapture(model) as cap:
        ...     logits = model(x)
        >>> last = cap.records[len(cap.sites) - 1].probs  # (B, heads, N, N)
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: int | Sequence[int] | None = None,
        grad: bool = False,
        record: bool = False,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.model = model
        self.sites = find_attention(model)
        self.indices = block_indices(len(self.sites), blocks)
        self.grad = grad
        self.record = record
        self.transform = None if (grad or record) else transform
        self.records: dict[int, BlockRecord] = {}
        self._hooks = Hooks()  # every registered hook, removed on exit

    # -- hooks --------------------------------------------------------------------------------
    def _attend(self, index: int, site: AttentionSite, q: Tensor, k: Tensor, v: Tensor | None) -> None:
        """Recompute A from q, k exactly as the model's non-fused path does."""
        if site.kind == "monai":
            logits = torch.einsum("blxd,blyd->blxy", q, k) * site.scale
        else:
            logits = (q * site.scale) @ k.transpose(-2, -1)
        probs = logits.softmax(dim=-1)
        rec = self.records.setdefault(index, BlockRecord())
        if self.grad or self.record:
            rec.q, rec.k, rec.v, rec.probs = q, k, v, probs
        else:
            rec.probs = probs if self.transform is None else self.transform(probs)

    def _spliced(self, index: int, site: AttentionSite, model_out: Tensor) -> Tensor:
        """The model's attention output, with the backward pass rerouted through our A."""
        rec = self.records[index]
        ours = merge_heads(rec.probs @ rec.v)
        if site.kind == "torchvision":
            ours = F.linear(ours, site.attn.out_proj.weight, site.attn.out_proj.bias)
        return model_out.detach() + (ours - ours.detach())

    def _keep(self, index: int, key: str, t: Tensor) -> None:
        self.records.setdefault(index, BlockRecord()).tensors[key] = t.detach()

    def _add(self, module: nn.Module, hook: Callable, pre: bool = False) -> None:
        if pre:
            self._hooks.forward_pre(module, hook)
        else:
            self._hooks.forward(module, hook)

    def _hook_qkv_module(self, index: int, site: AttentionSite) -> None:
        """timm / MONAI: the fused qkv Linear's output holds q, k, v."""
        attn = site.attn

        def on_qkv(_m: nn.Module, inputs: tuple, out: Tensor) -> None:
            q, k, v = split_heads(out, site.num_heads)
            if site.kind == "timm":
                if not isinstance(attn.q_norm, nn.Identity):
                    q = attn.q_norm(q)
                if not isinstance(attn.k_norm, nn.Identity):
                    k = attn.k_norm(k)
            elif attn.attention_dtype is not None:
                q, k = q.to(attn.attention_dtype), k.to(attn.attention_dtype)
            self._attend(index, site, q, k, v)
            if self.record:
                self._keep(index, "qkv_in", inputs[0])
                self._keep(index, "qkv_out", out)

        self._add(attn.qkv, on_qkv)
        if self.grad:
            # the merged-heads attention output enters timm's `norm` / MONAI's `out_proj`, or
            # MONAI's `drop_output` when the block has no output projection (include_fc=False)
            if site.kind == "timm":
                after = attn.norm
            else:
                after = attn.out_proj if getattr(attn, "include_fc", True) else attn.drop_output
            self._add(after, lambda _m, inputs: (self._spliced(index, site, inputs[0]), *inputs[1:]), pre=True)
        if self.record:
            proj = attn.proj if site.kind == "timm" else attn.out_proj
            self._add(proj, lambda _m, _i, out: self._keep(index, "proj_out", out))

    def _hook_torch_mha(self, index: int, site: AttentionSite) -> None:
        """torch MultiheadAttention: q/k/v are computed inside F.multi_head_attention_forward,
        so they are recomputed from ``in_proj_weight`` (only q and k when no v is needed)."""
        attn = site.attn

        def on_input(_m: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            if not (inputs[1] is x and inputs[2] is x):
                raise MedlensError(f"attention module {site.name!r} is not self-attention (query, key, value differ)")
            parts = 3 if self.grad or self.record else 2  # v only when gradients or LRP need it
            rows = parts * attn.embed_dim
            bias = None if attn.in_proj_bias is None else attn.in_proj_bias[:rows]
            qkv = F.linear(x, attn.in_proj_weight[:rows], bias)
            q, k, *v = split_heads(qkv, site.num_heads, parts)
            self._attend(index, site, q, k, v[0] if v else None)
            if self.record:
                self._keep(index, "qkv_in", x)
                self._keep(index, "qkv_out", qkv)

        def on_output(_m: nn.Module, _inputs: tuple, out: tuple) -> tuple | None:
            if self.record:
                self._keep(index, "proj_out", out[0])
            if self.grad:
                return (self._spliced(index, site, out[0]), *out[1:])
            return None

        self._add(attn, on_input, pre=True)
        if self.grad or self.record:
            self._add(attn, on_output)

    def _hook_block(self, index: int, site: AttentionSite) -> None:
        """Residual stream and MLP tensors for relevance propagation."""
        if type(site.block).__name__ not in _PRE_NORM_BLOCKS:
            raise MedlensError(
                f"block {site.name.rsplit('.', 1)[0]!r} is a {type(site.block).__name__}; relevance propagation supports "
                "pre-norm blocks (timm Block, torchvision EncoderBlock, MONAI TransformerBlock)"
            )
        if getattr(site.block, "with_cross_attention", False):
            raise MedlensError(f"block {site.name.rsplit('.', 1)[0]!r} has cross-attention; relevance propagation supports self-attention blocks only")
        fc1, fc2 = site.mlp_linears()
        self._add(site.block, lambda _m, inputs: self._keep(index, "x_in", inputs[0]), pre=True)
        self._add(site.norm2(), lambda _m, inputs: self._keep(index, "x_mid", inputs[0]), pre=True)
        self._add(site.block, lambda _m, _i, out: self._keep(index, "x_out", out))
        for key, lin in (("fc1", fc1), ("fc2", fc2)):
            self._add(lin, self._linear_keeper(index, key))

    def _linear_keeper(self, index: int, key: str) -> Callable:
        def keep(_m: nn.Module, inputs: tuple, out: Tensor) -> None:
            self._keep(index, f"{key}_in", inputs[0])
            self._keep(index, f"{key}_out", out)

        return keep

    def __enter__(self) -> "AttentionCapture":
        try:
            for index in self.indices:
                site = self.sites[index]
                if site.kind == "hf":
                    from medlens.core.hf_attention import hook_hf_site

                    hook_hf_site(self, index, site)
                    continue
                if site.kind == "torchvision":
                    self._hook_torch_mha(index, site)
                else:
                    self._hook_qkv_module(index, site)
                if self.record:
                    self._hook_block(index, site)
        except BaseException:
            self._hooks.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove()

    # -- results ------------------------------------------------------------------------------
    def probs(self) -> list[Tensor]:
        """Captured attention per selected block, in block order; raises if a block never ran."""
        missing = [i for i in self.indices if i not in self.records or self.records[i].probs is None]
        if missing:
            raise MedlensError(f"attention block {self.sites[missing[0]].name!r} was not called during the forward pass")
        return [self.records[i].probs for i in self.indices]


def attention_maps(model: nn.Module, x: Tensor, blocks: int | Sequence[int] | None = None) -> list[Tensor]:
    """Attention probabilities (B, heads, N, N) of the chosen blocks for input ``x``.

    One no-grad forward pass in eval mode; the model's modes are restored.
    """
    from medlens.core.capture import preserved_modes

    with preserved_modes(model), AttentionCapture(model, blocks) as cap, torch.no_grad():
        model(x)
    return cap.probs()
