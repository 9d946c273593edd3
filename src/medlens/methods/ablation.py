"""Feature ablation over segments (Zeiler & Fergus 2014; Captum ``FeatureAblation`` with a
``feature_mask``): the attribution of a segment is f(x) - f(x with the segment set to the
baseline), given to each of its locations. Segments: SLIC superpixels (2D, scikit-image),
a regular grid of patches / cubes (2D and 3D), or a user segmentation.

All segment-ablated copies of an image are scored in no-grad chunks of ``batch_size``.
"""

from __future__ import annotations

import math

import numpy as np
from typing import Any

import torch
from torch import Tensor

from medlens.core.engine import Context, PerturbationMethod, register, score_batches
from medlens.core.options import check_choice, require
from medlens.core.targets import region_rows
from medlens.errors import MedlensError

__all__ = ["FeatureAblation", "grid_segments", "segments_for", "slic_segments"]


def grid_segments(spatial: tuple[int, ...], patch: int, device=None) -> Tensor:
    """(*S) long labels of a grid of ``patch``-sized squares / cubes in raster order."""
    grid = [math.ceil(s / patch) for s in spatial]
    coords = torch.meshgrid(*(torch.arange(s, device=device) // patch for s in spatial), indexing="ij")
    ids = torch.zeros(spatial, dtype=torch.long, device=device)
    for c, g in zip(coords, grid):
        ids = ids * g + c
    return ids


def slic_segments(image: Tensor, n_segments: int = 50, compactness: float = 10.0, seed: int = 0) -> Tensor:
    """SLIC superpixels (skimage) of one (C, H, W) image (or supervoxels of a (C, D, H, W) volume,
    skimage's N-D SLIC), labels 0..n-1."""
    from skimage.segmentation import slic

    arr = image.detach().float().cpu().numpy()
    arr = np.moveaxis(arr, 0, -1)
    labels = slic(arr.astype(np.float64), n_segments=n_segments, compactness=compactness, channel_axis=-1,
                  start_label=0)
    return torch.from_numpy(labels.astype(np.int64)).to(image.device)


def segments_for(x: Tensor, options) -> Tensor:
    """(B, *S) labels from the options: ``segments`` = "grid" (``patch``), "slic" (``n_segments``,
    ``compactness``) or a (B or 1, *S) integer tensor."""
    kind = options.get("segments", "grid")
    spatial = tuple(x.shape[2:])
    if isinstance(kind, Tensor):
        seg = kind.to(x.device).long()
        if seg.dim() == len(spatial):
            seg = seg[None]
        if tuple(seg.shape[1:]) != spatial:
            raise MedlensError(f"segments of shape {tuple(seg.shape)} do not match the input {spatial}")
        return seg.expand(x.shape[0], *spatial)
    if kind == "grid":
        return grid_segments(spatial, int(options.get("patch", 8)), x.device).expand(x.shape[0], *spatial)
    if kind == "slic":
        n, comp = int(options.get("n_segments", 50)), float(options.get("compactness", 10.0))
        return torch.stack([slic_segments(img, n, comp) for img in x])
    raise MedlensError(f"segments must be 'grid', 'slic' or a label tensor; got {kind!r}")


class SegmentMethod(PerturbationMethod):
    """Options shared by the methods that perturb whole segments (grid patches, SLIC
    superpixels/supervoxels, or a user's label tensor) towards a constant baseline."""

    segments: Any = "grid"
    patch: int = 8
    n_segments: int = 50
    compactness: float = 10.0
    baseline: float = 0.0
    batch_size: int = 64

    def validate(self) -> None:
        super().validate()
        name = self.name or type(self).__name__
        if isinstance(self.segments, Tensor):
            require(self.segments.dim() >= 1 and not self.segments.is_floating_point(), name, "segments",
                    f"<{self.segments.dtype} tensor>", "must be an integer label tensor (B or 1, *S) or (*S)")
        else:
            check_choice(name, "segments", self.segments, ("grid", "slic"))
        require(self.patch >= 1, name, "patch", self.patch, "must be >= 1")
        require(self.n_segments >= 1, name, "n_segments", self.n_segments, "must be >= 1")
        require(self.compactness > 0, name, "compactness", self.compactness, "must be > 0")
        require(self.batch_size >= 1, name, "batch_size", self.batch_size, "must be >= 1")


@register
class FeatureAblation(SegmentMethod):
    """Feature ablation over segments: a(s) = f_t(x) - f_t(x with seg(s) -> baseline).

    Options: segments ("grid" | "slic" | tensor), patch (8), n_segments (50), compactness (10),
    baseline (0.0), batch_size (64). One forward per segment and image.
    """

    name = "feature-ablation"

    def compute(self, ctx: Context) -> Tensor:
        x = ctx.x
        seg = segments_for(x, self.options)
        baseline = float(self.options.get("baseline", 0.0))
        batch_size = int(self.options.get("batch_size", 64))
        out = x.new_zeros(x.shape[0], ctx.targets.shape[1], *x.shape[2:])
        for i in range(x.shape[0]):
            labels = seg[i]
            ids = labels.unique()
            masks = labels[None] == ids.view(-1, *(1,) * labels.dim())  # (n, *S)
            stack = torch.where(masks[:, None], torch.full_like(x[i], baseline)[None], x[i][None])
            region = region_rows(ctx.region, x, torch.tensor([i], device=x.device))
            clean = score_batches(ctx.model, x[i : i + 1], ctx.targets[i : i + 1], region, batch_size)
            scores = score_batches(ctx.model, stack, ctx.targets[i : i + 1], region, batch_size)  # (n, K)
            delta = clean - scores
            index = torch.searchsorted(ids, labels.flatten())
            out[i] = delta[index].T.reshape(ctx.targets.shape[1], *x.shape[2:])
        return out
