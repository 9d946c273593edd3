"""Vision Transformer explanations from attention: raw attention, rollout, gradient rollout,
Chefer et al.'s transformer attribution (LRP) and generic attention explainability.

All of them read the attention each block really uses (see :mod:`medlens.core.attention`), on the
unmodified model, batched, for several targets at once. Maps are over the patch grid
(B, K, *grid); the query is the class token's row (the mean of the patch rows for models
without a class token). Block order: ``A_1`` is the first block, ``A_L`` the last; rolled-out
relevance is the query row of ``Ā_L ··· Ā_1``, computed as a row vector, right to left.

Options (also ``medlens explain --block/--head-fusion/--discard-ratio``):
    block: block of the raw attention map (int, default -1 = last).
    head_fusion: ``mean`` | ``max`` | ``min`` (and ``none`` for raw attention: one map per head).
    discard_ratio: fraction of the lowest fused attention entries zeroed per block (rollout).
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from medlens.core.attention import AttentionCapture, AttentionSite, BlockRecord, block_indices, find_attention, merge_heads
from medlens.core.engine import AttentionGradientMethod, AttentionMethod, AttentionRun, Context, explain, register, target_gradients
from medlens.core.hooks import Hooks
from medlens.core.options import check_choice, require
from medlens.errors import MedlensError
from medlens.core.targets import Region
from medlens.core.tokens import has_class_token, patch_grid

HEAD_FUSIONS = ("mean", "max", "min")


# --- shared pieces -----------------------------------------------------------------------------
def fuse_heads(attn: Tensor, fusion: str = "mean") -> Tensor:
    """(..., H, N, N) -> (..., N, N) by the mean, max or min over heads."""
    if fusion == "mean":
        return attn.mean(dim=-3)
    if fusion == "max":
        return attn.amax(dim=-3)
    if fusion == "min":
        return attn.amin(dim=-3)
    raise MedlensError(f"unknown head_fusion {fusion!r}: use mean, max or min")


def query_row(model: nn.Module, x: Tensor, batch: int, n_tokens: int) -> Tensor:
    """(batch, N) the row read out of an attention matrix: the class token's one-hot, or the
    mean over patch tokens for models without a class token. x: the (B, C, *S) input."""
    n_prefix = n_tokens - int(torch.Size(patch_grid(model, tuple(x.shape[2:]))).numel())
    query = torch.zeros(batch, n_tokens, device=x.device)
    if has_class_token(model):
        query[:, 0] = 1.0
    else:
        query[:, n_prefix:] = 1.0 / (n_tokens - n_prefix)
    return query


def patch_map(row: Tensor, model: nn.Module, x: Tensor) -> Tensor:
    """(..., N) relevance over tokens -> (..., *grid) over patches (extra tokens dropped)."""
    grid = patch_grid(model, tuple(x.shape[2:]))
    n_patches = int(torch.Size(grid).numel())
    return row[..., row.shape[-1] - n_patches :].unflatten(-1, grid)


def discard_lowest(attn: Tensor, ratio: float) -> Tensor:
    """Zero the ``ratio`` fraction of lowest entries of each (N, N) matrix, never entry (0, 0)
    (Abnar & Zuidema's rollout as popularised by vit-explain). attn: (B, N, N)."""
    if not 0.0 <= ratio < 1.0:
        raise MedlensError(f"discard_ratio must be in [0, 1), got {ratio}")
    n_drop = int(attn[0].numel() * ratio)
    if n_drop == 0:
        return attn
    flat = attn.flatten(1)
    lowest = flat.topk(n_drop, dim=1, largest=False).indices
    keep = torch.ones_like(flat).scatter_(1, lowest, 0.0)
    keep[:, 0] = 1.0
    return (flat * keep).view_as(attn)


def residual_rows(attn: Tensor) -> Tensor:
    """Abnar & Zuidema's residual correction: 0.5 A + 0.5 I, rows renormalised. (B, N, N)."""
    eye = torch.eye(attn.shape[-1], device=attn.device, dtype=attn.dtype)
    mixed = 0.5 * attn + 0.5 * eye
    return mixed / mixed.sum(dim=-1, keepdim=True)


def roll_out(query: Tensor, mats: list[Tensor], identity: bool = False) -> Tensor:
    """query^T · M_L ··· M_1 for mats in block order [M_1 .. M_L], as vector-matrix products.

    With ``identity=True`` each M is taken as (I + M) (Chefer's rule), without forming I.
    query: (B, N); mats: (B, N, N). Returns (B, N).
    """
    row = query.unsqueeze(1)
    for mat in reversed(mats):
        step = row @ mat
        row = row + step if identity else step
    return row.squeeze(1)


def attention_gradients(logits: Tensor, targets: Tensor, probs: list[Tensor]) -> list[Tensor]:
    """d logits[b, targets[b, k]] / d A for every block: list of (B, K, H, N, N) (the engine's
    :func:`medlens.core.engine.target_gradients`: the K one-hot backward passes vmapped)."""
    return target_gradients(logits, targets, probs, [f"attention {i}" for i in range(len(probs))])


# --- LRP (Chefer et al. 2021), rules for the layers a ViT uses ------------------------------------
def safe_div(num: Tensor, den: Tensor, eps: float = 1e-9) -> Tensor:
    """num / (den + eps), and 0 where den == 0 (the stabiliser of Chefer et al.'s LRP code)."""
    return num / (den + eps) * (den != 0)


def linear_relevance(
    x: Tensor, weight: Tensor, relevance: Tensor, out: Tensor | None = None, bias: Tensor | None = None, abs_w: Tensor | None = None
) -> Tensor:
    """LRP alpha-beta rule with alpha=1, beta=0 for ``y = x W^T + b`` (bias ignored):
    R_i = sum_j (x_i^+ w_ji^+ + x_i^- w_ji^-) / z_j R_j,  z_j = sum_i x_i^+ w_ji^+ + x_i^- w_ji^-.

    Since x^+ w^+ + x^- w^- = (x w + |x| |w|) / 2, this costs three matmuls of the layer's size:
    with z' = x W^T + |x| |W|^T (= 2 z) and S' = R / z', R_in = x (S' W) + |x| (S' |W|).
    z >= 0, so the stabiliser needs no sign (z = 0 only where every contribution is 0).

    Args:
        x: (..., C_in) layer input; weight: (C_out, C_in); relevance: (..., C_out).
        out, bias: the layer's output and bias, if known (saves the x W^T matmul).
        abs_w: |W|, if known.
    """
    abs_w = weight.abs() if abs_w is None else abs_w
    abs_x = x.abs()
    flat_x = abs_x.reshape(-1, abs_x.shape[-1])
    if out is None:
        z = torch.addmm(flat_x @ abs_w.t(), x.reshape(-1, x.shape[-1]), weight.t())
        z.add_(1e-9)
    else:
        z = torch.addmm(out.reshape(-1, out.shape[-1]), flat_x, abs_w.t())
        z = z.add_(1e-9) if bias is None else z.sub_(bias - 1e-9)  # z' = x W^T + |x| |W|^T + eps
    s = relevance / z.view(relevance.shape)
    return (x * (s @ weight)).addcmul_(abs_x, s @ abs_w)


def add_relevance(x0: Tensor, x1: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """LRP for a residual sum z = x0 + x1 (Chefer et al.): z-rule shares, each branch rescaled so
    the two totals split sum(R) in proportion to |sum R_0| : |sum R_1| (per image)."""
    s = safe_div(relevance, x0 + x1)
    r0, r1 = x0 * s, x1 * s
    dims = tuple(range(1, relevance.dim()))
    sum0, sum1 = r0.sum(dims, keepdim=True), r1.sum(dims, keepdim=True)
    total = relevance.sum(dims, keepdim=True)
    denom = sum0.abs() + sum1.abs()
    r0.mul_(safe_div(safe_div(sum0.abs(), denom) * total, sum0))
    r1.mul_(safe_div(safe_div(sum1.abs(), denom) * total, sum1))
    return r0, r1


def matmul_relevance(a: Tensor, b: Tensor, relevance: Tensor, ab: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """LRP for z = a @ b: R_a = a * (S b^T), R_b = b * (a^T S), S = R / z, each halved as in
    Chefer et al. so that the two operands share the relevance."""
    s = safe_div(relevance, a @ b if ab is None else ab).mul_(0.5)
    return a * (s @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ s)


_ABS_WEIGHTS: dict[int, tuple["weakref.ref[Tensor]", int, Tensor]] = {}


def abs_weight(weight: Tensor) -> Tensor:
    """|W|, cached per weight tensor until the weight changes (its version counter moves)."""
    cached = _ABS_WEIGHTS.get(id(weight))
    if cached is None or cached[0]() is not weight or cached[1] != weight._version:
        cached = (weakref.ref(weight, lambda _r, key=id(weight): _ABS_WEIGHTS.pop(key, None)), weight._version, weight.detach().abs())
        _ABS_WEIGHTS[id(weight)] = cached
    return cached[2]


def _linear(x: Tensor, weight_bias: tuple[Tensor, Tensor | None], relevance: Tensor, out: Tensor) -> Tensor:
    """:func:`linear_relevance` of a captured Linear layer from its input and output."""
    weight, bias = weight_bias
    return linear_relevance(x, weight.detach(), relevance, out, None if bias is None else bias.detach(), abs_weight(weight))


def block_relevance(site: AttentionSite, rec: BlockRecord, relevance: Tensor, to_input: bool = True) -> tuple[Tensor | None, Tensor]:
    """Propagate relevance (B, N, C) from a pre-norm block's output to its input.

    LayerNorm, GELU, softmax, dropout, LayerScale pass relevance unchanged (Chefer et al.);
    Linear layers use :func:`linear_relevance`, residual sums :func:`add_relevance`, and the two
    attention products :func:`matmul_relevance`.

    Returns:
        (relevance at the block input or None when ``to_input`` is False, relevance of the
        attention probabilities (B, H, N, N)).
    """
    t, lin = rec.tensors, site.linears()
    x_in, x_mid, x_out = t["x_in"], t["x_mid"], t["x_out"]
    r_mid, r_mlp = add_relevance(x_mid, x_out - x_mid, relevance)
    r_hidden = _linear(t["fc2_in"], lin["fc2"], r_mlp, t["fc2_out"])
    r_mid += _linear(t["fc1_in"], lin["fc1"], r_hidden, t["fc1_out"])
    r_in, r_attn_out = add_relevance(x_in, x_mid - x_in, r_mid)
    probs, q, k, v = rec.probs.detach(), rec.q.detach(), rec.k.detach(), rec.v.detach()
    context = probs @ v  # (B, H, N, D)
    if lin["proj"][0] is not None:
        r_attn_out = _linear(merge_heads(context), lin["proj"], r_attn_out, t["proj_out"])
    r_context = r_attn_out.unflatten(-1, (site.num_heads, -1)).transpose(1, 2)
    r_probs, r_v = matmul_relevance(probs, v, r_context, context)
    if not to_input:
        return None, r_probs
    r_q, r_k = matmul_relevance(q, k.transpose(-2, -1), r_probs)
    r_k = r_k.transpose(-2, -1)
    r_qkv = torch.stack([merge_heads(r) for r in (r_q, r_k, r_v)], dim=2).flatten(2)  # (B, N, 3*H*D)
    r_in += _linear(t["qkv_in"], lin["qkv"], r_qkv, t["qkv_out"])
    return r_in, r_probs


class HeadCapture:
    """Inputs of a classifier head's Linear layers and the final tokens, for LRP.

    Supported heads: timm ViT/DeiT (``global_pool`` token or avg, distilled ``head_dist``),
    torchvision ``heads``, MONAI ``classification_head``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.paths = self._paths(model)  # [(weight, token index or "avg", [Linear, ...])]
        self.inputs: dict[nn.Module, Tensor] = {}
        self.norm = getattr(model, "norm", None)
        self.tokens: Tensor | None = None
        self._hooks = Hooks()

    @staticmethod
    def _paths(model: nn.Module) -> list[tuple[float, Any, list[nn.Linear]]]:
        def linears(module: nn.Module) -> list[nn.Linear]:
            return [m for m in module.modules() if isinstance(m, nn.Linear)]

        own = getattr(model, "medlens_head_paths", None)  # e.g. transformers ViT/DeiT (medlens.models.hf)
        if callable(own) and own() is not None:
            return own()
        if isinstance(getattr(model, "head", None), nn.Linear) and hasattr(model, "global_pool"):
            if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
                raise MedlensError(f"chefer supports token or avg pooling heads, not {model.global_pool!r} / attention pooling")
            if isinstance(getattr(model, "head_dist", None), nn.Linear):
                return [(0.5, 0, [model.head]), (0.5, 1, [model.head_dist])]
            return [(1.0, 0 if model.global_pool == "token" else "avg", [model.head])]
        for attr in ("heads", "classification_head"):
            head = getattr(model, attr, None)
            if isinstance(head, nn.Module) and linears(head):
                return [(1.0, 0, linears(head))]
        raise MedlensError(f"chefer needs a ViT classifier head (timm head, torchvision heads, MONAI classification_head); {type(model).__name__} has none")

    def register(self, hooks: Hooks) -> None:
        """Register the head's hooks on ``hooks`` (removed with it)."""
        for _, _, chain in self.paths:
            for lin in chain:
                hooks.forward_pre(lin, self._keep_input)
        if any(pool == "avg" for _, pool, _ in self.paths):
            hooks.forward(self.norm, self._keep_tokens)

    def __enter__(self) -> "HeadCapture":
        try:
            self.register(self._hooks)
        except BaseException:
            self._hooks.remove()
            raise
        return self

    def _keep_input(self, module: nn.Module, inputs: tuple) -> None:
        self.inputs[module] = inputs[0].detach()

    def _keep_tokens(self, _module: nn.Module, _inputs: tuple, out: Tensor) -> None:
        self.tokens = out.detach()

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove()

    def relevance(self, start: Tensor, n_tokens: int, n_patches: int, repeat: int) -> Tensor:
        """Relevance (B*K, N, C) at the last block's output from one-hot ``start`` (B*K, classes);
        the head's inputs were captured for B images, each repeated for its K targets."""
        out = None
        for weight, pool, chain in self.paths:
            r = start * weight
            for lin in reversed(chain):
                x = self.inputs[lin].repeat_interleave(repeat, 0)
                r = linear_relevance(x, lin.weight.detach(), r, abs_w=abs_weight(lin.weight))
            if out is None:
                out = r.new_zeros(r.shape[0], n_tokens, r.shape[-1])
            if pool == "avg":
                tokens = self.tokens.repeat_interleave(repeat, 0)[:, n_tokens - n_patches :]
                out[:, n_tokens - n_patches :] += tokens * safe_div(r, tokens.sum(1)).unsqueeze(1)
            else:
                out[:, pool] += r
        return out


# --- the functional API ----------------------------------------------------------------------
#: what one attention forward pass gives: maps (B, K, *grid), pooled logits (B, N), targets (B, K), task
ViTRun = AttentionRun


def vit_relevance(
    model: nn.Module,
    x: Tensor,
    method: str = "rollout",
    targets: Any = "pred",
    region: Region = None,
    block: int = -1,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> Tensor:
    """Attention-based explanation maps over the patch grid, from one forward pass.

    Args:
        model: timm / torchvision / MONAI vision transformer (modes restored, nothing changed).
        x: (B, C, *S) input.
        method: ``attention`` | ``rollout`` | ``grad-rollout`` | ``chefer`` | ``chefer-generic``.
        targets: as in :func:`medlens.core.targets.resolve_targets` (ignored by class-agnostic methods
            except for the output's K dimension).
        region: segmentation pooling region, as in :func:`medlens.explain`.
        block, head_fusion, discard_ratio: see the module docstring.

    Returns:
        (B, K, *grid) maps (K = number of targets; for ``attention`` with ``head_fusion="none"``,
        (B, heads, *grid)).
    """
    return vit_run(model, x, method, targets, region, block, head_fusion, discard_ratio).maps


def vit_run(
    model: nn.Module, x: Tensor, method: str = "rollout", targets: Any = "pred", region: Region = None,
    block: int = -1, head_fusion: str = "mean", discard_ratio: float = 0.0,
) -> ViTRun:
    """:func:`vit_relevance` with the logits, targets and task of its forward pass kept: the
    registered method of that name through the engine (:func:`medlens.explain`)."""
    key = method.lower().replace("_", "-")
    if key not in VIT_METHODS:
        raise MedlensError(f"unknown ViT method {method!r}: use attention, rollout, grad-rollout, chefer or chefer-generic")
    algo = VIT_METHODS[key](block=int(block), head_fusion=head_fusion, discard_ratio=float(discard_ratio))
    exp = explain(model, x, algo, target=targets, region=region)
    return ViTRun(exp.raw, exp.logits, exp.targets, exp.task)


def _chefer_rollout(model, cap: AttentionCapture, head: HeadCapture, logits, targets, grads, query, spatial) -> Tensor:
    """Chefer et al. (CVPR 2021) eq. 13-14: Ā_b = I + E_h[(∇A_b ⊙ R^(A_b))^+], C = Ā_L ··· Ā_1
    (their code's rollout order), read at the class token's row; relevance from LRP started at the
    one-hot target with alpha=1 rules."""
    batch, k = targets.shape
    n_tokens = query.shape[-1]
    start = torch.nn.functional.one_hot(targets.flatten(), logits.shape[1]).to(logits.dtype)  # (B*K, classes)
    n_patches = int(torch.Size(patch_grid(model, spatial)).numel())
    relevance = head.relevance(start, n_tokens, n_patches, k)
    row = query.unsqueeze(1)
    for index in reversed(cap.indices):
        rec = _repeat(cap.records[index], k)
        relevance, r_probs = block_relevance(cap.sites[index], rec, relevance, to_input=index > cap.indices[0])
        cam = (grads[index].flatten(0, 1) * r_probs).clamp(min=0).mean(dim=1)  # (B*K, N, N)
        row = row + row @ cam
    return row.squeeze(1)


def _repeat(rec: BlockRecord, k: int) -> BlockRecord:
    if k == 1:
        return rec
    rep = lambda t: t.repeat_interleave(k, 0)  # noqa: E731
    return BlockRecord(rep(rec.probs.detach()), rep(rec.q.detach()), rep(rec.k.detach()), rep(rec.v.detach()), {n: rep(t) for n, t in rec.tensors.items()})


# --- registered methods ----------------------------------------------------------------------
class _ViTMethod(AttentionMethod):
    """Options of the ViT attention methods; the engine runs the forward pass under each one's
    :meth:`provider` (a :class:`medlens.core.attention.AttentionCapture`)."""

    key: ClassVar[str] = ""
    block: int = -1
    head_fusion: str = "mean"
    discard_ratio: float = 0.0

    def validate(self) -> None:
        allowed = HEAD_FUSIONS + (("none", "per-head", "heads") if self.key == "attention" else ())
        check_choice(self.name, "head_fusion", self.head_fusion, allowed)
        require(0 <= float(self.discard_ratio) < 1, self.name, "discard_ratio", self.discard_ratio, "must be in [0, 1)")

    @staticmethod
    def query(ctx: Context, rows: int) -> Tensor:
        """(rows, N) the query row of the captured attention (class token, or patch mean)."""
        return query_row(ctx.model, ctx.x, rows, ctx.attention.probs()[0].shape[-1])


class _ClassAgnostic(_ViTMethod):
    """Raw attention and rollout: heads fused in the capture hook (less memory), no gradients;
    every target of an image gets the same map."""

    @property
    def per_head(self) -> bool:
        return self.key == "attention" and self.head_fusion in ("none", "per-head", "heads")

    def provider(self, model: nn.Module, x: Tensor) -> AttentionCapture:
        blocks = block_indices(len(find_attention(model)), int(self.block)) if self.key == "attention" else None
        fuse = None if self.per_head else (lambda a: fuse_heads(a, self.head_fusion))
        return AttentionCapture(model, blocks, transform=fuse)

    def relevance(self, ctx: Context) -> Tensor:
        """(B, 1 or H, *grid) the class-agnostic map(s)."""
        raise NotImplementedError

    def compute(self, ctx: Context) -> Tensor:
        maps = self.relevance(ctx)
        return maps if self.per_head else maps.expand(-1, ctx.targets.shape[1], *maps.shape[2:])


class _GradientWeighted(_ViTMethod, AttentionGradientMethod):
    """Methods of the attention A_b and its gradients dY_k/dA_b, per target."""

    def rolled(self, ctx: Context, weighted: list[Tensor], query: Tensor) -> Tensor:
        """(B*K, N) relevance row from the (B*K, H, N, N) products dY/dA ⊙ A per block."""
        raise NotImplementedError

    def compute(self, ctx: Context) -> Tensor:
        batch, k = ctx.targets.shape
        probs = [p.detach().unsqueeze(1) for p in ctx.attention.probs()]  # (B, 1, H, N, N)
        weighted = [(g * p).flatten(0, 1) for g, p in zip(ctx.attention_gradients, probs)]  # (B*K, H, N, N)
        row = self.rolled(ctx, weighted, self.query(ctx, batch * k))
        return patch_map(row, ctx.model, ctx.x).unflatten(0, (batch, k))


@register
class RawAttention(_ClassAgnostic):
    """Raw attention (e.g. Chung et al.; Dosovitskiy et al. 2021): the class token's attention
    row of one block (default: last) over the patch tokens, heads fused by mean/max/min or kept."""

    name = key = "attention"  # type: ignore[misc]

    def relevance(self, ctx: Context) -> Tensor:
        attn = ctx.attention.probs()[0]
        attn = attn if self.per_head else attn.unsqueeze(1)  # (B, H or 1, N, N)
        query = self.query(ctx, ctx.x.shape[0])
        return patch_map((query[:, None, None, :] @ attn).squeeze(-2), ctx.model, ctx.x)


@register
class AttentionRollout(_ClassAgnostic):
    """Attention rollout (Abnar & Zuidema, ACL 2020): Ā_b = norm(0.5 A_b + 0.5 I) with heads fused
    and optionally the lowest ``discard_ratio`` entries dropped; map = CLS row of Ā_L ··· Ā_1."""

    name = key = "rollout"

    def relevance(self, ctx: Context) -> Tensor:
        mats = [residual_rows(discard_lowest(m, float(self.discard_ratio))) for m in ctx.attention.probs()]
        return patch_map(roll_out(self.query(ctx, ctx.x.shape[0]), mats), ctx.model, ctx.x).unsqueeze(1)


@register
class GradientRollout(_GradientWeighted):
    """Gradient-weighted rollout (vit-explain): rollout of fuse_h((∇A ⊙ A)^+) per target."""

    name = key = "grad-rollout"

    def rolled(self, ctx: Context, weighted: list[Tensor], query: Tensor) -> Tensor:
        fused = [residual_rows(discard_lowest(fuse_heads(w, self.head_fusion).clamp(min=0), float(self.discard_ratio))) for w in weighted]
        return roll_out(query, fused)


@register
class CheferGeneric(_GradientWeighted):
    """Generic attention-model explainability (Chefer, Gur & Wolf, ICCV 2021):
    R <- R + E_h[(∇A_b ⊙ A_b)^+] R for every block, R initialised to I; CLS row. No LRP."""

    name = key = "chefer-generic"

    def rolled(self, ctx: Context, weighted: list[Tensor], query: Tensor) -> Tensor:
        return roll_out(query, [w.clamp(min=0).mean(dim=1) for w in weighted], identity=True)


class CheferCapture(AttentionCapture):
    """The attention capture of Chefer et al.'s LRP: every block's tensors (``record``), the
    spliced gradient path (``grad``), and the classifier head's inputs (:class:`HeadCapture`),
    all hooks in one :class:`medlens.core.hooks.Hooks`, removed on exit."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, grad=True, record=True)
        self.head = HeadCapture(model)

    def __enter__(self) -> "CheferCapture":
        super().__enter__()
        try:
            self.head.register(self._hooks)
        except BaseException:
            self._hooks.remove()
            raise
        return self


@register
class CheferAttribution(_ViTMethod, AttentionGradientMethod):
    """Transformer attribution (Chefer, Gur & Wolf, CVPR 2021): LRP relevance R^(A_b) of each
    block's attention (alpha=1) times its gradient, positive part, mean over heads, rolled out
    with identity Ā_b = I + E_h[(∇A_b ⊙ R^(A_b))^+], CLS row."""

    name = key = "chefer"

    def provider(self, model: nn.Module, x: Tensor) -> CheferCapture:
        return CheferCapture(model)

    def compute(self, ctx: Context) -> Tensor:
        batch, k = ctx.targets.shape
        cap = ctx.attention
        with torch.no_grad():
            row = _chefer_rollout(ctx.model, cap, cap.head, ctx.logits, ctx.targets, ctx.attention_gradients,
                                  self.query(ctx, batch * k), tuple(ctx.x.shape[2:]))
        return patch_map(row, ctx.model, ctx.x).unflatten(0, (batch, k))


#: the registered ViT methods by their key
VIT_METHODS: dict[str, type[_ViTMethod]] = {cls.key: cls for cls in (RawAttention, AttentionRollout, GradientRollout, CheferGeneric, CheferAttribution)}
