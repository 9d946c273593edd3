"""Region perturbation methods -- kernel-shap, lime, feature-ablation, shapley-sampling -- against
their forward-pass floor and against Captum (KernelShap, Lime, FeatureAblation,
ShapleyValueSampling with the same feature mask and chunk size), in one run.

The floor of a method is what its forward passes alone cost: a forward pre-hook records the batch
size of every call the model gets during the method (the engine's own forward included), and the
floor is the time of replaying those calls as bare no-grad forwards of the same batch sizes (timed
in alternation with the method, medians of ``--repeats``). ``x floor`` = method time / floor (target <= 1.1);
``Captum / medlens`` > 1 means medlens is faster. ResNet-18 with a 1-channel stem (seeded), B real
brain MRI slices (or random images without ../shared/data) at SIZE px, a grid of PATCH-sized
regions. Times are process CPU seconds (``--wall`` for wall-clock, required on a GPU).

Run:  PYTHONPATH=src .venv/bin/python benchmarks/bench_surrogate.py [--size 64] [--patch 8] [--images 4]
      [--samples 128] [--batch-size 64] [--threads 1] [--repeats 3] [--wall] [--skip-captum]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from torch import nn

from medlens import explain
from medlens.methods.ablation import grid_segments, segments_for
from medlens.methods.surrogate import consecutive_regions

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brain-tumor-mri"
CLOCK: Callable[[], float] = time.process_time


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median time (by CLOCK) of ``repeats`` calls after one warm-up call, and the last result."""
    out = fn()
    sync()
    times = []
    for _ in range(repeats):
        start = CLOCK()
        out = fn()
        sync()
        times.append(CLOCK() - start)
    return statistics.median(times), out


def images(n: int, size: int, device: torch.device) -> tuple[torch.Tensor, str]:
    """(n, 1, size, size) real MRI slices in [0, 1], or seeded random images without the data."""
    paths = sorted(DATA.glob("*/*.jpg"))[:n] if DATA.exists() else []
    if len(paths) < n:
        return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device), "random images"
    from PIL import Image

    arrs = [torch.from_numpy(np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0)[None, None] for p in paths]
    x = torch.cat([nn.functional.interpolate(a, size=(size, size), mode="bilinear", align_corners=False) for a in arrs])
    return x.to(device), "real brain MRI"


class CallSizes:
    """Records the batch size of every forward call of a model."""

    def __init__(self, model: nn.Module) -> None:
        self.sizes: Counter[int] = Counter()
        self.handle = model.register_forward_pre_hook(lambda _m, args: self.sizes.update([int(args[0].shape[0])]))

    def close(self) -> None:
        self.handle.remove()


def floor_run(model: nn.Module, x: torch.Tensor, sizes: Counter[int]) -> Callable[[], None]:
    """The recorded calls replayed: that many no-grad forwards of each batch size, nothing else."""
    chunks = {b: x[:1].expand(b, *x.shape[1:]).contiguous() for b in sizes}

    def run() -> None:
        with torch.no_grad():
            for b, calls in sizes.items():
                for _ in range(calls):
                    model(chunks[b])
    return run


def interleaved(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median times of ``a`` and ``b`` timed in alternation (so load on the machine hits both alike)."""
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            start = CLOCK()
            fn()
            sync()
            out.append(CLOCK() - start)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    global CLOCK
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--shapley-samples", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wall", action="store_true")
    parser.add_argument("--skip-captum", action="store_true")
    parser.add_argument("--slic", type=int, default=50, help="also kernel-shap over ~N SLIC superpixels (0: skip)")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run, e.g. kernel-shap lime")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="You are providing multiple inputs")
    if args.wall or torch.cuda.is_available():
        CLOCK = time.perf_counter
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    model = model.eval().to(device)
    x, what = images(args.images, args.size, device)
    with torch.no_grad():
        y = model(x).argmax(1)
    seg = grid_segments((args.size, args.size), args.patch, device)
    regions = int(seg.max()) + 1
    bs = args.batch_size
    grid = dict(patch=args.patch)
    runs = {
        "kernel-shap": ("kernel-shap", dict(grid, samples=args.samples), f"{args.samples} coalitions", seg),
        "lime": ("lime", dict(grid, samples=args.samples), f"{args.samples} coalitions", seg),
        "feature-ablation": ("feature-ablation", grid, f"{regions} regions", seg),
        "shapley-sampling": ("shapley-sampling", dict(grid, samples=args.shapley_samples), f"{args.shapley_samples} orders x {regions}", seg),
    }
    if args.slic:
        slic = dict(segments="slic", n_segments=args.slic)
        labels = consecutive_regions(segments_for(x, slic))[0].view(x.shape[0], *x.shape[2:])
        runs["kernel-shap (SLIC, segmentation timed)"] = ("kernel-shap", dict(slic, samples=args.samples),
                                                          f"{args.samples} coalitions, ~{args.slic} superpixels", labels)
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only}
    clock = "wall" if CLOCK is time.perf_counter else "CPU"
    print(f"\n### Region perturbation methods vs forward floor and Captum ({what}, ResNet-18, {args.images} images "
          f"{args.size}x{args.size}, {regions} grid regions of {args.patch} px, chunks of {bs}, {device.type}, "
          f"{args.threads} thread(s), {clock} seconds)\n")
    print("| method | perturbed inputs / image | forward calls | floor (s) | medlens (s) | x floor | Captum (s) | Captum / medlens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for row, (name, opts, what_n, mask) in runs.items():
        run = lambda: explain(model, x, name, target=y.view(-1, 1), batch_size=bs, **opts)
        run()
        calls = CallSizes(model)
        run()
        calls.close()
        t_ours, t_floor = interleaved(run, floor_run(model, x, calls.sizes), args.repeats)
        t_c = float("nan") if args.skip_captum else timed(lambda: captum_run(name, model, x, y, mask, opts, bs), 1)[0]
        print(f"| {row} | {what_n} | {sum(calls.sizes.values())} | {t_floor:.3f} | {t_ours:.3f} | {t_ours / t_floor:.2f} | "
              f"{t_c:.3f} | {t_c / t_ours:.2f} |", flush=True)


def captum_run(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seg: torch.Tensor, opts: dict, bs: int):
    """The Captum counterpart with the same feature mask ((*S) shared or (B, *S)), sample count and chunk size."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import FeatureAblation, KernelShap, Lime, ShapleyValueSampling

    mask = (seg if seg.dim() == x.dim() - 1 else seg[None].expand(x.shape[0], *seg.shape))[:, None].contiguous()
    if name == "kernel-shap":
        return KernelShap(model).attribute(x, target=y, feature_mask=mask, n_samples=opts["samples"], perturbations_per_eval=bs)
    if name == "lime":
        lime = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0))
        return lime.attribute(x, target=y, feature_mask=mask, n_samples=opts["samples"], perturbations_per_eval=bs)
    if name == "feature-ablation":
        return FeatureAblation(model).attribute(x, target=y, feature_mask=mask, perturbations_per_eval=max(1, bs // x.shape[0]))
    return ShapleyValueSampling(model).attribute(x, target=y, feature_mask=mask, n_samples=opts["samples"],
                                                 perturbations_per_eval=max(1, bs // x.shape[0]))


if __name__ == "__main__":
    main()
