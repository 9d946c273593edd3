"""Faithfulness: does removing what the map calls important change the model's answer?

Every perturbed input is built as a batch on the model's device and scored in no-grad chunks,
so a curve costs its forward passes and little else. 2D (B, C, H, W) and 3D (B, C, D, H, W)
inputs alike; a segmentation network's scores are pooled over ``region`` (shared, or one
(B, 1, *S) mask per image that follows the image's perturbed copies).

- :func:`perturbation_curve`: deletion / insertion (Petsiuk et al., RISE, BMVC 2018), also known
  as pixel flipping (Bach et al. 2015) / region perturbation (Samek et al. 2017), most (MoRF) or
  least (LeRF) relevant first, baselines zero, min, mean or blur.
- :func:`road`: ROAD (Rong et al., ICML 2022), removal by noisy linear imputation in 2D and 3D.
- :func:`confidence_change`: average drop and increase in confidence (Chattopadhyay et al.,
  Grad-CAM++, WACV 2018).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.errors import MedlensError
from medlens.core.targets import SCORE_KINDS, Region, apply_score, pool_scores, region_rows

__all__ = [
    "Curve", "confidence_change", "gaussian_filter", "noisy_linear_imputation", "perturbation_curve",
    "road", "faithfulness_metrics",
]


@dataclass
class Curve:
    """A perturbation curve.

    Attributes:
        fractions: (T,) share of pixels perturbed (removed for deletion/ROAD, revealed for insertion).
        scores: (B, T) target score (logit or softmax probability) at each step.
        auc: (B,) trapezoidal area under ``scores`` over ``fractions`` (in [0, 1] on the x axis).
        kept: (B, T) bool, the prediction still equals the target (ROAD's accuracy).
        info: how the curve was made.
    """

    fractions: Tensor
    scores: Tensor
    auc: Tensor
    kept: Tensor
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------- helpers


def gaussian_filter(x: Tensor, sigma: float, truncate: float = 3.0) -> Tensor:
    """Separable Gaussian blur of (B, C, *S) over the spatial axes (2D or 3D), zero-free borders
    (reflect padding where the axis is long enough, replicate otherwise)."""
    nd = x.dim() - 2
    radius = max(1, int(truncate * sigma + 0.5))
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    conv = {2: F.conv2d, 3: F.conv3d}[nd]
    channels = x.shape[1]
    out = x
    for axis in range(nd):
        shape = [1, 1] + [1] * nd
        shape[2 + axis] = kernel.numel()
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = radius
        mode = "reflect" if out.shape[2 + axis] > radius else "replicate"
        out = conv(F.pad(out, pad, mode=mode), kernel.view(shape).expand(channels, *shape[1:]), groups=channels)
    return out


def perturbation_baseline(x: Tensor, baseline: str | float, blur_sigma: float) -> Tensor:
    if isinstance(baseline, (int, float)):
        return torch.full_like(x, float(baseline))
    spatial = tuple(range(2, x.dim()))
    if baseline in ("zero", "black0"):
        return torch.zeros_like(x)
    if baseline == "min":  # each image's minimum, as Quantus' "black"
        return x.amin(dim=(1, *spatial), keepdim=True).expand_as(x)
    if baseline == "mean":
        return x.mean(dim=spatial, keepdim=True).expand_as(x)
    if baseline == "blur":
        return gaussian_filter(x, blur_sigma)
    raise MedlensError(f"baseline {baseline!r} not understood: use zero, min, mean, blur or a number")


def prepare_perturbation(model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None, region: Region,
             need_logits: bool = False, clean_logits: Tensor | None = None) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """Check shapes; return maps (B, N) flattened, targets (B, 1), the number of classes and, when
    the targets are not given (or ``need_logits``), the clean logits (B, classes): ``clean_logits``
    when given (no forward pass), else computed here."""
    if x.dim() not in (4, 5):
        raise MedlensError(f"x must be (B, C, H, W) or (B, C, D, H, W); got {tuple(x.shape)}")
    maps = maps.detach().to(x.device)
    if maps.dim() == x.dim():
        if maps.shape[1] != 1:
            raise MedlensError(f"maps have {maps.shape[1]} maps per image; pass one map per image (B, *S)")
        maps = maps[:, 0]
    if tuple(maps.shape) != (x.shape[0], *x.shape[2:]):
        raise MedlensError(f"maps have shape {tuple(maps.shape)}; expected {(x.shape[0], *x.shape[2:])} to match x")
    logits = None
    if clean_logits is not None:
        if clean_logits.dim() != 2 or clean_logits.shape[0] != x.shape[0]:
            raise MedlensError(f"clean_logits have shape {tuple(clean_logits.shape)}; expected ({x.shape[0]}, classes)")
        logits = clean_logits.detach().to(x.device)
        n_classes = logits.shape[1]
    elif targets is None or need_logits:
        logits = all_class_logits(model, x, region, batch_size=max(1, x.shape[0]))
        n_classes = logits.shape[1]
    else:
        n_classes = _class_count(model, x, region)
    if targets is None:
        targets = logits.argmax(dim=1)
    targets = torch.as_tensor(targets, device=x.device).long().reshape(-1, 1)
    if targets.shape[0] == 1 and x.shape[0] > 1:
        targets = targets.expand(x.shape[0], 1)
    if bool(((targets < 0) | (targets >= n_classes)).any()):
        raise MedlensError(f"targets must be class indices in 0..{n_classes - 1}")
    return maps.flatten(1).float(), targets, n_classes, logits


def _class_count(model: nn.Module, x: Tensor, region: Region) -> int:
    """Number of classes, from a forward pass of one image."""
    with torch.no_grad():
        return pool_scores(model(x[:1]), x[:1], region_rows(region, x, torch.zeros(1, dtype=torch.long))).shape[1]


def all_class_logits(model: nn.Module, stack: Tensor, region: Region, batch_size: int) -> Tensor:
    """(b, classes) scores of every class for a stack of inputs, in no-grad chunks of ``batch_size``.
    ``region`` is shared by all inputs or, as a (b, 1, *S) tensor, one row per input."""
    per_row = isinstance(region, Tensor) and region.dim() == stack.dim() and region.shape[0] == stack.shape[0] > 1
    out = []
    with torch.no_grad():
        for start in range(0, stack.shape[0], batch_size):
            chunk = stack[start : start + batch_size]
            rows = region[start : start + batch_size] if per_row else region
            out.append(pool_scores(model(chunk), chunk, rows))
    return torch.cat(out)


def read_scores(logits: Tensor, targets: Tensor, score: str) -> tuple[Tensor, Tensor]:
    """Target score (logit or probability) and whether the prediction is still the target."""
    if score == "sigmoid":
        values = logits.sigmoid().gather(1, targets)
    elif score in ("softmax", "logit") or score in SCORE_KINDS:
        values = apply_score(logits, score).gather(1, targets)
    else:
        raise MedlensError(f"score must be 'logit', 'softmax' ('probability'), 'log-probability' or 'sigmoid'; got {score!r}")
    return values[:, 0], logits.argmax(dim=1) == targets[:, 0]


def _ranks(flat_maps: Tensor, order: str) -> Tensor:
    """(B, N) rank of each pixel, 0 = perturbed first. Ties broken by raster order (stable)."""
    if order not in ("morf", "lerf"):
        raise MedlensError(f"order must be 'morf' (most relevant first) or 'lerf' (least relevant first); got {order!r}")
    idx = flat_maps.argsort(dim=1, descending=order == "morf", stable=True)
    ranks = torch.empty_like(idx)
    return ranks.scatter_(1, idx, torch.arange(idx.shape[1], device=idx.device).expand_as(idx))


def _score_steps(
    model: nn.Module, x: Tensor, ranks: Tensor, counts: Tensor, fill, targets: Tensor, region: Region,
    batch_size: int, n_classes: int, score: str, reveal: bool = False, known: dict[int, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Score every image at every step. Step t perturbs the pixels with rank < counts[t]:
    ``fill(repeated (b*T, C, *S), removed (b*T, 1, *S) bool, first image index, T)`` returns the
    perturbed stack. ``known`` maps a step to logits already at hand, (B, classes) or (1, classes)
    for all images (the clean input, a constant baseline); those steps run no forward pass.
    Images are processed in groups so the stack holds about 4 forward batches."""
    known = known or {}
    todo = [t for t in range(counts.numel()) if t not in known]
    steps = len(todo)
    counts = counts[todo]
    per_group = max(1, (4 * batch_size) // max(1, steps))
    logit_parts = []
    for start in range(0, x.shape[0], per_group):
        xs, rk = x[start : start + per_group], ranks[start : start + per_group]
        if not steps:
            logit_parts.append(x.new_empty(xs.shape[0], 0, n_classes))
            continue
        removed = rk[:, None, :] < counts[None, :, None]  # (b, T, N)
        if reveal:
            removed = ~removed
        removed = removed.view(-1, 1, *x.shape[2:])
        stack = fill(xs.repeat_interleave(steps, dim=0), removed, start, steps)
        image = torch.arange(start, start + xs.shape[0], device=x.device).repeat_interleave(steps)
        logit_parts.append(all_class_logits(model, stack, region_rows(region, x, image), batch_size).view(xs.shape[0], steps, -1))
    logits = torch.cat(logit_parts)  # (B, todo, classes)
    if known:
        full = logits.new_empty(x.shape[0], len(todo) + len(known), logits.shape[2])
        full[:, todo] = logits
        for t, value in known.items():
            full[:, t] = value.to(full.dtype).expand(x.shape[0], -1)
        logits = full
    T = logits.shape[1]
    value, same = read_scores(logits.flatten(0, 1), targets.repeat_interleave(T, dim=0), score)
    return value.view(-1, T), same.view(-1, T)


# ---------------------------------------------------------------- deletion / insertion


def perturbation_curve(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    targets: Tensor | int | None = None,
    mode: str = "deletion",
    order: str = "morf",
    baseline: str | float = "zero",
    steps: int = 28,
    score: str = "softmax",
    region: Region = None,
    batch_size: int = 64,
    blur_sigma: float = 5.0,
    clean_logits: Tensor | None = None,
) -> Curve:
    """Deletion or insertion curve of the target score as pixels are perturbed in map order.

    Deletion: step t (t = 0..steps) replaces the floor(t N / steps) highest-ranked pixels (all
    channels of a pixel together) by the baseline. Insertion starts from the baseline and
    reveals pixels of ``x`` in the same order. A faithful map gives a low deletion AUC and a high
    insertion AUC with ``order="morf"``.

    Args:
        model: classifier (or segmentation network with ``region``).
        x: (B, C, *S) inputs on the model's device.
        maps: (B, *S) or (B, 1, *S) relevance maps (higher = more relevant).
        targets: (B,) classes, an int, or None for the model's prediction on ``x``.
        mode: ``"deletion"`` or ``"insertion"``.
        order: ``"morf"`` (most relevant first) or ``"lerf"`` (least relevant first).
        baseline: ``"zero"``, ``"min"`` (each image's minimum, Quantus' "black"), ``"mean"`` (per image and channel),
            ``"blur"`` (Gaussian, ``blur_sigma`` px; RISE's insertion baseline) or a number.
        steps: number of perturbation steps; the curve has steps + 1 points.
        score: ``"softmax"`` probability (as Quantus and RISE), ``"logit"`` or ``"sigmoid"``.
        batch_size: forward-pass chunk size.
        clean_logits: (B, classes) the model's scores on ``x`` when already computed (e.g. by the
            explanation's forward pass); the step showing ``x`` unperturbed then costs nothing.

    Steps whose input does not depend on the map run no forward pass of their own: the clean
    input (its logits from ``clean_logits`` or from the prediction when ``targets`` is None) and,
    with a constant baseline (``"zero"`` or a number), the all-baseline input, scored once for the
    whole batch. So ``steps`` = 8 costs 7 forward passes per image, not 9.

    Returns:
        :class:`Curve` with fractions (steps + 1,), scores (B, steps + 1) and auc (B,).
    """
    if mode not in ("deletion", "insertion"):
        raise MedlensError(f"mode must be 'deletion' or 'insertion'; got {mode!r}")
    if steps < 1:
        raise MedlensError(f"steps must be at least 1; got {steps}")
    flat, targets, n_classes, logits = prepare_perturbation(model, x, maps, targets, region, clean_logits=clean_logits)
    n = flat.shape[1]
    counts = torch.div(torch.arange(steps + 1, device=x.device) * n, steps, rounding_mode="floor")
    base = perturbation_baseline(x, baseline, blur_sigma)
    clean, bare = (0, steps) if mode == "deletion" else (steps, 0)  # the steps showing x itself, the baseline alone
    known = {clean: logits} if logits is not None else {}
    if isinstance(baseline, (int, float)) or baseline in ("zero", "black0"):
        if not (isinstance(region, Tensor) and region.dim() == x.dim() and region.shape[0] > 1):  # one image for all
            known[bare] = all_class_logits(model, base[:1], region, 1)

    def fill(repeated: Tensor, removed: Tensor, start: int, per: int) -> Tensor:
        b = repeated.shape[0] // per
        return torch.where(removed, base[start : start + b].repeat_interleave(per, dim=0), repeated)

    scores, kept = _score_steps(model, x, _ranks(flat, order), counts, fill, targets, region, batch_size,
                                n_classes, score, reveal=mode == "insertion", known=known)
    fractions = counts.double() / n
    auc = torch.trapezoid(scores.double(), fractions, dim=1).float()
    return Curve(fractions.float(), scores, auc, kept, {"mode": mode, "order": order, "baseline": baseline, "score": score})


# ---------------------------------------------------------------- ROAD


def _neighbour_mean(v: Tensor) -> Tensor:
    """ROAD's neighbour weighting of (B, C, *S), zero outside the image, generalised to nd dims:
    the separable [1, 2, 1] filter on every axis minus the centre, divided by 4^nd - 2^nd, i.e.
    weight proportional to 2^-(nonzero offsets - 1), summing to 1. In 2D this is Rong et al.'s 1/6
    for the 4 face neighbours and 1/12 for the diagonals; in 3D faces 1/14, edges 1/28, corners 1/56.
    Shifted sums instead of a convolution: much faster for one-channel stacks on a CPU."""
    nd = v.dim() - 2
    out = v
    for axis in range(2, v.dim()):
        pad = [0, 0] * nd
        pad[2 * (v.dim() - 1 - axis)] = pad[2 * (v.dim() - 1 - axis) + 1] = 1
        padded = F.pad(out, pad)
        n = out.shape[axis]
        out = padded.narrow(axis, 0, n) + 2 * out + padded.narrow(axis, 2, n)
    return (out - 2**nd * v) / (4**nd - 2**nd)


def _initial_guess(x: Tensor, unknown: Tensor, levels: int = 3) -> Tensor:
    """A start for the solver: the imputation of a half-resolution copy (recursively), upsampled,
    so the conjugate gradients only have to fix fine detail; at the coarsest level the mean of
    the kept pixels."""
    spatial = tuple(range(2, x.dim()))
    kept = 1 - unknown
    if levels == 0 or min(x.shape[2:]) < 16:
        mean = (x * kept).sum(spatial, keepdim=True) / kept.sum(spatial, keepdim=True).clamp_min(1)
        return mean.expand_as(x)
    pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[x.dim() - 2]
    kept_small = pool(kept, 2, ceil_mode=True)
    x_small = pool(x * kept, 2, ceil_mode=True) / kept_small.clamp_min(1e-6)
    unknown_small = (kept_small < 0.5).to(x.dtype)
    coarse = _solve(x_small, unknown_small, _initial_guess(x_small, unknown_small, levels - 1), tol=1e-3, max_iter=100)
    mode = {2: "bilinear", 3: "trilinear"}[x.dim() - 2]
    return F.interpolate(coarse, size=x.shape[2:], mode=mode, align_corners=False)


def _solve(x: Tensor, unknown: Tensor, start: Tensor, tol: float, max_iter: int) -> Tensor:
    """Conjugate gradients for S_p v_p - sum_{q unknown} w_pq v_q = sum_{q kept} w_pq x_q on the
    unknown pixels, all images and channels at once (matrix-free)."""
    spatial = tuple(range(2, x.dim()))
    degree = _neighbour_mean(torch.ones_like(x[:1, :1]))  # S_p: fewer neighbours at borders
    known = x * (1 - unknown)
    rhs = unknown * _neighbour_mean(known)

    def apply(v: Tensor) -> Tensor:
        return unknown * (degree * v - _neighbour_mean(unknown * v))

    v = unknown * start
    r = rhs - apply(v)
    p = r.clone()
    rs = (r * r).sum(spatial, keepdim=True)
    target = (tol**2) * (rhs * rhs).sum(spatial, keepdim=True).clamp_min(1e-30)
    for it in range(max_iter):
        ap = apply(p)
        alpha = rs / (p * ap).sum(spatial, keepdim=True).clamp_min(1e-30)
        v = v + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(spatial, keepdim=True)
        if it % 5 == 4 and bool((rs_new <= target).all()):
            break
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return known + unknown * v


def noisy_linear_imputation(
    x: Tensor, removed: Tensor, noise: float = 0.01, max_iter: int = 300, tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ROAD's noisy linear imputation (Rong et al., ICML 2022), batched in torch, 2D and 3D.

    Each removed pixel p takes the weighted mean of its (in-image) neighbours q,
    S_p x_p - sum_{q removed} w_pq x_q = sum_{q kept} w_pq x_q with S_p = sum_q w_pq,
    the same sparse system Quantus solves with ``scipy.sparse.linalg.spsolve`` one image at a time.
    The system is symmetric positive definite (a Dirichlet Laplacian) wherever a removed region
    touches a kept pixel, so all images and channels are solved together by conjugate gradients
    with matrix-free shifted sums (:func:`_neighbour_mean`), started from the solution of a
    half-resolution copy (three levels, a cheap multigrid-like start) and stopped at relative
    residual ``tol``. Then ``noise * N(0, 1)`` is added to the imputed pixels.

    Args:
        x: (B, C, *S) images.
        removed: (B, 1, *S) or (B, *S) bool, True where the pixel is imputed.
        noise: std of the Gaussian noise added to imputed pixels (ROAD: 0.01).
        tol: relative residual at which to stop; 1e-3 leaves errors well below ROAD's noise.

    Returns:
        (B, C, *S) images with the removed pixels imputed.
    """
    nd = x.dim() - 2
    if removed.dim() == nd + 1:
        removed = removed[:, None]
    unknown = removed.to(x.dtype).expand_as(x)
    filled = _solve(x, unknown, _initial_guess(x, unknown), tol, max_iter)
    if noise:
        where = x.device if generator is None else generator.device
        filled = filled + unknown * noise * torch.randn(x.shape, generator=generator, device=where, dtype=x.dtype).to(x.device)
    return filled


def road(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    targets: Tensor | int | None = None,
    percentages: Sequence[float] = tuple(range(10, 100, 10)),
    order: str = "morf",
    noise: float = 0.01,
    score: str = "softmax",
    region: Region = None,
    batch_size: int = 64,
    seed: int | None = 0,
    tol: float = 1e-3,
) -> Curve:
    """ROAD: RemOve And Debias (Rong et al., ICML 2022), without retraining.

    For each percentage p the int(p/100 N) highest-ranked pixels (``order="morf"``; lowest with
    ``"lerf"``) are removed and filled by :func:`noisy_linear_imputation`, which leaks far less of
    the removed shape than a constant baseline. Scored like :func:`perturbation_curve`; ``kept``
    is ROAD's (and Quantus') accuracy: the prediction is still the target. 2D and 3D.

    Returns:
        :class:`Curve` with fractions (P,) = p / 100, scores (B, P), kept (B, P) and auc (B,).
    """
    flat, targets, n_classes, _ = prepare_perturbation(model, x, maps, targets, region)
    n = flat.shape[1]
    counts = torch.tensor([int(n * float(p) / 100) for p in percentages], device=x.device)
    generator = None if seed is None else torch.Generator(device=x.device).manual_seed(seed)

    def fill(repeated: Tensor, removed: Tensor, start: int, per: int) -> Tensor:
        return noisy_linear_imputation(repeated, removed, noise=noise, tol=tol, generator=generator)

    scores, kept = _score_steps(model, x, _ranks(flat, order), counts, fill, targets, region, batch_size,
                                n_classes, score)
    fractions = counts.double() / n
    auc = torch.trapezoid(scores.double(), fractions, dim=1).float() if len(percentages) > 1 else scores[:, 0]
    return Curve(fractions.float(), scores, auc, kept, {"order": order, "noise": noise, "score": score})


# ---------------------------------------------------------------- confidence


def confidence_change(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None,
    region: Region = None, batch_size: int = 64,
) -> dict[str, Tensor]:
    """Average drop and increase in confidence (Chattopadhyay et al., Grad-CAM++, WACV 2018).

    With Y the softmax probability of the target on x and O the probability on the explanation
    map used as a mask, ``x * map`` (map in [0, 1]):
    ``drop = max(0, Y - O) / Y`` (the paper's "average drop %" is 100 x its mean) and
    ``increase = 1[O > Y]`` (the paper's "% increase in confidence" is 100 x its mean).

    Returns:
        {"average_drop": (B,), "increase_in_confidence": (B,)} per image.
    """
    flat, targets, n_classes, logits = prepare_perturbation(model, x, maps, targets, region, need_logits=True)
    masks = flat.clamp(0, 1).view(x.shape[0], 1, *x.shape[2:])
    masked = all_class_logits(model, x * masks, region, batch_size)
    clean, _ = read_scores(logits, targets, "softmax")
    kept, _ = read_scores(masked, targets, "softmax")
    drop = (clean - kept).clamp_min(0) / clean.clamp_min(1e-12)
    return {"average_drop": drop, "increase_in_confidence": (kept > clean).float()}


def faithfulness_metrics(
    model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor | int | None = None,
    steps: int = 20, baseline: str | float = "zero", road_percentages: Sequence[float] = (10, 30, 50, 70, 90),
    region: Region = None, batch_size: int = 64, with_road: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Curve]]:
    """The faithfulness columns of ``medlens evaluate`` for one batch: deletion and insertion AUC
    (MoRF, ``baseline`` for deletion and blur for insertion), ROAD MoRF/LeRF AUC and their
    difference (LeRF - MoRF, higher = more faithful), average drop and increase in confidence.

    Returns:
        ({column: (B,)}, {"deletion": Curve, "insertion": Curve, ...}).
    """
    clean = all_class_logits(model, x, region, batch_size)  # the unperturbed step of both curves, scored once
    curves = {
        "deletion": perturbation_curve(model, x, maps, targets, "deletion", "morf", baseline, steps, region=region,
                                       batch_size=batch_size, clean_logits=clean),
        "insertion": perturbation_curve(model, x, maps, targets, "insertion", "morf", "blur", steps, region=region,
                                        batch_size=batch_size, clean_logits=clean),
    }
    cols = {"deletion_auc": curves["deletion"].auc, "insertion_auc": curves["insertion"].auc}
    if with_road:
        curves["road_morf"] = road(model, x, maps, targets, road_percentages, "morf", region=region, batch_size=batch_size)
        curves["road_lerf"] = road(model, x, maps, targets, road_percentages, "lerf", region=region, batch_size=batch_size)
        cols["road_morf_auc"] = curves["road_morf"].auc
        cols["road_lerf_auc"] = curves["road_lerf"].auc
        cols["road_gap"] = curves["road_lerf"].auc - curves["road_morf"].auc
    cols.update(confidence_change(model, x, maps, targets, region, batch_size))
    return cols, curves
