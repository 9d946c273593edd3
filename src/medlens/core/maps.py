"""Map arithmetic shared by the methods: channel-weighted sums of a layer's activations, the
top-k channel restriction, and the sign-fixed first principal component (eigen-smoothing).
Every formula works unchanged on 2D and 3D maps ("spatial" means all dims after the channel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def agreeing_sign(projection: Tensor, evidence: Tensor) -> Tensor:
    """+1/-1 per map so that ``projection`` (..., S) correlates positively with ``evidence``
    (..., S). Where the correlation is exactly zero the larger-magnitude extreme is made
    positive (Seg-Eigen-CAM's rule), and +1 where both are zero."""
    centred_p = projection - projection.mean(dim=-1, keepdim=True)
    centred_e = evidence - evidence.mean(dim=-1, keepdim=True)
    corr = (centred_p * centred_e).sum(dim=-1, keepdim=True)
    extreme = projection.amax(dim=-1, keepdim=True) + projection.amin(dim=-1, keepdim=True)
    sign = torch.where(corr != 0, corr.sign(), extreme.sign())
    return torch.where(sign == 0, torch.ones_like(sign), sign)


def principal_component(stack: Tensor, evidence: Tensor | None = None) -> Tensor:
    """Projection of each position's channel vector on the first principal component.

    For each map, the (S, C) matrix of channel vectors is centred over positions and projected
    on its first right singular vector v_1: P(s) = (a(s) - mean_s a) . v_1. SVD leaves the
    sign of v_1 arbitrary; it is fixed so that P correlates positively with ``evidence``
    (default: the channel sum, i.e. the map the projection replaces).

    Args:
        stack: (B, K, C, *s) per-channel maps (activations, or weighted activations).
        evidence: (B, K, *s) map the result must agree with, or None.
    Returns:
        (B, K, *s) projection, not rectified.
    """
    spatial = stack.shape[3:]
    matrix = stack.flatten(3).transpose(2, 3).float()  # (B, K, S, C)
    matrix = matrix - matrix.mean(dim=2, keepdim=True)
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    projection = (matrix @ vh[..., 0, :].unsqueeze(-1)).squeeze(-1)  # (B, K, S)
    reference = (stack.sum(dim=2) if evidence is None else evidence).flatten(2).float()
    projection = projection * agreeing_sign(projection, reference)
    return projection.view(*projection.shape[:2], *spatial).to(stack.dtype)


def spatial_dims(t: Tensor, lead: int) -> tuple[int, ...]:
    """The spatial dims of ``t`` after ``lead`` leading (batch/target/channel) dims."""
    return tuple(range(lead, t.dim()))


def weighted_sum(weights: Tensor, activation: Tensor) -> Tensor:
    """sum_c w[b, k, c] * A[b, c, *s] -> (B, K, *s)."""
    return torch.einsum("bkc,bc...->bk...", weights, activation)


def top_channels(activation: Tensor, top_k: int | float | None) -> Tensor | None:
    """(B, C) 0/1 mask of the ``top_k`` channels (a count, or a fraction in (0, 1)) with the
    largest mean activation, per image; None (all channels) when top_k is None or 0."""
    if not top_k:
        return None
    mean_act = activation.mean(dim=spatial_dims(activation, 2))
    count = int(round(top_k * mean_act.shape[1])) if 0 < float(top_k) < 1 else int(top_k)
    count = min(max(count, 1), mean_act.shape[1])
    return torch.zeros_like(mean_act).scatter_(1, mean_act.topk(count, dim=1).indices, 1.0)


def keep_top_channels(weights: Tensor, activation: Tensor, top_k: int | float | None) -> Tensor:
    """Zero the weights (B, K, C) of all but the ``top_k`` most active channels (see
    :func:`top_channels`), per image; unchanged when top_k is None."""
    keep = top_channels(activation, top_k)
    return weights if keep is None else weights * keep.unsqueeze(1).to(weights.dtype)


def elementwise_cam(contribution: Tensor, activation: Tensor, options: dict) -> Tensor:
    """ReLU(sum_c X[b, k, c]) of per-channel maps X (B, K, C, *s) (e.g. g_c A_c), over the
    ``top_k_channels`` most active channels if set; with ``eigen_smooth`` the first principal
    component of X replaces the sum (sign agreeing with it), as pytorch-grad-cam does."""
    keep = top_channels(activation, options.get("top_k_channels"))
    if keep is not None:
        contribution = contribution * keep.view(keep.shape[0], 1, keep.shape[1], *([1] * (contribution.dim() - 3))).to(contribution.dtype)
    if options.get("eigen_smooth"):
        return F.relu(principal_component(contribution))
    return F.relu(contribution.sum(dim=2))


def weighted_cam(weights: Tensor, activation: Tensor, options: dict) -> Tensor:
    """ReLU(sum_c w[b, k, c] A[b, c]) -> (B, K, *s) over the ``top_k_channels`` most active
    channels if that option is set (all by default); with ``options["eigen_smooth"]`` the
    sum is replaced by the first principal component of the weighted activations w_c A_c
    (pytorch-grad-cam's eigen_smooth), its sign fixed to agree with the plain sum."""
    weights = keep_top_channels(weights, activation, options.get("top_k_channels"))
    if options.get("eigen_smooth"):
        shape = (*weights.shape, *([1] * (activation.dim() - 2)))
        return F.relu(principal_component(weights.view(shape) * activation.unsqueeze(1)))
    return F.relu(weighted_sum(weights, activation))
