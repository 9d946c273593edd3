"""Surrogate-model attributions over regions: Kernel SHAP (Lundberg & Lee, NeurIPS 2017) and
LIME (Ribeiro, Singh & Guestrin, KDD 2016), as Captum's ``KernelShap`` / ``Lime`` with a
``feature_mask``.

An image is split into F regions (:class:`medlens.methods.ablation.SegmentMethod`: SLIC
superpixels in 2D or supervoxels in 3D (Achanta et al., TPAMI 2012), a grid of patches / cubes,
or a user segmentation). A coalition z in {0, 1}^F keeps the regions with z_j = 1 and sets the
others to the baseline; the model's target scores on ``samples`` coalitions per image are fitted
by a weighted linear model g(z) = phi_0 + sum_j phi_j z_j and each region's map value is its
coefficient phi_j.

* Kernel SHAP: the coalitions are the full and the empty one (weight 1e6, which pins
  g(1) = f(x) and g(0) = f(baseline), so sum_j phi_j = f(x) - f(baseline)), then coalitions whose
  size k is drawn with p(k) ~ (F - 1) / (k (F - k)) and whose members are uniform given k (weight
  1: sampling from the Shapley kernel, as Captum). When ``samples`` >= 2^F every coalition is used
  once, weighted by the Shapley kernel (F - 1) / (C(F, k) k (F - k)): the solution is then the
  exact Shapley value of each region. Unregularised least squares.
* LIME: every region kept with probability 1/2; weights exp(-d^2 / (2 kernel_width^2)) with d
  the cosine (or Euclidean) distance between the perturbed and the original input (Captum's
  default kernel); ridge regression with penalty ``alpha`` on the coefficients (not the intercept,
  as scikit-learn's ``Ridge``).

All B x samples perturbed inputs are built chunk by chunk and scored in no-grad chunks of
``batch_size`` across images; the weighted normal equations of all images and targets are one
batched float64 solve on the model's device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from medlens.core.engine import Context, register, score_batches
from medlens.core.options import check_choice, require
from medlens.core.targets import region_rows
from medlens.errors import MedlensError
from medlens.methods.ablation import SegmentMethod, segments_for

__all__ = ["KernelSHAP", "LIME", "SurrogateMethod", "consecutive_regions", "shapley_kernel_coalitions",
           "lime_coalitions", "weighted_linear_fit"]

#: weight of the full and the empty coalition in Kernel SHAP (Captum's ``inf_weight``)
EXTREME_WEIGHT = 1e6


def consecutive_regions(seg: Tensor) -> tuple[Tensor, Tensor]:
    """Relabel (B, *S) integer segments to 0..F_i-1 per image (in sorted label order).

    Returns (labels (B, N) long over the flattened N = prod(S) locations, counts (B,) long F_i).
    """
    b = seg.shape[0]
    flat = seg.reshape(b, -1).long()
    flat = flat - flat.min()
    span = int(flat.max()) + 1
    keys = flat + torch.arange(b, device=flat.device)[:, None] * span
    uniq, inverse = torch.unique(keys, return_inverse=True)
    counts = torch.bincount(uniq // span, minlength=b)
    offset = counts.cumsum(0) - counts
    return inverse - offset[:, None], counts


def region_valid(counts: Tensor, width: int) -> Tensor:
    """(B, width) bool: column j is a real region of image i (j < F_i)."""
    return torch.arange(width, device=counts.device)[None] < counts[:, None]


def shapley_kernel_coalitions(counts: Tensor, samples: int, generator: torch.Generator) -> Tensor:
    """(B, samples, F_max) bool coalitions drawn from the Shapley kernel (Captum's KernelShap
    sampler): row 0 full, row 1 empty, then per row a size k ~ (F_i - 1) / (k (F_i - k)),
    1 <= k < F_i, and k regions uniform among the F_i (smallest k of uniform keys). On the CPU
    generator's device; padded columns (j >= F_i) are False."""
    b, width = counts.shape[0], int(counts.max())
    counts = counts.cpu()
    k = torch.arange(width + 1, dtype=torch.float64)
    f = counts[:, None].double()
    probs = torch.where((k >= 1) & (k < f), 1.0 / (k * (f - k)).clamp_min(1e-12), torch.zeros(()))
    probs[:, 0] = (counts < 2).double()  # one region: the empty coalition (an extreme) only
    drawn = max(samples - 2, 0)
    sizes = torch.multinomial(probs, drawn, replacement=True, generator=generator) if drawn else torch.zeros(b, 0, dtype=torch.long)
    keys = torch.rand(b, drawn, width, generator=generator, dtype=torch.float64)
    keys = keys.masked_fill(~region_valid(counts, width)[:, None], 2.0)
    rank = keys.argsort(-1).argsort(-1)
    picked = rank < sizes[..., None]
    ends = torch.stack([region_valid(counts, width), torch.zeros(b, width, dtype=torch.bool)], 1)
    return torch.cat([ends, picked], 1)[:, :samples]


