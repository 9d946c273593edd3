"""Axiomatic properties of attribution maps (Quantus' catalogue), batched torch, 2D and 3D.

- :func:`completeness`: |sum_i a_i - (f(x) - f(x'))| (Sundararajan et al. 2017; Quantus
  ``Completeness`` returns the boolean ``gap == 0`` -- here the gap itself, so a tolerance can be
  chosen; ``completeness(...) == 0`` is Quantus' value).
- :func:`non_sensitivity`: the number of locations where "removing it changes nothing" and
  "the map gives it no relevance" disagree (Nguyen & Martinez 2020; Quantus ``NonSensitivity``).
- :func:`input_invariance`: whether the map stays the same when the input is shifted by a
  constant and the model compensates the shift (Kindermans et al. 2019; Quantus ``InputInvariance``).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import Tensor, nn

from medlens.core.targets import Region
from medlens.errors import MedlensError
from medlens.metrics.faithfulness import all_class_logits, perturbation_baseline, prepare_perturbation, read_scores
from medlens.metrics.faithfulness_extra import masked_scores

__all__ = ["completeness", "input_invariance", "non_sensitivity", "shifted_model"]


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


def shifted_model(model: nn.Module, shift: float, x: Tensor, mode: str = "exact") -> nn.Module:
    """A copy of ``model`` that gives on ``x + shift`` what ``model`` gives on ``x``.

    ``"exact"``: the copy subtracts the shift from its input (a forward pre-hook), which equals the
    first layer's bias absorbing W * shift position by position, borders and padding included.
    ``"bias"``: Quantus' ``add_mean_shift_to_first_layer``: the first child layer's bias b becomes
    2 b - min(layer(shift)) per output channel (exact only where the layer's response to the
    constant is the same everywhere, i.e. not at zero-padded borders; needs a bias).
    """
    twin = copy.deepcopy(model)
    if mode == "exact":
        twin.register_forward_pre_hook(lambda _m, args: (args[0] - shift, *args[1:]))
        return twin
    if mode != "bias":
        raise MedlensError(f"mode must be 'exact' or 'bias'; got {mode!r}")
    first = next(iter(twin.children()), None)
    if first is None or getattr(first, "bias", None) is None:
        raise MedlensError(f"input_invariance mode 'bias' needs a first layer with a bias; "
                           f"{type(first).__name__ if first is not None else 'the model'} has none")
    with torch.no_grad():
        response = first(torch.full((1, *x.shape[1:]), float(shift), device=x.device, dtype=x.dtype))[0]
        lowest = response.reshape(response.shape[0], -1).amin(dim=1) if response.dim() > 1 else response
        first.bias.copy_(2 * first.bias - lowest)
    return twin


def input_invariance(
    explain_fn: Callable[[nn.Module, Tensor, Tensor], Tensor], model: nn.Module, x: Tensor, targets: Tensor,
    maps: Tensor | None = None, shift: float = -1.0, mode: str = "exact", atol: float = 1e-4, rtol: float = 1e-5,
    return_diff: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Input invariance: 1 where e(model, x) and e(shifted model, x + shift) agree everywhere
    (|a - b| <= atol + rtol |b|, numpy's ``isclose`` as Quantus), else 0.

    Args:
        explain_fn: ``(model, x, targets) -> (b, *S)`` (e.g. :func:`medlens.metrics.mprt.model_explainer`).
        maps: the maps of the original model on x, if already computed.
        mode: how the model compensates the shift (:func:`shifted_model`).

    Returns:
        (B,) float 0/1 (higher: the method is input invariant); with ``return_diff`` also the (B,)
        largest absolute difference.
    """
    targets = torch.as_tensor(targets, device=x.device).long().view(-1)
    twin = shifted_model(model, shift, x, mode)
    a = explain_fn(model, x, targets).detach() if maps is None else maps.to(x.device)
    b = explain_fn(twin, x + shift, targets).detach()
    diff = (a.double() - b.double()).abs().flatten(1)
    same = (diff <= atol + rtol * b.double().abs().flatten(1)).all(dim=1).float()
    return (same, diff.amax(dim=1).float()) if return_diff else same
