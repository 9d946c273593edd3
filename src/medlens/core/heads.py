"""Closed-form target gradients through a global-average-pool + linear head.

For a classifier whose scores are Y = W mean_s A(s) + b over a layer's activation A (B, C, *s)
(ResNet, DenseNet, EfficientNet, ConvNeXt-style heads), dY_k / dA_c(s) = W[k, c] / |s| for
every position s: all 1000 classes' gradients cost nothing but a view. The engine uses this
only when it has *proved* the head on the call's own values: the head reproduces the logits
from the pooled activation, and the autograd gradient of the first target equals the closed form.
Anything else (a ReLU after the layer, attention pooling, a score hook) falls back to autograd.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def last_linear(model: nn.Module, channels: int) -> nn.Linear | None:
    """The last ``nn.Linear`` of ``model`` taking ``channels`` features, or None."""
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.in_features == channels:
            head = module
    return head


def pooled_linear_gradients(
    model: nn.Module, activation: Tensor, logits: Tensor, first_gradient: Tensor, first_targets: Tensor
) -> Callable[[Tensor], Tensor] | None:
    """A function targets (B, k) -> gradients (B, k, C, *s) (an expanded view of W[t] / |s|),
    or None when the head is not provably GAP -> Linear on these values.

    Args:
        activation: (B, C, *s) the layer's activation (detached).
        logits: (B, N) the scores the engine explains.
        first_gradient: (B, 1, C, *s) autograd gradient of ``first_targets`` (B, 1), the proof's second half.
    """
    if activation.dim() < 3:
        return None
    head = last_linear(model, activation.shape[1])
    if head is None or head.out_features != logits.shape[1]:
        return None
    spatial = tuple(range(2, activation.dim()))
    weight = head.weight.detach().to(activation.dtype)
    bias = None if head.bias is None else head.bias.detach().to(activation.dtype)
    with torch.no_grad():
        predicted = F.linear(activation.mean(dim=spatial), weight, bias)
    scale = max(1.0, float(logits.detach().abs().max()))
    if predicted.shape != logits.shape or not torch.allclose(predicted, logits.detach(), rtol=1e-4, atol=1e-4 * scale):
        return None
    size = activation[0, 0].numel()
    shape = (*activation.shape[2:],)

    def gradients(targets: Tensor) -> Tensor:
        rows = weight[targets] / size  # (B, k, C)
        return rows.view(*rows.shape, *([1] * len(shape))).expand(*rows.shape, *shape)

    closed = gradients(first_targets)
    tolerance = 1e-4 * float(first_gradient.abs().max().clamp_min(1e-12))
    if not torch.allclose(closed, first_gradient, rtol=1e-3, atol=tolerance):
        return None
    return gradients
