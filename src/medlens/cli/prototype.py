"""``medlens prototype``: the input a trained classifier takes as the most typical of a class."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medlens.cli.app import app
from medlens.errors import MedlensError, one_line


def _files(paths: list[Path]) -> list[Path]:
    from medlens.io.loaded import is_readable

    return [f for p in paths for f in (sorted(x for x in p.rglob("*") if is_readable(x)) if p.is_dir() else [p])]


def _read_stack(paths: list[Path], pre) -> "torch.Tensor":
    """Images/volumes at ``paths`` (files or folders) prepared as for the model: (N, C, *size) in model units
    (display range [0, 1], resized, channels matched, then the model's normalisation; see medlens.data.prepare)."""
    import torch

    from medlens.data.prepare import prepare_loaded
    from medlens.io.loading import read_image

    files = _files(paths)
    if not files:
        raise MedlensError(f"no images found in {', '.join(str(p) for p in paths)}")
    images = []
    for file in files:
        loaded = read_image(file)
        if loaded.image.dim() - 1 != len(pre.size):
            raise MedlensError(f"{file}: has {loaded.image.dim() - 1} spatial dims but --size has {len(pre.size)}")
        images.append(prepare_loaded(loaded, pre, file).tensor)
    return torch.stack(images)


def _class_means(root: Path, classes: list[int], names: Optional[list[str]], pre) -> "torch.Tensor":
    """One mean image per class from ``root/<class name>/`` (or ``root/<class index>/``), in model units."""
    import torch

    means = []
    for cls in classes:
        folder = next((root / n for n in ([names[cls]] if names else []) + [str(cls)] if (root / n).is_dir()), None)
        if folder is None:
            raise MedlensError(f"--class-means {root}: no folder for class {names[cls] if names else cls}")
        means.append(_read_stack([folder], pre).mean(0))
    return torch.stack(means)


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
    model: str = typer.Argument(..., help="a run folder of medlens train (runs/NAME), or a model spec: torchvision:resnet18, timm:..., pkg.module:factory"),
    weights: Optional[str] = typer.Argument(None, help="for a spec: .pth/.pt/.safetensors weights (loaded safely), or 'none'; a run folder uses its best.safetensors"),
    classes: list[str] = typer.Option(..., "--class", "-c", help="class (number or name) to build a prototype of; repeat for several"),
    num_classes: int = typer.Option(2, "--num-classes", "-n", help="classes of the model (a run folder knows its own)"),
    class_names: Optional[str] = typer.Option(None, "--class-names", help="comma-separated class names, in class order (a run folder knows its own): name --class and the files"),
    in_channels: int = typer.Option(1, "--in-channels", help="input channels of the model (a run folder knows its own)"),
    size: Optional[str] = typer.Option(None, "--size", help="input size, e.g. 64 (every axis), 64,64 or 32,32,32 (default: the run's, else 64,64)"),
    dims: Optional[int] = typer.Option(None, "--dims", help="2 for images, 3 for volumes (default: from --size, 2 for one number)"),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="none, imagenet, zscore or mean=a,b,c/std=d,e,f (default: the run's, else none)"),
    model_kwargs: list[str] = typer.Option([], "--model-kwargs", help="model constructor argument key=value (YAML value); repeatable"),
    init: Optional[Path] = typer.Option(None, "--init", help="start from this image (prepared like the model's inputs) instead of zeros"),
    mean_images: list[Path] = typer.Option([], "--mean-images", help="images (or folders) of the class: their mean is the pull target"),
    class_means: Optional[Path] = typer.Option(None, "--class-means", help="a dataset folder with one subfolder per class: each class is pulled to its own mean image"),
    lam: float = typer.Option(0.1, "--lambda", help="weight of the MSE pull toward the class mean"),
    steps: int = typer.Option(200, "--steps"),
    lr: float = typer.Option(0.05, "--lr"),
    tv: float = typer.Option(0.0, "--tv", help="total-variation weight"),
    jitter: int = typer.Option(0, "--jitter", help="random roll of up to this many pixels per step"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("prototype"), "--out", "-o", help="output path stem: STEM.npy (all, model units) and, for 2D, STEM_<class name>.png each (titled, >= 256 px, colourbar)"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Optimise an input that the model assigns to each --class (cross-entropy + lambda * MSE to
    the class mean, Adam), from zeros or from --init, and save it. The optimisation runs in the
    model's own units: --init and the mean images are prepared exactly like the model's inputs."""
    from rich.progress import Progress

    from medlens.cli.explain import fail, parse_model_kwargs, parse_size  # shared with `medlens explain`
    from medlens.data.prepare import parse_normalize
    from medlens.methods.prototype import class_prototype
    from medlens.models.run_folder import is_run_folder, is_weights_file, load_model_source
    from medlens.workflows.prototype import save_prototypes

    if is_run_folder(model) and weights is not None and not is_weights_file(weights):
        fail(f"{weights}: not a weights file (a run folder uses its best.safetensors)")
    if weights is None and not is_run_folder(model):
        fail(f"{model} is a model spec: give its weights (or 'none'), or pass a run folder")
    shape = parse_size(size)
    if num_classes < 1:
        fail(f"--num-classes {num_classes}: a model has at least 1 class")
    numbers = [int(c) for c in classes if c.lstrip("-").isdigit()]
    bad = [c for c in numbers if not 0 <= c < num_classes] if not is_run_folder(model) else [c for c in numbers if c < 0]
    if bad:
        fail(f"--class {bad[0]} is out of range for {num_classes} classes (0..{num_classes - 1}; see --num-classes)")
    if not 1 <= in_channels <= 64:
        fail(f"--in-channels {in_channels}: use 1 (greyscale) or 3 (RGB), at most 64")
    if steps < 1 or lr <= 0 or lam < 0 or tv < 0 or jitter < 0:
        fail("--steps must be >= 1, --lr > 0, and --lambda, --tv, --jitter >= 0")
    _check_writable(out)
    if dims is not None and dims not in (2, 3):
        fail(f"--dims {dims}: use 2 for images or 3 for volumes")
    if shape is not None and len(shape) > 1 and dims is not None and len(shape) != dims:
        fail(f"--size {size} has {len(shape)} axes but --dims is {dims}")
    kwargs = parse_model_kwargs(model_kwargs)
    try:
        run = is_run_folder(model)
        model_dims = dims or (len(shape) if shape is not None and len(shape) > 1 else 2)
        source = load_model_source(model, weights, num_classes, in_channels, model_dims, device, kwargs)
        pre = source.preprocessing
        if shape is None:
            shape = pre.size if run and pre.size else (64,)
        if len(shape) == 1:
            shape = shape * (dims or pre.dims or 2)
        pre = pre.override(size=tuple(shape), channels=pre.channels or in_channels, **parse_normalize(normalize))
        names = pre.class_names
        if class_names is not None:
            names = [n.strip() for n in class_names.split(",")]
            expected = len(pre.class_names) if pre.class_names else num_classes
            if len(names) != expected or not all(names):
                raise MedlensError(f"--class-names gives {len(names)} names but the model has {expected} classes")
        chosen = []
        n_out = len(names) if names else num_classes
        for c in classes:
            if c.lstrip("-").isdigit():
                if not 0 <= int(c) < n_out:
                    raise MedlensError(f"--class {c} is out of range for {n_out} classes (0..{n_out - 1})")
                chosen.append(int(c))
            elif names and c in names:
                chosen.append(names.index(c))
            else:
                raise MedlensError(f"--class {c!r} is not a class number" + (f" or one of {', '.join(names)}" if names else ""))
        net = source.model
        dev = next(net.parameters()).device
        start = _read_stack([init], pre)[0].to(dev) if init is not None else None
        mean = _read_stack(mean_images, pre).mean(0).to(dev) if mean_images else None
        if class_means is not None:
            mean = _class_means(class_means, chosen, names, pre).to(dev)
        with Progress(transient=True) as progress:
            progress.add_task(f"optimising {len(chosen)} prototype(s), {steps} steps", total=None)
            result = class_prototype(net, chosen, shape=(pre.channels, *shape), init=start, class_mean=mean, lam=lam,
                                     steps=steps, lr=lr, tv=tv, jitter=jitter, seed=seed)
        label = str(model) if weights is None or str(weights).lower() == "none" else f"{model} ({Path(str(weights)).name})"
        written = save_prototypes(result.images, result.targets.tolist(), result.probabilities.tolist(), out, label,
                                  names, overwrite=True)
    except (MedlensError, RuntimeError) as err:  # RuntimeError: the model itself failed on the input
        fail(one_line(err))
    except OSError as err:
        fail(f"cannot write {err.filename or out} ({err.strerror or err})")
    for cls, prob in zip(result.targets.tolist(), result.probabilities.tolist()):
        label = f" ({names[cls]})" if names and 0 <= cls < len(names) else ""
        typer.echo(f"class {cls}{label}: model probability {prob:.3f}")
    for path in written:
        typer.echo(f"wrote {path}")
