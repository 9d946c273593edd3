"""``medlens prototype``: the input a trained classifier takes as the most typical of a class."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medlens.cli.app import app
from medlens.errors import MedlensError, one_line


def _read_stack(paths: list[Path], channels: int, size: tuple[int, ...]):
    """Images/volumes at ``paths`` (files or folders), as (N, channels, *size) float tensors."""
    import torch

    from medlens.core.resample import upsample
    from medlens.io.loading import read_image

    files = [f for p in paths for f in (sorted(x for x in p.rglob("*") if x.is_file() and not x.name.endswith(".txt")) if p.is_dir() else [p])]
    if not files:
        raise MedlensError(f"no images found in {', '.join(str(p) for p in paths)}")
    images = []
    for file in files:
        image = read_image(file).image  # (C, *S)
        if image.dim() - 1 != len(size):
            raise MedlensError(f"{file}: has {image.dim() - 1} spatial dims but --size has {len(size)}")
        if image.shape[0] != channels:
            image = image.mean(0, keepdim=True).expand(channels, *image.shape[1:])
        images.append(upsample(image[None].float(), size)[0])
    return torch.stack(images)


def _save(images, out: Path, overwrite: bool) -> list[Path]:
    """Write the prototypes as one .npy (all) and, for 2D, one greyscale/RGB PNG each."""
    import io

    import numpy as np
    from PIL import Image

    from medlens.core.resample import normalise
    from medlens.io.atomic import write_bytes

    buffer = io.BytesIO()
    np.save(buffer, images.cpu().numpy())
    written = [write_bytes(out.with_suffix(".npy"), buffer.getvalue(), overwrite=overwrite)]
    if images.dim() == 4:
        shown = normalise(images.flatten(1)[:, None]).view_as(images)  # per-image min-max
        for i, img in enumerate(shown):
            pixels = (img.permute(1, 2, 0).squeeze(-1).cpu().numpy() * 255).round().astype(np.uint8)
            png = io.BytesIO()
            Image.fromarray(pixels if pixels.ndim == 2 or pixels.shape[2] == 3 else pixels[..., 0]).save(png, format="PNG")
            written.append(write_bytes(out.with_name(f"{out.stem}_{i}.png"), png.getvalue(), overwrite=overwrite))
    return written


def _check_writable(out: Path) -> None:
    """The folder of the --out stem exists (or can be made) and takes files; exit 2 naming it otherwise."""
    import os
    import tempfile

    from medlens.cli.explain import fail

    if out.is_dir():
        fail(f"--out {out} is a folder; give a file stem such as {out / 'prototype'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medlens-probe.", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        fail(f"--out {out}: cannot write in {out.parent} ({error.strerror or error})")


@app.command("prototype")
def prototype_command(
    model: str = typer.Argument(..., help="model spec: torchvision:resnet18, timm:..., pkg.module:factory"),
    weights: str = typer.Argument(..., help=".pth/.pt/.safetensors weights (loaded safely), or 'none'"),
    classes: list[int] = typer.Option(..., "--class", "-c", help="class to build a prototype of; repeat for several"),
    num_classes: int = typer.Option(2, "--num-classes", "-n", help="classes of the model"),
    in_channels: int = typer.Option(1, "--in-channels", help="input channels of the model"),
    size: str = typer.Option("64,64", "--size", help="input size, e.g. 64 (every axis), 64,64 or 32,32,32"),
    dims: Optional[int] = typer.Option(None, "--dims", help="2 for images, 3 for volumes (default: from --size, 2 for one number)"),
    init: Optional[Path] = typer.Option(None, "--init", help="start from this image instead of zeros"),
    mean_images: list[Path] = typer.Option([], "--mean-images", help="images (or folders) of the class: their mean is the pull target"),
    lam: float = typer.Option(0.1, "--lambda", help="weight of the MSE pull toward the class mean"),
    steps: int = typer.Option(200, "--steps"),
    lr: float = typer.Option(0.05, "--lr"),
    tv: float = typer.Option(0.0, "--tv", help="total-variation weight"),
    jitter: int = typer.Option(0, "--jitter", help="random roll of up to this many pixels per step"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("prototype"), "--out", "-o", help="output path stem (.npy, and _i.png for 2D)"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Optimise an input that the model assigns to each --class (cross-entropy + lambda * MSE to
    the class mean, Adam), from zeros or from --init, and save it."""
    from rich.progress import Progress

    from medlens.cli.explain import fail, load_model, parse_size  # shared with `medlens explain`
    from medlens.methods.prototype import class_prototype

    shape = parse_size(size)
    if num_classes < 1:
        fail(f"--num-classes {num_classes}: a model has at least 1 class")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        fail(f"--class {bad[0]} is out of range for {num_classes} classes (0..{num_classes - 1}; see --num-classes)")
    if not 1 <= in_channels <= 64:
        fail(f"--in-channels {in_channels}: use 1 (greyscale) or 3 (RGB), at most 64")
    if steps < 1 or lr <= 0 or lam < 0 or tv < 0 or jitter < 0:
        fail("--steps must be >= 1, --lr > 0, and --lambda, --tv, --jitter >= 0")
    _check_writable(out)
    if dims is not None and dims not in (2, 3):
        fail(f"--dims {dims}: use 2 for images or 3 for volumes")
    if len(shape) == 1:
        shape = shape * (dims or 2)
    elif dims is not None and len(shape) != dims:
        fail(f"--size {size} has {len(shape)} axes but --dims is {dims}")
    try:
        net = load_model(model, weights, num_classes, in_channels, len(shape), device)
        dev = next(net.parameters()).device
        start = _read_stack([init], in_channels, shape)[0].to(dev) if init is not None else None
        mean = _read_stack(mean_images, in_channels, shape).mean(0).to(dev) if mean_images else None
        with Progress(transient=True) as progress:
            progress.add_task(f"optimising {len(classes)} prototype(s), {steps} steps", total=None)
            result = class_prototype(net, classes, shape=(in_channels, *shape), init=start, class_mean=mean, lam=lam,
                                     steps=steps, lr=lr, tv=tv, jitter=jitter, seed=seed)
        written = _save(result.images, out, overwrite=True)
    except (MedlensError, RuntimeError) as err:  # RuntimeError: the model itself failed on the input
        fail(one_line(err))
    except OSError as err:
        fail(f"cannot write {err.filename or out} ({err.strerror or err})")
    for cls, prob in zip(result.targets.tolist(), result.probabilities.tolist()):
        typer.echo(f"class {cls}: model probability {prob:.3f}")
    for path in written:
        typer.echo(f"wrote {path}")
