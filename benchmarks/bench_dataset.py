"""Dataset-scale run (``medlens run``) benchmarks.

1. Throughput on real brain MRI (--size px, torchvision resnet18, seeded random weights): medlens
   (Grad-CAM + pointing game + IoU@10 + deletion curve, Parquet + Zarr outputs) against a loop of
   pytorch-grad-cam + Quantus (PointingGame, PixelFlipping) + a NumPy IoU@10 on the same --n
   images, both on one thread, in --blocks alternating blocks (load changes fall on both).
2. Peak RSS of a run over --small vs --large phantom inputs, each in a fresh process.
3. 1 vs 2 Fabric processes (CPU, gloo) on the small phantom set.
4. Resuming a finished run.

    PYTHONPATH=src python benchmarks/bench_dataset.py --n 2000 --size 224 --blocks 4 --small 1000 --large 10000

``--precisions 32,bf16`` (the default) times medlens in float32 and under bfloat16 autocast and
reports how far the bf16 results are from the float32 ones; the reference loop runs in float32
(pytorch-grad-cam and Quantus move tensors to NumPy, which has no bfloat16).
"""

from __future__ import annotations

import argparse
import os
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
    """``n`` annotated brain MRI JPEGs, the classes taken in turn (a class that runs out leaves
    the rest to the others: 2,000 of the 2,297 annotated images)."""
    classes = [sorted(p for p in c.glob("*.jpg") if p.with_suffix(".txt").exists())
               for c in sorted(p for p in MRI.iterdir() if p.is_dir())]
    files = [c[i] for i in range(max(map(len, classes))) for c in classes if i < len(c)]
    if len(files) < n:
        raise SystemExit(f"only {len(files)} annotated images under {MRI}; asked for {n}")
    return files[:n]


def resnet():
    from medlens.models import build_model

    torch.manual_seed(0)
    return build_model("torchvision:resnet18", num_classes=3, in_channels=3).eval()


def bench_medlens(files, out, steps, batch, size, workers, precision="32"):
    """Seconds for ``medlens run`` (its own decoding workers, Parquet + Zarr writes included)."""
    from medlens.workflows.dataset_run import run_dataset

    start = time.perf_counter()
    run_dataset(resnet, files, out, methods=["gradcam"], layer="layer4", size=(size, size), normalize="imagenet",
                batch_size=batch, shard_size=64, deletion_steps=steps, overlays="none", n_boot=200, workers=workers,
                precision=precision)
    return time.perf_counter() - start


