"""The class activation map family: maps from a layer's activations A (B, C, *s) and the
gradients G (B, K, C, *s) of each target score with respect to them. Every formula works
unchanged on 2D and 3D feature maps ("spatial" means all dims after the channel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.core.engine import ActivationMethod, ClassifierOnly, Context, LayerMethod, ScoreFree, register
from medlens.core.options import check_top_k
from medlens.errors import MedlensError
from medlens.core.maps import (  # noqa: F401  (re-exported: the CAM arithmetic lives in core)
    elementwise_cam, keep_top_channels, principal_component, spatial_dims as _space, top_channels, weighted_cam, weighted_sum,
)


class ChannelOptions(LayerMethod):
    """The options of the CAMs that combine channels.

    Options:
        top_k_channels: only the k (or fraction in (0, 1)) most active channels contribute
            (per image); None or 0: all.
        eigen_smooth: the first principal component replaces the channel sum.
        fusion: how the maps of several layers are fused (mean, max, product).
    """

    top_k_channels: int | float | None = None
    eigen_smooth: bool = False

    def validate(self) -> None:
        super().validate()
        check_top_k(self.name, self.top_k_channels)


class _WeightedCAM(ChannelOptions):
    """ReLU(sum_c w_c A_c), with channel weights w (B, K, C) given by :meth:`weights`.
    Option ``eigen_smooth=True`` uses the first principal component instead of the sum."""

    def weights(self, activation: Tensor, gradient: Tensor) -> Tensor:
        raise NotImplementedError

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        return weighted_cam(self.weights(activation, gradient), activation, self.options)


@register
class GradCAM(_WeightedCAM):
    """Grad-CAM (Selvaraju et al., ICCV 2017): w_c = mean_s dY/dA_c(s)."""

    name = "gradcam"

    def weights(self, activation: Tensor, gradient: Tensor) -> Tensor:
        return gradient.mean(dim=_space(gradient, 3))


@register
class GradCAMPlusPlus(_WeightedCAM):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018), with the exponential-score closed form:
    alpha_c(s) = g^2 / (2 g^2 + sum_s' A_c(s') g^3), w_c = sum_s alpha_c(s) ReLU(g_c(s)).
    Where g = 0, alpha is 0 (the limit taken by the reference implementation)."""

    name = "gradcam++"

    def weights(self, activation: Tensor, gradient: Tensor) -> Tensor:
        g2, g3 = gradient.pow(2), gradient.pow(3)
        act_sum = activation.sum(dim=_space(activation, 2)).unsqueeze(1)  # (B, 1, C)
        act_sum = act_sum.view(*act_sum.shape, *([1] * (gradient.dim() - 3)))
        alpha = g2 / (2 * g2 + act_sum * g3 + 1e-7)
        alpha = torch.where(gradient != 0, alpha, torch.zeros_like(alpha))
        return (alpha * F.relu(gradient)).sum(dim=_space(gradient, 3))


@register
class XGradCAM(_WeightedCAM):
    """XGrad-CAM (Fu et al., BMVC 2020): w_c = sum_s A_c(s) g_c(s) / (sum_s A_c(s) + eps)."""

    name = "xgradcam"

    def weights(self, activation: Tensor, gradient: Tensor) -> Tensor:
        space = _space(activation, 2)
        norm = activation / (activation.sum(dim=space, keepdim=True) + 1e-7)
        return (norm.unsqueeze(1) * gradient).sum(dim=_space(gradient, 3))


@register
class HiResCAM(ChannelOptions):
    """HiResCAM (Draelos & Carin, 2020): ReLU(sum_c g_c(s) A_c(s)), element-wise, so the map
    is exactly the target score's first-order attribution at the layer's resolution.
    Options ``top_k_channels`` and ``eigen_smooth`` as for the weighted CAMs (with
    eigen-smoothing the first-order guarantee no longer holds)."""

    name = "hirescam"

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        return elementwise_cam(gradient * activation.unsqueeze(1), activation, self.options)


@register
class LayerCAM(ChannelOptions):
    """LayerCAM (Jiang et al., IEEE TIP 2021): ReLU(sum_c ReLU(g_c(s)) A_c(s)); fusing
    shallow and deep layers (pass several layers) is the paper's intended use.
    Options ``top_k_channels`` and ``eigen_smooth`` as for the weighted CAMs."""

    name = "layercam"

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        return elementwise_cam(F.relu(gradient) * activation.unsqueeze(1), activation, self.options)


@register
class GradCAMElementwise(ChannelOptions):
    """Grad-CAM element-wise (pytorch-grad-cam's GradCAMElementWise): ReLU(sum_c ReLU(g_c(s) A_c(s))),
    the positive part of each channel's first-order contribution. ``eigen_smooth=True`` takes
    the first principal component of ReLU(g A) instead of the channel sum; ``top_k_channels``
    as for the weighted CAMs."""

    name = "gradcam-elementwise"

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        return elementwise_cam(F.relu(gradient * activation.unsqueeze(1)), activation, self.options)


def linear_head(model: nn.Module, channels: int) -> nn.Linear:
    """The last ``nn.Linear`` taking ``channels`` features: the head of a GAP + linear model."""
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.in_features == channels:
            head = module
    if head is None:
        raise MedlensError(
            f"CAM needs a global-average-pool + linear head over the layer's {channels} channels, "
            f"and {type(model).__name__} has none; use gradcam (equal to CAM on such models)"
        )
    return head


@register
class CAM(ClassifierOnly, ScoreFree, ChannelOptions, ActivationMethod):
    """CAM (Zhou et al., CVPR 2016): M_k(s) = sum_c W[k, c] A_c(s), with W the linear head's
    weights after global average pooling. No gradients are needed. With ``top_k_channels=n``
    only the n channels with the largest mean activation contribute (per image); with
    ``eigen_smooth=True`` the map is the first principal component of W[k, c] A_c (sign agreeing
    with the sum; not rectified, like the plain CAM)."""

    name = "cam"
    score_free_reason = "reads the head's weights"

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        head = linear_head(ctx.model, activation.shape[1])
        weights = head.weight.detach()[ctx.targets].to(activation.dtype)  # (B, K, C)
        weights = keep_top_channels(weights, activation, self.top_k_channels)
        if self.eigen_smooth:
            shape = (*weights.shape, *([1] * (activation.dim() - 2)))
            return principal_component(weights.view(shape) * activation.unsqueeze(1))
        return weighted_sum(weights, activation)
