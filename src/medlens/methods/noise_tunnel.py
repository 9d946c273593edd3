"""SmoothGrad-squared and VarGrad: the second moments of the noisy gradients (Hooker et al.,
NeurIPS 2019; Adebayo et al., ICLR-W 2018), as Captum's ``NoiseTunnel(Saliency)`` with
``nt_type="smoothgrad_sq"`` / ``"vargrad"``.

The noise is drawn exactly as :class:`medlens.methods.attribution.SmoothGrad` (one
``torch.normal(0, sigma, (B, samples, C, *S))`` from a generator seeded with ``seed``: for one
image, Captum's draw after ``torch.manual_seed(seed)``); 2D and 3D alike.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from medlens.core.engine import Context, register
from medlens.core.options import option_names
from medlens.methods.attribution import SmoothGrad

__all__ = ["SmoothGradSquared", "VarGrad", "noisy_gradients"]


def noisy_gradients(ctx: Context, options: Mapping[str, Any]) -> Tensor:
    """(B, samples, K, C, *S) gradients at x + N(0, sigma^2) (|.| with ``absolute``, Saliency's
    default): :meth:`SmoothGrad.noisy_gradients` of a SmoothGrad built from ``options``."""
    return SmoothGrad(**{k: v for k, v in options.items() if k in option_names(SmoothGrad)}).noisy_gradients(ctx)


@register
class SmoothGradSquared(SmoothGrad):  # SmoothGrad's options and their checks
    """SmoothGrad-squared: mean_n g_n^2 per input element, the map max over channels.

    Options: as ``smoothgrad`` -- samples (25), noise_level (0.15 of the image range) or stdev,
    absolute (True), seed (0), batch_size (32).
    """

    name = "smoothgrad-sq"

    def compute(self, ctx: Context) -> Tensor:
        grads = self.noisy_gradients(ctx)
        ctx.info["attributions"] = (grads * grads).mean(dim=1)  # (B, K, C_in, *S)
        return ctx.info["attributions"].amax(dim=2)


@register
class VarGrad(SmoothGradSquared):  # the same options
    """VarGrad: the (population) variance over samples of the noisy gradients,
    mean_n g_n^2 - (mean_n g_n)^2, as Captum; the map max over channels. Options as ``smoothgrad-sq``."""

    name = "vargrad"


    def compute(self, ctx: Context) -> Tensor:
        grads = self.noisy_gradients(ctx)
        ctx.info["attributions"] = (grads * grads).mean(dim=1) - grads.mean(dim=1) ** 2
        return ctx.info["attributions"].amax(dim=2)
