"""The Quantus-catalogue metrics and the new perturbation methods: medlens vs Quantus / Captum
in one run, on the same model, maps and perturbation choices.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_catalogue.py [--threads 2] [--repeats 1] [--size 32] [--only-more]

ResNet-18 with a 1-channel stem, 4 images at SIZE x SIZE (random init), smooth tie-free maps.
Each metric is reported as time (s), ratio to its batched-forward floor (the same number of
perturbed inputs through the model, no-grad, batches of 64), ratio to Quantus, and the max abs
difference of the scores. Methods: feature ablation over a grid vs Captum FeatureAblation and the
forward floor; SmoothGrad-squared vs Captum NoiseTunnel. ``catalogue_more`` (``--only-more`` for just
these): infidelity, IROF (shared SLIC segments), continuity, relative representation stability
(shared noise), smooth MPRT (shared draws), efficient MPRT, input invariance, sufficiency,
consistency and Focus, with raw saliency as the explanation on both sides.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torchvision

from common import best_of, forward_floor, grey_resnet18
from medlens import explain
from medlens.metrics import faithfulness_extra as fx
from medlens.metrics import faithfulness_more as fm
from medlens.metrics import axiomatic, map_metrics, mosaics, mprt, stability






def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--only-more", action="store_true", help="only the metrics of catalogue_more")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import quantus

    model = grey_resnet18()
    s = args.size
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, s, s, generator=gen)
    maps = torch.nn.functional.avg_pool2d(x, 5, 1, 2)[:, 0] + 1e-4 * torch.rand(4, s, s, generator=gen)
    y = model(x).argmax(1).detach()
    q = dict(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None].numpy(), device="cpu")
    common = dict(normalise=False, abs=False, disable_warnings=True)
    n = s * s
    step = n // 16
    print(f"\n### Quantus catalogue metrics, medlens vs Quantus (ResNet-18, 4 images {s}x{s}, {args.threads} threads)\n")
    print("| metric | forwards/image | floor (s) | medlens (s) | Quantus (s) | x floor | Quantus / medlens | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)

    def add(name, copies, ours_fn, theirs_fn, to_np=lambda v: np.asarray(v)):
        t_floor, _ = best_of(lambda: forward_floor(model, x, copies), args.repeats)
        t_ours, ours = best_of(ours_fn, args.repeats)
        t_q, theirs = best_of(theirs_fn, 1)
        diff = float(np.nanmax(np.abs(to_np(ours) - np.asarray(theirs, dtype=np.float64))))
        xf = f"{t_ours / t_floor:.2f}" if copies else "-"
        print(f"| {name} | {copies} | {t_floor:.3f} | {t_ours:.3f} | {t_q:.3f} | {xf} | {t_q / t_ours:.1f} | {diff:.1e} |",
              flush=True)

    if args.only_more:
        more_metrics(model, x, maps, y, q, common, add, args)
        return
    add("FaithfulnessEstimate (16 chunks)", 16,
        lambda: fx.faithfulness_estimate(model, x, maps, y, features_in_step=step, batch_size=64),
        lambda: quantus.FaithfulnessEstimate(features_in_step=step, perturb_baseline="black", **common)(**q))
    np.random.seed(0)
    draws = np.stack([np.stack([np.random.choice(n, n // 20, replace=False) for _ in range(4)]) for _ in range(20)], 1)

    def quantus_fc():
        np.random.seed(0)
        return quantus.FaithfulnessCorrelation(nr_runs=20, subset_size=n // 20, perturb_baseline="black",
                                               return_aggregate=False, **common)(**q)

    add("FaithfulnessCorrelation (20 runs)", 20,
        lambda: fx.faithfulness_correlation(model, x, maps, y, subsets=torch.from_numpy(draws), batch_size=64),
        quantus_fc)
    add("MonotonicityCorrelation (16 chunks, 1 sample)", 16,
        lambda: fx.monotonicity_nguyen(model, x, maps, y, features_in_step=step, baseline=0.0, batch_size=64),
        lambda: quantus.MonotonicityCorrelation(features_in_step=step, nr_samples=1, perturb_baseline=0.0, **common)(**q))
    patches = math.ceil(s / 8) ** 2
    add(f"RegionPerturbation ({min(20, patches)} patches)", min(20, patches),
        lambda: fx.region_perturbation(model, x, maps, y, patch_size=8, regions=20, batch_size=64),
        lambda: quantus.RegionPerturbation(patch_size=8, regions_evaluation=20, perturb_baseline="black", **common)(**q))
    add(f"Selectivity ({patches} patches)", patches,
        lambda: fx.selectivity(model, x, maps, y, patch_size=8, batch_size=64)[0],
        lambda: quantus.Selectivity(patch_size=8, perturb_baseline="black", **common)(**q))
    small = torch.nn.functional.avg_pool2d(x, 4)
    a_small = torch.nn.functional.avg_pool2d(maps[:, None], 4)[:, 0]
    qs = dict(q, x_batch=small.numpy(), a_batch=a_small[:, None].numpy())
    add(f"NonSensitivity ({(s // 4) ** 2} px at {s // 4}x{s // 4})", (s // 4) ** 2,
        lambda: axiomatic.non_sensitivity(model, small, a_small, y, eps=1e-3, baseline=0.0, batch_size=64),
        lambda: quantus.NonSensitivity(eps=1e-3, features_in_step=1, perturb_baseline=0.0, **common)(**qs))
    masks = torch.zeros(4, s, s, dtype=torch.bool)
    masks[:, s // 4 : s // 2, s // 4 : 3 * s // 4] = True
    qm = dict(q, s_batch=masks[:, None].float().numpy())
    add("TopKIntersection (no model calls)", 0,
        lambda: map_metrics.top_k_intersection(maps, masks, k=n // 20),
        lambda: quantus.TopKIntersection(k=n // 20, **common)(**qm))
    more_metrics(model, x, maps, y, q, common, add, args)


    # ---- methods vs Captum and the forward floor
    from captum.attr import FeatureAblation, NoiseTunnel, Saliency

    from medlens.methods.ablation import grid_segments

    seg = grid_segments((s, s), 8)
    copies = int(seg.max()) + 1
    t_floor, _ = best_of(lambda: forward_floor(model, x, copies), args.repeats)
    t_ours, out = best_of(lambda: explain(model, x, "feature-ablation", target=y.view(-1, 1), patch=8), args.repeats)
    fa = FeatureAblation(model)
    t_c, theirs = best_of(lambda: fa.attribute(x, target=y, feature_mask=seg[None, None].expand(4, 1, s, s),
                                               perturbations_per_eval=16), 1)
    print(f"\n### Perturbation methods (ResNet-18, 4 images {s}x{s})\n")
    print("| method | forwards/image | floor (s) | medlens (s) | Captum (s) | x floor | Captum / medlens | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    diff = float((out.raw[:, 0] - theirs[:, 0]).abs().max())
    print(f"| feature-ablation (8x8 grid) | {copies} | {t_floor:.3f} | {t_ours:.3f} | {t_c:.3f} | {t_ours / t_floor:.2f} | {t_c / t_ours:.1f} | {diff:.1e} |")
    xi = x[:1]
    t_ours, _ = best_of(lambda: explain(model, xi, "smoothgrad-sq", target=int(y[0]), samples=16, stdev=0.2, seed=3), args.repeats)
    nt = NoiseTunnel(Saliency(model))
    t_c, _ = best_of(lambda: nt.attribute(xi, nt_type="smoothgrad_sq", nt_samples=16, stdevs=0.2, target=int(y[0]),
                                          nt_samples_batch_size=16), 1)
    print(f"| smoothgrad-sq (16 samples, 1 image) | 16 (fwd+bwd) | - | {t_ours:.3f} | {t_c:.3f} | - | {t_c / t_ours:.1f} | - |")


def more_metrics(model, x, maps, y, q, common, add, args) -> None:
    """catalogue_more: each metric vs its Quantus class on the same model, maps and perturbations."""
    import functools

    import quantus
    import quantus.helpers.utils as qutils

    s = x.shape[-1]

    def raw_saliency(m, xx, tt):
        return explain(m, xx, "saliency", target=tt.view(-1, 1)).raw[:, 0]

    def q_explain(model, inputs, targets, **kwargs):
        return raw_saliency(model, torch.as_tensor(np.asarray(inputs), dtype=torch.float32),
                            torch.as_tensor(np.asarray(targets)).long())[:, None].detach().numpy()

    fn = functools.partial(raw_saliency, model)
    patch = max(1, s // 8)
    add(f"Infidelity ({(s // patch) ** 2} patches)", (s // patch) ** 2,
        lambda: fm.infidelity(model, x, maps, y, patch_sizes=(patch,), batch_size=64),
        lambda: quantus.Infidelity(perturb_patch_sizes=[patch], n_perturb_samples=1, perturb_baseline="black", **common)(**q))
    np.trapz = getattr(np, "trapz", np.trapezoid)  # Quantus' calculate_auc needs np.trapz (gone in NumPy 2)
    qutils.slic = functools.partial(qutils.slic, n_segments=16)  # Quantus' SLIC has no option for it
    seg = fm.slic_segments(x, n_segments=16)
    k = int(max(len(torch.unique(r)) for r in seg))

    def quantus_irof():  # one image per batch: Quantus' string baselines are batch-wide otherwise
        return np.concatenate([quantus.IROF(perturb_baseline="black", return_aggregate=False, **common)(
            **dict(q, x_batch=q["x_batch"][i : i + 1], y_batch=q["y_batch"][i : i + 1], a_batch=q["a_batch"][i : i + 1]),
            softmax=True) for i in range(x.shape[0])])

    add(f"IROF (SLIC, {k} segments)", k, lambda: fm.irof(model, x, maps, y, segments=seg, baseline="min", batch_size=64),
        quantus_irof)
    add("Continuity (8 translations, saliency)", 0, lambda: stability.continuity(fn, x, y, n_steps=8, batch_size=64),
        lambda: quantus.Continuity(nr_steps=8, **common)(**dict(q, a_batch=None), explain_func=q_explain))
    gen = torch.Generator().manual_seed(4)
    noise = (torch.rand(5, *x.shape, generator=gen) * 2 - 1) * 0.05

    class Replay:
        def __init__(self):
            self.i = 0

        def __call__(self, arr, indices, **kwargs):
            self.i += 1
            return arr + noise[self.i - 1].reshape(arr.shape).numpy()

    a_sal = fn(x, y).detach()
    add("RelativeRepresentationStability (5 samples, layer4.1)", 0,
        lambda: stability.relative_representation_stability(fn, model, x, y, ["layer4.1"], noise=noise,
                                                           nan_when_changed=False, batch_size=64),
        lambda: quantus.RelativeRepresentationStability(nr_samples=5, layer_names=["layer4.1"], perturb_func=Replay(),
                                                        return_nan_when_prediction_changes=False, **common)(
            **dict(q, a_batch=a_sal[:, None].numpy()), explain_func=q_explain))
    draws = torch.from_numpy(np.random.RandomState(11).randn(3, 4, *x.shape))

    def quantus_smooth():
        np.random.seed(11)
        out = quantus.SmoothMPRT(nr_samples=5, seed=42, skip_layers=True, disable_warnings=True)(
            **dict(q, a_batch=None), explain_func=quantus.explain, explain_func_kwargs={"method": "Saliency"})
        return np.array([out[k] for k in out])

    add("SmoothMPRT (5 samples, full randomisation)", 0,
        lambda: (lambda r: torch.cat([r.original[None], r.similarity]))(
            mprt.smooth_mprt(raw_saliency, model, x, y, n_samples=5, noise=draws, last_only=True, batch_size=64)),
        quantus_smooth)
    add("EfficientMPRT", 0, lambda: mprt.efficient_mprt(raw_saliency, model, x, y, batch_size=64),
        lambda: quantus.EfficientMPRT(seed=42, disable_warnings=True)(**dict(q, a_batch=None), explain_func=q_explain))
    torch.manual_seed(0)
    biased = torchvision.models.resnet18(num_classes=3)
    biased.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=True)
    biased.eval()
    a_b = raw_saliency(biased, x, y).detach()
    add("InputInvariance (bias shift, saliency)", 0,
        lambda: axiomatic.input_invariance(raw_saliency, biased, x, y, maps=a_b, mode="bias"),
        lambda: quantus.InputInvariance(input_shift=-1, **common)(**dict(q, model=biased, a_batch=a_b[:, None].numpy()),
                                                                  explain_func=q_explain))
    preds = y
    add("Sufficiency (no model calls)", 0, lambda: fm.sufficiency(maps, preds),
        lambda: quantus.Sufficiency(**common)(**q))
    add("Consistency (no model calls)", 0, lambda: stability.consistency(maps, preds),
        lambda: quantus.Consistency(**common)(**q))
    labels = torch.tensor([0, 0, 1, 2] * (x.shape[0] // 4) + [0] * (x.shape[0] % 4))
    mos = mosaics.make_mosaics(x, labels, seed=0)
    a_m = raw_saliency(model, mos.images, mos.targets).detach()
    qf = dict(q, x_batch=mos.images.numpy(), y_batch=mos.targets.numpy(), a_batch=a_m[:, None].numpy())
    add("Focus (mosaics, no model calls)", 0, lambda: mosaics.focus(a_m, mos.quadrants),
        lambda: quantus.Focus(**common)(**qf, custom_batch=mos.quadrants.int().tolist()))


if __name__ == "__main__":
    main()
