"""Localisation: does the map point where the annotation is?  Batched, torch-native, 2D and 3D.

Conventions:

- ``maps`` are (B, *S) float tensors, S = (H, W) or (D, H, W) (a (B, 1, *S) map is squeezed).
- ``masks`` are (B, *S) or (B, 1, *S), any dtype; non-zero means inside the annotation.
- ``boxes`` are (B, 2 * nd) ``lo..., hi...`` in the array's axis order, ``hi`` exclusive
  (the convention of :mod:`medlens.boxes`); a box with ``hi <= lo`` on some axis is empty.

Every metric returns a (B,) float tensor (or (B, T) for several thresholds/percentages) with
**NaN where the annotation is empty**: an image without a lesion has no right answer, so it is
reported, never silently scored. :func:`empty_annotations` gives the flag per image.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medlens.boxes import box_around
from medlens.errors import MedlensError

__all__ = [
    "PAPER_PERCENTAGES", "auroc", "average_precision", "box_iou", "boxes_to_masks", "dice",
    "empty_annotations", "energy_pointing_game", "localisation_metrics", "mask_iou",
    "pointing_game", "relevance_mass", "relevance_rank_accuracy", "topk_box_iou",
]

#: The attention-maps paper's top-k percentages for the box IoU.
PAPER_PERCENTAGES = (5, 10, 20, 40)


def _as_maps(maps: Tensor, name: str = "maps") -> Tensor:
    if not isinstance(maps, Tensor):
        raise MedlensError(f"{name} must be a torch.Tensor, got {type(maps).__name__}")
    if maps.dim() in (4, 5) and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() not in (3, 4):
        raise MedlensError(f"{name} must have shape (B, H, W) or (B, D, H, W); got {tuple(maps.shape)}")
    return maps


def _as_masks(masks: Tensor, maps: Tensor) -> Tensor:
    masks = _as_maps(torch.as_tensor(masks), "masks")
    if masks.shape != maps.shape:
        raise MedlensError(f"masks have shape {tuple(masks.shape)} but the maps have {tuple(maps.shape)}")
    return masks.to(maps.device) != 0


def boxes_to_masks(boxes: Tensor, shape: Sequence[int]) -> Tensor:
    """Boolean masks (B, *shape) of boxes (B, 2 * nd) ``lo..., hi...`` (hi exclusive), batched.

    Coordinates are clipped to the image; an empty box gives an empty mask.
    """
    boxes = torch.as_tensor(boxes)
    nd = len(shape)
    if boxes.dim() != 2 or boxes.shape[1] != 2 * nd:
        raise MedlensError(f"boxes must have shape (B, {2 * nd}) for {nd}D images; got {tuple(boxes.shape)}")
    inside = None
    for axis, size in enumerate(shape):
        coord = torch.arange(size, device=boxes.device)
        lo, hi = boxes[:, axis : axis + 1], boxes[:, nd + axis : nd + axis + 1]
        along = (coord >= lo) & (coord < hi)  # (B, size)
        view = [boxes.shape[0]] + [1] * nd
        view[1 + axis] = size
        along = along.view(view)
        inside = along if inside is None else inside & along
    return inside.expand(boxes.shape[0], *shape)


def empty_annotations(masks: Tensor) -> Tensor:
    """(B,) bool: True where the annotation has no pixel (its metrics are NaN)."""
    return ~(_as_maps(torch.as_tensor(masks), "masks") != 0).flatten(1).any(dim=1)


def _nan_where_empty(values: Tensor, masks: Tensor) -> Tensor:
    empty = ~masks.flatten(1).any(dim=1)
    shape = (-1,) + (1,) * (values.dim() - 1)
    return values.float().masked_fill(empty.view(shape), float("nan"))


def _inner(values: Tensor, inside: Tensor) -> Tensor:
    """Per-row sum of ``values`` over ``inside``: (B, N) x (B, N) -> (B,), one batched matmul."""
    return torch.bmm(values[:, None, :], inside.to(values.dtype)[:, :, None])[:, 0, 0]


def _dilate(masks: Tensor, radius: int) -> Tensor:
    """Grow each mask by ``radius`` pixels (a (2r+1)^nd max-pool, i.e. Chebyshev distance)."""
    if radius <= 0:
        return masks
    pool = F.max_pool2d if masks.dim() == 3 else F.max_pool3d
    return pool(masks[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0, ties: str = "any") -> Tensor:
    """Pointing game (Zhang et al., ECCV 2016): is the map's maximum inside the annotation?

    Args:
        maps: (B, *S) maps.
        masks: (B, *S) annotations.
        tolerance: pixels the maximum may lie outside the annotation and still hit (Zhang et al.
            used 15 at 224 px); the annotation is dilated by this Chebyshev radius.
        ties: several pixels can share the maximum (a saturated or patch-repeated map).
            ``"any"`` (default, as Quantus): a hit if any maximal pixel is inside;
            ``"all"``: only if every maximal pixel is inside; ``"fraction"``: the share of
            maximal pixels inside (a value in [0, 1]); ``"first"``: the first maximal pixel in
            raster order decides (``argmax`` semantics).

    A constant map (e.g. a Grad-CAM whose evidence is all negative, normalised to zeros) points
    nowhere: it is a miss under ``"any"``, ``"all"`` and ``"first"`` (Quantus counts it as a hit,
    every pixel being maximal), and the annotation's share of the image under ``"fraction"``.

    Returns:
        (B,) float: 1 hit, 0 miss (or a fraction), NaN for empty annotations.
    """
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps)
    inside = _dilate(masks, tolerance).flatten(1)
    flat = maps.flatten(1)
    if ties == "first":
        hit = inside.gather(1, flat.argmax(dim=1, keepdim=True))[:, 0].float()
    elif ties == "any":  # a maximal pixel inside <=> the maximum inside equals the global maximum
        hit = (flat.masked_fill(~inside, float("-inf")).amax(dim=1) == flat.amax(dim=1)).float()
    else:
        at_max = flat == flat.amax(dim=1, keepdim=True)
        n_inside = (at_max & inside).sum(dim=1)
        if ties == "all":
            hit = (n_inside == at_max.sum(dim=1)).float()
        elif ties == "fraction":
            hit = n_inside / at_max.sum(dim=1)
        else:
            raise MedlensError(f"ties must be 'any', 'all', 'fraction' or 'first'; got {ties!r}")
    if ties != "fraction":
        constant = flat.amax(dim=1) == flat.amin(dim=1)
        hit = hit.masked_fill(constant, 0.0)
    return _nan_where_empty(hit, masks)


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy-based pointing game (Wang et al., Score-CAM, CVPR-W 2020): the share of the map's
    positive energy inside the annotation, sum(relu(m) * g) / sum(relu(m)); 0 for an all-zero map."""
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps)
    pos = maps.clamp_min(0).flatten(1).float()
    total = pos.sum(dim=1)
    share = _inner(pos, masks.flatten(1)) / total.clamp_min(torch.finfo(pos.dtype).tiny)
    return _nan_where_empty(torch.where(total > 0, share, torch.zeros_like(share)), masks)


