"""What a model expects of its inputs, when the model says so itself.

Hugging Face image models carry an image processor (``preprocessor_config.json``: size, mean,
std, rescale factor) and MONAI bundles a ``preprocessing`` transform chain. Both become a
:class:`Preprocessing` attached to the model as ``model.preprocessing``; ``medlens explain``
applies it when the user gives neither ``--size`` nor ``--normalize``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from medlens.errors import MedlensError


@dataclass
class Preprocessing:
    """A model's own input preparation.

    Attributes:
        size: spatial input size, e.g. (224, 224); None keeps the input's size.
        mean, std: per-channel normalisation applied after ``scale`` (None: no normalisation).
        scale: factor applied to medlens' [0, 1] images first (HF ``rescale_factor`` * 255, so
            1.0 for the usual 1/255; 255 when the processor does not rescale).
        in_channels: channels the model takes; class_names: from the model's labels.
        transform: a callable on one (C, *S) tensor (a MONAI bundle's transforms), applied
            instead of resize + mean/std when given.
        source: where this came from (for messages).
    """

    size: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 1.0
    in_channels: int | None = None
    class_names: list[str] | None = None
    transform: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    source: str = ""

    def __call__(self, x: Tensor) -> Tensor:
        """Normalise one (C, *S) image in [0, 1] (already resized to :attr:`size`)."""
        if self.transform is not None:
            return self.transform(x)
        x = x * self.scale if self.scale != 1.0 else x
        if self.mean is not None and self.std is not None:
            mean, std = _per_channel(self.mean, x), _per_channel(self.std, x)
            x = (x - mean) / std
        return x

    def batch(self, x: Tensor) -> Tensor:
        """:meth:`__call__` on a (B, C, *S) batch, resized to :attr:`size` first."""
        if self.size is not None and tuple(x.shape[2:]) != tuple(self.size):
            mode = "bilinear" if x.dim() == 4 else "trilinear"
            x = torch.nn.functional.interpolate(x, size=tuple(self.size), mode=mode, align_corners=False)
        return torch.stack([self(item) for item in x])


def _per_channel(values: Sequence[float], x: Tensor) -> Tensor:
    t = torch.as_tensor(list(values), dtype=x.dtype, device=x.device)
    if t.numel() == 1:
        t = t.expand(x.shape[0])
    if t.numel() != x.shape[0]:
        raise MedlensError(f"model normalisation has {t.numel()} channel values for a {x.shape[0]}-channel input")
    return t.view(-1, *([1] * (x.dim() - 1)))
