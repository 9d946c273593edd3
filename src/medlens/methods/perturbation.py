"""Perturbation methods: the model is run on masked or ablated copies of the input and the
maps come from how the target scores change. Every perturbed copy is built as a batched
tensor (broadcasting and ``F.interpolate``, never a Python loop over pixels or samples) and
scored in chunks of ``batch_size`` through one forward pass per chunk; all targets of an image
come from the same perturbed forward passes, and no score leaves the device mid-run.

All methods take 2D (B, C, H, W) and 3D (B, C, D, H, W) inputs, classifier and segmentation
(pooled-region) targets.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from medlens.core.capture import resolve_layer
from medlens.core.engine import ActivationMethod, Context, PerturbationMethod, register, score_batches
from medlens.core.hooks import Hooks
from medlens.core.maps import weighted_cam
from medlens.core.resample import upsample, upsample_normalised
from medlens.core.options import check_top_k, require
from medlens.errors import MedlensError
from medlens.core.targets import pool_scores, region_rows


def _per_dim(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != ndim or any(v < 1 for v in values):
        raise MedlensError(f"option {name}={value!r} must be a positive int or {ndim} positive ints")
    return values


def _copy_scores(ctx: Context, stack: Tensor) -> Tensor:
    """Scores (B, c, K) of the explained targets for ``stack`` (B * c, C_in, *S), c perturbed
    copies per image, image-major, in one forward pass; a per-image segmentation region goes
    with each image's copies."""
    batch = ctx.x.shape[0]
    copies = stack.shape[0] // batch
    image = torch.arange(batch, device=stack.device).repeat_interleave(copies)
    region = region_rows(ctx.region, ctx.x, image)
    return score_batches(ctx.model, stack, ctx.targets, region, batch_size=stack.shape[0]).view(batch, copies, -1)


