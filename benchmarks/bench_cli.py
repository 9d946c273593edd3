"""``medlens explain`` (the CLI) vs ``medlens.explain`` (the API): per-image time on real brain MRI.

The same 1-channel ResNet-18 (seeded weights, written once to a temporary .safetensors file), the
same images (``--n`` JPEGs from ../shared/data/brain-tumor-mri, classes alternating) prepared at
``--size`` px, the same methods and batch size. Timed:

* ``api``: :func:`medlens.explain` on the prepared tensors, batch by batch, every method (the maps
  only: nothing read or written);
* ``cli in-process``: the ``explain`` command run through the Typer app in this process (model
  loading, reading, preparing, explaining, writing overlays/maps/boxes/figures/index.html);
* ``cli --no-figures``: the same without the titled figures;
* ``writes inline``: the library call behind the command (:func:`medlens.workflows.explain.explain_inputs`,
  same arguments, model already built) with ``background_writes=False``: each batch's files are
  encoded and written before the next batch starts, instead of on the writer thread, which uses a
  second core while the model runs;
* ``cli subprocess`` (once): a fresh ``python -m``-style process, interpreter start and imports included.

The goal is cli in-process / api <= 1.5. ``--profile`` prints the top of a cProfile of one
in-process CLI run (cumulative time), to find where the rest goes.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_cli.py [--n 24] [--size 224]
     [--methods gradcam,layercam,saliency] [--repeats 2] [--profile]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from common import print_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brain-tumor-mri"


def brain_images(n: int) -> list[Path]:
    """``n`` brain MRI JPEGs, classes alternating (glioma, meningioma, pituitary), sorted within a class."""
    if not DATA.is_dir():
        sys.exit(f"no data: {DATA} is missing (the benchmark needs the shared brain MRI images)")
    classes = [sorted(p.glob("*.jpg")) for p in sorted(DATA.iterdir()) if p.is_dir()]
    picked = [files[i] for i in range(n) for files in classes if i < len(files)]
    return picked[:n]


def make_model(weights: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    from medlens.models import save_weights

    save_weights(model.eval(), weights)
    return model.eval()


def prepared(files: list[Path], size: int) -> torch.Tensor:
    """(N, 1, size, size) model tensors, prepared exactly as ``medlens explain`` prepares them."""
    from medlens.data.prepare import Preprocessing, prepare_loaded
    from medlens.io.loading import read_image

    pre = Preprocessing(channels=1, size=(size, size), dims=2)
    return torch.stack([prepare_loaded(read_image(f), pre, f).tensor for f in files])


def cli_args(weights: Path, files: list[Path], out: Path, size: int, methods: list[str], batch: int, figures: bool) -> list[str]:
    args = ["explain", "torchvision:resnet18", str(weights), *map(str, files), "--in-channels", "1", "--num-classes", "3",
            "--size", str(size), "--batch-size", str(batch), "--out", str(out), "--overwrite", "--device", "cpu"]
    for method in methods:
        args += ["-m", method]
    return args + ([] if figures else ["--no-figures"])


def run_in_process(args: list[str]) -> None:
    from typer.main import get_command

    from medlens.cli import app

    try:
        get_command(app).main(args, standalone_mode=False)
    except SystemExit as stop:  # a failing command exits non-zero: the benchmark must not time it
        if stop.code:
            raise


def inline(model: torch.nn.Module, files: list[Path], out: Path, size: int, methods: list[str], batch: int) -> None:
    from medlens.workflows.explain import explain_inputs

    explain_inputs(model, files, out, methods, size=(size, size), batch_size=batch, overwrite=True, progress=False,
                   background_writes=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", default="gradcam,layercam,saliency")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-subprocess", action="store_true", help="skip the fresh-process run")
    args = parser.parse_args()
    methods = args.methods.split(",")

    from medlens import explain

    files = brain_images(args.n)
    work = Path(tempfile.mkdtemp(prefix="medlens-bench-cli-"))
    model = make_model(work / "resnet18.safetensors")
    x = prepared(files, args.size)

    def api() -> None:
        for method in methods:
            for i in range(0, len(x), args.batch):
                explain(model, x[i : i + args.batch], method)

    contenders = {
        "api": api,
        "cli in-process": lambda: run_in_process(cli_args(work / "resnet18.safetensors", files, work / "out", args.size,
                                                          methods, args.batch, True)),
        "cli --no-figures": lambda: run_in_process(cli_args(work / "resnet18.safetensors", files, work / "out-nofig",
                                                            args.size, methods, args.batch, False)),
        "writes inline": lambda: inline(model, files, work / "out-inline", args.size, methods, args.batch),
    }
    for fn in contenders.values():  # warm-up: imports, first-call caches
        fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):  # rounds interleaved, so load on a shared machine hits all alike
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    times = {name: min(values) / len(files) for name, values in samples.items()}
    notes = {"api": f"{len(files)} images, {len(methods)} methods, batch {args.batch}"}
    if not args.no_subprocess:
        command = [sys.executable, "-c", "from medlens.cli import app; app()",
                   *cli_args(work / "resnet18.safetensors", files, work / "out-sub", args.size, methods, args.batch, True)]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times["cli subprocess"] = (time.perf_counter() - start) / len(files)
        notes["cli subprocess"] = "once; interpreter start and imports included"
    print_table(f"medlens explain vs medlens.explain, per image ({args.size}px, {', '.join(methods)})", times, "api", notes)
    ratio = times["cli in-process"] / times["api"]
    print(f"\ncli in-process / api = {ratio:.2f} (goal <= 1.5); maps per image: {len(methods)}; times: per image, best of {args.repeats}")
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        contenders["cli in-process"]()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)


if __name__ == "__main__":
    main()
