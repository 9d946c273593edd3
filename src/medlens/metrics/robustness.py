"""Robustness of explanations to small input noise (Quantus' catalogue), batched torch, 2D and 3D.

The noisy copies of all images are explained in batches through an ``explain_fn(x, targets) ->
maps (b, *S)`` (e.g. :func:`medlens.metrics.complexity.method_explainer`). The noise can be passed
in (``noise``: (n_samples, B, C, *S)) so that another library sees the very same copies;
otherwise it is drawn from ``seed``.

- :func:`avg_sensitivity`: mean_j ||e(x + d_j) - e(x)|| / ||e(x)||, d_j ~ U(-r, r) (Yeh et al.,
  NeurIPS 2019; Quantus ``AvgSensitivity``, Frobenius norms).
- :func:`local_lipschitz_estimate`: max_j ||e(x) - e(x + d_j)||_2 / ||d_j||_2, d_j ~ N(0, s^2)
  (Alvarez-Melis & Jaakkola 2018; Quantus ``LocalLipschitzEstimate``).

``nan_when_changed`` leaves out (NaN) the samples whose prediction differs from the clean one,
as Quantus' ``return_nan_when_prediction_changes`` (off by default, as there).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["avg_sensitivity", "local_lipschitz_estimate", "nanmax_rows", "noisy_explanations", "relative_change",
           "relative_input_stability", "relative_output_stability", "uniform_noise"]

Explainer = Callable[[Tensor, Tensor], Tensor]


def noisy_explanations(explain_fn: Explainer, x: Tensor, targets: Tensor, noise: Tensor, batch_size: int = 32
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Clean maps (B, N), noisy maps (B, n, N) and noisy inputs (B, n, C*S) for ``noise`` (n, B, C, *S)."""
    targets = torch.as_tensor(targets, device=x.device).long().view(-1)
    n = noise.shape[0]
    clean = explain_fn(x, targets).flatten(1).double()
    noisy = (x[None] + noise.to(x)).transpose(0, 1).reshape(-1, *x.shape[1:])  # each image's samples together
    noisy_targets = targets.repeat_interleave(n)
    maps = torch.cat([explain_fn(noisy[i : i + batch_size], noisy_targets[i : i + batch_size]).flatten(1).double()
                      for i in range(0, noisy.shape[0], batch_size)])
    return clean, maps.view(x.shape[0], n, -1), noisy.view(x.shape[0], n, -1)


def _changed(model: nn.Module | None, x: Tensor, noisy: Tensor, batch_size: int) -> Tensor | None:
    if model is None:
        return None
    with torch.no_grad():
        clean = model(x).argmax(1)
        flat = noisy.view(-1, *x.shape[1:])
        pred = torch.cat([model(flat[i : i + batch_size]).argmax(1) for i in range(0, flat.shape[0], batch_size)])
    return pred.view(x.shape[0], -1) != clean[:, None]


