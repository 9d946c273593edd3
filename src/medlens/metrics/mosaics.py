"""Focus (Arias-Duart et al., "Focus! Rating XAI methods and finding biases", FUZZ-IEEE 2022;
Quantus ``Focus``), batched torch, 2D and 3D.

A mosaic tiles four images 2 x 2: two of the target class and two of other classes, in random
places. The explanation of the mosaic for the target class should put its positive relevance on
the two target tiles; Focus is the share that lies there. In 3D the volumes are tiled in-plane
(the last two axes), depth unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from medlens.errors import MedlensError

__all__ = ["Mosaics", "focus", "make_mosaics", "mosaic_quadrants", "tile_mosaics"]


@dataclass
class Mosaics:
    """Mosaics built from a batch of images.

    Attributes:
        images: (M, C, *S') mosaics (S' = S with the last two axes doubled, or S with ``downsample``).
        targets: (M,) the class each mosaic is explained for.
        quadrants: (M, 4) bool, tile k holds a target-class image (order: top-left, top-right,
            bottom-left, bottom-right, as Quantus' ``custom_batch``).
        sources: (M, 4) index of the image in each tile.
    """

    images: Tensor
    targets: Tensor
    quadrants: Tensor
    sources: Tensor


def tile_mosaics(x: Tensor, sources: Tensor, downsample: bool = False) -> Tensor:
    """Tile x[sources[m, k]] into 2 x 2 mosaics over the last two axes -> (M, C, *S').
    ``downsample`` first halves every tile (area averaging), so a mosaic has the images' own size."""
    tiles = x[sources.to(x.device).reshape(-1)]
    if downsample:
        if any(s % 2 for s in x.shape[-2:]):
            raise MedlensError(f"downsampled mosaics need even sizes on the last two axes; got {tuple(x.shape[2:])}")
        kernel = (1,) * (x.dim() - 4) + (2, 2)
        pool = F.avg_pool3d if x.dim() == 5 else F.avg_pool2d
        tiles = pool(tiles, kernel)
    tiles = tiles.view(sources.shape[0], 4, *tiles.shape[1:])
    top = torch.cat([tiles[:, 0], tiles[:, 1]], dim=-1)
    bottom = torch.cat([tiles[:, 2], tiles[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def make_mosaics(x: Tensor, labels: Tensor, n_mosaics: int | None = None, seed: int = 0,
                 downsample: bool = False) -> Mosaics:
    """Random mosaics (Arias-Duart et al.): each takes a target class among those with two or more
    images, two distinct images of it and two distinct images of other classes, in a random order.

    Args:
        x: (B, C, *S) images; labels: (B,) their classes.
        n_mosaics: how many (default B).

    Returns:
        :class:`Mosaics`.
    """
    labels = torch.as_tensor(labels).long().view(-1).cpu()
    if labels.numel() != x.shape[0]:
        raise MedlensError(f"labels has {labels.numel()} entries for {x.shape[0]} images")
    gen = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    eligible = [int(c) for c, n in zip(classes, counts) if n >= 2 and int((labels != c).sum()) >= 2]
    if not eligible:
        raise MedlensError("focus needs a class with two images and two images of other classes to build a mosaic")
    rows, targets = [], []
    for _ in range(n_mosaics or x.shape[0]):  # index bookkeeping on the host; the tiling is one batched op
        c = eligible[int(torch.randint(len(eligible), (1,), generator=gen))]
        same, other = (labels == c).nonzero()[:, 0], (labels != c).nonzero()[:, 0]
        picks = torch.cat([same[torch.randperm(len(same), generator=gen)[:2]],
                           other[torch.randperm(len(other), generator=gen)[:2]]])
        rows.append(picks[torch.randperm(4, generator=gen)])
        targets.append(c)
    sources = torch.stack(rows)
    quadrants = labels[sources] == torch.tensor(targets)[:, None]
    return Mosaics(tile_mosaics(x, sources, downsample), torch.tensor(targets, device=x.device),
                   quadrants.to(x.device), sources.to(x.device))


def mosaic_quadrants(quadrants: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """(M, 4) tile flags -> (M, *spatial) bool mask of the target tiles (halves: size // 2, as Quantus)."""
    h, w = spatial[-2:]
    hh, hw = h // 2, w // 2
    rows = torch.arange(h, device=quadrants.device) >= hh
    cols = torch.arange(w, device=quadrants.device) >= hw
    tile = rows[:, None].long() * 2 + cols[None, :].long()  # (h, w) tile index
    mask = quadrants.bool()[:, tile.flatten()].view(quadrants.shape[0], 1, h, w)
    lead = spatial[:-2]
    return mask.view(quadrants.shape[0], *(1,) * len(lead), h, w).expand(quadrants.shape[0], *spatial)


def focus(maps: Tensor, quadrants: Tensor) -> Tensor:
    """Focus: positive relevance on the target tiles / all positive relevance (+1e-9).

    Args:
        maps: (M, *S') maps of the mosaics; quadrants: (M, 4) target-tile flags.

    Returns:
        (M,) in [0, 1] (higher is better; 0.5 for relevance spread evenly).
    """
    if maps.dim() < 3:
        raise MedlensError(f"maps must be (M, *S) mosaics with at least two spatial axes; got {tuple(maps.shape)}")
    quadrants = torch.as_tensor(quadrants, device=maps.device)
    if tuple(quadrants.shape) != (maps.shape[0], 4):
        raise MedlensError(f"quadrants have shape {tuple(quadrants.shape)}; expected {(maps.shape[0], 4)}")
    pos = maps.double().clamp_min(0)
    mask = mosaic_quadrants(quadrants, tuple(maps.shape[1:]))
    return ((pos * mask).flatten(1).sum(dim=1) / (pos.flatten(1).sum(dim=1) + 1e-9)).float()
