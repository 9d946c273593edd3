"""Score-CAM and occlusion: medlens against pytorch-grad-cam's ScoreCAM and Captum's Occlusion
in the same run, on a torchvision ResNet-18 at 224x224, plus 3D Score-CAM/occlusion on a
64^3 volume with a small 3D CNN.

Perturbation methods cost what their forward passes cost, so every time is printed as a ratio:
- ``/ masked fwd``: against running the same number of inputs through the model in the same
  batch size and nothing else (the floor any implementation pays; target <= 1.1x),
- ``ref / medlens``: how many times faster medlens is than the reference (target >= 1x;
  fast mode >= 5x against pytorch-grad-cam, with Pearson r >= 0.95 against the full map).

Times are process CPU seconds by default (``--wall`` for wall-clock): on a shared machine
other jobs then do not distort the ratios.

Run:  .venv/bin/python benchmarks/bench_perturbation.py [--size 224] [--batch-size 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time

import torch
import torchvision
from torch import nn

import medlens
import common
from common import cpu_timed as timed, pearson
from common import cpu_forward_floor as forward_floor
from medlens.methods.perturbation import select_channels




def row(name: str, seconds: float, floor: float | None, ref: float | None, note: str = "") -> None:
    f = f"{seconds / floor:6.2f}x" if floor else "   -   "
    r = f"{ref / seconds:6.2f}x" if ref else "   -   "
    print(f"{name:<44} {seconds:8.2f}s  {f:>9}  {r:>9}  {note}")


def bench_2d(size: int, batch_size: int, top_ks: tuple[int, ...], captum_default: bool) -> None:
    from captum.attr import Occlusion
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, size, size)
    target = int(model(x).argmax())
    print(f"\n2D: torchvision resnet18, 1 image {size}x{size}, target {target}, batch size {batch_size}, {torch.get_num_threads()} thread(s)")
    print(f"{'method':<44} {'time':>9}  {'/ masked':>9}  {'ref/ours':>9}")

    # --- Score-CAM at layer4 (512 channels)
    with medlens.LayerCapture(model, ["layer4"]) as capture, torch.no_grad():
        model(x)
    live = select_channels(capture.activations["layer4"])[0]
    n_channels = 512
    floor = forward_floor(model, x, live.shape[1], batch_size)
    t_ours, full = timed(lambda: medlens.explain(model, x, "scorecam", target=target, layer="layer4", batch_size=batch_size))
    with ScoreCAM(model=model, target_layers=[model.layer4]) as cam:
        cam.batch_size = batch_size
        t_ref, ref_map = timed(lambda: cam(input_tensor=x, targets=[ClassifierOutputTarget(target)]))
    ref_floor = floor * n_channels / live.shape[1]  # the reference masks every channel
    r_ref = pearson(full.maps[0, 0], torch.from_numpy(ref_map[0]))
    print(f"  ({live.shape[1]} of {n_channels} channels have activation; masked-forward floor {floor:.2f}s, scaled to all {n_channels}: {ref_floor:.2f}s)")
    row("medlens scorecam (full, exact)", t_ours, floor, t_ref, f"r vs pytorch-grad-cam {r_ref:.4f}")
    row("pytorch-grad-cam ScoreCAM", t_ref, ref_floor, None)
    t_multi, _ = timed(lambda: medlens.explain(model, x, "scorecam", target="top3", layer="layer4", batch_size=batch_size))
    row("medlens scorecam, top-3 classes in one run", t_multi, floor, 3 * t_ref, "reference: 3 runs (3x its time)")
    for k in top_ks:
        t_fast, fast = timed(lambda: medlens.explain(model, x, "scorecam", target=target, layer="layer4", batch_size=batch_size, top_k_channels=k))
        row(f"medlens scorecam fast (top_k_channels={k})", t_fast, forward_floor(model, x, k, batch_size), t_ref,
            f"r vs full {pearson(fast.maps[0, 0], full.maps[0, 0]):.4f}")

    # --- Occlusion, window size/8, stride window/2
    window = size // 7
    stride = window // 2
    n_windows = (math.ceil((size - window) / stride) + 1) ** 2
    floor = forward_floor(model, x, n_windows, batch_size)
    t_ours, ours = timed(lambda: medlens.explain(model, x, "occlusion", target=target, window=window, stride=stride, batch_size=batch_size))
    occ = Occlusion(model)
    t_cap, cap = timed(lambda: occ.attribute(x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride), target=target, perturbations_per_eval=batch_size))
    print(f"  (occlusion: window {window}, stride {stride}: {n_windows} occluded inputs; masked-forward floor {floor:.2f}s)")
    row("medlens occlusion", t_ours, floor, t_cap, f"max |diff| vs Captum {float((ours.raw[0, 0] - cap[0, 0]).abs().max()):.2e}")
    row(f"Captum Occlusion (perturbations_per_eval={batch_size})", t_cap, floor, None)
    if captum_default:
        t_cap1, _ = timed(lambda: occ.attribute(x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride), target=target))
        row("Captum Occlusion (default, 1 per eval)", t_cap1, floor, None, f"medlens is {t_cap1 / t_ours:.1f}x faster")


def small_cnn3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool3d(2),
        nn.Conv3d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool3d(2),
        nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool3d(2),
        nn.Conv3d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 3),
    )


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _run_3d(method: str, options: dict, threads: int, queue: mp.Queue) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = small_cnn3d().eval()
    vol = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        model(vol)  # warm-up: allocator and kernels
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak-RSS mark (VmHWM)
    before = _status_kib("VmRSS")
    seconds, out = timed(lambda: medlens.explain(model, vol, method, target="all", **options))
    peak = _status_kib("VmHWM")
    queue.put((seconds, (peak - before) / 1024, tuple(out.maps.shape), bool(torch.isfinite(out.maps).all())))


def bench_3d(threads: int) -> None:
    """Peak memory follows batch_size, not the number of perturbed volumes."""
    print("\n3D: own 4-layer 3D CNN, 1 volume 64^3, all 3 classes at once (peak RSS growth, fresh process each)")
    print(f"{'method':<40} {'inputs':>7} {'batch':>6} {'time':>8} {'peak +MiB':>10} {'stacked inputs':>15}")
    runs = [
        ("scorecam", {"layer": "10", "batch_size": 4}, 32),
        ("scorecam", {"layer": "10", "batch_size": 16}, 32),
        ("occlusion", {"window": 16, "stride": 16, "batch_size": 8}, 4**3),
        ("occlusion", {"window": 16, "stride": 8, "batch_size": 8}, 7**3),
    ]
    ctx = mp.get_context("spawn")
    for method, options, n_inputs in runs:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_3d, args=(method, options, threads, queue))
        proc.start()
        seconds, peak_mib, shape, finite = queue.get()
        proc.join()
        label = f"{method} " + ", ".join(f"{k}={v}" for k, v in options.items() if k != "batch_size")
        stacked = n_inputs * 64**3 * 4 / 2**20
        print(f"{label:<40} {n_inputs:>7} {options['batch_size']:>6} {seconds:7.2f}s {peak_mib:9.0f}  {stacked:11.0f} MiB   maps {shape} finite={finite}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps CPU time free of spin-waiting)")
    parser.add_argument("--wall", action="store_true", help="time wall-clock instead of process CPU time")
    parser.add_argument("--top-k", type=int, nargs="+", default=[32])
    parser.add_argument("--captum-default", action="store_true", help="also time Captum with 1 perturbation per eval (slow)")
    parser.add_argument("--skip-3d", action="store_true")
    parser.add_argument("--only-3d", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.wall:
        common.CPU_CLOCK = time.perf_counter  # read by the shared timers at each call
    print(f"times are {'wall-clock' if args.wall else 'process CPU'} seconds")
    if not args.only_3d:
        bench_2d(args.size, args.batch_size, tuple(args.top_k), args.captum_default)
    if not args.skip_3d:
        bench_3d(args.threads)


if __name__ == "__main__":
    main()