def uniform_noise(n: int, x: Tensor, radius: float, seed: int) -> Tensor:
    """(n, *x.shape) noise U(-radius, radius) drawn on the host from ``seed``, on x's device."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand((n, *x.shape), generator=gen, dtype=x.dtype) * 2 - 1).to(x.device) * radius


def avg_sensitivity(
    explain_fn: Explainer, x: Tensor, targets: Tensor, n_samples: int = 10, radius: float = 0.2,
    batch_size: int = 32, seed: int = 0, noise: Tensor | None = None, model: nn.Module | None = None,
    nan_when_changed: bool = False,
) -> Tensor:
    """Average sensitivity: mean over samples of ||e(x + d) - e(x)||_F / ||e(x)||_F.

    Args:
        radius: d ~ U(-radius, radius) (Quantus' ``lower_bound``, 0.2 by default).
        model: needed for ``nan_when_changed``.

    Returns:
        (B,) float (lower is more robust); NaN-samples are left out of the mean.
    """
    noise = uniform_noise(n_samples, x, radius, seed) if noise is None else noise
    clean, maps, noisy = noisy_explanations(explain_fn, x, targets, noise, batch_size)
    ratio = (maps - clean[:, None]).norm(dim=2) / clean.norm(dim=1, keepdim=True)
    changed = _changed(model, x, noisy, batch_size) if nan_when_changed else None
    if changed is not None:
        ratio = ratio.masked_fill(changed, float("nan"))
    return ratio.nanmean(dim=1).float()


def local_lipschitz_estimate(
    explain_fn: Explainer, x: Tensor, targets: Tensor, n_samples: int = 10, std: float = 0.1, mean: float = 0.0,
    batch_size: int = 32, seed: int = 0, noise: Tensor | None = None, model: nn.Module | None = None,
    nan_when_changed: bool = False,
) -> Tensor:
    """Local Lipschitz estimate: max over samples of ||e(x) - e(x + d)||_2 / (||d||_2 + 1e-10),
    d ~ N(mean, std^2) per input element.

    Returns:
        (B,) float (lower is more robust).
    """
    if noise is None:
        gen = torch.Generator().manual_seed(seed)
        noise = (torch.randn((n_samples, *x.shape), generator=gen, dtype=x.dtype) * std + mean).to(x.device)
    clean, maps, noisy = noisy_explanations(explain_fn, x, targets, noise, batch_size)
    step = (noisy - x.flatten(1)[:, None].to(noisy)).double().norm(dim=2)
    ratio = (clean[:, None] - maps).norm(dim=2) / (step + 1e-10)
    changed = _changed(model, x, noisy, batch_size) if nan_when_changed else None
    if changed is not None:
        ratio = ratio.masked_fill(changed, float("nan"))
    return torch.where(torch.isnan(ratio), torch.full_like(ratio, -float("inf")), ratio).amax(dim=1).float()


def relative_change(clean: Tensor, maps: Tensor, eps_min: float) -> Tensor:
    """||(e(x) - e(x')) / e(x)|| per sample (zeros of e(x) replaced by eps_min), (B, n)."""
    safe = clean + (clean == 0) * eps_min
    return ((clean[:, None] - maps) / safe[:, None]).norm(dim=2)


def nanmax_rows(values: Tensor) -> Tensor:
    """Max over dim 1 ignoring NaN (-inf for an all-NaN row)."""
    return torch.where(torch.isnan(values), torch.full_like(values, -float("inf")), values).amax(dim=1)


def relative_input_stability(
    explain_fn: Explainer, x: Tensor, targets: Tensor, n_samples: int = 10, radius: float = 0.2,
    batch_size: int = 32, seed: int = 0, noise: Tensor | None = None, model: nn.Module | None = None,
    nan_when_changed: bool = True, eps_min: float = 1e-6,
) -> Tensor:
    """Relative input stability (Agarwal et al., 2022; Quantus ``RelativeInputStability``):
    max over samples of ||(e - e') / e|| / max(||(x - x') / x||, eps_min), d ~ U(-radius, radius).

    Samples whose prediction changes are left out when ``model`` is given (Quantus' default);
    Quantus' ``np.max`` then returns NaN for the image -- here the max of the others (NaN only
    when every sample changed), a deliberate difference.

    Returns:
        (B,) float (lower is more stable).
    """
    noise = uniform_noise(n_samples, x, radius, seed) if noise is None else noise
    clean, maps, noisy = noisy_explanations(explain_fn, x, targets, noise, batch_size)
    flat_x = x.flatten(1).double()
    safe_x = flat_x + (flat_x == 0) * eps_min
    den = ((flat_x[:, None] - noisy.double()) / safe_x[:, None]).norm(dim=2)
    ratio = relative_change(clean, maps, eps_min) / (den + (den == 0) * eps_min)
    changed = _changed(model, x, noisy, batch_size) if nan_when_changed else None
    if changed is not None:
        ratio = ratio.masked_fill(changed, float("nan"))
    out = nanmax_rows(ratio)
    return torch.where(torch.isinf(out), torch.full_like(out, float("nan")), out).float()


def relative_output_stability(
    explain_fn: Explainer, model: nn.Module, x: Tensor, targets: Tensor, n_samples: int = 10, radius: float = 0.2,
    batch_size: int = 32, seed: int = 0, noise: Tensor | None = None, nan_when_changed: bool = True,
    eps_min: float = 1e-6,
) -> Tensor:
    """Relative output stability (Agarwal et al., 2022; Quantus ``RelativeOutputStability``):
    max over samples of ||(e - e') / e|| / max(||h(x) - h(x')||, eps_min), h the logits (as
    Quantus, the logit change is absolute, not relative). NaN handling as
    :func:`relative_input_stability`.

    Returns:
        (B,) float (lower is more stable).
    """
    noise = uniform_noise(n_samples, x, radius, seed) if noise is None else noise
    clean, maps, noisy = noisy_explanations(explain_fn, x, targets, noise, batch_size)
    with torch.no_grad():
        h = model(x).double()
        flat = noisy.view(-1, *x.shape[1:])
        hs = torch.cat([model(flat[i : i + batch_size]) for i in range(0, flat.shape[0], batch_size)]).double()
    den = (h[:, None] - hs.view(x.shape[0], n_samples if noise is None else noise.shape[0], -1)).norm(dim=2)
    ratio = relative_change(clean, maps, eps_min) / (den + (den == 0) * eps_min)
    if nan_when_changed:
        changed = hs.view(*den.shape, -1).argmax(dim=2) != h.argmax(dim=1, keepdim=True)
        ratio = ratio.masked_fill(changed, float("nan"))
    out = nanmax_rows(ratio)
    return torch.where(torch.isinf(out), torch.full_like(out, float("nan")), out).float()
