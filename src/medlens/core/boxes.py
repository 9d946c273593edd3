"""Masks and bounding boxes from explanation maps, torch-native, 2D and 3D.

Conventions used throughout:

- a map batch is ``(B, *S)`` with ``S`` = (H, W) or (D, H, W); a single map is ``(*S)``.
- a box is ``[lo_0, ..., lo_{n-1}, hi_0, ..., hi_{n-1}]`` in the array's axis order
  ((y, x) in 2D, (z, y, x) in 3D), ``lo`` inclusive and ``hi`` exclusive, so
  ``image[..., y0:y1, x0:x1]`` is the boxed region. An empty mask gives a box of all ``-1``.

Everything stays on the maps' device; only :func:`boxes_to_json` leaves torch.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medlens.errors import MedlensError

Box = list[int]

__all__ = [
    "Box", "argmax_cell_box", "box_around", "box_from_profiles", "boxes_to_json", "component_boxes",
    "component_regions", "components", "threshold_mask", "topk_mask",
]


def _check_spatial(t: Tensor, name: str, batched: bool) -> int:
    """Return the number of spatial dims (2 or 3) of ``t`` or raise a one-line error."""
    nd = t.dim() - (1 if batched else 0)
    if nd not in (2, 3):
        want = "(B, H, W) or (B, D, H, W)" if batched else "(H, W) or (D, H, W)"
        raise MedlensError(f"{name} must have shape {want}; got {tuple(t.shape)}")
    return nd


def topk_mask(maps: Tensor, fraction: float, ties: str = "include") -> Tensor:
    """The top ``fraction`` of pixels of each map.

    Args:
        maps: (B, *S) float maps.
        fraction: share of pixels to keep, in (0, 1]; at least one pixel is kept per map.
        ties: ``"include"`` (default) keeps every pixel whose value equals the k-th largest, so a
            map with ties may keep more than k pixels and a flat map keeps all of them: the mask
            then depends only on the values, never on pixel order. ``"exact"`` keeps exactly k
            pixels, breaking ties by ``torch.topk``'s order (unspecified, device dependent).

    Returns:
        (B, *S) bool mask.
    """
    _check_spatial(maps, "maps", batched=True)
    if not 0.0 < float(fraction) <= 1.0:
        raise MedlensError(f"fraction must be in (0, 1]; got {fraction}")
    flat = maps.flatten(1)
    k = max(1, math.ceil(float(fraction) * flat.shape[1]))
    values, indices = flat.topk(k, dim=1)
    if ties == "include":
        return (flat >= values[:, -1:]).view(maps.shape)
    if ties == "exact":
        mask = torch.zeros_like(flat, dtype=torch.bool)
        return mask.scatter_(1, indices, True).view(maps.shape)
    raise MedlensError(f"ties must be 'include' or 'exact'; got {ties!r}")


def threshold_mask(maps: Tensor, threshold: float | Tensor) -> Tensor:
    """Pixels at or above ``threshold``.

    Args:
        maps: (B, *S) maps (or a single (*S) map).
        threshold: a number, or a (B,) tensor with one threshold per map.

    Returns:
        bool mask with the shape of ``maps``.
    """
    if isinstance(threshold, Tensor) and threshold.dim() == 1:
        threshold = threshold.to(maps.device).view(-1, *([1] * (maps.dim() - 1)))
    return maps >= threshold


def box_around(mask: Tensor) -> Tensor:
    """The tightest box around the True pixels of each mask.

    Args:
        mask: (B, *S) bool.

    Returns:
        (B, 2 * nd) long: lo..., hi... (hi exclusive); all -1 for an empty mask.
    """
    nd = _check_spatial(mask, "mask", batched=True)
    mask = mask.bool()
    profiles = []
    for axis in range(1, nd + 1):
        others = [a for a in range(1, nd + 1) if a != axis]
        profiles.append(mask.any(dim=others) if others else mask)  # (B, S_axis)
    return box_from_profiles(profiles)


def box_from_profiles(profiles: Sequence[Tensor]) -> Tensor:
    """The box of :func:`box_around` from the mask's per-axis profiles: ``profiles[i]`` is (B, S_i)
    bool, True where some selected pixel lies at that coordinate of axis i (the mask reduced with
    ``any`` over every other axis). All -1 where nothing is selected."""
    los, his = [], []
    for profile in profiles:
        size = profile.shape[1]
        first = profile.int().argmax(dim=1)  # argmax returns the first maximal index
        last = size - 1 - profile.flip(1).int().argmax(dim=1)
        los.append(first)
        his.append(last + 1)
    boxes = torch.stack(los + his, dim=1).long()
    empty = ~profiles[0].any(dim=1)
    return boxes.masked_fill(empty[:, None], -1)


def _neighbour_min(labels: Tensor, connectivity: str) -> Tensor:
    """Min over each pixel's neighbourhood (and itself) of a (1, 1, *S) float tensor."""
    nd = labels.dim() - 2
    if connectivity == "full":  # 8-neighbours in 2D, 26 in 3D
        pool = F.max_pool2d if nd == 2 else F.max_pool3d
        return -pool(-labels, kernel_size=3, stride=1, padding=1)
    out = labels
    big = torch.finfo(labels.dtype).max
    for axis in range(2, labels.dim()):  # face neighbours: 4 in 2D, 6 in 3D
        pad = [0, 0] * nd
        pad[2 * (labels.dim() - 1 - axis)] = 1
        pad[2 * (labels.dim() - 1 - axis) + 1] = 1
        padded = F.pad(labels, pad, value=big)
        n = labels.shape[axis]
        out = torch.minimum(out, torch.minimum(padded.narrow(axis, 0, n), padded.narrow(axis, 2, n)))
    return out


