"""DeepLIFT with the rescale rule (Shrikumar et al., ICML 2017) and DeepLIFT-SHAP (Lundberg &
Lee, NeurIPS 2017), as modified gradients.

The input and its reference go through the model as one batch [x; x'] (B pairs -> 2B rows). At
every elementwise nonlinearity y = f(u) (ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus, and the
other activation modules in :data:`RESCALED`) the backward pass uses the multiplier
m = (f(u) - f(u')) / (u - u') in place of f'(u) (f'(u) itself where |u - u'| < eps); at a max pool
the difference of the pooled outputs is sent back through both argmax positions (the input's and
the reference's, as Captum does) and divided by u - u'. Linear layers (convolutions, dense, batch
norm in eval, average pools, residual sums) keep their gradient, which is their exact multiplier.
The attribution is (x - x') * dY/dx under these multipliers; summed over all pixels it equals
Y(x) - Y(x') when every nonlinearity is a module (summation-to-delta).

The rules are forward hooks returning ``y.detach() + m * (u - u.detach())`` (same value, new
gradient), so they compose with ``torch.autograd.grad`` and batched targets; a module called
several times (torchvision ResNet's ``relu``) gets its own multiplier at each call (Captum refuses
such models). Functional activations (``F.relu`` inside a forward) are not rescaled; the number of
rescaled calls is reported as ``exp.info["rescaled_calls"]``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.core.engine import Context, InputMethod, register, target_gradients
from medlens.core.options import require
from medlens.core.targets import pool_scores, region_rows
from medlens.errors import MedlensError

__all__ = ["DeepLift", "DeepLiftShap", "rescale_rule"]

#: elementwise activation modules whose gradient becomes the rescale multiplier
RESCALED: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.ReLU6, nn.PReLU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.LogSigmoid, nn.Softsign,
)
_POOLS = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}


def _rescaled(u: Tensor, y: Tensor, eps: float) -> Tensor:
    """y (2B, ...) with the rescale multiplier as its gradient w.r.t. u (2B, ...), [x; x'] halves."""
    half = u.shape[0] // 2
    with torch.no_grad():
        d_in = u[:half] - u[half:]
        big = d_in.abs() >= eps
        slope = torch.where(big, (y[:half] - y[half:]) / torch.where(big, d_in, torch.ones_like(d_in)), 0.0)
        big, slope = torch.cat([big, big]), torch.cat([slope, slope])
    return torch.where(big, y.detach() + slope * (u - u.detach()), y)


def _pool_rescaled(module: nn.Module, u: Tensor, y: Tensor, eps: float) -> Tensor:
    """Max-pool output y (2B, C, *s) whose gradient to the input half u[:B] is Captum's DeepLIFT
    max-pool multiplier: the output difference split over the input's and the reference's argmax
    positions, divided by u - u' (the plain max-pool gradient where |u - u'| < eps)."""
    half = u.shape[0] // 2
    with torch.no_grad():
        _, index = _POOLS[type(module)](u, module.kernel_size, module.stride, module.padding, module.dilation,
                                        module.ceil_mode, True)
        index = index.flatten(2)
        out, ref = y[:half], y[half:]
        top = torch.maximum(out, ref)
        d_in = u[:half] - u[half:]
        big = d_in.abs() >= eps
        inverse = torch.where(big, 1.0 / torch.where(big, d_in, torch.ones_like(d_in)), 0.0)
    lin = (u[:half] * inverse).flatten(2)
    small = (u[:half] * (~big)).flatten(2)
    shape = out.shape
    surrogate = (lin.gather(2, index[:half]).view(shape) * (top - ref) + lin.gather(2, index[half:]).view(shape) * (out - top)
                 + small.gather(2, index[:half]).view(shape))
    return torch.cat([out.detach() + surrogate - surrogate.detach(), y[half:]])


@contextmanager
def rescale_rule(model: nn.Module, eps: float = 1e-10) -> Iterator[list[int]]:
    """Inside, every activation module in :data:`RESCALED` and every max pool of ``model``
    backpropagates DeepLIFT multipliers for a forward pass on a [x; x'] batch (2B rows).

    Hooks are removed on exit, exceptions included. Yields a one-item list counting the rescaled
    calls (filled during the forward pass).
    """
    pending: dict[int, list[Tensor]] = {}
    calls = [0]

    def before(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        pending.setdefault(id(module), []).append(args[0])
        # an in-place activation would overwrite u: let it work on a copy
        return (args[0].clone(), *args[1:]) if getattr(module, "inplace", False) else None

    def after(module: nn.Module, _args: tuple[Any, ...], y: Tensor) -> Tensor:
        u = pending[id(module)].pop()
        if u.shape[0] % 2 or not isinstance(y, Tensor):
            raise MedlensError(f"deeplift expects a [input; reference] batch at {type(module).__name__}, got {tuple(u.shape)}")
        calls[0] += 1
        return _pool_rescaled(module, u, y, eps) if type(module) in _POOLS else _rescaled(u, y, eps)

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, RESCALED) or type(module) in _POOLS:
                handles.append(module.register_forward_pre_hook(before))
                handles.append(module.register_forward_hook(after))
        yield calls
    finally:
        for handle in handles:
            handle.remove()
        pending.clear()


def _references(option: Any, x: Tensor) -> Tensor:
    """One reference per image as (B, 1, C, *S): a number, one image (C, *S) or (1, C, *S), or
    one per image (B, C, *S)."""
    ref = torch.as_tensor(0.0 if option is None else option, dtype=x.dtype, device=x.device)
    try:
        return torch.broadcast_to(ref, x.shape)[:, None]
    except RuntimeError:
        raise MedlensError(f"deeplift: baseline of shape {tuple(ref.shape)} does not broadcast to the input {tuple(x.shape)}") from None


def deeplift_attributions(ctx: Context, refs: Tensor, eps: float, batch_size: int) -> tuple[Tensor, int]:
    """Mean DeepLIFT attributions (B, K, C_in, *S) over the references ``refs`` (B, R, C_in, *S),
    ``batch_size`` (input, reference) pairs per forward pass; and the rescaled calls per pass."""
    x, targets = ctx.x, ctx.targets
    b, r = refs.shape[:2]
    image = torch.arange(b, device=x.device).repeat_interleave(r)
    flat_refs = refs.reshape(b * r, *x.shape[1:])
    total = x.new_zeros(b, targets.shape[1], *x.shape[1:])
    calls = 0
    for rows in torch.arange(b * r, device=x.device).split(batch_size):
        inp = x[image[rows]].detach().requires_grad_(True)
        ref = flat_refs[rows].detach()
        with torch.enable_grad(), rescale_rule(ctx.model, eps) as counted:
            output = ctx.model(torch.cat([inp, ref]))
            scores = pool_scores(output[: len(rows)], inp, region_rows(ctx.region, x, image[rows]))
            grads = target_gradients(scores, targets[image[rows]], [inp], ["input"])[0]  # (n, K, C, *S)
        calls = counted[0]
        total.index_add_(0, image[rows], (inp - ref).detach().unsqueeze(1) * grads.detach())
    return total / r, calls


class _Rescale(InputMethod):
    """What DeepLIFT and DeepLIFT-SHAP share: the rescale rule against :meth:`references`.

    Options:
        eps (float, 1e-10): |u - u'| below which a nonlinearity keeps its plain derivative;
        batch_size (int, 32): (input, reference) pairs per forward pass.
    """

    eps: float = 1e-10
    batch_size: int = 32

    def validate(self) -> None:
        require(self.eps > 0, self.name, "eps", self.eps, "must be > 0")
        require(self.batch_size >= 1, self.name, "batch_size", self.batch_size, "must be at least 1")

    def references(self, x: Tensor) -> Tensor:
        """The references (B, R, C, *S) for the input ``x`` (B, C, *S)."""
        raise NotImplementedError

    def compute(self, ctx: Context) -> Tensor:
        attributions, calls = deeplift_attributions(ctx, self.references(ctx.x), self.eps, self.batch_size)
        ctx.info["attributions"] = attributions  # (B, K, C_in, *S)
        ctx.info["rescaled_calls"] = calls
        return attributions.sum(dim=2)


@register
class DeepLift(_Rescale):
    """DeepLIFT, rescale rule (Shrikumar et al., ICML 2017; Captum ``DeepLift``):
    (x - x') * dY/dx with every nonlinearity's derivative replaced by its difference quotient
    (f(u) - f(u')) / (u - u') between the input's and the reference's forward passes. The map is the
    signed sum over channels; it adds up to Y(x) - Y(x') (summation-to-delta).

    Options:
        baseline (float | Tensor, 0.0): the reference x', a number, one image (C, *S) or one per
        image (B, C, *S); eps (float, 1e-10); batch_size (int, 32).
    """

    name = "deeplift"
    baseline: Any = None

    def validate(self) -> None:
        super().validate()
        require(self.baseline is None or isinstance(self.baseline, (int, float, Tensor)) and not isinstance(self.baseline, bool),
                self.name, "baseline", self.baseline, "must be a number or a tensor")

    def references(self, x: Tensor) -> Tensor:
        return _references(self.baseline, x)


@register
class DeepLiftShap(_Rescale):
    """DeepLIFT-SHAP (Lundberg & Lee, NeurIPS 2017; Captum ``DeepLiftShap``): DeepLIFT averaged
    over a distribution of references, an approximation of SHAP values.

    Options:
        baselines (Tensor | None): (R, C, *S) references shared by all images (R >= 2), e.g. a few
        training images; None draws ``samples`` references uniformly within each image's own
        intensity range (seeded by ``seed``); samples (int, 8); seed (int, 0); eps; batch_size.
    B x R (input, reference) pairs are explained, ``batch_size`` per forward pass.
    """

    name = "deeplift-shap"
    baselines: Any = None
    samples: int = 8
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.baselines is None:
            require(self.samples >= 2, self.name, "samples", self.samples, "must be at least 2")
            return
        shape = tuple(getattr(self.baselines, "shape", ()))
        require(isinstance(self.baselines, Tensor) and len(shape) >= 3 and shape[0] >= 2, self.name, "baselines",
                f"<shape {shape}>", "must be an (R, C, *S) tensor of R >= 2 reference images (one reference: use deeplift)")

    def references(self, x: Tensor) -> Tensor:
        if self.baselines is not None:
            if tuple(self.baselines.shape[1:]) != tuple(x.shape[1:]):
                raise MedlensError(f"deeplift-shap: baselines of shape {tuple(self.baselines.shape)} do not match the input {tuple(x.shape)}")
            refs = self.baselines.to(x.device, x.dtype)
            return refs[None].expand(x.shape[0], *refs.shape)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        flat = x.flatten(1)
        low, high = flat.amin(1), flat.amax(1)
        shape = (x.shape[0], 1) + (1,) * (x.dim() - 1)
        noise = torch.rand(x.shape[0], self.samples, *x.shape[1:], generator=generator, device=x.device, dtype=x.dtype)
        return low.view(shape) + noise * (high - low).view(shape)
