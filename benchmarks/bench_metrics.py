"""Evaluation metrics: medlens vs Quantus in one run, on the same maps and model.

    .venv/bin/python benchmarks/bench_metrics.py [--threads 2] [--repeats 3]

Faithfulness (ResNet-18 with a 1-channel stem, 8 images at 112x112, Grad-CAM maps with a 1e-4
tie-break so every library orders the pixels identically):

- PixelFlipping / deletion, 28 steps of 448 pixels, "black" baseline (each image's minimum;
  medlens "min"), softmax.
- ROAD, 9 percentages (10..90), noisy linear imputation with noise 0 (so results can be compared).

Each is reported as a ratio of the batched-forward floor (the same number of perturbed inputs
through the model, no-grad, batches of 64) and of Quantus; scores are compared (max abs diff).
Localisation: PointingGame on the same 8 maps against Quantus, then every localisation metric on
1,000 maps of 224x224 (the paper's size) with their boxes.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import medlens
from common import best_of, forward_floor, grey_resnet18
from medlens.metrics import boxes_to_masks, localisation_metrics, perturbation_curve, pointing_game, road





def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import quantus

    model = grey_resnet18()
    x = torch.rand(8, 1, 112, 112)
    maps = medlens.explain(model, x, "gradcam", layer="layer3").maps[:, 0]
    maps = maps + 1e-4 * torch.rand(maps.shape, generator=torch.Generator().manual_seed(1))
    targets = model(x).argmax(1).detach()
    x_np, y_np, a_np = x.numpy(), targets.numpy(), maps[:, None].numpy()
    rows = []

    # ---- pixel flipping / deletion
    steps = 28
    t_floor, _ = best_of(lambda: forward_floor(model, x, steps), args.repeats)
    t_ours, curve = best_of(lambda: perturbation_curve(model, x, maps, targets, steps=steps, baseline="min", batch_size=64), args.repeats)
    flipping = quantus.PixelFlipping(features_in_step=112 * 112 // steps, perturb_baseline="black", normalise=False, abs=False,
                                     disable_warnings=True)
    t_q, theirs = best_of(lambda: np.asarray(flipping(model=model, x_batch=x_np, y_batch=y_np, a_batch=a_np, device="cpu",
                                                      batch_size=8)), 1)
    diff = float(np.abs(curve.scores[:, 1:].numpy() - theirs).max())
    rows.append(("PixelFlipping / deletion (28 steps)", t_floor, t_ours, t_q, diff))

    # ---- ROAD
    percentages = list(range(10, 100, 10))
    t_floor_r, _ = best_of(lambda: forward_floor(model, x, len(percentages)), args.repeats)
    t_road, ours_road = best_of(lambda: road(model, x, maps, targets, percentages, noise=0.0, batch_size=64), args.repeats)
    road_q = quantus.ROAD(percentages=percentages, noise=0.0, normalise=False, abs=False, disable_warnings=True)
    t_rq, theirs_road = best_of(lambda: road_q(model=model, x_batch=x_np, y_batch=y_np, a_batch=a_np, device="cpu", batch_size=8), 1)
    road_diff = float(np.abs(ours_road.kept.float().mean(0).numpy() - np.array([theirs_road[p] for p in percentages])).max())
    rows.append(("ROAD (9 percentages, accuracy)", t_floor_r, t_road, t_rq, road_diff))

    print(f"\nFaithfulness: ResNet-18 (1-channel), 8 images at 112x112, {args.threads} threads, best of {args.repeats}")
    print("| metric | forward floor s | medlens s | Quantus s | medlens / floor | Quantus / floor | speed-up vs Quantus | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, floor, ours, q, d in rows:
        print(f"| {name} | {floor:.3f} | {ours:.3f} | {q:.3f} | {ours / floor:.2f}x | {q / floor:.2f}x | {q / ours:.1f}x | {d:.1e} |")

    # ---- pointing game: same 8 maps
    masks = torch.zeros(8, 112, 112, dtype=torch.bool)
    masks[:, 30:70, 40:90] = True
    pg = pointing_game(maps, masks)
    pg_q = np.asarray(quantus.PointingGame(disable_warnings=True)(model=None, x_batch=x_np, y_batch=y_np, a_batch=a_np,
                                                                 s_batch=masks[:, None].numpy().astype(float)))
    print(f"\nPointingGame on the same 8 maps: medlens {pg.tolist()} / Quantus {pg_q.tolist()}: "
          f"{'equal' if np.array_equal(pg.numpy(), pg_q) else 'DIFFERENT'}")

    # ---- localisation on 1,000 maps
    gen = torch.Generator().manual_seed(0)
    big = torch.rand(1000, 224, 224, generator=gen)
    lo = torch.randint(0, 112, (1000, 2), generator=gen)
    boxes = torch.cat([lo, lo + torch.randint(16, 112, (1000, 2), generator=gen)], 1)
    box_masks = boxes_to_masks(boxes, (224, 224)).contiguous()
    t_pg, _ = best_of(lambda: pointing_game(big, box_masks), args.repeats)
    t_fast, _ = best_of(lambda: localisation_metrics(big, box_masks, boxes, ranking=False), args.repeats)
    t_all, _ = best_of(lambda: localisation_metrics(big, box_masks, boxes, ranking=True), 1)
    q_pg = quantus.PointingGame(disable_warnings=True)
    t_qpg, _ = best_of(lambda: q_pg(model=None, x_batch=big[:, None].numpy(), y_batch=np.zeros(1000, int),
                                    a_batch=big[:, None].numpy(), s_batch=box_masks[:, None].numpy().astype(float)), 1)
    print("\nLocalisation on 1,000 maps of 224x224 with boxes")
    print("| what | seconds |")
    print("|---|---|")
    print(f"| medlens pointing game | {t_pg:.3f} |")
    print(f"| Quantus PointingGame | {t_qpg:.3f} |")
    print(f"| medlens pointing game + energy + relevance mass + mask IoU/Dice + IoU@5/10/20/40 | {t_fast:.3f} |")
    print(f"| ... + AUROC + AP + rank accuracy (three sorts of 50M values) | {t_all:.3f} |")


if __name__ == "__main__":
    main()
