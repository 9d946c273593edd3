"""Dataset-scale run (``medlens run``) benchmarks.

1. Throughput on real brain MRI (224 px, torchvision resnet18, seeded random weights): medlens
   (Grad-CAM + pointing game + IoU@10 + deletion curve, Parquet + Zarr outputs) against a loop of
   pytorch-grad-cam + Quantus (PointingGame, PixelFlipping) + a NumPy IoU@10 on the same images.
2. Peak RSS of a run over N_small vs N_large phantom inputs (32 px), each in its own process.
3. 1 vs 2 Fabric processes (CPU, gloo) on the small phantom set.
4. Resuming a finished run.

    PYTHONPATH=src python benchmarks/bench_dataset.py --images 48 --small 500 --large 2000 --steps 8
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MRI = Path(os.environ.get("MEDLENS_SHARED_DATA", ROOT.parent / "shared" / "data")) / "brain-tumor-mri"


def mri_files(n: int) -> list[Path]:
    files = []
    classes = sorted(p for p in MRI.iterdir() if p.is_dir())
    per = -(-n // len(classes))
    for c in classes:
        files += sorted(p for p in c.glob("*.jpg") if p.with_suffix(".txt").exists())[:per]
    return files[:n]


def resnet():
    from medlens.models import build_model

    torch.manual_seed(0)
    return build_model("torchvision:resnet18", num_classes=3, in_channels=3).eval()


def bench_medlens(files, out, steps, batch):
    from medlens.workflows.dataset_run import run_dataset

    start = time.perf_counter()
    run_dataset(resnet, files, out, methods=["gradcam"], layer="layer4", size=(224, 224), normalize="imagenet",
                batch_size=batch, shard_size=32, deletion_steps=steps, overlays="none", n_boot=200, workers=1)
    return time.perf_counter() - start


def bench_baseline(files, steps):
    import quantus
    from pytorch_grad_cam import GradCAM

    from medlens.workflows.stream import ExplainDataset, PlannedItem

    model = resnet()
    start = time.perf_counter()
    data = ExplainDataset([PlannedItem(i, str(f)) for i, f in enumerate(files)], 3, (224, 224), "imagenet")
    items = [data[i] for i in range(len(data))]
    x = torch.stack([it["x"] for it in items])
    masks = torch.stack([it["mask"] for it in items]).numpy()[:, None].astype(float)
    boxes = [it["box"].numpy() for it in items]
    cam = GradCAM(model=model, target_layers=[model.layer4])
    maps = np.concatenate([cam(x[i : i + 8], None) for i in range(0, len(x), 8)])[:, None]
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    xs = x.numpy()
    quantus.PointingGame(disable_warnings=True)(model=model, x_batch=xs, y_batch=y, a_batch=maps, s_batch=masks, device="cpu")
    quantus.PixelFlipping(features_in_step=224 * 224 // steps, perturb_baseline="black", disable_warnings=True)(
        model=model, x_batch=xs, y_batch=y, a_batch=maps, device="cpu", batch_size=8)
    ious = []
    for m, b in zip(maps[:, 0], boxes):  # IoU@10: one box around the top 10 % pixels
        kth = np.sort(m.ravel())[-int(np.ceil(0.1 * m.size))]
        ys, xs_ = np.nonzero(m >= kth)
        sel = (ys.min(), xs_.min(), ys.max() + 1, xs_.max() + 1)
        inter = max(0, min(sel[2], b[2]) - max(sel[0], b[0])) * max(0, min(sel[3], b[3]) - max(sel[1], b[1]))
        union = (sel[2] - sel[0]) * (sel[3] - sel[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        ious.append(inter / union)
    return time.perf_counter() - start


CHILD = """
import resource, sys, time
from medlens.models import build_model
from medlens.workflows.dataset_run import run_dataset
factory = lambda: build_model("medlens.models:phantom_net", num_classes=2, in_channels=1, spatial_dims=2).eval()
start = time.perf_counter()
r = run_dataset(factory, [sys.argv[1]], sys.argv[2], batch_size=32, shard_size=256, overlays="worst:8", n_boot=200,
                resume=sys.argv[3] == "resume", workers=int(sys.argv[4]), devices=int(sys.argv[5]), strategy="ddp")
if r.rank == 0:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]  # ru_maxrss survives exec
    print(f"{time.perf_counter() - start:.2f} {int(hwm) / 1024:.0f} {r.done}")
"""


def child(folder, out, mode="fresh", workers=0, devices=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    start = time.perf_counter()
    script = Path(folder).parent / "child.py"  # a file: Fabric starts the other ranks by re-running the command line
    script.write_text(CHILD)
    done = subprocess.run([sys.executable, str(script), str(folder), str(out), mode, str(workers), str(devices)],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    seconds, rss, n = done.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(rss), int(n), wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    rows = []
    if MRI.exists() and args.images:
        files = mri_files(args.images)
        t_base = bench_baseline(files, args.steps)
        t_med = bench_medlens(files, tmp / "mri", args.steps, args.batch)
        rows.append((f"{len(files)} brain MRI, 224 px: medlens run (Grad-CAM, PG, IoU@10, deletion {args.steps} steps)",
                     f"{t_med:.1f} s ({len(files) / t_med:.2f} img/s)"))
        rows.append(("same: pytorch-grad-cam + Quantus PointingGame + PixelFlipping loop",
                     f"{t_base:.1f} s ({len(files) / t_base:.2f} img/s); medlens x{t_base / t_med:.2f}"))
        print(rows[-2:], flush=True)
    from medlens.data.phantoms import make_phantoms, write_phantoms

    for n in (args.small, args.large):
        write_phantoms(tmp / f"ph{n}", make_phantoms(n, 32, seed=0))
    s_small, rss_small, _, _ = child(tmp / f"ph{args.small}", tmp / "small")
    s_large, rss_large, _, _ = child(tmp / f"ph{args.large}", tmp / "large")
    rows.append((f"peak RSS, {args.small} phantoms (32 px)", f"{rss_small:.0f} MiB ({s_small:.1f} s)"))
    rows.append((f"peak RSS, {args.large} phantoms (32 px)", f"{rss_large:.0f} MiB ({s_large:.1f} s)"))
    print(rows[-2:], flush=True)
    s_two, _, _, wall_two = child(tmp / f"ph{args.small}", tmp / "two", devices=2)
    rows.append((f"{args.small} phantoms, 1 process vs 2 Fabric processes (gloo)", f"{s_small:.1f} s vs {s_two:.1f} s"))
    s_resume, _, _, wall_resume = child(tmp / f"ph{args.large}", tmp / "large", mode="resume")
    rows.append((f"resume a finished {args.large}-input run", f"{s_resume:.2f} s in the runner ({wall_resume:.1f} s with start-up)"))
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
