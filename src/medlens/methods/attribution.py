"""Gradient attributions in input space: SmoothGrad, Integrated Gradients, Input x Gradient,
Guided Backprop and Guided Grad-CAM.

Gradients are taken with ``torch.autograd.grad`` with respect to the (perturbed) inputs only,
never the parameters, for all targets of an image at once. Gradient-like methods (SmoothGrad,
Guided Backprop) reduce the input channels by max |.| as the saliency map does; attribution
methods (Integrated Gradients, Input x Gradient) by a signed sum, so the map of a pixel is its
total contribution to the score. The per-channel attributions (B, K, C_in, *S) come back on
the explanation as ``exp.info["attributions"]`` (the methods keep no state between calls).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from medlens.core.engine import Context, InputGradientMethod, InputMethod, LayerMethod, register
from medlens.core.hooks import Hooks
from medlens.core.resample import upsample
from medlens.errors import MedlensError
from medlens.core.options import check_top_k, require
from medlens.methods.cam import GradCAM
from medlens.core.targets import region_rows  # noqa: F401  (re-exported)


def input_gradients(ctx: Context, x: Tensor, targets: Tensor, image: Tensor | None = None) -> Tensor:
    """Gradients (b, K, C_in, *S) of the ``targets`` (b, K) scores w.r.t. inputs ``x`` (b, C_in, *S),
    made from the images ``image`` (b,) of ``ctx.x`` (for per-image segmentation regions)."""
    return ctx.gradients_at(x, targets, image)


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    return values.view(*values.shape, *([1] * (like.dim() - values.dim())))


def path_gradients(ctx: Context, point: Callable[[Tensor, Tensor], Tensor], n: int, weights: Tensor, batch_size: int) -> Tensor:
    """sum_j weights[j] * grad(point(b, j)) per image, (B, K, C_in, *S).

    The B * n inputs (image-major) are built ``batch_size`` at a time by
    ``point(image_index (b,), step_index (b,)) -> (b, C_in, *S)``, so memory stays bounded.
    """
    batch = ctx.x.shape[0]
    total = ctx.x.new_zeros(batch, ctx.targets.shape[1], *ctx.x.shape[1:])
    flat = torch.arange(batch * n, device=ctx.x.device)
    for chunk in flat.split(max(1, int(batch_size))):
        image, step = chunk // n, chunk % n
        grads = input_gradients(ctx, point(image, step), ctx.targets[image], image)
        total.index_add_(0, image, grads * _broadcast(weights[step], grads))
    return total


# ----------------------------------------------------------------------------- SmoothGrad


def gaussian_copies(x: Tensor, samples: int, sigma: Tensor, seed: int) -> Tensor:
    """(B * samples, C, *S) copies x + N(0, sigma_b^2), image-major, drawn as one
    ``torch.normal(0, sigma, (B, samples, C, *S))`` from a generator seeded with ``seed`` (for
    one image, the draw Captum's NoiseTunnel makes after ``torch.manual_seed(seed)``).

    Args:
        x: (B, C, *S) images; sigma: (B,) standard deviation per image.
    """
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    b = x.shape[0]
    spread = sigma.view(b, *(1,) * x.dim()).expand(b, samples, *x.shape[1:])
    return (x.unsqueeze(1) + torch.normal(0.0, spread, generator=generator)).flatten(0, 1)


@register
class SmoothGrad(InputMethod):
    """SmoothGrad (Smilkov et al., 2017): the gradient averaged over noisy copies
    x + N(0, sigma^2), M(s) = max_c mean_n |dY/dx_c(s)| (with ``absolute=True``, as Captum's
    NoiseTunnel over Saliency) or max_c |mean_n dY/dx_c(s)|.

    Options:
        samples (int, 25); noise_level (float, 0.15): sigma as a fraction of each image's
        intensity range, or stdev (float) in absolute units; absolute (bool, True);
        seed (int, 0); batch_size (int, 32).
    The noise is drawn as one ``torch.normal(0, sigma, (B, samples, C, *S))`` from a generator
    seeded with ``seed`` (for one image, the same draw Captum makes after ``torch.manual_seed(seed)``),
    and all B x samples noisy copies go through the model in chunks of ``batch_size``.
    """

    name = "smoothgrad"
    samples: int = 25
    noise_level: float = 0.15
    stdev: float | None = None
    absolute: bool = True
    seed: int = 0
    batch_size: int = 32

    def validate(self) -> None:
        require(self.samples >= 1, self.name, "samples", self.samples, "must be at least 1")
        require(self.noise_level >= 0, self.name, "noise_level", self.noise_level, "must be >= 0")
        require(self.stdev is None or self.stdev >= 0, self.name, "stdev", self.stdev, "must be >= 0")
        require(self.batch_size >= 1, self.name, "batch_size", self.batch_size, "must be at least 1")

    def sigma(self, x: Tensor) -> Tensor:
        """(B,) noise standard deviation per image: ``stdev``, or ``noise_level`` x its range."""
        if self.stdev is not None:
            return torch.full((x.shape[0],), float(self.stdev), device=x.device, dtype=x.dtype)
        flat = x.flatten(1)
        return float(self.noise_level) * (flat.amax(1) - flat.amin(1))

    def noisy_gradients(self, ctx: Context) -> Tensor:
        """(B, samples, K, C_in, *S) input gradients at the noisy copies (|.| with ``absolute``):
        the one noise draw of SmoothGrad, SmoothGrad-squared and VarGrad."""
        x, samples = ctx.x, self.samples
        noisy = gaussian_copies(x, samples, self.sigma(x), self.seed)  # (B * samples, C, *S)
        targets = ctx.targets.repeat_interleave(samples, dim=0)
        images = torch.arange(x.shape[0], device=x.device).repeat_interleave(samples)
        chunk = self.batch_size
        grads = torch.cat([ctx.gradients_at(part, targets[i : i + chunk], images[i : i + chunk])
                           for i, part in zip(range(0, len(noisy), chunk), noisy.split(chunk))])
        grads = grads.unflatten(0, (x.shape[0], samples))
        return grads.abs() if self.absolute else grads

    def compute(self, ctx: Context) -> Tensor:
        ctx.info["attributions"] = self.noisy_gradients(ctx).mean(dim=1)  # (B, K, C_in, *S)
        return ctx.info["attributions"].abs().amax(dim=2)


# ----------------------------------------------------------------------------- Integrated Gradients


RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_middle", "riemann_right")


def quadrature(steps: int, rule: str) -> tuple[Tensor, Tensor]:
    """Points alpha in [0, 1] and weights (summing to 1) of the path integral's quadrature."""
    if steps < 1:
        raise MedlensError(f"integrated-gradients option steps={steps} must be at least 1")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.tensor(0.5 * (nodes + 1)), torch.tensor(0.5 * weights)
    if rule == "riemann_trapezoid":
        if steps < 2:
            raise MedlensError("riemann_trapezoid needs steps >= 2")
        weights = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        weights[[0, -1]] /= 2
        return torch.linspace(0, 1, steps, dtype=torch.float64), weights
    offsets = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}
    if rule not in offsets:
        raise MedlensError(f"unknown integration rule {rule!r}: use gausslegendre, riemann_trapezoid, riemann_left, riemann_middle or riemann_right")
    return (torch.arange(steps, dtype=torch.float64) + offsets[rule]) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)


