"""Complexity and robustness of explanation maps, batched over (B, *S) maps, 2D and 3D.

- :func:`gini`: sparseness as the Gini index of |map| (Chalasani et al., ICML 2020; Quantus ``Sparseness``).
- :func:`entropy`: Shannon entropy of |map| / sum|map| (Bhatt et al., IJCAI 2020; Quantus ``Complexity``).
- :func:`max_sensitivity`: the largest relative change of the map under small input noise
  (Yeh et al., NeurIPS 2019; Quantus ``MaxSensitivity``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from medlens.errors import MedlensError

__all__ = ["entropy", "gini", "max_sensitivity", "method_explainer"]

Explainer = Callable[[Tensor, Tensor], Tensor]


def _flat(maps: Tensor) -> Tensor:
    if maps.dim() < 2:
        raise MedlensError(f"maps must be batched (B, *S); got shape {tuple(maps.shape)}")
    return maps.flatten(1).abs().double()


def gini(maps: Tensor) -> Tensor:
    """Gini index of each |map|: G = sum_k (2k - n - 1) a_(k) / (n sum a), a sorted ascending.

    0 for a uniform map, (n - 1) / n for a single non-zero pixel; 0 for an all-zero map.

    Args:
        maps: (B, *S).

    Returns:
        (B,) float.
    """
    values = _flat(maps).sort(dim=1).values
    n = values.shape[1]
    k = torch.arange(1, n + 1, device=values.device, dtype=values.dtype)
    total = values.sum(dim=1)
    g = ((2 * k - n - 1) * values).sum(dim=1) / (n * total.clamp_min(1e-300))
    return torch.where(total > 0, g, torch.zeros_like(g)).float()


def entropy(maps: Tensor) -> Tensor:
    """Shannon entropy (nats) of p = |map| / sum|map|: log(n) for a uniform map, 0 for one pixel.

    Returns:
        (B,) float; 0 for an all-zero map.
    """
    values = _flat(maps)
    p = values / values.sum(dim=1, keepdim=True).clamp_min(1e-300)
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(dim=1).float()


def method_explainer(model: nn.Module, method: str, layer: str | None = None, **options: Any) -> Explainer:
    """An ``explain_fn(x, targets) -> (B, *S)`` maps for :func:`max_sensitivity` from a medlens method."""
    from medlens.core.engine import explain

    def explain_fn(x: Tensor, targets: Tensor) -> Tensor:
        return explain(model, x, method, target=targets.view(-1, 1), layer=layer, **options).maps[:, 0]

    return explain_fn


def max_sensitivity(
    explain_fn: Explainer, x: Tensor, targets: Tensor, n_samples: int = 10, radius: float = 0.02,
    batch_size: int = 32, seed: int = 0,
) -> Tensor:
    """Max-sensitivity (Yeh et al. 2019): max_j ||e(x + d_j) - e(x)|| / ||e(x)|| over ``n_samples``
    perturbations d_j ~ U(-radius, radius)^{C x S} (Frobenius norms, as Quantus' default).
    The noisy copies are explained in batches.

    Args:
        explain_fn: ``(x (b, C, *S), targets (b,)) -> maps (b, *S)``, e.g. :func:`method_explainer`.
        x: (B, C, *S) inputs; targets: (B,) classes kept fixed under the noise.
        radius: half-width of the uniform noise, in input units.

    Returns:
        (B,) float; 0 where the clean map is all zero and stays so.
    """
    targets = torch.as_tensor(targets, device=x.device).long().view(-1)
    clean = explain_fn(x, targets).flatten(1).double()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = (torch.rand((n_samples, *x.shape), generator=generator, dtype=x.dtype) * 2 - 1).to(x.device) * radius
    noisy = (x[None] + noise).transpose(0, 1).reshape(-1, *x.shape[1:])  # each image's samples contiguous
    noisy_targets = targets.repeat_interleave(n_samples)
    maps = torch.cat([explain_fn(noisy[i : i + batch_size], noisy_targets[i : i + batch_size]).flatten(1).double()
                      for i in range(0, noisy.shape[0], batch_size)])
    diff = (maps.view(x.shape[0], n_samples, -1) - clean[:, None]).norm(dim=2).amax(dim=1)
    norm = clean.norm(dim=1)
    return torch.where(norm > 0, diff / norm.clamp_min(1e-300), diff).float()