def all_coalitions(width: int, batch: int) -> Tensor:
    """(batch, 2^width, width) bool: every coalition, in binary order."""
    codes = torch.arange(2**width)
    bits = (codes[:, None] >> torch.arange(width)[None]) & 1
    return bits.bool()[None].expand(batch, -1, -1)


def lime_coalitions(counts: Tensor, samples: int, generator: torch.Generator) -> Tensor:
    """(B, samples, F_max) bool: every region kept with probability 1/2 (Captum's Lime sampler)."""
    width = int(counts.max())
    keep = torch.rand(counts.shape[0], samples, width, generator=generator) < 0.5
    return keep & region_valid(counts.cpu(), width)[:, None]


def shapley_kernel_weights(z: Tensor, counts: Tensor, exhaustive: bool) -> Tensor:
    """(B, n) weights: 1e6 for a full or empty coalition; otherwise the Shapley kernel
    (F - 1) / (C(F, k) k (F - k)) when every coalition is enumerated, else 1 (drawn from it)."""
    k = z.sum(-1).double()
    f = counts[:, None].double()
    extreme = (k == 0) | (k == f)
    if not exhaustive:
        return torch.where(extreme, EXTREME_WEIGHT, 1.0)
    log_choose = torch.lgamma(f + 1) - torch.lgamma(k + 1) - torch.lgamma(f - k + 1)
    kernel = (f - 1) / (torch.exp(log_choose) * (k * (f - k)).clamp_min(1.0))
    return torch.where(extreme, EXTREME_WEIGHT, kernel)


