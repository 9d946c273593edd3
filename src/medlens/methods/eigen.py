"""Principal-component CAMs. SVD leaves the sign of a component arbitrary, which is why other
implementations' maps can flip between runs, layers or library versions; here the sign is
fixed so that the map correlates positively with the evidence it summarises."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from medlens.core.engine import ActivationMethod, Context, LayerMethod, register
from medlens.core.maps import principal_component


@register
class EigenCAM(ActivationMethod):
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): the projection of the activations A (centred
    over positions) on their first principal component, rectified. Gradient-free and
    class-agnostic: every target of an image gets the same map. The sign is chosen so that the
    map correlates positively with the channel sum sum_c A_c (where the layer is active)."""

    name = "eigencam"

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        projection = F.relu(principal_component(activation.unsqueeze(1)))  # (B, 1, *s)
        return projection.expand(-1, ctx.targets.shape[1], *projection.shape[2:])


@register
class EigenGradCAM(LayerMethod):
    """Eigen-Grad-CAM (pytorch-grad-cam's EigenGradCAM): the first principal component of the
    element-wise products g_c(s) A_c(s), rectified. The sign is chosen so that the map
    correlates positively with the class evidence sum_c g_c(s) A_c(s) (the target score's
    first-order attribution at the layer, HiResCAM's map before the ReLU)."""

    name = "eigengradcam"

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        return F.relu(principal_component(gradient * activation.unsqueeze(1)))
