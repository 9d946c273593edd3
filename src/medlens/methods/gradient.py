"""Attributions from the gradient of the target score with respect to the input pixels."""

from __future__ import annotations

from torch import Tensor

from medlens.core.engine import Context, InputGradientMethod, register


@register
class Saliency(InputGradientMethod):
    """Vanilla gradient saliency (Simonyan et al., ICLR workshop 2014): M(s) = max_c |dY/dx_c(s)|."""

    name = "saliency"

    def compute(self, ctx: Context) -> Tensor:
        return ctx.input_gradients.abs().amax(dim=2)