def _baseline(option: object, x: Tensor) -> Tensor:
    baseline = torch.as_tensor(0.0 if option is None else option, dtype=x.dtype, device=x.device)
    try:
        return torch.broadcast_to(baseline, x.shape)
    except RuntimeError:
        raise MedlensError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to the input {tuple(x.shape)}") from None


@register
class IntegratedGradients(InputMethod):
    """Integrated Gradients (Sundararajan et al., ICML 2017):
    IG_i(x) = (x_i - x'_i) * int_0^1 dY/dx_i(x' + a (x - x')) da, computed with a quadrature
    (Gauss-Legendre by default, as Captum). The map is sum_c IG_c(s); summed over all pixels
    it approximates Y(x) - Y(x') (completeness).

    Options:
        baseline (float | Tensor, 0.0), steps (int, 32), rule (str, "gausslegendre"),
        internal_batch_size (int, 32): interpolated inputs per forward/backward pass.
    """

    name = "integrated-gradients"
    baseline: Any = None
    steps: int = 32
    rule: str = "gausslegendre"
    internal_batch_size: int = 32

    def validate(self) -> None:
        quadrature(self.steps, self.rule)  # refuses steps < 1 and unknown rules, naming the valid ones
        require(self.internal_batch_size >= 1, self.name, "internal_batch_size", self.internal_batch_size, "must be at least 1")

    def compute(self, ctx: Context) -> Tensor:
        x = ctx.x
        baseline = _baseline(self.baseline, x)
        alphas, weights = quadrature(self.steps, self.rule)
        alphas, weights = alphas.to(x.device, x.dtype), weights.to(x.device, x.dtype)
        delta = x - baseline

        def point(image: Tensor, step: Tensor) -> Tensor:
            return baseline[image] + _broadcast(alphas[step], delta) * delta[image]

        mean_grad = path_gradients(ctx, point, len(alphas), weights, self.internal_batch_size)
        ctx.info["attributions"] = delta.unsqueeze(1) * mean_grad
        return ctx.info["attributions"].sum(dim=2)


