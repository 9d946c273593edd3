"""Stability of explanations beyond additive noise (Quantus' robustness catalogue), batched torch, 2D and 3D.

- :func:`continuity` (Montavon et al., DSP 2018; Quantus ``Continuity``): the largest
  ||e(x) - e(x')||_1 / ||x - x'||_2 over translations x' of the image along its last axis.
- :func:`consistency` (Dasgupta et al., ICML 2022; Quantus ``Consistency``): among the other images
  whose explanation discretises to the same label, the share predicted as the same class.
- :func:`relative_representation_stability` (Agarwal et al. 2022; Quantus
  ``RelativeRepresentationStability``): max over noisy copies of the relative change of the map
  over the relative change of internal representations.

Explanations come from an ``explain_fn(x, targets) -> (b, *S)`` (e.g.
:func:`medlens.metrics.complexity.method_explainer`); all perturbed copies are explained in batches.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from medlens.errors import MedlensError
from medlens.metrics.faithfulness import perturbation_baseline
from medlens.metrics.faithfulness_more import agreement_share
from medlens.metrics.robustness import nanmax_rows, relative_change, uniform_noise, noisy_explanations

__all__ = ["consistency", "continuity", "discretise", "relative_representation_stability", "translations"]

Explainer = Callable[[Tensor, Tensor], Tensor]


def translations(x: Tensor, n_steps: int = 28, baseline: str | float = "min") -> tuple[Tensor, Tensor]:
    """Copies of x shifted along its last axis by t_k = -W + k * ((2W + 1) // n_steps), k = 1..n_steps,
    the vacated columns filled with ``baseline`` (Quantus' ``batched_translation`` sweep).

    Returns:
        (B, n_steps, C, *S) shifted copies and the (n_steps,) shifts.
    """
    w = x.shape[-1]
    dx = (2 * w + 1) // n_steps
    if dx < 1:
        raise MedlensError(f"n_steps {n_steps} exceeds the {2 * w + 1} possible shifts of width {w}")
    shifts = -w + dx * torch.arange(1, n_steps + 1, device=x.device)
    src = torch.arange(w, device=x.device)[None, :] - shifts[:, None]  # (n, W)
    valid = (src >= 0) & (src < w)
    lead = (1,) * (x.dim() - 2)
    index = src.clamp(0, w - 1).view(1, n_steps, *lead, w).expand(x.shape[0], n_steps, *x.shape[1:])
    moved = x[:, None].expand(-1, n_steps, *x.shape[1:]).gather(-1, index)
    fill = perturbation_baseline(x, baseline, 5.0)[:, None].expand_as(moved)
    return torch.where(valid.view(1, n_steps, *lead, w), moved, fill), shifts


def _explain_all(explain_fn: Explainer, stack: Tensor, targets: Tensor, batch_size: int) -> Tensor:
    """Maps (b, N) of a (b, C, *S) stack, explained in chunks."""
    return torch.cat([explain_fn(stack[i : i + batch_size], targets[i : i + batch_size]).flatten(1).double()
                      for i in range(0, stack.shape[0], batch_size)])


def _predictions(model: nn.Module, stack: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(stack[i : i + batch_size]).argmax(1) for i in range(0, stack.shape[0], batch_size)])


def continuity(
    explain_fn: Explainer, x: Tensor, targets: Tensor, n_steps: int = 28, baseline: str | float = "min",
    batch_size: int = 32, model: nn.Module | None = None, nan_when_changed: bool = False,
) -> Tensor:
    """Continuity: max_k ||e(x) - e(x_k)||_1 / (||x - x_k||_2 + 1e-9) over the translations
    x_k of :func:`translations` (last axis: width in 2D, and in 3D too).

    With ``nan_when_changed`` (needs ``model``), translations whose prediction differs from the
    target are left out (Quantus sets them NaN and its max is then NaN; here the max of the rest,
    NaN only when all changed -- as :func:`medlens.metrics.robustness.relative_input_stability`).

    Returns:
        (B,) float (lower is more continuous).
    """
    targets = torch.as_tensor(targets, device=x.device).long().view(-1)
    moved, _ = translations(x, n_steps, baseline)
    stack = moved.reshape(-1, *x.shape[1:])
    clean = explain_fn(x, targets).flatten(1).double()
    maps = _explain_all(explain_fn, stack, targets.repeat_interleave(n_steps), batch_size).view(x.shape[0], n_steps, -1)
    step = (x[:, None].double() - moved.double()).flatten(2).norm(dim=2)
    ratio = (clean[:, None] - maps).abs().sum(dim=2) / (step + 1e-9)
    if nan_when_changed:
        if model is None:
            raise MedlensError("continuity with nan_when_changed needs the model")
        changed = _predictions(model, stack, batch_size).view(x.shape[0], n_steps) != targets[:, None]
        ratio = ratio.masked_fill(changed, float("nan"))
    out = nanmax_rows(ratio)
    return torch.where(torch.isinf(out), torch.full_like(out, float("nan")), out).float()


def discretise(maps: Tensor, how: str = "top_n_sign", n: int = 5, cells: int = 4) -> Tensor:
    """Discrete labels of maps (B, *S) -> (B, K); two maps share a label when their rows are equal.

    - ``"top_n_sign"``: the signs of the first ``n`` values in raster order (Quantus' default
      ``top_n_sign``: "top" is the flattened order, not relevance).
    - ``"sign"``: every sign; ``"rank"``: the full descending order; ``"round"``: values rounded
      to ``n`` decimals (Quantus' ``sign``, ``rank``, ``floating_points``).
    - ``"peak_cell"`` (medlens): the cell of a ``cells``-per-axis grid holding the map's maximum,
      i.e. "the explanation points at this region".
    """
    flat = maps.flatten(1)
    if how == "top_n_sign":
        return flat[:, :n].sign()
    if how == "sign":
        return flat.sign()
    if how == "rank":
        return flat.argsort(dim=1, descending=True, stable=True).to(flat.dtype)
    if how == "round":
        return flat.double().round(decimals=n)
    if how == "peak_cell":
        spatial = maps.shape[1:]
        peak = flat.argmax(dim=1)
        cell = torch.zeros_like(peak)
        coords, rest = [], peak  # raster coordinates, last axis fastest
        for size in reversed(spatial):
            coords.append(rest % size)
            rest = torch.div(rest, size, rounding_mode="floor")
        for c, size in zip(reversed(coords), spatial):
            cell = cell * cells + c * cells // size
        return cell[:, None].to(flat.dtype)
    raise MedlensError(f"discretise must be top_n_sign, sign, rank, round or peak_cell; got {how!r}")


def consistency(maps: Tensor, predictions: Tensor, how: str = "top_n_sign", n: int = 5, cells: int = 4) -> Tensor:
    """Consistency (Dasgupta et al. 2022) within a batch: among the other images whose map has the
    same :func:`discretise` label, the share predicted as the same class (0 when none).

    Args:
        maps: (B, *S); predictions: (B,) predicted classes.

    Returns:
        (B,) in [0, 1] (higher: equal explanations mean equal predictions).
    """
    if maps.dim() < 2 or maps.shape[0] < 2:
        raise MedlensError("consistency compares images with each other: it needs a batch (B >= 2, *S) of maps")
    labels = discretise(maps, how, n, cells)
    equal = (labels[:, None] == labels[None, :]).all(dim=2)
    return agreement_share(equal, predictions)


def _representations(model: nn.Module, stack: Tensor, layers: Sequence[str], batch_size: int) -> Tensor:
    """(b, F) outputs of ``layers`` (flattened, concatenated in the given order), no-grad, in chunks."""
    from medlens.core.capture import resolve_layer

    modules = [resolve_layer(model, name) for name in layers]
    out = []
    with torch.no_grad():
        for i in range(0, stack.shape[0], batch_size):
            seen: dict[int, Tensor] = {}
            handles = [m.register_forward_hook(lambda _m, _i, o, k=k: seen.__setitem__(k, o.flatten(1).double()))
                       for k, m in enumerate(modules)]
            try:
                model(stack[i : i + batch_size])
            finally:
                for h in handles:
                    h.remove()
            out.append(torch.cat([seen[k] for k in range(len(modules))], dim=1))
    return torch.cat(out)


def relative_representation_stability(
    explain_fn: Explainer, model: nn.Module, x: Tensor, targets: Tensor, layers: Sequence[str], n_samples: int = 10,
    radius: float = 0.2, batch_size: int = 32, seed: int = 0, noise: Tensor | None = None, nan_when_changed: bool = True,
    eps_min: float = 1e-6,
) -> Tensor:
    """Relative representation stability: max over samples of ||(e - e') / e|| / max(||(h - h') / h||,
    eps_min), h the outputs of ``layers`` (zeros of e and h replaced by eps_min, as Quantus).

    The noise is U(-radius, radius) (Quantus' default draws U(0.02, 0.2), one-sided -- pass
    ``noise`` (n, B, C, *S) to use any other). Samples whose prediction changes are left out
    (Quantus: NaN for the image; here the max of the others, as relative input stability).

    Returns:
        (B,) float (lower is more stable).
    """
    if not layers:
        raise MedlensError("relative_representation_stability needs at least one layer name")
    noise = uniform_noise(n_samples, x, radius, seed) if noise is None else noise.to(x)
    clean, maps, noisy = noisy_explanations(explain_fn, x, targets, noise, batch_size)
    flat_noisy = noisy.view(-1, *x.shape[1:])
    h = _representations(model, x, layers, batch_size)
    hs = _representations(model, flat_noisy, layers, batch_size).view(x.shape[0], noise.shape[0], -1)
    safe = h + (h == 0) * eps_min
    den = ((h[:, None] - hs) / safe[:, None]).norm(dim=2)
    ratio = relative_change(clean, maps, eps_min) / (den + (den == 0) * eps_min)
    if nan_when_changed:
        changed = _predictions(model, flat_noisy, batch_size).view(x.shape[0], -1) != _predictions(model, x, batch_size)[:, None]
        ratio = ratio.masked_fill(changed, float("nan"))
    out = nanmax_rows(ratio)
    return torch.where(torch.isinf(out), torch.full_like(out, float("nan")), out).float()