def components(mask: Tensor, connectivity: str = "face") -> Tensor:
    """Connected components of a 2D or 3D mask, computed in torch on the mask's device.

    Label propagation: every foreground pixel starts with its own raster index, repeatedly takes
    the minimum over its neighbourhood (a pooling op), and jumps to the label of the pixel its
    label points at (pointer jumping, which makes long thin components converge in few rounds).
    At convergence each component carries the raster index of its first pixel; those are
    renumbered 1..n in raster order, which gives exactly ``scipy.ndimage.label``'s numbering.

    Args:
        mask: (*S) bool, S = (H, W) or (D, H, W).
        connectivity: ``"face"`` (4-neighbours in 2D, 6 in 3D; scipy's default structure) or
            ``"full"`` (8 in 2D, 26 in 3D).

    Returns:
        (*S) long: 0 background, 1..n components.
    """
    _check_spatial(mask, "mask", batched=False)
    if connectivity not in ("face", "full"):
        raise MedlensError(f"connectivity must be 'face' or 'full'; got {connectivity!r}")
    mask = mask.bool()
    n = mask.numel()
    dtype = torch.float32 if n < 2**24 else torch.float64  # raster indices must be exact
    index = torch.arange(n, device=mask.device, dtype=dtype).view(mask.shape)
    big = torch.finfo(dtype).max
    labels = torch.where(mask, index, torch.full_like(index, big))[None, None]
    fg = mask[None, None]
    while True:
        spread = torch.where(fg, _neighbour_min(labels, connectivity), labels)
        flat = spread.flatten()
        pointer = flat.clamp_max(n - 1).long()  # background values are masked out below
        jumped = torch.where(fg.flatten(), torch.minimum(flat, flat[pointer]), flat).view_as(spread)
        if torch.equal(jumped, labels):
            break
        labels = jumped
    roots = labels[0, 0]
    out = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    if mask.any():
        _, renumbered = torch.unique(roots[mask], return_inverse=True)  # sorted roots = raster order
        out[mask] = renumbered + 1
    return out


def component_regions(
    heat: Tensor,
    threshold: float | None = None,
    fraction: float | None = None,
    connectivity: str = "face",
    min_size: int = 1,
) -> list[dict[str, Any]]:
    """Connected regions of a map above a threshold (or in its top fraction), strongest first.

    Args:
        heat: (*S) map, usually normalised to [0, 1].
        threshold: keep pixels >= threshold. With neither threshold nor fraction, 0.5 is used.
        fraction: keep the top fraction of pixels instead (see :func:`topk_mask`, ties included).
        connectivity: see :func:`components`.
        min_size: drop components with fewer pixels.

    Returns:
        list of ``{"box": Box, "area": int, "peak": float, "mean": float}`` sorted by peak
        descending (ties by area descending).
    """
    _check_spatial(heat, "map", batched=False)
    if threshold is not None and fraction is not None:
        raise MedlensError("give either threshold or fraction for component boxes, not both")
    if fraction is not None:
        mask = topk_mask(heat[None], fraction)[0]
    else:
        mask = threshold_mask(heat, 0.5 if threshold is None else threshold)
    labels = components(mask, connectivity)
    count = int(labels.max())
    if count == 0:
        return []
    ids = torch.arange(1, count + 1, device=labels.device).view(-1, *([1] * labels.dim()))
    members = labels[None] == ids  # (n, *S)
    boxes = box_around(members)
    areas = members.flatten(1).sum(1)
    values = heat[None].float().expand_as(members)
    peaks = torch.where(members, values, torch.full_like(values, -math.inf)).flatten(1).amax(1)
    means = (values * members).flatten(1).sum(1) / areas
    keep = areas >= min_size
    order = sorted(
        torch.nonzero(keep).flatten().tolist(), key=lambda i: (-float(peaks[i]), -int(areas[i]))
    )
    return [
        {"box": boxes[i].tolist(), "area": int(areas[i]), "peak": float(peaks[i]), "mean": float(means[i])}
        for i in order
    ]


