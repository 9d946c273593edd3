"""Map-only metrics from Quantus' catalogue (no model calls), batched over (B, *S), 2D and 3D.

- :func:`effective_complexity`: the number of locations with |a| > eps (Nguyen & Martinez 2020;
  Quantus ``EffectiveComplexity``).
- :func:`top_k_intersection`: the share of the k most relevant locations inside the annotation
  (Theiner et al. 2021; Quantus ``TopKIntersection``).
- :func:`attribution_localisation`: the share of positive relevance inside the annotation,
  optionally weighted by the annotation's share of the image (Kohlbrenner et al. 2020; Quantus
  ``AttributionLocalisation``).

An empty annotation gives NaN (not scored), as Quantus.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medlens.errors import MedlensError

__all__ = ["attribution_localisation", "effective_complexity", "top_k_intersection"]


def _pair(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    if maps.dim() < 2:
        raise MedlensError(f"maps must be batched (B, *S); got shape {tuple(maps.shape)}")
    masks = masks.to(maps.device)
    if masks.dim() == maps.dim() + 1 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.shape != maps.shape:
        raise MedlensError(f"masks have shape {tuple(masks.shape)}; expected {tuple(maps.shape)} to match the maps")
    return maps.flatten(1).double(), masks.flatten(1).bool()


def effective_complexity(maps: Tensor, eps: float = 1e-5, absolute: bool = True) -> Tensor:
    """Count of locations with |a| > eps (``absolute=False``: a > eps). (B,) float, lower is simpler."""
    flat = maps.flatten(1)
    return ((flat.abs() if absolute else flat) > eps).sum(dim=1).float()


def top_k_intersection(maps: Tensor, masks: Tensor, k: int = 1000, concept_influence: bool = False) -> Tensor:
    """Share of the ``k`` highest-map locations that lie in the mask (ties: lower index first,
    as a stable descending sort). ``concept_influence`` divides by the mask's share of the image.

    Returns:
        (B,) in [0, 1]; NaN for an empty mask.
    """
    flat, mask = _pair(maps, masks)
    if not 0 < k <= flat.shape[1]:
        raise MedlensError(f"k must be in 1..{flat.shape[1]}; got {k}")
    top = flat.argsort(dim=1, descending=True, stable=True)[:, :k]
    share = mask.gather(1, top).double().mean(dim=1)
    sizes = mask.sum(dim=1)
    if concept_influence:
        share = share * flat.shape[1] / sizes.clamp_min(1)
    return torch.where(sizes > 0, share, torch.full_like(share, float("nan"))).float()


def attribution_localisation(maps: Tensor, masks: Tensor, weighted: bool = False, positive: bool = True) -> Tensor:
    """Inside / total relevance: sum(a+ in mask) / (sum a+ + 1e-9); ``weighted`` multiplies by
    the mask's share of the image (Quantus' ``weighted``). ``positive`` (the paper's definition)
    clips negative relevance first; Quantus' default is ``positive_attributions=False``.

    Returns:
        (B,) in [0, 1]; NaN for an empty mask.
    """
    flat, mask = _pair(maps, masks)
    if positive:
        flat = flat.clamp_min(0)
    ratio = (flat * mask).sum(dim=1) / (flat.sum(dim=1) + 1e-9)
    sizes = mask.sum(dim=1)
    if weighted:
        ratio = ratio * sizes / flat.shape[1]
    return torch.where(sizes > 0, ratio, torch.full_like(ratio, float("nan"))).float()
