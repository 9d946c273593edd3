"""Upsampling and min-max normalisation of many maps in one pass over the output.

``F.interpolate`` (bilinear/trilinear, ``align_corners=False``) is separable: along each axis it
is a fixed (n_out, n_in) matrix with at most two non-zero weights per row, summing to 1. We take
that matrix from ``F.interpolate`` itself (applied to the identity), so the result is PyTorch's
interpolation, and apply it axis by axis as matrix products.

Normalisation needs each output map's minimum and maximum. Within one input cell an
interpolated value is multilinear in the per-axis weights, so its extremes over any set of
sample points lie at the points with the smallest and largest weight on each axis: the first
and last output index of every cell. Interpolating onto just those indices (about two per input
sample) gives the exact extremes of the full output. The maps are then shifted and scaled at
their own small size, and the full output is written once, already normalised; shifting first
leaves only rounding to clamp.

This matters when there are many maps (all 1000 classes of an ImageNet model): the naive
upsample-then-normalise reads and writes the large output four or five times.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@lru_cache(maxsize=64)
def _matrix_cpu(n_in: int, n_out: int) -> Tensor:
    eye = torch.eye(n_in).unsqueeze(1)  # (n_in, 1, n_in): each basis vector as a 1D signal
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0].t().contiguous()  # (n_out, n_in)


def interpolation_matrix(n_in: int, n_out: int, device: torch.device | str = "cpu") -> Tensor:
    """(n_out, n_in) matrix of ``F.interpolate``'s linear interpolation along one axis."""
    return _matrix_cpu(n_in, n_out).to(device)


def extreme_rows(n_in: int, n_out: int) -> Tensor:
    """Output indices with the extreme interpolation weights of each input cell: the first and
    last output index whose first source sample is the same."""
    cell = (_matrix_cpu(n_in, n_out) > 0).to(torch.uint8).argmax(dim=1)  # first source sample of each output index
    change = cell[1:] != cell[:-1]
    keep = torch.ones(n_out, dtype=torch.bool)
    keep[1:-1] = change[:-1] | change[1:]  # the last of one cell or the first of the next
    return keep.nonzero().flatten()


def _apply(maps: Tensor, matrices: Sequence[Tensor], order: Sequence[int] | None = None) -> Tensor:
    """Apply one (n_out, n_in) matrix per spatial axis of ``maps`` (B, K, *s), in ``order``."""
    out = maps
    for axis in order if order is not None else range(len(matrices)):
        dim = 2 + axis
        out = torch.movedim(torch.movedim(out, dim, -1) @ matrices[axis].t(), -1, dim)
    return out


def inverse_span(lo: Tensor, hi: Tensor) -> Tensor:
    """1 / (hi - lo), or 0 where the map is flat: a span below 1e-6 of the largest magnitude is
    rounding noise (e.g. a Grad-CAM whose gradients cancel), and stretching it would draw a
    confident map."""
    span = hi - lo
    floor = 1e-6 * torch.maximum(hi.abs(), lo.abs())
    return torch.where((span > floor) & (span > 0), 1.0 / span, torch.zeros_like(span))


def normalise(maps: Tensor) -> Tensor:
    """Min-max normalise each (b, k) map of (B, K, *S) to [0, 1]; a flat map becomes zeros,
    never NaN (see :func:`inverse_span`). Subtracting the minimum first keeps values >= 0 exactly."""
    flat = maps.flatten(2)
    lo, hi = torch.aminmax(flat, dim=2, keepdim=True)
    return (flat - lo).mul_(inverse_span(lo, hi)).view_as(maps)


def upsample_normalised(raw: Tensor, size: Sequence[int]) -> Tensor:
    """(B, K, *s) maps -> (B, K, *size), linearly interpolated like ``F.interpolate`` and each
    min-max normalised to [0, 1] (a flat map, or one whose span is below 1e-6 of its largest
    magnitude, becomes zeros)."""
    raw = raw.float()
    size = tuple(int(n) for n in size)
    if tuple(raw.shape[2:]) == size:
        return normalise(raw)
    device = raw.device
    shape_in = raw.shape[2:]
    full = [interpolation_matrix(a, b, device) for a, b in zip(shape_in, size)]
    probes = [m[extreme_rows(a, b).to(device)] for m, a, b in zip(full, shape_in, size)]
    corners = _apply(raw, probes).flatten(2)
    lo, hi = torch.aminmax(corners, dim=2)
    scale = inverse_span(lo, hi)
    view = (*scale.shape, *(1,) * len(size))
    shifted = (raw - lo.view(view)) * scale.view(view)  # may dip below 0 at raw samples no output point reaches
    # apply the smallest growth first, so the intermediates stay small and the big write is last
    out = _apply(shifted, full, sorted(range(len(size)), key=lambda a: size[a] / shape_in[a]))
    return out.clamp_(0.0, 1.0)  # rounding only: in exact arithmetic the output already lies in [0, 1]


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """(B, K, *s) -> (B, K, *size), bilinear in 2D, trilinear in 3D, linear in 1D (float32)."""
    if tuple(maps.shape[2:]) == tuple(size):
        return maps
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(maps.float(), size=tuple(size), mode=mode, align_corners=False)