@register
class InputXGradient(InputGradientMethod):
    """Input x Gradient (Shrikumar et al., 2016): x_c(s) * dY/dx_c(s), summed over channels."""

    name = "inputxgradient"

    def compute(self, ctx: Context) -> Tensor:
        ctx.info["attributions"] = ctx.x.unsqueeze(1) * ctx.input_gradients
        return ctx.info["attributions"].sum(dim=2)


# ----------------------------------------------------------------------------- Guided Backprop


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward passes only the positive part of the gradient."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad.clamp_min(0)


def _guide(_module: nn.Module, _inp: object, out: Tensor) -> Tensor:
    return _PositiveGradient.apply(out)


@contextmanager
def guided_relus(model: nn.Module) -> Iterator[int]:
    """Make every ``nn.ReLU`` module of ``model`` backpropagate guided gradients while inside.

    A forward hook passes the ReLU's output through an identity whose backward keeps only
    positive gradients; with ReLU's own backward (the mask x > 0) this is guided backprop's
    rule R_in = (x > 0) * ReLU(R_out). Works with ``inplace=True`` ReLUs (the mask is read
    from the output, > 0 exactly where the input is). Not covered: ``F.relu``/``torch.relu``
    called inside a module's forward (e.g. torchvision's DenseNet tail, some timm blocks):
    those keep the plain ReLU gradient. Captum and pytorch-grad-cam have the same coverage.
    Hooks are removed on exit, exceptions included. Yields the number of hooked modules.
    """
    with Hooks() as hooks:
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                hooks.forward(module, _guide)
        if not hooks:
            raise MedlensError(f"guided backprop needs nn.ReLU modules and {type(model).__name__} has none (functional relu and other activations are not guided)")
        yield len(hooks)


def guided_gradients(ctx: Context, batch_size: int = 32) -> Tensor:
    """Guided-backprop gradients (B, K, C_in, *S) of the explained targets."""
    with guided_relus(ctx.model):
        ones = ctx.x.new_ones(1)
        return path_gradients(ctx, lambda image, _step: ctx.x[image], 1, ones, batch_size)


@register
class GuidedBackprop(InputMethod):
    """Guided Backpropagation (Springenberg et al., ICLR-W 2015): the input gradient with
    negative gradients zeroed at every ReLU on the way back; M(s) = max_c |R_c(s)|.
    The user's modules are not changed (see :func:`guided_relus`)."""

    name = "guided-backprop"
    batch_size: int = 32

    def validate(self) -> None:
        require(self.batch_size >= 1, self.name, "batch_size", self.batch_size, "must be at least 1")

    def compute(self, ctx: Context) -> Tensor:
        ctx.info["attributions"] = guided_gradients(ctx, self.batch_size)
        return ctx.info["attributions"].abs().amax(dim=2)


@register
class GuidedGradCAM(LayerMethod):
    """Guided Grad-CAM (Selvaraju et al., ICCV 2017): guided backprop R times the Grad-CAM map
    upsampled to the input (bilinear; Captum's default is nearest), M(s) = max_c |R_c(s)| * L(s).
    Grad-CAM's options (``top_k_channels``, ``eigen_smooth``, ``fusion``) build the Grad-CAM
    that gives L (a method of its own, composed, nothing shared)."""

    name = "guided-gradcam"
    top_k_channels: int | float | None = None
    eigen_smooth: bool = False
    batch_size: int = 32

    def validate(self) -> None:
        super().validate()
        check_top_k(self.name, self.top_k_channels)
        require(self.batch_size >= 1, self.name, "batch_size", self.batch_size, "must be at least 1")

    @property
    def gradcam(self) -> GradCAM:
        """The Grad-CAM giving the coarse map L, built from this method's options."""
        return GradCAM(top_k_channels=self.top_k_channels, eigen_smooth=self.eigen_smooth, fusion=self.fusion)

    def compute(self, ctx: Context) -> Tensor:
        cam = upsample(self.gradcam.compute(ctx), ctx.x.shape[2:])  # (B, K, *S)
        ctx.info["attributions"] = guided_gradients(ctx, self.batch_size) * cam.unsqueeze(2)
        return ctx.info["attributions"].abs().amax(dim=2)
