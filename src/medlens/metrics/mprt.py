"""Model parameter randomisation revisited (Hedström et al., "Sanity checks revisited: an
exploration to repair the model parameter randomisation test", XAI in Action workshop, NeurIPS
2023; Quantus ``SmoothMPRT`` and ``EfficientMPRT``), batched torch, 2D and 3D.

- :func:`smooth_mprt`: the explanations are averaged over noisy copies of the input (removing the
  noise that gradients add to the test) before comparing the randomised model's with the original's
  (Spearman of the absolute maps, per layer of the cascade).
- :func:`efficient_mprt`: no similarity at all: the relative rise in the explanation's discrete
  entropy (histogram complexity) from the original to the fully randomised model.

The layers are randomised as Quantus' ``get_random_layer_generator``: every module with a
``reset_parameters`` (named_modules order; ``"bottom_up"`` input first, ``"top_down"`` output
first), cumulatively (or ``"independent"``), each reset right after ``torch.manual_seed(seed + 1)``,
on a deep copy of the model (the caller's model and global RNG state are left untouched).
Explanations come from ``explain_fn(model, x, targets) -> (b, *S)``, e.g. :func:`model_explainer`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from medlens.errors import MedlensError
from medlens.metrics.faithfulness_extra import spearman_rows

__all__ = ["MPRTResult", "discrete_entropy", "efficient_mprt", "model_explainer", "randomised_models", "smooth_mprt"]

ModelExplainer = Callable[[nn.Module, Tensor, Tensor], Tensor]


def model_explainer(method: str, layer: str | None = None, raw: bool = False, **options: Any) -> ModelExplainer:
    """``explain_fn(model, x, targets) -> (b, *S)`` from a medlens method: the [0, 1] maps, or with
    ``raw`` the method's unnormalised first map (at its own resolution)."""
    from medlens.core.engine import explain

    def explain_fn(model: nn.Module, x: Tensor, targets: Tensor) -> Tensor:
        out = explain(model, x, method, target=targets.view(-1, 1), layer=layer, **options)
        return (out.raw if raw else out.maps)[:, 0]

    return explain_fn


def randomised_models(model: nn.Module, order: str = "bottom_up", seed: int = 42) -> Iterator[tuple[str, nn.Module]]:
    """Yield (layer name, model copy with that layer -- and, cascading, every one before it -- re-initialised)."""
    if order not in ("bottom_up", "top_down", "independent"):
        raise MedlensError(f"order must be bottom_up, top_down or independent; got {order!r}")
    twin = copy.deepcopy(model)
    saved = {k: v.clone() for k, v in twin.state_dict().items()} if order == "independent" else None
    layers = [(n, m) for n, m in twin.named_modules() if callable(getattr(m, "reset_parameters", None))]
    if not layers:
        raise MedlensError(f"{type(model).__name__} has no layer with reset_parameters to randomise")
    devices = [p.device for p in twin.parameters() if p.device.type == "cuda"][:1]
    for name, module in layers[::-1] if order == "top_down" else layers:
        if saved is not None:
            twin.load_state_dict(saved)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + 1)
            module.reset_parameters()
        yield name, twin


def _smoothed(explain_fn: ModelExplainer, model: nn.Module, x: Tensor, targets: Tensor, noise: Tensor,
              batch_size: int) -> Tensor:
    """Mean map over the copies x + noise[j] (noise (n, B, C, *S)), all copies explained in chunks -> (B, N)."""
    n = noise.shape[0]
    stack = (x[None] + noise).transpose(0, 1).reshape(-1, *x.shape[1:])
    tg = targets.repeat_interleave(n)
    maps = torch.cat([explain_fn(model, stack[i : i + batch_size], tg[i : i + batch_size]).detach().flatten(1).double()
                      for i in range(0, stack.shape[0], batch_size)])
    return maps.view(x.shape[0], n, -1).mean(dim=1)


@dataclass
class MPRTResult:
    """Smooth MPRT similarities.

    Attributes:
        layers: the randomised layers, in the order of the cascade (only the last with ``last_only``).
        similarity: (L, B) Spearman of each step's smoothed |map| with the original smoothed |map|.
        original: (B,) the same between two smoothings of the original model (the noise floor).
    """

    layers: list[str]
    similarity: Tensor
    original: Tensor

    @property
    def last(self) -> Tensor:
        """(B,) similarity after the whole model is randomised (Quantus' ``return_last_correlation``)."""
        return self.similarity[-1]

    @property
    def average(self) -> Tensor:
        """(B,) mean over the original and every layer, as Quantus' ``return_average_correlation``
        (its "orig" key test never matches the "original" key, so the original is averaged in)."""
        return torch.cat([self.original[None], self.similarity]).mean(dim=0)


