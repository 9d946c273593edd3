"""The rest of Quantus' faithfulness catalogue, batched torch, on (B, *S) maps in 2D and 3D.

- :func:`infidelity` (Yeh et al., NeurIPS 2019; Quantus ``Infidelity``): squared gap between the
  map's prediction of a score drop, sum a * (x - x~), and the drop itself, over cumulative patch
  removals.
- :func:`irof` (Rieger & Hansen 2020; Quantus ``IROF``): area over the curve of the relative
  target score while superpixels are removed, most relevant (mean attribution) first.
- :func:`sufficiency` (Dasgupta et al., ICML 2022; Quantus ``Sufficiency``): among the other images
  whose explanation lies within a distance threshold, the share predicted as the same class.

As in :mod:`medlens.metrics.faithfulness_extra`, a perturbation replaces every channel of a
location and all perturbed copies of all images are scored in no-grad chunks on the model's device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from medlens.core.targets import Region
from medlens.errors import MedlensError
from medlens.metrics.faithfulness import all_class_logits, perturbation_baseline, prepare_perturbation, read_scores
from medlens.metrics.faithfulness_extra import patch_ids, masked_scores

__all__ = ["agreement_share", "infidelity", "irof", "slic_segments", "sufficiency"]


def _clean(model: nn.Module, x: Tensor, targets: Tensor, region: Region, batch_size: int, score: str) -> Tensor:
    return read_scores(all_class_logits(model, x, region, batch_size), targets, score)[0]


def infidelity(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None, patch_sizes: tuple[int, ...] = (4,),
    baseline: str | float = "min", score: str = "logit", region: Region = None, batch_size: int = 64,
    blur_sigma: float = 5.0,
) -> Tensor:
    """Infidelity with cumulative patch removal, as Quantus 0.6 implements it: the image is cut
    into ``patch`` squares (cubes in 3D) visited in raster order; after each removal t,
    I_t = x - x_t, and the score is mean_t (sum(a * I_t) - (f(x) - f(x_t)))^2, averaged over
    ``patch_sizes``. Partial patches at the far border are smaller patches (Quantus requires the
    size to be a multiple of the patch). Quantus' ``n_perturb_samples`` repeats the very same
    deterministic removal, so it is not needed here.

    Args:
        x: (B, C, *S); maps: (B, *S) (a map value weighs every channel of its location).
        baseline: the fill (``"min"`` = Quantus' ``"black"``, ``"zero"``, ``"mean"``, ``"blur"`` or
            a number); logits by default, as Quantus.

    Returns:
        (B,) float (lower is more faithful). ceil(S / patch)^d forwards per image and patch size.
    """
    flat, targets, _, _ = prepare_perturbation(model, x, maps, targets, region)
    fill = perturbation_baseline(x, baseline, blur_sigma)
    clean = _clean(model, x, targets, region, batch_size, score)
    weighted = (flat.double() * (x - fill).double().sum(dim=1).flatten(1))  # (B, N): a * sum_c (x - fill)
    out = []
    for patch in patch_sizes:
        if patch < 1:
            raise MedlensError(f"patch sizes must be positive; got {patch}")
        ids, n_patches = patch_ids(tuple(x.shape[2:]), patch, x.device)
        steps = torch.arange(n_patches, device=x.device)
        removed = (ids[None, None, :] <= steps[None, :, None]).expand(x.shape[0], -1, -1)
        removed = removed.reshape(x.shape[0], n_patches, *x.shape[2:])
        drops = clean[:, None].double() - masked_scores(model, x, removed, fill, targets, region, batch_size, score).double()
        per_patch = torch.zeros(x.shape[0], n_patches, dtype=torch.float64, device=x.device).index_add_(1, ids, weighted)
        out.append(((drops - per_patch.cumsum(dim=1)) ** 2).mean(dim=1))
    return torch.stack(out).mean(dim=0).float()


def slic_segments(x: Tensor, n_segments: int = 100, compactness: float = 10.0) -> Tensor:
    """SLIC superpixels (Achanta et al., TPAMI 2012) of each image, as Quantus' IROF makes them
    (``skimage.segmentation.slic`` on the channel-last image as float64, labels from 0), 2D or 3D.
    This runs on the host, image by image (skimage); pass ``segments`` to :func:`irof` to reuse them.

    Returns:
        (B, *S) long labels on x's device.
    """
    from skimage.segmentation import slic

    host = x.detach().double().cpu().numpy()
    labels = [slic(np.moveaxis(img, 0, -1), n_segments=n_segments, compactness=compactness, start_label=0)
              for img in host]
    return torch.from_numpy(np.stack(labels)).long().to(x.device)


def _segment_ranks(flat: Tensor, segments: Tensor) -> tuple[Tensor, Tensor]:
    """Per location, the rank (0 = highest mean attribution) of its segment within its image,
    and each image's number of segments. segments: (B, N) any integer labels."""
    b, n = flat.shape
    key = segments.long() + torch.arange(b, device=flat.device)[:, None] * (int(segments.max()) + 1)
    uniq, inverse = torch.unique(key, return_inverse=True)  # global segment ids, sorted by image
    image = torch.div(uniq, int(segments.max()) + 1, rounding_mode="floor")
    counts = torch.bincount(image, minlength=b)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64, device=flat.device).index_add_(0, inverse.flatten(), flat.double().flatten())
    sizes = torch.bincount(inverse.flatten(), minlength=uniq.numel()).double()
    means = sums / sizes
    # order segments by (image, -mean); stable so equal means keep label order
    order = torch.argsort(-means, stable=True)
    order = order[torch.argsort(image[order], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(uniq.numel(), device=flat.device) - starts[image[order]]
    return rank[inverse], counts


def irof(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None, segments: Tensor | None = None,
    n_segments: int = 100, baseline: str | float = "mean", score: str = "softmax", region: Region = None,
    batch_size: int = 64, blur_sigma: float = 5.0, return_curve: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Iterative removal of features: segments are removed cumulatively, highest mean attribution
    first; the curve is f(x_t) / f(x) after each removal, the score K - trapz(curve) (unit
    spacing, K segments: the area over the curve).

    Differences from Quantus 0.6 ``IROF`` (deliberate): string baselines are per image and from the
    clean image (Quantus' ``baseline_replacement_by_mask`` takes the min / mean over the whole batch,
    recomputed from the already-perturbed batch at each step); images with fewer segments than the
    batch's largest are scored over their own K steps (Quantus pads their curve with zeros).
    Both agree exactly per image with a numeric or ``"min"`` baseline.

    Args:
        segments: (B, *S) integer labels; default :func:`slic_segments` with ``n_segments``.
        score: ``"softmax"`` (the paper's class probability) or ``"logit"`` (Quantus' default).

    Returns:
        (B,) AOC (higher is more faithful); with ``return_curve`` also the (B, K_max) curve
        (NaN past an image's own K).
    """
    flat, targets, _, _ = prepare_perturbation(model, x, maps, targets, region)
    if segments is None:
        segments = slic_segments(x, n_segments)
    segments = torch.as_tensor(segments, device=x.device)
    if tuple(segments.shape) != (x.shape[0], *x.shape[2:]):
        raise MedlensError(f"segments have shape {tuple(segments.shape)}; expected {(x.shape[0], *x.shape[2:])}")
    rank, counts = _segment_ranks(flat, segments.flatten(1))
    k_max = int(counts.max())
    steps = torch.arange(k_max, device=x.device)
    removed = (rank[:, None, :] <= steps[None, :, None]).view(x.shape[0], k_max, *x.shape[2:])
    fill = perturbation_baseline(x, baseline, blur_sigma)
    clean = _clean(model, x, targets, region, batch_size, score).double()
    curve = masked_scores(model, x, removed, fill, targets, region, batch_size, score).double() / clean[:, None]
    valid = steps[None, :] < counts[:, None]
    inner = torch.where(valid[:, 1:], (curve[:, 1:] + curve[:, :-1]) / 2, torch.zeros_like(curve[:, 1:]))
    aoc = counts.double() - inner.sum(dim=1)
    aoc = aoc.float()
    if return_curve:
        return aoc, torch.where(valid, curve, torch.full_like(curve, float("nan"))).float()
    return aoc


def sufficiency(maps: Tensor, predictions: Tensor, threshold: float = 0.6, distance: str = "seuclidean") -> Tensor:
    """Sufficiency (Dasgupta et al. 2022) within a batch: the pairwise distances between the
    flattened maps are divided by their largest value; an image's explanation *applies* to every
    other image within ``threshold``; the score is the share of those predicted as the same class
    (0 when none is close).

    ``"seuclidean"`` (Quantus' default) standardises each location by its sample variance over the
    batch. A location constant over the batch is left out (a deliberate difference: scipy's
    ``cdist`` makes every distance NaN there, so Quantus scores 0 for all images).

    Args:
        maps: (B, *S); predictions: (B,) predicted classes.
        distance: ``"seuclidean"`` or ``"euclidean"``.

    Returns:
        (B,) in [0, 1] (higher: explanations are sufficient for the prediction).
    """
    flat = maps.flatten(1).double()
    if flat.shape[0] < 2:
        raise MedlensError("sufficiency compares images with each other: it needs a batch of at least two")
    if distance == "seuclidean":
        var = flat.var(dim=0, unbiased=True)
        keep = var > 0
        flat = flat[:, keep] / var[keep].sqrt()
    elif distance != "euclidean":
        raise MedlensError(f"distance must be 'seuclidean' or 'euclidean'; got {distance!r}")
    dist = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    top = dist.abs().max()
    dist = dist / top if top > 0 else dist
    return agreement_share(dist <= threshold, predictions)


def agreement_share(close: Tensor, predictions: Tensor) -> Tensor:
    """Share of the other images marked ``close`` (B, B) that share the image's prediction; 0 if none."""
    b = close.shape[0]
    close = close & ~torch.eye(b, dtype=torch.bool, device=close.device)
    preds = torch.as_tensor(predictions, device=close.device).view(-1)
    same = preds[None, :] == preds[:, None]
    n = close.sum(dim=1)
    return torch.where(n > 0, (close & same).sum(dim=1).double() / n.clamp_min(1), torch.zeros(b, dtype=torch.float64,
                                                                                              device=close.device)).float()