def component_boxes(
    heat: Tensor,
    threshold: float | None = None,
    fraction: float | None = None,
    connectivity: str = "face",
    min_size: int = 1,
) -> list[Box]:
    """Boxes around the connected components of ``heat`` above ``threshold`` / in its top
    ``fraction`` (0.5 threshold when neither is given), strongest component first.
    See :func:`component_regions` for the arguments."""
    return [r["box"] for r in component_regions(heat, threshold, fraction, connectivity, min_size)]


def argmax_cell_box(raw_map: Tensor, input_size: Sequence[int]) -> Box:
    """The layer cell holding the map's maximum, as a box in input pixels.

    The idea of fastai's ``get_boxes``: a coarse (layer-resolution) map's strongest cell is a
    region of the input, found without any threshold. Cell ``i`` of ``s`` cells along an axis of
    ``S`` input pixels covers pixels ``floor(i*S/s)`` to ``ceil((i+1)*S/s)`` (exclusive).

    Args:
        raw_map: (*s) map at layer resolution, s = (h, w) or (d, h, w).
        input_size: (*S) input size, same number of dims.

    Returns:
        Box ``[lo..., hi...]`` in input pixels (first maximum in raster order on ties).
    """
    nd = _check_spatial(raw_map, "raw_map", batched=False)
    if len(input_size) != nd:
        raise MedlensError(f"input_size {tuple(input_size)} must have {nd} dims to match raw_map {tuple(raw_map.shape)}")
    flat_index = int(raw_map.flatten().argmax())
    cell = []
    for size in reversed(raw_map.shape):
        cell.append(flat_index % size)
        flat_index //= size
    cell.reverse()
    lo = [(i * big) // small for i, small, big in zip(cell, raw_map.shape, input_size)]
    hi = [min(big, -((-(i + 1) * big) // small)) for i, small, big in zip(cell, raw_map.shape, input_size)]
    return lo + hi


def boxes_to_json(
    boxes: Tensor | Sequence[Sequence[int]],
    image_size: Sequence[int] | None = None,
    scores: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    **extra: Any,
) -> str:
    """Boxes as a JSON document a person or another tool can read.

    Args:
        boxes: (K, 2 * nd) tensor or list of boxes; empty boxes (all -1) are left out.
        image_size: the image's (*S), recorded so the boxes can be rescaled.
        scores: optional score per box (e.g. the component's peak value).
        labels: optional name per box (e.g. ``"argmax cell"``, ``"component 1"``).
        **extra: further top-level fields (source file, method, target class ...).

    Returns:
        JSON text: ``{"convention": ..., "image_size": [...], "boxes": [{"lo", "hi", "xyxy"?,
        "score"?, "label"?}], ...extra}``; 2D boxes also carry ``xyxy`` = [x0, y0, x1, y1].
    """
    rows = boxes.tolist() if isinstance(boxes, Tensor) else [list(map(int, b)) for b in boxes]
    items = []
    for k, box in enumerate(rows):
        if all(v == -1 for v in box):
            continue
        nd = len(box) // 2
        item: dict[str, Any] = {"lo": box[:nd], "hi": box[nd:]}
        if nd == 2:
            item["xyxy"] = [box[1], box[0], box[3], box[2]]
        if scores is not None:
            item["score"] = float(scores[k])
        if labels is not None:
            item["label"] = str(labels[k])
        items.append(item)
    doc: dict[str, Any] = {
        "convention": "lo inclusive, hi exclusive, array axis order ((y, x) in 2D, (z, y, x) in 3D)",
        "image_size": list(image_size) if image_size is not None else None,
        "boxes": items,
    }
    doc.update(extra)
    return json.dumps(doc, indent=2)


def pixel_boxes(boxes: Tensor, size: Sequence[int]) -> Tensor:
    """Normalised 2D boxes (N, 4) x0, y0, x1, y1 in [0, 1] to pixel boxes (N, 4) row0, col0, row1,
    col1 (exclusive) at ``size`` (H, W): lower edges floored, upper edges ceiled, so a box always
    covers the pixels it touches (the convention of the attention-maps paper's masks)."""
    h, w = (int(v) for v in size)
    b = boxes.float().reshape(-1, 4)
    return torch.stack([(b[:, 1] * h).floor(), (b[:, 0] * w).floor(), (b[:, 3] * h).ceil(), (b[:, 2] * w).ceil()], 1).long()
