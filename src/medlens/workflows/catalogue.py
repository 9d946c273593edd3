"""The Quantus-catalogue metrics as ``medlens evaluate`` columns (``--metric NAME`` or the group
``catalogue``), on each batch's maps, 2D and 3D.

Step sizes scale with the image so a column costs a bounded number of forwards per image:
faithfulness estimate, monotonicity and non-sensitivity perturb ``steps`` chunks (N / steps
locations each); faithfulness correlation draws 20 subsets of 5% of the locations; the robustness
columns explain 5 noisy copies; region perturbation (AOPC over ``steps`` patches) and selectivity
(normalised AUC) use an 8 x 8 patch grid in 2D, 4 x 4 x 4 in 3D. Localisation-type columns need a mask (or boxes); completeness
needs a method whose raw map is at input resolution (attribution methods), else NaN.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from medlens.metrics import axiomatic, map_metrics, randomisation, robustness
from medlens.metrics import faithfulness_extra as fx
from medlens.metrics.complexity import method_explainer

__all__ = ["CATALOGUE", "LOWER_IS_BETTER", "catalogue_columns"]

#: column names computed by :func:`catalogue_columns` (each is also a ``--metric`` name)
CATALOGUE = (
    "faithfulness_correlation", "faithfulness_estimate", "monotonicity_arya", "monotonicity_nguyen",
    "effective_complexity", "top_k_intersection", "attribution_localisation", "completeness", "non_sensitivity",
    "random_logit", "avg_sensitivity", "local_lipschitz_estimate", "region_perturbation", "selectivity",
    "relative_input_stability", "relative_output_stability",
)
LOWER_IS_BETTER = {"effective_complexity", "completeness", "non_sensitivity", "random_logit", "avg_sensitivity",
                   "local_lipschitz_estimate", "selectivity",
                   "relative_input_stability", "relative_output_stability"}


def wanted(metrics) -> list[str]:
    """The catalogue columns asked for by ``metrics`` (names or the group ``catalogue``)."""
    return [m for m in CATALOGUE if m in metrics or "catalogue" in metrics]


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
    return cols