def relevance_mass(maps: Tensor, masks: Tensor) -> Tensor:
    """Relevance mass accuracy (Arras et al., Information Fusion 2022): sum(m * g) / sum(m),
    over signed values as in Quantus' ``RelevanceMassAccuracy`` (use non-negative maps).
    An all-zero map puts no mass inside: 0 (Quantus: NaN, which would read as an empty annotation)."""
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps)
    flat = maps.flatten(1).float()
    total = flat.sum(dim=1)
    inside = _inner(flat, masks.flatten(1))
    mass = torch.where(total != 0, inside / torch.where(total != 0, total, torch.ones_like(total)), torch.zeros_like(total))
    return _nan_where_empty(mass, masks)


def relevance_rank_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    """Relevance rank accuracy (Arras et al. 2022): with K = |annotation|, the share of the map's
    K highest pixels that lie inside it. Ties at the K-th value are broken by raster order
    (a stable descending sort), deterministic on every device."""
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps)
    flat, inside = maps.flatten(1), masks.flatten(1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    k = inside.sum(dim=1, keepdim=True)
    ranked_inside = inside.gather(1, order)
    in_top = torch.arange(flat.shape[1], device=flat.device) < k
    return _nan_where_empty((ranked_inside & in_top).sum(dim=1) / k.squeeze(1).clamp_min(1), masks)


def box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU of paired boxes (B, 2 * nd) ``lo..., hi...``; NaN where both are empty."""
    nd = boxes_a.shape[1] // 2
    a, b = boxes_a.float(), boxes_b.float()
    lo = torch.maximum(a[:, :nd], b[:, :nd])
    hi = torch.minimum(a[:, nd:], b[:, nd:])
    inter = (hi - lo).clamp_min(0).prod(dim=1)
    vol_a = (a[:, nd:] - a[:, :nd]).clamp_min(0).prod(dim=1)
    vol_b = (b[:, nd:] - b[:, :nd]).clamp_min(0).prod(dim=1)
    union = vol_a + vol_b - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.full_like(union, float("nan")))


def topk_box_iou(
    maps: Tensor, boxes: Tensor, percentages: Sequence[float] = PAPER_PERCENTAGES, ties: str = "include"
) -> Tensor:
    """The attention-maps paper's localisation IoU: keep the top k% pixels of the map, draw ONE box
    around all of them (every selected component together), and take its IoU with the annotation box.

    Args:
        maps: (B, *S) maps.
        boxes: (B, 2 * nd) annotation boxes ``lo..., hi...`` (hi exclusive).
        percentages: k values in percent (default 5, 10, 20, 40).
        ties: ``"include"`` (default) selects every pixel >= the k-th largest value, so the box
            depends only on the values (a patch-repeated attention map keeps whole patches; a map
            that is flat beyond its top region may select more than k%); ``"exact"`` keeps exactly
            ceil(k% N) pixels (see :func:`medlens.boxes.topk_mask`).

    Returns:
        (B, len(percentages)) IoU in [0, 1], NaN for empty annotation boxes.
    """
    maps = _as_maps(maps)
    boxes = torch.as_tensor(boxes, device=maps.device)
    nd = maps.dim() - 1
    if boxes.dim() != 2 or boxes.shape != (maps.shape[0], 2 * nd):
        raise MedlensError(f"boxes must have shape ({maps.shape[0]}, {2 * nd}); got {tuple(boxes.shape)}")
    empty = ((boxes[:, nd:] - boxes[:, :nd]) <= 0).any(dim=1)
    bad = [p for p in percentages if not 0 < float(p) <= 100]
    if bad:
        raise MedlensError(f"percentages must be in (0, 100]; got {bad[0]}")
    if ties not in ("include", "exact"):
        raise MedlensError(f"ties must be 'include' or 'exact'; got {ties!r}")
    flat = maps.flatten(1)
    counts = [max(1, math.ceil(float(p) / 100.0 * flat.shape[1])) for p in percentages]
    # one topk for the largest k serves every percentage (its values come sorted), the same
    # selection as medlens.boxes.topk_mask
    values, indices = flat.topk(max(counts), dim=1)
    out = []
    for k in counts:
        if ties == "include":
            selected = flat >= values[:, k - 1 : k]
        else:
            selected = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, indices[:, :k], True)
        out.append(box_iou(box_around(selected.view(maps.shape)), boxes))
    return torch.stack(out, dim=1).masked_fill(empty[:, None], float("nan"))


def _threshold_overlap(maps: Tensor, masks: Tensor, thresholds: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Per threshold (B, T): |P & G|, |P|, |G| with P = map >= t."""
    flat, inside = maps.flatten(1), masks.flatten(1)
    t = torch.as_tensor(list(thresholds), dtype=flat.dtype, device=flat.device)
    predicted = (flat[:, None, :] >= t[None, :, None]).float()  # (B, T, N)
    inter = torch.bmm(predicted, inside.float()[:, :, None])[:, :, 0]
    return inter, predicted.sum(dim=2), inside.sum(dim=1, keepdim=True).float()


def mask_iou(maps: Tensor, masks: Tensor, thresholds: Sequence[float] = (0.5,)) -> Tensor:
    """IoU of the thresholded map (map >= t) with the annotation mask: (B, T), NaN if empty."""
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps)
    inter, pred, true = _threshold_overlap(maps, masks, thresholds)
    return _nan_where_empty(inter / (pred + true - inter).clamp_min(1), masks)