def bench_baseline(files, steps, batch, size):
    """Seconds for the reference loop, batch by batch (decoding included, as medlens' is): Grad-CAM
    from pytorch-grad-cam, Quantus PointingGame and PixelFlipping, a NumPy IoU@10.

    PixelFlipping gets the map repeated over the 3 channels and flips ``3 H W / steps`` values a
    step, so it runs ``steps`` forward passes per image, as medlens' deletion curve does (steps + 1
    points); flipping ``H W / steps`` values would run 3 x more forwards and flatter medlens.
    Quantus asserts that a step divides ``H W`` (not ``3 H W``), so that one check is switched off."""
    import quantus
    import quantus.metrics.faithfulness.pixel_flipping as pf
    from pytorch_grad_cam import GradCAM

    from medlens.workflows.stream import ExplainDataset, PlannedItem

    model = resnet()
    start = time.perf_counter()
    data = ExplainDataset([PlannedItem(i, str(f)) for i, f in enumerate(files)], 3, (size, size), "imagenet")
    cam = GradCAM(model=model, target_layers=[model.layer4])
    pf.asserts = type("Asserts", (), {name: staticmethod(getattr(pf.asserts, name)) for name in dir(pf.asserts)
                                       if not name.startswith("_")})
    pf.asserts.assert_features_in_step = staticmethod(lambda *args, **kwargs: None)
    pointing = quantus.PointingGame(disable_warnings=True)
    flipping = quantus.PixelFlipping(features_in_step=3 * size * size // steps, perturb_baseline="black",
                                     disable_warnings=True)
    for lo in range(0, len(data), batch):
        items = [data[i] for i in range(lo, min(lo + batch, len(data)))]
        x = torch.stack([it["x"] for it in items])
        masks = torch.stack([it["mask"] for it in items]).numpy()[:, None].astype(float)
        maps = cam(x, None)[:, None]
        with torch.no_grad():
            y = model(x).argmax(1).numpy()
        xs = np.ascontiguousarray(x.numpy())
        pointing(model=model, x_batch=xs, y_batch=y, a_batch=maps, s_batch=masks, device="cpu")
        flipping(model=model, x_batch=xs, y_batch=y, a_batch=np.repeat(maps, 3, axis=1), device="cpu", batch_size=batch)
        for m, it in zip(maps[:, 0], items):  # IoU@10: one box around the top 10 % pixels
            b = it["box"].numpy()
            kth = np.sort(m.ravel())[-int(np.ceil(0.1 * m.size))]
            ys, xs_ = np.nonzero(m >= kth)
            sel = (ys.min(), xs_.min(), ys.max() + 1, xs_.max() + 1)
            inter = max(0, min(sel[2], b[2]) - max(sel[0], b[0])) * max(0, min(sel[3], b[3]) - max(sel[1], b[1]))
            _ = inter / ((sel[2] - sel[0]) * (sel[3] - sel[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
    return time.perf_counter() - start


CHILD = """
import sys, time
from medlens.models import build_model
from medlens.workflows.dataset_run import run_dataset
factory = lambda: build_model("medlens.models:phantom_net", num_classes=2, in_channels=1, spatial_dims=2).eval()
start = time.perf_counter()
r = run_dataset(factory, [sys.argv[1]], sys.argv[2], batch_size=32, shard_size=256, overlays="worst:8", n_boot=200,
                resume=sys.argv[3] == "resume", workers=int(sys.argv[4]), devices=int(sys.argv[5]), strategy="ddp")
if r.rank == 0:
    print(f"{time.perf_counter() - start:.2f} {r.done}")
"""


def child(folder, out, mode="fresh", workers=0, devices=1):
    """(seconds in the runner, peak RSS MiB of the process tree, inputs done, wall seconds with
    start-up) of one run in a fresh process. The peak is ``ru_maxrss`` of that child alone
    (``os.wait4``), the largest of its own and its waited-for workers' / ranks' peaks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    start = time.perf_counter()
    script = Path(folder).parent / "child.py"  # a file: Fabric starts the other ranks by re-running the command line
    script.write_text(CHILD)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, str(script), str(folder), str(out), mode, str(workers), str(devices)],
                                env=env, stdout=stdout, stderr=stderr, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        stdout.seek(0), stderr.seek(0)
        if proc.returncode:
            raise SystemExit(stderr.read()[-2000:])
        seconds, n = stdout.read().strip().splitlines()[-1].split()
    return float(seconds), usage.ru_maxrss / 1024, int(n), wall


def throughput(args, tmp: Path) -> list[tuple[str, str, str]]:
    """medlens vs the reference loop on the same files, in ``--blocks`` alternating blocks (so a
    change of load on a shared machine falls on both)."""
    import pytorch_grad_cam  # noqa: F401  (imports are not timed, for either side)
    import quantus  # noqa: F401

    import medlens.workflows.dataset_run  # noqa: F401

    files = mri_files(args.n)
    blocks = [files[i :: args.blocks] for i in range(args.blocks)]
    precisions = args.precisions.split(",")
    t_base, t_med = 0.0, {p: 0.0 for p in precisions}
    for b, block in enumerate(blocks):
        if not args.skip_baseline:
            t_base += bench_baseline(block, args.steps, args.batch, args.size)
        for p in precisions:
            t_med[p] += bench_medlens(block, tmp / f"mri{b}-{p}", args.steps, args.batch, args.size, args.workers, p)
        print(f"block {b + 1}/{len(blocks)}: medlens {t_med} s, reference {t_base:.1f} s so far", flush=True)
    conditions = (f"{len(files)} brain MRI jpgs, {args.size} px, resnet18 (seeded random), 1 thread, batch {args.batch}, "
                  f"deletion {args.steps} steps, {args.workers} decoding worker(s), {args.blocks} alternating block(s)")
    rows = []
    for p in precisions:
        vs = f"; x{t_base / t_med[p]:.2f} the reference" if not args.skip_baseline else ""
        rows.append((f"medlens run --precision {p}: Grad-CAM + pointing game + IoU@10 + deletion AUC",
                     f"{len(files) / t_med[p]:.2f} img/s{vs}", conditions))
    if not args.skip_baseline:
        rows.append(("pytorch-grad-cam + Quantus PointingGame + PixelFlipping + NumPy IoU@10 (float32)",
                     f"{len(files) / t_base:.2f} img/s", "same"))
    if "32" in precisions:
        for p in precisions:
            if p != "32":
                rows.append((f"--precision {p} vs 32, same images", agreement(tmp, len(blocks), p), "per row of the results table"))
    return rows


def agreement(tmp: Path, n_blocks: int, precision: str) -> str:
    """How far the reduced-precision run's results are from the float32 run's."""
    import pandas as pd

    def table(p: str):
        parts = [pd.read_parquet(tmp / f"mri{b}-{p}" / "results").assign(block=b) for b in range(n_blocks)]
        return pd.concat(parts).sort_values(["block", "item"]).reset_index(drop=True)

    ref, low = table("32"), table(precision)
    same_pred = float((ref["prediction"] == low["prediction"]).mean())
    same_pg = float((ref["pointing_game"] == low["pointing_game"]).mean())
    return (f"deletion AUC max |diff| {float((ref['deletion_auc'] - low['deletion_auc']).abs().max()):.4f} "
            f"(mean {float((ref['deletion_auc'] - low['deletion_auc']).abs().mean()):.4f}); IoU@10 max |diff| "
            f"{float((ref['iou@10'] - low['iou@10']).abs().max()):.3f}; same prediction {same_pred:.1%}, "
            f"same pointing-game hit {same_pg:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", "--images", dest="n", type=int, default=48, help="brain MRI images (0: skip)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--precisions", default="32,bf16", help="medlens run --precision values to time (32 first)")
    parser.add_argument("--small", type=int, default=1000, help="phantoms for the small RSS run (0: skip RSS, 1 vs 2, resume)")
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--phantom-size", type=int, default=32)
    parser.add_argument("--phantoms", type=Path, default=None, help="folder to keep phantoms in (ph<N>/), reused")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    rows = []
    if MRI.exists() and args.n:
        rows += throughput(args, tmp)
        print(rows, flush=True)
    if args.small:
        rows += scale_rows(args, tmp)
    print("| figure | measured | conditions |\n|---|---|---|")
    for name, value, conditions in rows:
        print(f"| {name} | {value} | {conditions} |")


def scale_rows(args, tmp: Path) -> list[tuple[str, str, str]]:
    store = args.phantoms or tmp
    folders = {}
    for n in (args.small, args.large):
        folders[n] = store / f"ph{n}"
        if not folders[n].exists():  # in a child: the children timed below are forked from this process, and
            # ru_maxrss keeps the high-water mark across exec, so a parent holding 10,000 phantoms inflates their peaks
            subprocess.run([sys.executable, "-c", "import sys; from medlens.data.phantoms import make_phantoms, write_phantoms; "
                            "write_phantoms(sys.argv[1], make_phantoms(int(sys.argv[2]), int(sys.argv[3]), seed=0))",
                            str(folders[n]), str(n), str(args.phantom_size)], check=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    px = f"{args.phantom_size} px phantoms, phantom_net, batch 32, shard 256, 0 workers"
    s_small, rss_small, _, _ = child(folders[args.small], tmp / "small")
    s_large, rss_large, _, _ = child(folders[args.large], tmp / "large")
    rows = [(f"peak RSS, {args.small} vs {args.large} inputs",
             f"{rss_small:.0f} vs {rss_large:.0f} MiB (x{rss_large / rss_small:.2f})", f"{px}; fresh process each")]
    print(rows, flush=True)
    s_two, _, _, _ = child(folders[args.small], tmp / "two", devices=2)
    rows.append((f"{args.small} inputs, 1 vs 2 Fabric processes (gloo)",
                 f"{s_small:.1f} s vs {s_two:.1f} s (x{s_small / s_two:.2f})", f"{px}; {os.cpu_count()} shared cores"))
    s_resume, _, _, wall_resume = child(folders[args.large], tmp / "large", mode="resume")
    rows.append((f"resume a finished {args.large}-input run", f"{s_resume:.2f} s in the runner, {wall_resume:.1f} s with start-up", px))
    return rows


if __name__ == "__main__":
    main()
