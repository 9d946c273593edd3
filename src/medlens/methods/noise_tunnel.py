"""SmoothGrad-squared and VarGrad: the second moments of the noisy gradients (Hooker et al.,
NeurIPS 2019; Adebayo et al., ICLR-W 2018), as Captum's ``NoiseTunnel(Saliency)`` with
``nt_type="smoothgrad_sq"`` / ``"vargrad"``.

The noise is drawn exactly as :class:`medlens.methods.attribution.SmoothGrad` (one
``torch.normal(0, sigma, (B, samples, C, *S))`` from a generator seeded with ``seed``: for one
image, Captum's draw after ``torch.manual_seed(seed)``); 2D and 3D alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medlens.core.engine import Context, register
from medlens.errors import MedlensError
from medlens.methods.attribution import SmoothGrad, input_gradients

__all__ = ["SmoothGradSquared", "VarGrad", "noisy_gradients"]


def noisy_gradients(ctx: Context, options) -> Tensor:
    """(B, samples, K, C, *S) gradients at x + N(0, sigma^2) (|.| with ``absolute``, Saliency's default)."""
    x = ctx.x
    samples = int(options.get("samples", 25))
    if samples < 1:
        raise MedlensError(f"option samples={samples} must be at least 1")
    absolute = bool(options.get("absolute", True))
    generator = torch.Generator(device=x.device).manual_seed(int(options.get("seed", 0)))
    if options.get("stdev") is not None:
        sigma = torch.full((x.shape[0],), float(options["stdev"]), device=x.device, dtype=x.dtype)
    else:
        flat = x.flatten(1)
        sigma = float(options.get("noise_level", 0.15)) * (flat.amax(1) - flat.amin(1))
    b = x.shape[0]
    spread = sigma.view(b, *(1,) * x.dim()).expand(b, samples, *x.shape[1:])
    noisy = (x.unsqueeze(1) + torch.normal(0.0, spread, generator=generator)).flatten(0, 1)
    targets = ctx.targets.repeat_interleave(samples, dim=0)
    images = torch.arange(b, device=x.device).repeat_interleave(samples)
    chunk = int(options.get("batch_size", 32))
    grads = torch.cat([input_gradients(ctx, part, targets[i : i + chunk], images[i : i + chunk])
                       for i, part in zip(range(0, len(noisy), chunk), noisy.split(chunk))])
    grads = grads.unflatten(0, (b, samples))
    return grads.abs() if absolute else grads


@register
class SmoothGradSquared(SmoothGrad):  # SmoothGrad's options and their checks
    """SmoothGrad-squared: mean_n g_n^2 per input element, the map max over channels.

    Options: as ``smoothgrad`` -- samples (25), noise_level (0.15 of the image range) or stdev,
    absolute (True), seed (0), batch_size (32).
    """

    name = "smoothgrad-sq"

    def compute(self, ctx: Context) -> Tensor:
        grads = noisy_gradients(ctx, self.options)
        ctx.info["attributions"] = (grads * grads).mean(dim=1)  # (B, K, C_in, *S)
        return ctx.info["attributions"].amax(dim=2)


@register
class VarGrad(SmoothGradSquared):  # the same options
    """VarGrad: the (population) variance over samples of the noisy gradients,
    mean_n g_n^2 - (mean_n g_n)^2, as Captum; the map max over channels. Options as ``smoothgrad-sq``."""

    name = "vargrad"


    def compute(self, ctx: Context) -> Tensor:
        grads = noisy_gradients(ctx, self.options)
        ctx.info["attributions"] = (grads * grads).mean(dim=1) - grads.mean(dim=1) ** 2
        return ctx.info["attributions"].amax(dim=2)
