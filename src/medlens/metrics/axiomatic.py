"""Axiomatic properties of attribution maps (Quantus' catalogue), batched torch, 2D and 3D.

- :func:`completeness`: |sum_i a_i - (f(x) - f(x'))| (Sundararajan et al. 2017; Quantus
  ``Completeness`` returns the boolean ``gap == 0`` -- here the gap itself, so a tolerance can be
  chosen; ``completeness(...) == 0`` is Quantus' value).
- :func:`non_sensitivity`: the number of locations where "removing it changes nothing" and
  "the map gives it no relevance" disagree (Nguyen & Martinez 2020; Quantus ``NonSensitivity``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from medlens.core.targets import Region
from medlens.metrics.faithfulness import all_class_logits, perturbation_baseline, prepare_perturbation, read_scores
from medlens.metrics.faithfulness_extra import masked_scores

__all__ = ["completeness", "non_sensitivity"]


def completeness(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None, baseline: str | float = "min",
    score: str = "logit", region: Region = None, batch_size: int = 64, blur_sigma: float = 5.0,
) -> Tensor:
    """The completeness gap |sum(map) - (f_t(x) - f_t(baseline))| per image (raw, signed maps:
    pass ``Explanation.raw`` of an attribution method, not the [0, 1] display maps).

    Returns:
        (B,) float (0 for a complete attribution).
    """
    flat, targets, _, _ = prepare_perturbation(model, x, maps, targets, region)
    fill = perturbation_baseline(x, baseline, blur_sigma).contiguous()
    clean = read_scores(all_class_logits(model, x, region, batch_size), targets, score)[0]
    base = read_scores(all_class_logits(model, fill, region, batch_size), targets, score)[0]
    return (flat.double().sum(dim=1) - (clean - base).double()).abs().float()


def non_sensitivity(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None, features_in_step: int = 1,
    eps: float = 1e-5, baseline: str | float = "min", score: str = "softmax", region: Region = None,
    batch_size: int = 64, blur_sigma: float = 5.0,
) -> Tensor:
    """Non-sensitivity: the locations are removed in raster order, ``features_in_step`` at a time
    (each step from the clean input); a location is *insensitive* when its step moves the target
    score by less than ``eps``, *unattributed* when its map value is below ``eps``. Returns how many
    locations are one and not the other (XOR). With ``features_in_step > 1`` each location takes
    its chunk's sensitivity (Quantus requires 1 there: its XOR of (T,) steps and (N,) locations
    only broadcasts then).

    Returns:
        (B,) float count (0 is best). N / features_in_step forwards per image.
    """
    flat, targets, _, _ = prepare_perturbation(model, x, maps, targets, region)
    n = flat.shape[1]
    steps = math.ceil(n / features_in_step)
    chunk = torch.arange(n, device=x.device) // features_in_step
    removed = (chunk[None, :] == torch.arange(steps, device=x.device)[:, None]).view(1, steps, *x.shape[2:])
    removed = removed.expand(x.shape[0], *removed.shape[1:])
    fill = perturbation_baseline(x, baseline, blur_sigma)
    clean = read_scores(all_class_logits(model, x, region, batch_size), targets, score)[0]
    preds = masked_scores(model, x, removed, fill, targets, region, batch_size, score)
    insensitive = ((preds - clean[:, None]).abs() < eps)[:, chunk]
    unattributed = flat < eps
    return (insensitive ^ unattributed).sum(dim=1).float()