def weighted_linear_fit(z: Tensor, y: Tensor, w: Tensor, alpha: float, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted (ridge) least squares per image: min sum_r w_r (y_r - c - z_r . phi)^2 + alpha |phi|^2.

    Args:
        z: (B, n, F) coalitions; y: (B, n, K) scores; w: (B, n) weights; valid: (B, F) real regions
        (padded columns are held at 0).
    Returns:
        coefficients (B, K, F) and intercepts (B, K), float64. One batched solve of the normal
        equations (pseudo-inverse, so an unregularised under-determined fit is the minimum-norm one).
    """
    b, n, f = z.shape
    design = torch.cat([z.double() * valid[:, None], z.new_ones(b, n, 1, dtype=torch.float64)], -1)
    weighted = design * w.double()[..., None]
    gram = weighted.mT @ design
    penalty = torch.cat([torch.where(valid, float(alpha), 1.0).double(), gram.new_zeros(b, 1)], 1)
    theta = torch.linalg.pinv(gram + torch.diag_embed(penalty), hermitian=True) @ (weighted.mT @ y.double())
    return theta[:, :-1].mT, theta[:, -1]


class SurrogateMethod(SegmentMethod):
    """A weighted linear surrogate over regions (Kernel SHAP, LIME): subclasses draw the
    coalitions (:meth:`draw`) and weigh them (:meth:`weigh`); ``alpha`` is the ridge penalty.

    Options (besides the segment ones): samples (int), seed (int, 0), coalitions (None, or a
    (n, F) / (B, n, F) 0/1 tensor used instead of drawing, e.g. to share another library's draws).
    """

    samples: int = 200
    seed: int = 0
    coalitions: Any = None

    def validate(self) -> None:
        super().validate()
        require(self.samples >= 1, self.name, "samples", self.samples, "must be >= 1")
        if self.coalitions is not None:
            ok = isinstance(self.coalitions, Tensor) and self.coalitions.dim() in (2, 3) and bool(
                ((self.coalitions == 0) | (self.coalitions == 1)).all())
            require(ok, self.name, "coalitions", type(self.coalitions).__name__,
                    "must be a 0/1 tensor of shape (n, F) or (B, n, F)")

    def draw(self, counts: Tensor, generator: torch.Generator) -> tuple[Tensor, bool]:
        """(B, n, F_max) bool coalitions, and whether they enumerate all 2^F."""
        raise NotImplementedError

    def weigh(self, z: Tensor, counts: Tensor, exhaustive: bool, x: Tensor, labels: Tensor) -> Tensor:
        """(B, n) sample weights."""
        raise NotImplementedError

    def ridge(self) -> float:
        """The ridge penalty on the coefficients (0: least squares)."""
        return 0.0

    def _coalitions(self, counts: Tensor, device: torch.device) -> tuple[Tensor, bool]:
        width = int(counts.max())
        given = self.coalitions
        if given is None:
            z, exhaustive = self.draw(counts, torch.Generator().manual_seed(self.seed))
            return z.to(device), exhaustive
        given = given.to(device).bool()
        if given.dim() == 2:
            given = given[None].expand(counts.shape[0], -1, -1)
        if given.shape[0] != counts.shape[0] or given.shape[2] != width:
            raise MedlensError(f"{self.name}: coalitions of shape {tuple(given.shape)} do not match "
                               f"{counts.shape[0]} image(s) with at most {width} regions")
        return given & region_valid(counts, width)[:, None], False

    def _scores(self, ctx: Context, z: Tensor, labels: Tensor) -> Tensor:
        """(B, n, K) target scores of the perturbed inputs, chunks of ``batch_size`` across images."""
        x = ctx.x
        b, n, width = z.shape
        flat_z = z.reshape(b * n, width)
        base = torch.tensor(self.baseline, dtype=x.dtype, device=x.device)
        out = []
        for rows in torch.arange(b * n, device=x.device).split(self.batch_size):
            image = rows // n
            keep = flat_z[rows].gather(1, labels[image]).view(rows.shape[0], 1, *x.shape[2:])
            stack = torch.where(keep, x[image], base)
            out.append(score_batches(ctx.model, stack, ctx.targets[image], region_rows(ctx.region, x, image), self.batch_size))
        return torch.cat(out).view(b, n, -1)

    def compute(self, ctx: Context) -> Tensor:
        """(B, K, *S) maps: each location gets its region's surrogate coefficient; the (B, K, F_max)
        coefficients and (B, K) intercepts go to ``ctx.info`` (padded regions j >= F_i are 0)."""
        x = ctx.x
        labels, counts = consecutive_regions(segments_for(x, self.options))
        z, exhaustive = self._coalitions(counts, x.device)
        weights = self.weigh(z, counts, exhaustive, x, labels)
        scores = self._scores(ctx, z, labels)
        valid = region_valid(counts, z.shape[2])
        coef, intercept = weighted_linear_fit(z, scores, weights, self.ridge(), valid)
        coef = coef.to(x.dtype)
        ctx.info["coefficients"] = coef
        ctx.info["intercept"] = intercept.to(x.dtype)
        k = coef.shape[1]
        return coef.gather(2, labels[:, None].expand(-1, k, -1)).view(x.shape[0], k, *x.shape[2:])


@register
class KernelSHAP(SurrogateMethod):
    """Kernel SHAP over regions (Lundberg & Lee, NeurIPS 2017; Captum ``KernelShap`` with a
    ``feature_mask``): Shapley values of the regions as the weighted least-squares fit of the
    target score on coalitions drawn from the Shapley kernel; exact when ``samples`` >= 2^F.

    Options: segments ("grid" | "slic" | tensor), patch (8), n_segments (50), compactness (10),
    baseline (0.0), batch_size (64), samples (200, the full and empty coalitions included),
    seed (0), coalitions (None). B x samples forwards (B x 2^F when exhaustive).
    """

    name = "kernel-shap"

    def validate(self) -> None:
        super().validate()
        require(self.samples >= 2, self.name, "samples", self.samples, "must be >= 2 (the full and the empty coalition)")

    def draw(self, counts: Tensor, generator: torch.Generator) -> tuple[Tensor, bool]:
        width = int(counts.max())
        if width < 31 and 2**width <= self.samples:
            return all_coalitions(width, counts.shape[0]) & region_valid(counts.cpu(), width)[:, None], True
        return shapley_kernel_coalitions(counts, self.samples, generator), False

    def weigh(self, z: Tensor, counts: Tensor, exhaustive: bool, x: Tensor, labels: Tensor) -> Tensor:
        return shapley_kernel_weights(z, counts, exhaustive)


#: LIME's distances between the perturbed and the original input
LIME_DISTANCES = ("cosine", "euclidean")


@register
class LIME(SurrogateMethod):
    """LIME over regions (Ribeiro et al., KDD 2016; Captum ``Lime`` with a ``feature_mask``):
    ridge regression of the target score on random coalitions (each region kept with
    probability 1/2), weighted by exp(-d^2 / (2 kernel_width^2)), d the ``distance`` between the
    perturbed and the original input.

    Options: segments ("grid" | "slic" | tensor), patch (8), n_segments (50), compactness (10),
    baseline (0.0), batch_size (64), samples (200), seed (0), coalitions (None), kernel_width (1.0),
    distance ("cosine" | "euclidean"), alpha (1.0, ridge penalty; 0 = least squares).
    B x samples forwards.
    """

    name = "lime"
    kernel_width: float = 1.0
    distance: str = "cosine"
    alpha: float = 1.0

    def validate(self) -> None:
        super().validate()
        require(self.kernel_width > 0, self.name, "kernel_width", self.kernel_width, "must be > 0")
        require(self.alpha >= 0 and math.isfinite(self.alpha), self.name, "alpha", self.alpha, "must be a finite number >= 0")
        check_choice(self.name, "distance", self.distance, LIME_DISTANCES)

    def ridge(self) -> float:
        return self.alpha

    def draw(self, counts: Tensor, generator: torch.Generator) -> tuple[Tensor, bool]:
        return lime_coalitions(counts, self.samples, generator), False

    def weigh(self, z: Tensor, counts: Tensor, exhaustive: bool, x: Tensor, labels: Tensor) -> Tensor:
        """exp(-d^2 / (2 w^2)) with d from per-region sums of the input, so no perturbed copy is
        needed: for z, |x'|^2 = sum_j z_j Sxx_j + (1 - z_j) b^2 n_j, x.x' = sum_j z_j Sxx_j + (1 - z_j) b Sx_j."""
        b, width = z.shape[0], z.shape[2]
        xs = x.flatten(2).double()  # (B, C, N)
        base = float(self.baseline)

        def per_region(values: Tensor) -> Tensor:  # (B, N) -> (B, F, 1)
            return values.new_zeros(b, width).scatter_add_(1, labels, values)[..., None]

        zf = z.double()
        if self.distance == "euclidean":
            d2 = ((1 - zf) @ per_region(((xs - base) ** 2).sum(1)))[..., 0]
        else:
            sxx = per_region((xs**2).sum(1))
            sx = per_region(xs.sum(1))
            cnt = per_region(xs.new_full(labels.shape, float(xs.shape[1])))
            dot = (zf @ sxx + (1 - zf) @ (base * sx))[..., 0]
            norm2 = (zf @ sxx + (1 - zf) @ (base * base * cnt))[..., 0]
            eps = 1e-8
            cos = dot / (sxx.sum((1, 2)).sqrt().clamp_min(eps)[:, None] * norm2.sqrt().clamp_min(eps))
            d2 = (1 - cos) ** 2
        return torch.exp(-d2 / (2 * self.kernel_width**2))
