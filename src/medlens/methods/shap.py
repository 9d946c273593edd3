"""Shapley value sampling over segments (Castro et al., 2009; Strumbelj & Kononenko, 2010;
Captum ``ShapleyValueSampling`` with a ``feature_mask``): for ``samples`` random orders of the
segments, start from the baseline image, reveal the input's segments one at a time and credit
each segment with the change of the target score; average over the orders.

Segments as :mod:`medlens.methods.ablation` (grid, SLIC superpixels/supervoxels, or a user
segmentation). The orders are ``torch.randperm(F, generator)`` with the generator seeded by
``seed`` -- for one image the permutations Captum draws after ``torch.manual_seed(seed)``; each
image of a batch takes the next ``samples`` draws. All samples x F revealed copies of an image
are scored in no-grad chunks of ``batch_size``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from medlens.core.engine import Context, InputMethod, register, score_batches
from medlens.core.targets import region_rows
from medlens.methods.ablation import SegmentMethod, segments_for

__all__ = ["GradientSHAP", "ShapleySampling"]


@register
class ShapleySampling(SegmentMethod):
    """Shapley value sampling over segments.

    Options: segments ("grid" | "slic" | tensor), patch (8), n_segments (50), compactness (10),
    samples (25), seed (0), baseline (0.0), batch_size (64). samples x F forwards per image.
    """

    name = "shapley-sampling"
    samples: int = 25
    seed: int = 0

    def compute(self, ctx: Context) -> Tensor:
        x = ctx.x
        seg = segments_for(x, self.options)
        samples = int(self.options.get("samples", 25))
        baseline = float(self.options.get("baseline", 0.0))
        batch_size = int(self.options.get("batch_size", 64))
        gen = torch.Generator().manual_seed(int(self.options.get("seed", 0)))
        out = x.new_zeros(x.shape[0], ctx.targets.shape[1], *x.shape[2:])
        for i in range(x.shape[0]):
            ids, labels = seg[i].unique(return_inverse=True)  # consecutive 0..F-1
            f = ids.numel()
            perms = torch.stack([torch.randperm(f, generator=gen) for _ in range(samples)]).to(x.device)  # (P, F)
            pos = torch.empty_like(perms).scatter_(1, perms, torch.arange(f, device=x.device).expand_as(perms))
            steps = torch.arange(f, device=x.device)
            revealed = pos[:, None, labels.flatten()] <= steps[None, :, None]  # (P, F, N)
            revealed = revealed.view(samples * f, 1, *x.shape[2:])
            base = torch.full_like(x[i], baseline)
            stack = torch.where(revealed, x[i][None], base[None])
            region = region_rows(ctx.region, x, torch.tensor([i], device=x.device))
            start = score_batches(ctx.model, base[None], ctx.targets[i : i + 1], region, batch_size)  # (1, K)
            scores = score_batches(ctx.model, stack, ctx.targets[i : i + 1], region, batch_size)
            scores = scores.view(samples, f, -1)
            diffs = scores - torch.cat([start.expand(samples, 1, -1), scores[:, :-1]], dim=1)  # (P, F, K)
            per_feature = torch.zeros(f, diffs.shape[2], device=x.device, dtype=diffs.dtype)
            per_feature.index_add_(0, perms.flatten(), diffs.flatten(0, 1))
            per_feature = per_feature / samples
            out[i] = per_feature[labels.flatten()].T.reshape(ctx.targets.shape[1], *x.shape[2:])
        return out


@register
class GradientSHAP(InputMethod):
    """GradientSHAP (Lundberg & Lee, NeurIPS 2017; Captum ``GradientShap``): the expectation of
    (x~ - b) * dY/dx at b + a (x~ - b), over baselines b drawn from ``baselines``, a ~ U(0, 1) and
    x~ = x + N(0, stdev^2). The map is the signed sum over channels (as Integrated Gradients).

    Options: baselines (float or (R, C, *S) tensor, 0.0), samples (25), stdev (0.0), seed (0),
    batch_size (32); to share another library's draws: ``baseline_index`` (B * samples,) and
    ``alphas`` (B * samples,) (image-major). The noise is one ``torch.normal`` of shape
    (B * samples, C, *S) from a generator seeded with ``seed``; Captum's noise after
    ``torch.manual_seed(seed)`` (its baseline and alpha draws come from NumPy).
    """

    name = "gradient-shap"
    samples: int = 25
    stdev: float = 0.0
    batch_size: int = 32
    seed: int = 0
    baselines: Any = 0.0
    baseline_index: Any = None
    alphas: Any = None


    def compute(self, ctx: Context) -> Tensor:
        x = ctx.x
        b = x.shape[0]
        samples = int(self.options.get("samples", 25))
        stdev = float(self.options.get("stdev", 0.0))
        chunk = int(self.options.get("batch_size", 32))
        gen = torch.Generator(device=x.device).manual_seed(int(self.options.get("seed", 0)))
        bases = self.options.get("baselines", 0.0)
        bases = torch.as_tensor(bases, dtype=x.dtype, device=x.device)
        if bases.dim() != x.dim():
            bases = torch.broadcast_to(bases, x.shape[1:])[None]
        total = b * samples
        idx = self.options.get("baseline_index")
        idx = (torch.randint(0, bases.shape[0], (total,), generator=gen, device=x.device) if idx is None
               else torch.as_tensor(idx, device=x.device).long())
        alphas = self.options.get("alphas")
        alphas = (torch.rand(total, generator=gen, device=x.device, dtype=x.dtype) if alphas is None
                  else torch.as_tensor(alphas, device=x.device, dtype=x.dtype))
        noisy = x.repeat_interleave(samples, dim=0)
        if stdev > 0:
            noisy = noisy + torch.normal(0.0, torch.full(noisy.shape, stdev, device=x.device, dtype=x.dtype), generator=gen)
        diff = noisy - bases[idx]
        shape = (-1,) + (1,) * (x.dim() - 1)
        points = bases[idx] + alphas.view(shape) * diff
        targets = ctx.targets.repeat_interleave(samples, dim=0)
        images = torch.arange(b, device=x.device).repeat_interleave(samples)
        grads = torch.cat([ctx.gradients_at(points[i : i + chunk], targets[i : i + chunk], images[i : i + chunk])
                           for i in range(0, total, chunk)])  # (total, K, C, *S)
        attr = (grads * diff[:, None]).unflatten(0, (b, samples)).mean(dim=1)
        ctx.info["attributions"] = attr  # (B, K, C_in, *S)
        return attr.sum(dim=2)
