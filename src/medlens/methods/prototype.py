"""Class prototypes by activation maximisation.

An input is optimised so that a frozen classifier assigns it to a class (Simonyan et al.,
ICLR-W 2014; the seed course's formulation):

    x* = argmin_x  CE(f(x), k) + lambda * ||x - mean_k||^2 / n + tv * TV(x)

with Adam, where mean_k is the class's mean image (which keeps the prototype in the range of
natural-looking inputs), TV the total variation and, optionally, a random jitter (roll) of the
input at each step so that the result does not rely on pixel-exact patterns. Starting from a
given image instead of zeros turns that image into the class (e.g. an 8 into a 3).

The model is frozen without touching it: it runs in eval mode (restored afterwards) and the
gradient is taken with ``torch.autograd.grad`` w.r.t. the input only, so no parameter's
``requires_grad`` flag or ``.grad`` is changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.core.capture import preserved_modes
from medlens.errors import MedlensError


@dataclass
class Prototype:
    """Result of :func:`class_prototype`.

    Attributes:
        images: (B, C, *S) optimised inputs, one per requested class.
        targets: (B,) classes.
        probabilities: (B,) the model's softmax probability of each class for its prototype.
        losses: (steps,) total loss per step (summed over the batch).
    """

    images: Tensor
    targets: Tensor
    probabilities: Tensor
    losses: Tensor


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation per image, (B,): sum of |differences| along every spatial dim."""
    dims = range(2, x.dim())
    return sum(x.diff(dim=d).abs().flatten(1).sum(1) for d in dims)


def _jitter(x: Tensor, pixels: int, generator: torch.Generator) -> Tensor:
    if pixels <= 0:
        return x
    shifts = torch.randint(-pixels, pixels + 1, (x.dim() - 2,), generator=generator).tolist()
    return x.roll(shifts=shifts, dims=tuple(range(2, x.dim())))


def _image_rank(model: nn.Module, default: int) -> int:
    """Rank (C, *S) of one input: from the model's first convolution, else ``default``."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    return default if first is None else {nn.Conv1d: 2, nn.Conv2d: 3, nn.Conv3d: 4}[type(first)]


def _as_batch(image: Tensor, rank: int, batch: int, name: str, device: torch.device) -> Tensor:
    """(C, *S) or (B, C, *S) -> (batch, C, *S) float on ``device``."""
    image = image.detach().to(device=device, dtype=torch.float32)
    image = image.unsqueeze(0) if image.dim() == rank else image
    if image.dim() != rank + 1 or image.shape[0] not in (1, batch):
        raise MedlensError(f"{name} has shape {tuple(image.shape)}; expected (C, *S) or ({batch}, C, *S) with {rank - 1} spatial dims")
    return image.expand(batch, *image.shape[1:])


def class_prototype(
    model: nn.Module,
    target: int | Sequence[int],
    shape: Sequence[int] | None = None,
    init: Tensor | None = None,
    class_mean: Tensor | None = None,
    lam: float = 0.1,
    steps: int = 200,
    lr: float = 0.05,
    tv: float = 0.0,
    jitter: int = 0,
    value_range: tuple[float, float] | None = None,
    seed: int = 0,
) -> Prototype:
    """Optimise one input per class in ``target`` so that the frozen ``model`` predicts it.

    Args:
        model: a classifier with (B, N) outputs, 2D or 3D. It is not modified.
        target: a class index or a list of them (optimised together as a batch).
        shape: (C, *S) input shape when starting from zeros.
        init: (C, *S) or (B, C, *S) starting image(s) instead of zeros.
        class_mean: (C, *S) or (B, C, *S) mean image(s) of the class(es); with ``lam`` > 0
            the loss adds lam * MSE(x, class_mean). None: no pull.
        lam: weight of the pull toward the class mean.
        steps, lr: Adam iterations and learning rate.
        tv: weight of the total-variation penalty (per pixel).
        jitter: roll the input by up to this many pixels per axis at each step.
        value_range: clamp the image to (low, high) after each step.
        seed: seed of the jitter.

    Returns:
        A :class:`Prototype`.
    """
    device = next(iter(model.parameters()), torch.zeros(())).device
    targets = torch.as_tensor([target] if isinstance(target, int) else list(target), dtype=torch.long, device=device)
    if steps < 1 or lr <= 0:
        raise MedlensError(f"class_prototype needs steps >= 1 and lr > 0 (got steps={steps}, lr={lr})")
    batch = targets.shape[0]
    if init is None:
        if shape is None:
            raise MedlensError("class_prototype needs the input shape (C, *S) or an init image")
        x = torch.zeros((batch, *shape), device=device)
    else:
        x = _as_batch(init, _image_rank(model, init.dim()), batch, "init image", device).clone()
    x.requires_grad_(True)
    mean = None
    if class_mean is not None and lam != 0:
        mean = _as_batch(class_mean, x.dim() - 1, batch, "class mean image", device)
        if mean.shape != x.shape:
            raise MedlensError(f"class mean image has shape {tuple(mean.shape[1:])} but the prototype has {tuple(x.shape[1:])}")
    optimiser = torch.optim.Adam([x], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with preserved_modes(model):
        for _ in range(steps):
            with torch.enable_grad():
                logits = model(_jitter(x, jitter, generator))
                if logits.dim() != 2:
                    raise MedlensError(f"class prototypes need a classifier with (B, classes) output, got shape {tuple(logits.shape)}")
                if bool((targets >= logits.shape[1]).any()):
                    raise MedlensError(f"class {int(targets.max())} is out of range: the model has {logits.shape[1]} classes")
                loss = F.cross_entropy(logits, targets, reduction="sum")
                if mean is not None:
                    loss = loss + lam * (x - mean).pow(2).flatten(1).mean(1).sum()
                if tv > 0:
                    loss = loss + tv * (total_variation(x) / x[0].numel()).sum()
                (grad,) = torch.autograd.grad(loss, x)
            x.grad = grad
            optimiser.step()
            if value_range is not None:
                with torch.no_grad():
                    x.clamp_(*value_range)
            losses.append(loss.detach())
        with torch.no_grad():
            probabilities = model(x).softmax(dim=1).gather(1, targets[:, None])[:, 0]
    return Prototype(x.detach(), targets, probabilities, torch.stack(losses))