def dice(maps: Tensor, masks: Tensor, thresholds: Sequence[float] = (0.5,)) -> Tensor:
    """Dice 2|P & G| / (|P| + |G|) of the thresholded map with the mask: (B, T), NaN if empty."""
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps)
    inter, pred, true = _threshold_overlap(maps, masks, thresholds)
    return _nan_where_empty(2 * inter / (pred + true).clamp_min(1), masks)


def _ties_ranks(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted values (B, N) and each value's count of strictly smaller / smaller-or-equal values."""
    ordered = flat.sort(dim=1).values
    below = torch.searchsorted(ordered, flat, right=False)
    at_most = torch.searchsorted(ordered, flat, right=True)
    return below, at_most


def auroc(maps: Tensor, masks: Tensor) -> Tensor:
    """Area under the ROC curve of the map as a pixel classifier of the mask (rank-based).

    Mann-Whitney: AUROC = (sum of the positives' mid-ranks - P(P+1)/2) / (P * Q), with tied values
    given their average rank, which equals sklearn's ``roc_auc_score`` (and Quantus' ``AUC``).
    NaN when the mask is empty; 0.5 convention is not applied when the mask covers everything
    (NaN too, since there is no negative pixel).
    """
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps)
    flat, inside = maps.flatten(1).float(), masks.flatten(1)
    below, at_most = _ties_ranks(flat)
    mid_rank = (below + at_most + 1).double() / 2  # 1-based average rank
    n_pos = inside.sum(dim=1).double()
    n_neg = inside.shape[1] - n_pos
    rank_sum = (mid_rank * inside).sum(dim=1)
    value = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    value = torch.where(n_neg > 0, value, torch.full_like(value, float("nan")))
    return _nan_where_empty(value.float(), masks)