def _chunk(batch_size: int, images: int) -> int:
    """How many perturbations per image fit in one forward pass of ``batch_size`` inputs."""
    return max(1, int(batch_size) // images)


def masked_sum(ctx: Context, masks_of: Callable[[int, int], Tensor], n_masks: int, batch_size: int,
               baseline: Tensor | float, occlude: bool) -> Tensor:
    """sum_i v_i M_i(s), (B, K, *S): the one masked-batch loop of Occlusion and RISE.

    The masks M_i (c, *S) are built ``masks_of(start, stop)`` a chunk at a time (as many per
    image as fit in ``batch_size`` inputs); every image gets every mask in one forward pass.
    With ``occlude`` the masked region is set to ``baseline``, x (1 - M) + b M, and v_i is the
    drop of the target score Y(x) - Y(x_i) (Occlusion); otherwise the mask keeps the input,
    x M + b (1 - M), and v_i = Y(x_i) (RISE).
    """
    x = ctx.x
    per_pass = _chunk(batch_size, x.shape[0])
    total = x.new_zeros(x.shape[0], ctx.targets.shape[1], *x.shape[2:])
    for start in range(0, n_masks, per_pass):
        masks = masks_of(start, min(start + per_pass, n_masks))  # (c, *S)
        m = masks.unsqueeze(1).unsqueeze(0)  # (1, c, 1, *S)
        keep = 1 - m if occlude else m
        scores = _copy_scores(ctx, (x.unsqueeze(1) * keep + baseline * (1 - keep)).flatten(0, 1))  # (B, c, K)
        value = ctx.scores.unsqueeze(1) - scores if occlude else scores
        total += torch.einsum("bck,c...->bk...", value, masks)
    return total


# ----------------------------------------------------------------------------- channel choice


def select_channels(activation: Tensor, top_k: int | float | None = None) -> tuple[Tensor, Tensor]:
    """Channels worth perturbing, per image, strongest mean activation first.

    Channels that are identically zero are dropped (perturbing them is provably useless: a
    zero map masks the input to the zero baseline, and ablating a zero channel changes
    nothing); with ``top_k`` (a count, or a fraction in (0, 1)) only that many are kept.

    Args:
        activation: (B, C, *s) layer activation.
    Returns:
        channels: (B, n) long indices; live: (B, n) bool, False where an image has fewer
        live channels than the batch's busiest image (those entries must be ignored).
    """
    batch, n_channels = activation.shape[:2]
    flat = activation.flatten(2)
    alive = flat.abs().amax(dim=2) > 0
    rank = torch.where(alive, flat.mean(dim=2), torch.full_like(flat[..., 0], -math.inf))
    n_keep = int(alive.sum(dim=1).max())  # the one sync of the method: how many to run
    if top_k:
        wanted = int(round(top_k * n_channels)) if 0 < float(top_k) < 1 else int(top_k)
        n_keep = min(n_keep, max(1, wanted))
    n_keep = max(n_keep, 1)
    order = rank.topk(n_keep, dim=1).indices
    return order, alive.gather(1, order)


def _scatter_weights(weights: Tensor, channels: Tensor, live: Tensor, n_channels: int) -> Tensor:
    """(B, n, K) weights of the selected channels -> (B, K, C) with zeros elsewhere."""
    weights = torch.where(live.unsqueeze(2), weights, torch.zeros_like(weights))
    full = weights.new_zeros(weights.shape[0], n_channels, weights.shape[2])
    full.scatter_(1, channels.unsqueeze(2).expand_as(weights), weights)
    return full.transpose(1, 2)


# ----------------------------------------------------------------------------- Score-CAM



class ScoredChannels(ActivationMethod):
    """Options of the layer methods that score masked or ablated inputs per channel (Score-CAM,
    Ablation-CAM): ``batch_size`` inputs per forward pass, ``top_k_channels`` (count or fraction of
    the strongest channels scored; None: all) and ``eigen_smooth``."""

    batch_size: int = 32
    top_k_channels: int | float | None = None
    eigen_smooth: bool = False

    def validate(self) -> None:
        super().validate()
        check_top_k(self.name, self.top_k_channels)
        require(self.batch_size >= 1, self.name, "batch_size", self.batch_size, "must be at least 1")


@register
class ScoreCAM(ScoredChannels):
    """Score-CAM (Wang et al., CVPR-W 2020).

    Each channel map A_c, upsampled to the input and min-max normalised to H_c in [0, 1],
    masks the input; the target score of X * H_c gives the channel weight
    w_c = softmax_c(Y(X * H_c)), and the map is ReLU(sum_c w_c A_c). The softmax over channels
    follows pytorch-grad-cam (the paper's "increase of confidence" with softmax outputs differs
    only in scale for classifiers).

    Options:
        batch_size (int, 32): masked inputs per forward pass.
        top_k_channels (int | float, None): fast mode, perturb only the k (or fraction) most
            active channels. Channels that are identically zero are always skipped; their
            softmax share is accounted for exactly with one forward pass of the zero image.
        eigen_smooth (bool): first principal component of the weighted activations.
    """

    name = "scorecam"

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        batch, n_channels = activation.shape[:2]
        channels, live = select_channels(activation, self.top_k_channels)
        per_pass = _chunk(self.batch_size, batch)
        x = ctx.x
        scores = []
        for start in range(0, channels.shape[1], per_pass):
            idx = channels[:, start : start + per_pass]  # (B, c)
            picked = activation.gather(1, idx.view(*idx.shape, *([1] * (activation.dim() - 2))).expand(-1, -1, *activation.shape[2:]))
            masks = upsample_normalised(picked, x.shape[2:])  # (B, c, *S)
            masked = (x.unsqueeze(1) * masks.unsqueeze(2)).flatten(0, 1)  # (B*c, C_in, *S)
            scores.append(_copy_scores(ctx, masked))
        logit = torch.cat(scores, dim=1)  # (B, n, K)
        return self._softmax_cam(logit, live, channels, n_channels, activation, ctx)

    def _softmax_cam(self, logit: Tensor, live: Tensor, channels: Tensor, n_channels: int, activation: Tensor, ctx: Context) -> Tensor:
        """The map from the masked-input scores ``logit`` (B, n, K) of the scored ``channels``:
        a softmax over the live channels (the skipped dead ones counted in its normaliser) weighs
        the activation's channels."""
        logit = torch.where(live.unsqueeze(2), logit, torch.full_like(logit, -math.inf))
        log_norm = torch.logsumexp(logit, dim=1, keepdim=True)
        if not self.top_k_channels:
            log_norm = self._with_dead_channels(log_norm, activation, ctx)
        weights = torch.exp(logit - log_norm)
        return weighted_cam(_scatter_weights(weights, channels, live, n_channels), activation, self.options)

    def _with_dead_channels(self, log_norm: Tensor, activation: Tensor, ctx: Context) -> Tensor:
        """Add the softmax share of the skipped all-zero channels: each masks the input to zero,
        so one forward pass of the zero image scores them all."""
        n_dead = (activation.flatten(2).abs().amax(dim=2) == 0).sum(dim=1)  # (B,)
        if not bool(n_dead.any()):
            return log_norm
        zero_score = ctx.score(torch.zeros_like(ctx.x)).unsqueeze(1)  # (B, 1, K)
        dead = zero_score + n_dead.clamp_min(1).log().view(-1, 1, 1).to(zero_score.dtype)
        dead = torch.where(n_dead.view(-1, 1, 1) > 0, dead, torch.full_like(dead, -math.inf))
        return torch.logaddexp(log_norm, dead)


# ----------------------------------------------------------------------------- Ablation-CAM


class _Ablate:
    """Forward hook that replaces a layer's output (B, C, *s) by ``copies`` ablated versions of
    each image's output, (B * copies, C, *s), channel ``channels[b, j]`` zeroed in copy j.
    Whether the layer sees the batch of B images (the prefix ran once) or the input repeated
    (B * copies) is handled alike."""

    def __init__(self, channels: Tensor) -> None:
        self.channels = channels  # (B, c)

    def __call__(self, _module: object, _inp: object, out: Tensor) -> Tensor:
        batch, copies = self.channels.shape
        if not isinstance(out, Tensor) or out.dim() < 3:
            raise MedlensError("ablationcam needs a layer that outputs a (B, C, *spatial) feature map")
        if out.shape[0] == batch:
            out = out.repeat_interleave(copies, dim=0)
        keep = torch.ones(batch * copies, out.shape[1], device=out.device, dtype=out.dtype)
        keep.scatter_(1, self.channels.reshape(-1, 1), 0.0)
        return out * keep.view(*keep.shape, *([1] * (out.dim() - 2)))


@register
class AblationCAM(ScoredChannels):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): w_c = (Y - Y_c) / Y, with Y_c the target score
    when channel c of the layer is set to zero, and the map ReLU(sum_c w_c A_c).

    The ablated copies are made at the layer itself: by default the network before the layer
    runs once per chunk on the B images and only the rest of it on the B * c ablated copies;
    models whose later layers reuse earlier tensors of batch B (U-Net skips) fall back to
    running the whole network on the repeated input.

    Options:
        batch_size (int, 32): ablated copies per forward pass.
        top_k_channels (int | float, None): ablate only the k (or fraction) most active
            channels; the others get weight 0. All-zero channels are skipped (exactly weight 0).
        eigen_smooth (bool): first principal component of the weighted activations.
    """

    name = "ablationcam"

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        if activation.dim() != ctx.x.dim():
            raise MedlensError(f"ablationcam needs a convolutional feature map at {layer!r}, not tokens")
        batch, n_channels = activation.shape[:2]
        channels, live = select_channels(activation, self.top_k_channels)
        per_pass = _chunk(self.batch_size, batch)
        module = resolve_layer(ctx.model, layer)
        ablated = [self._ablated_scores(ctx, module, channels[:, s : s + per_pass]) for s in range(0, channels.shape[1], per_pass)]
        scores = torch.cat(ablated, dim=1)  # (B, n, K)
        original = ctx.scores.unsqueeze(1)
        drop = original - scores
        weights = torch.where(original != 0, drop / original, drop)
        return weighted_cam(_scatter_weights(weights, channels, live, n_channels), activation, self.options)

    def _ablated_scores(self, ctx: Context, module: torch.nn.Module, channels: Tensor) -> Tensor:
        batch, copies = channels.shape
        targets = ctx.targets.repeat_interleave(copies, dim=0)
        with Hooks() as hooks, torch.no_grad():
            hooks.forward(module, _Ablate(channels))
            output = self._run_from_layer(ctx, batch * copies)
            if output is None:  # a later layer mixes in batch-B tensors: repeat the input instead
                output = ctx.model(ctx.x.repeat_interleave(copies, dim=0))
        image = torch.arange(batch, device=ctx.x.device).repeat_interleave(copies)
        logits = pool_scores(output, ctx.x, region_rows(ctx.region, ctx.x, image))
        return logits.gather(1, targets).view(batch, copies, -1)

    @staticmethod
    def _run_from_layer(ctx: Context, expected: int) -> Tensor | None:
        """The model on the B images, the hook expanding the batch at the layer; None when the
        network after the layer cannot take the expanded batch."""
        if ctx.x.shape[0] == expected:
            return ctx.model(ctx.x)
        try:
            output = ctx.model(ctx.x)
        except RuntimeError:
            return None
        return output if output.shape[0] == expected else None


# ----------------------------------------------------------------------------- Occlusion


def _window_masks(size: Sequence[int], window: Sequence[int], stride: Sequence[int], device: torch.device) -> list[Tensor]:
    """Per spatial dim, (n_d, size_d) 0/1 masks of the window positions start = k * stride,
    k = 0..ceil((size - window) / stride) (the last window is clipped at the border, as in
    Captum, so every pixel is covered)."""
    masks = []
    for n, w, s in zip(size, window, stride):
        if w > n:
            raise MedlensError(f"occlusion window {w} is larger than the input size {n}")
        starts = torch.arange(math.ceil((n - w) / s) + 1, device=device) * s
        pos = torch.arange(n, device=device)
        masks.append(((pos >= starts[:, None]) & (pos < starts[:, None] + w)).float())
    return masks


def _outer_masks(axis_masks: Sequence[Tensor], flat_index: Tensor) -> Tensor:
    """Masks (c, *S) of the windows with flat indices ``flat_index`` (row-major over the
    per-dim window positions), as the outer product of the per-dim 1D masks."""
    counts = [m.shape[0] for m in axis_masks]
    out = None
    rest = flat_index
    for d in reversed(range(len(axis_masks))):
        pos = rest % counts[d]
        rest = rest // counts[d]
        m = axis_masks[d][pos]  # (c, size_d)
        m = m.view(m.shape[0], *([1] * d), m.shape[1], *([1] * (len(axis_masks) - d - 1)))
        out = m if out is None else out * m
    return out


@register
class Occlusion(PerturbationMethod):
    """Occlusion (Zeiler & Fergus, ECCV 2014): slide a window filled with ``baseline`` over the
    input (all channels); a pixel's attribution is the mean drop Y(X) - Y(X_occluded) over the
    windows that cover it (the definition Captum's ``Occlusion`` implements).

    Options:
        window (int | tuple, size // 8): window size per spatial dim.
        stride (int | tuple, window // 2): step between windows.
        baseline (float | Tensor, 0.0): value put in the window (a tensor broadcastable to x).
        batch_size (int, 64): occluded inputs per forward pass.
    """

    name = "occlusion"
    window: int | tuple[int, ...] | None = None
    stride: int | tuple[int, ...] | None = None
    baseline: Any = 0.0
    batch_size: int = 64

    def validate(self) -> None:
        for option in ("window", "stride"):
            value = getattr(self, option)
            values = value if isinstance(value, (tuple, list)) else (value,)
            require(value is None or all(int(v) >= 1 for v in values), self.name, option, value, "must be positive")
        require(self.batch_size >= 1, self.name, "batch_size", self.batch_size, "must be at least 1")

    def compute(self, ctx: Context) -> Tensor:
        x = ctx.x
        size = x.shape[2:]
        ndim = len(size)
        window = _per_dim(self.window if self.window is not None else max(1, min(size) // 8), ndim, "window")
        stride = _per_dim(self.stride if self.stride is not None else tuple(max(1, w // 2) for w in window), ndim, "stride")
        baseline = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device)
        axis_masks = _window_masks(size, window, stride, x.device)
        n_windows = math.prod(m.shape[0] for m in axis_masks)

        def windows(start: int, stop: int) -> Tensor:
            return _outer_masks(axis_masks, torch.arange(start, stop, device=x.device))

        total = masked_sum(ctx, windows, n_windows, self.batch_size, baseline, occlude=True)
        return total / _outer_coverage(axis_masks).clamp_min(1)


def _outer_coverage(axis_masks: Sequence[Tensor]) -> Tensor:
    """(*S) number of windows covering each pixel: the outer product of per-dim counts."""
    out = None
    for d, m in enumerate(axis_masks):
        c = m.sum(0).view(*([1] * d), -1, *([1] * (len(axis_masks) - d - 1)))
        out = c if out is None else out * c
    return out


# ----------------------------------------------------------------------------- RISE


def rise_draws(count: int, ndim: int, cells: int, p_keep: float, cell: Sequence[int], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The random part of ``count`` RISE masks: binary ``cells``^d grids (count, 1, *grid) that
    keep a cell with probability p_keep, and crop shifts (count, d) in [0, cell_size)."""
    grid = (torch.rand((count, 1, *([cells] * ndim)), generator=generator) < p_keep).float()
    shifts = torch.stack([torch.randint(0, c, (count,), generator=generator) for c in cell], dim=1)
    return grid, shifts


def rise_masks(grid: Tensor, shifts: Tensor, size: Sequence[int]) -> Tensor:
    """RISE masks (count, *size): each grid upsampled (bi/trilinear) to (cells + 1) * cell_size
    and cropped at its shift, so the masks are smooth and not aligned to the cell borders."""
    ndim, cells = len(size), grid.shape[-1]
    cell = [math.ceil(s / cells) for s in size]
    up = upsample(grid, [(cells + 1) * c for c in cell])[:, 0].clamp_(0, 1)  # (count, *up)
    for d, s in enumerate(size):
        index = shifts[:, d].view(-1, *([1] * ndim)) + torch.arange(s, device=grid.device).view(*([1] * (d + 1)), s, *([1] * (ndim - d - 1)))
        up = up.gather(d + 1, index.expand(*up.shape[: d + 1], s, *up.shape[d + 2 :]))
    return up


@register
class RISE(PerturbationMethod):
    """RISE (Petsiuk et al., BMVC 2018): M(s) = sum_i Y(X * M_i) M_i(s) / (N p), with N random
    smooth masks M_i that keep each coarse cell with probability p.

    Options:
        n_masks (int, 1000), cells (int, 7), p_keep (float, 0.5), seed (int, 0),
        baseline (float, 0.0) put where the mask is 0, batch_size (int, 64).
    """

    name = "rise"
    n_masks: int = 1000
    cells: int = 7
    p_keep: float = 0.5
    seed: int = 0
    baseline: float = 0.0
    batch_size: int = 64

    def validate(self) -> None:
        if self.n_masks < 1 or self.cells < 1 or not 0 < self.p_keep <= 1:
            raise MedlensError("rise needs n_masks >= 1, cells >= 1 and 0 < p_keep <= 1")
        require(self.batch_size >= 1, self.name, "batch_size", self.batch_size, "must be at least 1")

    def compute(self, ctx: Context) -> Tensor:
        x = ctx.x
        n_masks, cells, p_keep = self.n_masks, self.cells, float(self.p_keep)
        baseline = float(self.baseline)
        generator = torch.Generator().manual_seed(self.seed)
        cell = [math.ceil(s / cells) for s in x.shape[2:]]
        grids, shifts = rise_draws(n_masks, x.dim() - 2, cells, p_keep, cell, generator)  # drawn up front: chunking changes nothing

        def masks(start: int, stop: int) -> Tensor:
            return rise_masks(grids[start:stop].to(x.device), shifts[start:stop].to(x.device), x.shape[2:])

        return masked_sum(ctx, masks, n_masks, self.batch_size, baseline, occlude=False) / (n_masks * p_keep)
