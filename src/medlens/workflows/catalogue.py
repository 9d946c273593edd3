"""The Quantus-catalogue metrics as ``medlens evaluate`` columns (``--metric NAME`` or the group
``catalogue``), on each batch's maps, 2D and 3D.

Step sizes scale with the image so a column costs a bounded number of forwards per image:
faithfulness estimate, monotonicity and non-sensitivity perturb ``steps`` chunks (N / steps
locations each); faithfulness correlation draws 20 subsets of 5% of the locations; the robustness
columns explain 5 noisy copies; region perturbation (AOPC over ``steps`` patches) and selectivity
(normalised AUC) use an 8 x 8 patch grid in 2D, 4 x 4 x 4 in 3D. Localisation-type columns need a mask (or boxes); completeness
needs a method whose raw map is at input resolution (attribution methods), else NaN.

The group ``catalogue_more`` (or any of :data:`CATALOGUE_MORE`) adds the rest of Quantus' catalogue:
infidelity (8 x 8 / 4 x 4 x 4 patches), IROF (SLIC, ``steps`` superpixels), continuity (5
translations), relative representation stability (the explained layer, 5 noisy copies), smooth
MPRT (full randomisation, 3 noise samples), efficient MPRT, input invariance (shift -1, exact
compensation) and, within each batch, sufficiency, consistency (the map's peak in a 4 x 4 / 2 x 2 x 2
grid) and Focus (per image, a mosaic of it, another image of its class and two of other classes,
halved so the mosaic has the input size; NaN where the batch holds no other class).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from medlens.metrics import axiomatic, map_metrics, mprt, randomisation, robustness, stability
from medlens.metrics import faithfulness_extra as fx
from medlens.metrics import faithfulness_more as fm
from medlens.metrics import mosaics as focus_metric
from medlens.metrics.complexity import method_explainer

__all__ = ["CATALOGUE", "CATALOGUE_MORE", "LOWER_IS_BETTER", "catalogue_columns"]

#: column names computed by :func:`catalogue_columns` (each is also a ``--metric`` name)
CATALOGUE = (
    "faithfulness_correlation", "faithfulness_estimate", "monotonicity_arya", "monotonicity_nguyen",
    "effective_complexity", "top_k_intersection", "attribution_localisation", "completeness", "non_sensitivity",
    "random_logit", "avg_sensitivity", "local_lipschitz_estimate", "region_perturbation", "selectivity",
    "relative_input_stability", "relative_output_stability",
)
#: the rest of Quantus' catalogue (group ``catalogue_more``; each also a ``--metric`` name)
CATALOGUE_MORE = (
    "infidelity", "irof", "sufficiency", "continuity", "consistency", "relative_representation_stability",
    "smooth_mprt", "efficient_mprt", "focus", "input_invariance",
)
LOWER_IS_BETTER = {"infidelity", "continuity", "relative_representation_stability", "smooth_mprt",
                   "effective_complexity", "completeness", "non_sensitivity", "random_logit", "avg_sensitivity",
                   "local_lipschitz_estimate", "selectivity",
                   "relative_input_stability", "relative_output_stability"}


def wanted(metrics) -> list[str]:
    """The catalogue columns asked for by ``metrics`` (names or the group ``catalogue``)."""
    return [m for m in CATALOGUE if m in metrics or "catalogue" in metrics] + \
        [m for m in CATALOGUE_MORE if m in metrics or "catalogue_more" in metrics]


def catalogue_columns(
    names, model: nn.Module, x: Tensor, maps: Tensor, raw: Tensor, targets: Tensor, masks: Tensor | None,
    method: str, layer: str | None = None, options: Mapping[str, Any] | None = None, steps: int = 20,
    batch_size: int = 32, seed: int = 0,
) -> dict[str, Tensor]:
    """One (B,) tensor per asked catalogue column (NaN where it does not apply)."""
    options = dict(options or {})
    n = maps[0].numel()
    chunk = max(1, n // steps)
    nan = torch.full((x.shape[0],), float("nan"), device=x.device)
    fn = method_explainer(model, method, layer=layer, **options)
    cols: dict[str, Tensor] = {}
    for name in wanted(names):
        if name == "faithfulness_correlation":
            cols[name] = fx.faithfulness_correlation(model, x, maps, targets, n_runs=20, subset_size=max(1, n // 20),
                                                     batch_size=batch_size, seed=seed)
        elif name == "faithfulness_estimate":
            cols[name] = fx.faithfulness_estimate(model, x, maps, targets, features_in_step=chunk, batch_size=batch_size)
        elif name == "monotonicity_arya":
            cols[name] = fx.monotonicity_arya(model, x, maps, targets, features_in_step=chunk, batch_size=batch_size)
        elif name == "monotonicity_nguyen":
            cols[name] = fx.monotonicity_nguyen(model, x, maps, targets, features_in_step=chunk, n_samples=3,
                                                batch_size=batch_size, seed=seed)
        elif name == "effective_complexity":
            cols[name] = map_metrics.effective_complexity(maps, eps=1e-2) / n  # share of locations above 1% of max
        elif name == "top_k_intersection":
            cols[name] = nan if masks is None else map_metrics.top_k_intersection(maps, masks, k=max(1, n // 20))
        elif name == "attribution_localisation":
            cols[name] = nan if masks is None else map_metrics.attribution_localisation(maps, masks)
        elif name == "completeness":
            full = raw.shape[2:] == x.shape[2:]
            cols[name] = axiomatic.completeness(model, x, raw[:, 0], targets, baseline=0.0) if full else nan
        elif name == "non_sensitivity":
            cols[name] = axiomatic.non_sensitivity(model, x, maps, targets, features_in_step=chunk, eps=1e-3,
                                                   batch_size=batch_size) / n
        elif name == "random_logit":
            with torch.no_grad():
                classes = model(x[:1]).shape[1]
            cols[name] = randomisation.random_logit(fn, x, targets, maps=maps, num_classes=classes, seed=seed) \
                if classes > 1 else nan
        elif name == "avg_sensitivity":
            cols[name] = robustness.avg_sensitivity(fn, x, targets, n_samples=5, radius=0.02, batch_size=batch_size, seed=seed)
        elif name == "local_lipschitz_estimate":
            cols[name] = robustness.local_lipschitz_estimate(fn, x, targets, n_samples=5, std=0.02, batch_size=batch_size,
                                                             seed=seed)
        elif name == "relative_input_stability":
            cols[name] = robustness.relative_input_stability(fn, x, targets, n_samples=5, radius=0.02, batch_size=batch_size,
                                                             seed=seed, model=model)
        elif name == "relative_output_stability":
            cols[name] = robustness.relative_output_stability(fn, model, x, targets, n_samples=5, radius=0.02,
                                                              batch_size=batch_size, seed=seed)
        elif name in ("region_perturbation", "selectivity"):
            patch = max(1, min(x.shape[2:]) // (8 if x.dim() == 4 else 4))
            if name == "region_perturbation":  # AOPC over the first `steps` patches, most relevant first
                cols[name] = fx.region_perturbation(model, x, maps, targets, patch, regions=steps,
                                                    batch_size=batch_size).mean(dim=1)
            else:  # area under the score curve, per removed patch (so in [0, 1] for probabilities)
                curve, auc = fx.selectivity(model, x, maps, targets, patch, batch_size=batch_size)
                cols[name] = auc / max(1, curve.shape[1] - 1)
        elif name in CATALOGUE_MORE:
            cols[name] = _more_column(name, model, x, maps, raw, targets, method, layer, options, steps, batch_size, seed)
    return cols


def _predictions(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


def _more_column(name: str, model: nn.Module, x: Tensor, maps: Tensor, raw: Tensor, targets: Tensor, method: str,
                 layer: str | None, options: Mapping[str, Any], steps: int, batch_size: int, seed: int) -> Tensor:
    """One (B,) column of :data:`CATALOGUE_MORE`."""
    three_d = x.dim() == 5
    fn = method_explainer(model, method, layer=layer, **options)
    mfn = mprt.model_explainer(method, layer=layer, **options)
    if name == "infidelity":  # the raw map where it is at input resolution (its scale is the point), else the map
        a = raw[:, 0] if raw.shape[2:] == x.shape[2:] else maps
        patch = max(1, min(x.shape[2:]) // (4 if three_d else 8))
        return fm.infidelity(model, x, a, targets, patch_sizes=(patch,), batch_size=batch_size)
    if name == "irof":
        return fm.irof(model, x, maps, targets, n_segments=steps, batch_size=batch_size)
    if name == "sufficiency":
        return fm.sufficiency(maps, _predictions(model, x)) if x.shape[0] > 1 else _nan(x)
    if name == "consistency":
        return stability.consistency(maps, _predictions(model, x), "peak_cell", cells=2 if three_d else 4) \
            if x.shape[0] > 1 else _nan(x)
    if name == "continuity":
        return stability.continuity(fn, x, targets, n_steps=5, batch_size=batch_size)
    if name == "relative_representation_stability":
        from medlens.core.capture import auto_layer

        layers = [layer] if layer else [auto_layer(model, x)]
        return stability.relative_representation_stability(fn, model, x, targets, layers, n_samples=5, radius=0.02,
                                                           batch_size=batch_size, seed=seed)
    if name == "smooth_mprt":
        return mprt.smooth_mprt(mfn, model, x, targets, n_samples=3, last_only=True, batch_size=batch_size,
                                noise_seed=seed).last
    if name == "efficient_mprt":
        return mprt.efficient_mprt(mfn, model, x, targets, batch_size=batch_size)
    if name == "input_invariance":
        return axiomatic.input_invariance(mfn, model, x, targets, maps=maps)
    if name == "focus":
        return _focus_column(fn, x, targets, seed)
    raise KeyError(name)


def _nan(x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float("nan"), device=x.device)


def _focus_column(fn, x: Tensor, targets: Tensor, seed: int) -> Tensor:
    """Focus per image: a mosaic of the image, another of its class (itself if none), and two images
    of other classes (one twice if only one), in random tiles; NaN without another class or with odd sizes."""
    if any(s % 2 for s in x.shape[-2:]):
        return _nan(x)
    tg = targets.view(-1).cpu()
    gen = torch.Generator().manual_seed(seed)
    rows, keep = [], []
    for i in range(x.shape[0]):  # index bookkeeping on the host; the mosaics are built and explained batched
        order = [(i + k) % x.shape[0] for k in range(1, x.shape[0])]
        same = [j for j in order if tg[j] == tg[i]] or [i]
        other = [j for j in order if tg[j] != tg[i]]
        keep.append(bool(other))
        picks = torch.tensor([i, same[0], *(other * 2)[:2]] if other else [i, i, i, i])
        rows.append(picks[torch.randperm(4, generator=gen)])
    sources = torch.stack(rows)
    quadrants = tg[sources] == tg[:, None]
    mosaics = focus_metric.tile_mosaics(x, sources, downsample=True)
    score = focus_metric.focus(fn(mosaics, targets.view(-1)), quadrants)
    return torch.where(torch.tensor(keep, device=score.device), score, torch.full_like(score, float("nan")))
