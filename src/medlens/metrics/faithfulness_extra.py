"""More faithfulness metrics from Quantus' catalogue, batched torch, on (B, *S) maps in 2D and 3D.

Every perturbed copy of every image is built on the model's device and scored in no-grad chunks
of ``batch_size`` (all images and steps flattened together). A *feature* is a pixel / voxel: a
perturbation replaces all channels of it, so on single-channel inputs (most medical images) the
features are Quantus' features exactly; on C > 1 channels Quantus would broadcast the map and
perturb channel by channel (a deliberate difference: a map has one value per location).

- :func:`faithfulness_correlation` (Bhatt et al., IJCAI 2020; Quantus ``FaithfulnessCorrelation``)
- :func:`faithfulness_estimate` (Alvarez-Melis & Jaakkola, NeurIPS 2018; Quantus ``FaithfulnessEstimate``)
- :func:`monotonicity_arya` (Arya et al. 2019; Quantus ``Monotonicity``)
- :func:`monotonicity_nguyen` (Nguyen & Martinez 2020; Quantus ``MonotonicityCorrelation``)
- :func:`sensitivity_n` (Ancona et al., ICLR 2018; Quantus ``SensitivityN``)

Scores are logits by default (``score="softmax"`` for probabilities), as Quantus' defaults for
the first two; ``baseline`` is ``"min"`` (Quantus' ``"black"``: each image's minimum), ``"zero"``,
``"mean"``, ``"blur"`` or a number.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from medlens.core.targets import Region
from medlens.errors import MedlensError
from medlens.core.targets import region_rows
from medlens.metrics.faithfulness import all_class_logits, perturbation_baseline, prepare_perturbation, read_scores

__all__ = [
    "faithfulness_correlation", "faithfulness_estimate", "masked_scores", "monotonicity_arya",
    "monotonicity_nguyen", "patch_ids", "pearson_rows", "sensitivity_n", "spearman_rows",
]


def pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson r between the rows of a and b (B, T); NaN where a row is constant (as scipy)."""
    a, b = a.double(), b.double()
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(dim=1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def _average_ranks(v: Tensor) -> Tensor:
    """Ranks along dim 1 with ties given their average rank (as scipy.stats.rankdata)."""
    order = v.argsort(dim=1, stable=True)
    sorted_v = v.gather(1, order)
    n = v.shape[1]
    pos = torch.arange(n, device=v.device, dtype=torch.float64).expand_as(sorted_v).clone()
    # ties: average position of each run of equal values
    new_run = torch.ones_like(sorted_v, dtype=torch.bool)
    new_run[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    run_id = new_run.long().cumsum(dim=1) - 1
    sums = torch.zeros_like(pos).scatter_add_(1, run_id, pos)
    counts = torch.zeros_like(pos).scatter_add_(1, run_id, torch.ones_like(pos))
    avg = (sums / counts.clamp_min(1)).gather(1, run_id)
    return torch.empty_like(avg).scatter_(1, order, avg)


def spearman_rows(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rho between the rows of a and b (average ranks for ties, as scipy)."""
    return pearson_rows(_average_ranks(a.double()), _average_ranks(b.double()))


def masked_scores(
    model: nn.Module, x: Tensor, removed: Tensor, fill: Tensor, targets: Tensor, region: Region = None,
    batch_size: int = 64, score: str = "logit", keep_from: Tensor | None = None,
) -> Tensor:
    """Scores of perturbed copies: copy (i, t) is ``x[i]`` with the locations ``removed[i, t]``
    replaced by ``fill[i]`` (or, with ``keep_from``, ``keep_from[i]`` everywhere else).

    Args:
        x: (B, C, *S); removed: (B, T, *S) bool; fill: (B, C, *S); targets: (B, 1).

    Returns:
        (B, T) target scores; all B*T copies scored in no-grad chunks of ``batch_size``.
    """
    b, t = removed.shape[:2]
    base = x if keep_from is None else keep_from
    image = torch.arange(b, device=x.device).repeat_interleave(t)
    step = torch.arange(t, device=x.device).repeat(b)
    out = []
    for start in range(0, b * t, batch_size):
        i, s = image[start : start + batch_size], step[start : start + batch_size]
        stack = torch.where(removed[i, s][:, None], fill[i], base[i])
        logits = all_class_logits(model, stack, region_rows(region, x, i), stack.shape[0])
        out.append(read_scores(logits, targets[i], score)[0])
    return torch.cat(out).view(b, t)


def _clean_scores(model: nn.Module, x: Tensor, targets: Tensor, region: Region, batch_size: int, score: str) -> Tensor:
    return read_scores(all_class_logits(model, x, region, batch_size), targets, score)[0]


def _subset_masks(idx: Tensor, n: int) -> Tensor:
    """(B, R, k) flat indices -> (B, R, n) bool."""
    return torch.zeros(*idx.shape[:2], n, dtype=torch.bool, device=idx.device).scatter_(2, idx, True)


def faithfulness_correlation(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None, n_runs: int = 100,
    subset_size: int = 224, baseline: str | float = "min", score: str = "logit", region: Region = None,
    batch_size: int = 64, seed: int = 0, subsets: Tensor | None = None, blur_sigma: float = 5.0,
) -> Tensor:
    """Faithfulness correlation: Pearson r, over ``n_runs`` random subsets of ``subset_size``
    locations, between the map's sum over the subset and the drop in the target score when the
    subset is replaced by the baseline.

    Args:
        subsets: optional (B, n_runs, subset_size) flat location indices (to share Quantus'
            ``np.random.choice`` draws); otherwise drawn without replacement from ``seed``.

    Returns:
        (B,) r in [-1, 1] (higher is more faithful).
    """
    flat, targets, _, _ = prepare_perturbation(model, x, maps, targets, region)
    n = flat.shape[1]
    if subsets is None:
        if subset_size > n:
            raise MedlensError(f"subset_size {subset_size} exceeds the {n} locations of the image")
        gen = torch.Generator().manual_seed(seed)
        subsets = torch.rand(x.shape[0], n_runs, n, generator=gen).argsort(dim=2)[..., :subset_size]
    subsets = torch.as_tensor(subsets, device=x.device).long()
    removed = _subset_masks(subsets, n).view(x.shape[0], -1, *x.shape[2:])
    fill = perturbation_baseline(x, baseline, blur_sigma)
    clean = _clean_scores(model, x, targets, region, batch_size, score)
    deltas = clean[:, None] - masked_scores(model, x, removed, fill, targets, region, batch_size, score)
    sums = flat.double().gather(1, subsets.flatten(1)).view(subsets.shape).sum(dim=2)
    return pearson_rows(sums, deltas).float()


def _chunks(flat: Tensor, features_in_step: int, descending: bool) -> tuple[Tensor, int]:
    """(B, N) chunk index of each location when sorted (stable) and cut into ``features_in_step``."""
    order = flat.argsort(dim=1, descending=descending, stable=True)
    n = flat.shape[1]
    chunk = torch.empty_like(order)
    chunk.scatter_(1, order, (torch.arange(n, device=flat.device) // features_in_step).expand_as(order))
    return chunk, math.ceil(n / features_in_step)


def faithfulness_estimate(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None, features_in_step: int = 1,
    baseline: str | float = "min", score: str = "logit", region: Region = None, batch_size: int = 64,
    blur_sigma: float = 5.0,
) -> Tensor:
    """Faithfulness estimate: Pearson r between each chunk's attribution sum and the score drop
    when that chunk alone (most relevant chunks first, ``features_in_step`` locations each) is
    replaced by the baseline. ceil(N / features_in_step) perturbed copies per image.

    Returns:
        (B,) r (higher is more faithful).
    """
    flat, targets, _, _ = prepare_perturbation(model, x, maps, targets, region)
    chunk, steps = _chunks(flat, features_in_step, descending=True)
    removed = (chunk[:, None, :] == torch.arange(steps, device=x.device)[None, :, None]).view(x.shape[0], steps, *x.shape[2:])
    fill = perturbation_baseline(x, baseline, blur_sigma)
    clean = _clean_scores(model, x, targets, region, batch_size, score)
    deltas = clean[:, None] - masked_scores(model, x, removed, fill, targets, region, batch_size, score)
    sums = torch.zeros(x.shape[0], steps, dtype=torch.float64, device=x.device).scatter_add_(1, chunk, flat.double())
    return pearson_rows(sums, deltas).float()


def monotonicity_arya(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None, features_in_step: int = 1,
    baseline: str | float = "min", score: str = "softmax", region: Region = None, batch_size: int = 64,
    blur_sigma: float = 5.0, return_curve: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Monotonicity (Arya et al. 2019): starting from the baseline image, reveal the input's
    locations least relevant first, ``features_in_step`` at a time; 1 if the target probability
    never decreases, else 0.

    Deliberate difference from Quantus 0.6 ``Monotonicity``: there the step re-applies the
    baseline to the baseline image (``perturb_func(arr=x_baseline)``), so nothing is ever
    revealed and every image scores True; here the input's values are revealed, as in the paper.

    Returns:
        (B,) float 0/1 (and the (B, T) curve with ``return_curve``).
    """
    flat, targets, _, _ = prepare_perturbation(model, x, maps, targets, region)
    chunk, steps = _chunks(flat, features_in_step, descending=False)
    revealed = (chunk[:, None, :] <= torch.arange(steps, device=x.device)[None, :, None]).view(x.shape[0], steps, *x.shape[2:])
    fill = perturbation_baseline(x, baseline, blur_sigma)
    curve = masked_scores(model, x, revealed, x, targets, region, batch_size, score, keep_from=fill)
    mono = (curve.diff(dim=1) >= 0).all(dim=1).float()
    return (mono, curve) if return_curve else mono


def monotonicity_nguyen(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None, features_in_step: int = 1,
    n_samples: int = 100, baseline: str | float = "uniform", score: str = "softmax", region: Region = None,
    batch_size: int = 64, eps: float = 1e-5, seed: int = 0, blur_sigma: float = 5.0,
) -> Tensor:
    """Monotonicity correlation (Nguyen & Martinez 2020): Spearman rho between each chunk's
    attribution sum (least relevant chunk first) and the variance of the target score when that
    chunk alone is perturbed, E[(f(x) - f(x~))^2] / f(x)^2 over ``n_samples`` draws.

    ``baseline="uniform"`` (Quantus' default) fills each perturbed location with U(0, 1) noise
    drawn from ``seed``; a deterministic baseline (``"min"``, a number, ...) needs one sample.

    Returns:
        (B,) rho (higher is more faithful).
    """
    flat, targets, _, _ = prepare_perturbation(model, x, maps, targets, region)
    chunk, steps = _chunks(flat, features_in_step, descending=False)
    removed = (chunk[:, None, :] == torch.arange(steps, device=x.device)[None, :, None]).view(x.shape[0], steps, *x.shape[2:])
    clean = _clean_scores(model, x, targets, region, batch_size, score)
    inv = torch.where(clean.abs() >= eps, 1 / clean.abs().clamp_min(1e-300), torch.ones_like(clean)) ** 2
    gen = torch.Generator().manual_seed(seed)
    stochastic = baseline == "uniform"
    total = torch.zeros(x.shape[0], steps, dtype=torch.float64, device=x.device)
    for _ in range(n_samples if stochastic else 1):
        fill = (torch.rand(x.shape, generator=gen).to(x) if stochastic else perturbation_baseline(x, baseline, blur_sigma))
        total += ((masked_scores(model, x, removed, fill, targets, region, batch_size, score) - clean[:, None]) ** 2).double()
    var = total / (n_samples if stochastic else 1) * inv[:, None].double()
    sums = torch.zeros(x.shape[0], steps, dtype=torch.float64, device=x.device).scatter_add_(1, chunk, flat.double())
    return spearman_rows(sums, var).float()


def sensitivity_n(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None, n: int = 16, n_runs: int = 50,
    baseline: str | float = "min", score: str = "logit", region: Region = None, batch_size: int = 64,
    seed: int = 0, blur_sigma: float = 5.0,
) -> Tensor:
    """Sensitivity-n (Ancona et al. 2018) at one subset size ``n``: Pearson r, over ``n_runs``
    random subsets of ``n`` locations, between the map's sum over the subset and the score drop
    when the subset is removed. (The quantity is :func:`faithfulness_correlation` at
    ``subset_size = n``; Quantus' ``SensitivityN`` sweeps n and reports a curve, and pools the
    correlation over images at each n -- here one value per image, at one n.)
    """
    return faithfulness_correlation(model, x, maps, targets, n_runs=n_runs, subset_size=n, baseline=baseline,
                                    score=score, region=region, batch_size=batch_size, seed=seed, blur_sigma=blur_sigma)


def patch_ids(spatial: tuple[int, ...], patch_size: int, device) -> tuple[Tensor, int]:
    """(N,) raster index of the patch (a grid of ``patch_size`` cubes, partial at the far border)
    holding each location, and the number of patches."""
    grid = [math.ceil(s / patch_size) for s in spatial]
    coords = torch.meshgrid(*(torch.arange(s, device=device) // patch_size for s in spatial), indexing="ij")
    ids = torch.zeros(spatial, dtype=torch.long, device=device)
    for c, g in zip(coords, grid):
        ids = ids * g + c
    return ids.flatten(), math.prod(grid)


def region_perturbation(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None, patch_size: int = 8,
    order: str = "morf", regions: int = 100, baseline: str | float = "min", score: str = "softmax",
    region: Region = None, batch_size: int = 64, blur_sigma: float = 5.0, seed: int = 0,
) -> Tensor:
    """Region perturbation (Samek et al., IEEE TNNLS 2017; Quantus ``RegionPerturbation``): the
    image is cut into ``patch_size`` squares (cubes in 3D), ranked by their attribution sum
    (``morf``, ``lerf`` or ``random``), and removed cumulatively; returns the drop
    f(x) - f(x_t) after each of the first ``regions`` removals.

    A partial patch at the far border is a smaller patch (Quantus pads the image to whole patches;
    the same result where the size is a multiple of ``patch_size``).

    Returns:
        (B, T) score drops, T = min(regions, patches); AOPC = ``.mean(dim=1)``.
    """
    flat, targets, _, _ = prepare_perturbation(model, x, maps, targets, region)
    ids, n_patches = patch_ids(tuple(x.shape[2:]), patch_size, x.device)
    sums = torch.zeros(x.shape[0], n_patches, dtype=torch.float64, device=x.device).index_add_(1, ids, flat.double())
    if order == "random":
        gen = torch.Generator().manual_seed(seed)
        ranked = torch.rand(x.shape[0], n_patches, generator=gen).argsort(dim=1).to(x.device)
    elif order in ("morf", "lerf"):
        ranked = sums.argsort(dim=1, descending=order == "morf", stable=True)
    else:
        raise MedlensError(f"order must be morf, lerf or random; got {order!r}")
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(n_patches, device=x.device).expand_as(ranked))
    steps = min(regions, n_patches)
    loc_rank = rank[:, ids]  # (B, N)
    removed = (loc_rank[:, None, :] <= torch.arange(steps, device=x.device)[None, :, None]).view(x.shape[0], steps, *x.shape[2:])
    fill = perturbation_baseline(x, baseline, blur_sigma)
    clean = _clean_scores(model, x, targets, region, batch_size, score)
    return (clean[:, None] - masked_scores(model, x, removed, fill, targets, region, batch_size, score)).float()


def selectivity(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None, patch_size: int = 8,
    baseline: str | float = "min", score: str = "softmax", region: Region = None, batch_size: int = 64,
    blur_sigma: float = 5.0,
) -> tuple[Tensor, Tensor]:
    """Selectivity (Montavon et al., DSP 2018; Quantus ``Selectivity``): the target score after
    removing every patch, most relevant first (patches as :func:`region_perturbation`).

    Returns:
        (curve (B, T) scores after each removal, auc (B,) trapezoidal area over unit spacing as
        Quantus' ``calculate_auc``; lower is better).
    """
    drops = region_perturbation(model, x, maps, targets, patch_size, "morf", 10**9, baseline, score, region,
                                batch_size, blur_sigma)
    flat, tg, _, _ = prepare_perturbation(model, x, maps, targets, region)
    clean = _clean_scores(model, x, tg, region, batch_size, score)
    curve = clean[:, None] - drops
    return curve, torch.trapezoid(curve.double(), dim=1).float()