def average_precision(maps: Tensor, masks: Tensor) -> Tensor:
    """Average precision of the map as a pixel classifier of the mask: the mean over positive
    pixels of the precision at their value, precision(v) = |{g, m >= v}| / |{m >= v}|.
    Ties form one threshold, so this equals sklearn's ``average_precision_score``."""
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps)
    flat, inside = maps.flatten(1).float(), masks.flatten(1)
    n = flat.shape[1]
    ordered_all = flat.sort(dim=1).values
    ordered_pos = flat.masked_fill(~inside, float("-inf")).sort(dim=1).values
    at_least_all = n - torch.searchsorted(ordered_all, flat, right=False)
    at_least_pos = n - torch.searchsorted(ordered_pos, flat, right=False)
    precision = at_least_pos.double() / at_least_all.double()
    n_pos = inside.sum(dim=1)
    value = (precision * inside).sum(dim=1) / n_pos.clamp_min(1)
    return _nan_where_empty(value.float(), masks)


def localisation_metrics(
    maps: Tensor,
    masks: Tensor | None = None,
    boxes: Tensor | None = None,
    percentages: Sequence[float] = PAPER_PERCENTAGES,
    thresholds: Sequence[float] = (0.5,),
    tolerance: int = 0,
    ranking: bool = True,
) -> dict[str, Tensor]:
    """Every localisation metric that the given annotations allow, as (B,) columns.

    With only ``boxes``, the box is used as the mask. ``ranking=False`` skips the sort-based
    metrics (AUROC, AP, rank accuracy), the only ones that cost more than a few passes.
    The ``empty_annotation`` column (1.0/0.0) flags images whose metrics are NaN.
    """
    maps = _as_maps(maps)
    if masks is None and boxes is None:
        raise MedlensError("localisation metrics need masks or boxes")
    if masks is None:
        masks = boxes_to_masks(torch.as_tensor(boxes, device=maps.device), maps.shape[1:])
    masks = _as_masks(masks, maps)
    out: dict[str, Tensor] = {
        "empty_annotation": empty_annotations(masks).float(),
        "pointing_game": pointing_game(maps, masks, tolerance=tolerance),
        "energy_pointing_game": energy_pointing_game(maps, masks),
        "relevance_mass": relevance_mass(maps, masks),
    }
    inter, pred, true = _threshold_overlap(maps, masks, thresholds)  # shared by IoU and Dice
    ious = _nan_where_empty(inter / (pred + true - inter).clamp_min(1), masks)
    dices = _nan_where_empty(2 * inter / (pred + true).clamp_min(1), masks)
    for i, t in enumerate(thresholds):
        out[f"mask_iou@{t:g}"] = ious[:, i]
        out[f"dice@{t:g}"] = dices[:, i]
    if boxes is None:
        boxes = box_around(masks)
    topk = topk_box_iou(maps, torch.as_tensor(boxes, device=maps.device), percentages)
    for i, p in enumerate(percentages):
        out[f"iou@{p:g}"] = topk[:, i]
    if ranking:
        out["auroc"] = auroc(maps, masks)
        out["average_precision"] = average_precision(maps, masks)
        out["rank_accuracy"] = relevance_rank_accuracy(maps, masks)
    return out