def _noise_sets(x: Tensor, sets: int, n_samples: int, magnitude: float, seed: int, noise: Tensor | None) -> Tensor:
    """(sets, n_samples, B, C, *S) noise: N(0, (magnitude * (max - min))^2) per image, the last
    copy of every set noise-free (as Quantus). ``noise`` gives the standard normal draws
    (sets, n_samples - 1, B, C, *S)."""
    spatial = tuple(range(1, x.dim()))
    std = magnitude * (x.amax(dim=spatial, keepdim=True) - x.amin(dim=spatial, keepdim=True))
    if noise is None:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((sets, n_samples - 1, *x.shape), generator=gen, dtype=torch.float64)
    if tuple(noise.shape) != (sets, n_samples - 1, *x.shape):
        raise MedlensError(f"noise has shape {tuple(noise.shape)}; expected {(sets, n_samples - 1, *x.shape)}")
    scaled = (noise.to(x.device).double() * std.double()[None, None]).to(x.dtype)
    return torch.cat([scaled, torch.zeros(sets, 1, *x.shape, dtype=x.dtype, device=x.device)], dim=1)


def smooth_mprt(
    explain_fn: ModelExplainer, model: nn.Module, x: Tensor, targets: Tensor, n_samples: int = 50,
    noise_magnitude: float = 0.1, order: str = "bottom_up", seed: int = 42, last_only: bool = False,
    batch_size: int = 32, noise: Tensor | None = None, noise_seed: int = 0, absolute: bool = True,
) -> MPRTResult:
    """Smooth MPRT: Spearman rank correlation between the noise-averaged |map| of the original model
    and of each step of the cascading randomisation (lower: the method depends on the parameters).

    Each smoothing averages the maps of ``n_samples`` copies, ``n_samples - 1`` with Gaussian
    noise of std ``noise_magnitude * (max - min)`` of the image and one clean copy (Quantus).
    A fresh set of draws is used for the reference, for the original-model check and for each
    step, in that order; ``noise`` passes them in (standard normal, (L + 2, n_samples - 1, B, C, *S),
    or (3, ...) with ``last_only``) so that another library can share them. Spearman is invariant to
    Quantus' positive normalisation, so none is applied.

    Returns:
        :class:`MPRTResult` (``.last``, ``.average`` per image).
    """
    targets = torch.as_tensor(targets, device=x.device).long().view(-1)
    n_layers = 1 if last_only else sum(1 for m in model.modules() if callable(getattr(m, "reset_parameters", None)))
    sets = _noise_sets(x, n_layers + 2, n_samples, noise_magnitude, noise_seed, noise)

    def smooth(m: nn.Module, k: int) -> Tensor:
        a = _smoothed(explain_fn, m, x, targets, sets[k], batch_size)
        return a.abs() if absolute else a

    reference = smooth(model, 0)
    original = spearman_rows(reference, smooth(model, 1)).float()
    names, sims = [], []
    if last_only:
        *_, (name, twin) = randomised_models(model, order, seed)
        names, sims = [name], [spearman_rows(reference, smooth(twin, 2)).float()]
    else:
        for k, (name, twin) in enumerate(randomised_models(model, order, seed)):
            names.append(name)
            sims.append(spearman_rows(reference, smooth(twin, k + 2)).float())
    return MPRTResult(names, torch.stack(sims), original)


def discrete_entropy(maps: Tensor, n_bins: int = 100) -> Tensor:
    """Shannon entropy (nats) of the histogram of each map's values in ``n_bins`` equal bins
    between its min and max (numpy's ``histogram`` binning, edges included; a flat map gets the
    range +-0.5 as numpy does). (B, *S) -> (B,)."""
    flat = maps.flatten(1).double()
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    flat_map = hi == lo
    lo, hi = torch.where(flat_map, lo - 0.5, lo), torch.where(flat_map, hi + 0.5, hi)
    idx = ((flat - lo) / (hi - lo) * n_bins).floor().long().clamp(0, n_bins - 1)
    edges = lo + (hi - lo) * torch.arange(n_bins + 1, device=flat.device, dtype=torch.float64) / n_bins
    idx = idx - (flat < edges.gather(1, idx)).long()
    idx = idx + ((flat >= edges.gather(1, idx + 1)) & (idx != n_bins - 1)).long()
    counts = torch.zeros(flat.shape[0], n_bins, dtype=torch.float64, device=flat.device).scatter_add_(
        1, idx, torch.ones_like(flat))
    p = counts / counts.sum(dim=1, keepdim=True)
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(dim=1)


def efficient_mprt(
    explain_fn: ModelExplainer, model: nn.Module, x: Tensor, targets: Tensor, n_bins: int = 100, seed: int = 42,
    batch_size: int = 32, absolute: bool = False,
) -> Tensor:
    """Efficient MPRT: (H(e_rand) - H(e)) / H(e), H the :func:`discrete_entropy` of the map, e_rand
    the map of the fully randomised model (every layer re-initialised). Two explanations per image.

    Returns:
        (B,) float (higher: randomising the model makes the explanation more complex, as it should).
    """
    targets = torch.as_tensor(targets, device=x.device).long().view(-1)
    *_, (_, twin) = randomised_models(model, "bottom_up", seed)

    def entropy(m: nn.Module) -> Tensor:
        maps = torch.cat([explain_fn(m, x[i : i + batch_size], targets[i : i + batch_size]).detach()
                          for i in range(0, x.shape[0], batch_size)])
        return discrete_entropy(maps.abs() if absolute else maps, n_bins)

    before = entropy(model)
    return ((entropy(twin) - before) / before).float()
