"""``medlens explain`` and ``medlens layers``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer

from medlens.cli.app import app
from medlens.errors import MedlensError, one_line


def fail(message: str) -> None:
    """Print a one-line error and exit with status 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


MAX_SIZE = 4096  # largest model input side accepted by --size


def parse_size(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        fail(f"--size {text!r} is not like 224 or 224,224 or 64,64,64")
    if not 1 <= len(size) <= 3:
        fail(f"--size {text!r}: give 1, 2 or 3 numbers")
    if any(not 1 <= v <= MAX_SIZE for v in size):
        fail(f"--size {text!r}: every side must be between 1 and {MAX_SIZE} pixels")
    return size


def check_model_args(num_classes: int, in_channels: int, dims: int, size: Optional[tuple[int, ...]] = None,
                     batch_size: int = 1, max_pixels: Optional[int] = None) -> None:
    """Exit 2 with one line naming the argument, before any model or file is touched."""
    if num_classes < 1:
        fail(f"--num-classes {num_classes}: a model has at least 1 class")
    if not 1 <= in_channels <= 64:
        fail(f"--in-channels {in_channels}: use 1 (greyscale) or 3 (RGB), at most 64")
    if dims not in (2, 3):
        fail(f"--dims {dims}: use 2 for images or 3 for volumes")
    if size is not None and len(size) not in (1, dims):
        fail(f"--size {','.join(map(str, size))} has {len(size)} numbers but --dims is {dims}")
    if batch_size < 1:
        fail(f"--batch-size {batch_size}: must be at least 1")
    if max_pixels is not None and max_pixels < 1:
        fail(f"--max-pixels {max_pixels}: must be at least 1")


def check_model_fits(net, dims: int, in_channels: int) -> None:
    """The built model's first convolution against --dims/--in-channels (exit 2 naming the flag)."""
    from medlens.workflows.explain import model_input_spec

    channels, model_dims = model_input_spec(net)
    if model_dims is not None and model_dims != dims:
        fail(f"--dims {dims} but the model's first convolution is {model_dims}D; pass --dims {model_dims}")


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs to method options; numbers and true/false are converted."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            fail(f"--option {pair!r} is not key=value")
        for convert in (int, float):
            try:
                options[key] = convert(value)
                break
            except ValueError:
                continue
        else:
            options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def parse_model_kwargs(pairs: list[str]) -> dict[str, Any]:
    """``--model-kwargs key=value`` pairs; values are YAML (``channels=[8,16,32]``, ``dropout=0.1``, ``norm=batch``)."""
    import yaml

    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--model-kwargs {pair!r} is not key=value")
        try:
            kwargs[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            kwargs[key] = value
    return kwargs


def load_model(spec: str, weights: Optional[str], num_classes: int, in_channels: int, dims: int, device: str,
               model_kwargs: Optional[dict[str, Any]] = None):
    """Build ``spec`` and load ``weights`` ('none' keeps the random initialisation); a run folder rebuilds its own model."""
    from medlens.models.run_folder import load_model_source

    return load_source(spec, weights, num_classes, in_channels, dims, device, model_kwargs).model


def load_source(spec: str, weights: Optional[str], num_classes: int, in_channels: int, dims: int, device: str,
                model_kwargs: Optional[dict[str, Any]] = None, class_names: Optional[list[str]] = None):
    """:func:`~medlens.models.run_folder.load_model_source`, with the flags to pass when weights do not fit."""
    from medlens.models.run_folder import load_model_source

    try:
        return load_model_source(spec, weights, num_classes, in_channels, dims, device, model_kwargs, class_names)
    except MedlensError as error:
        fits = weights and "does not fit" in str(error)
        hint = _flags_hint(weights, num_classes, in_channels, dims) if fits else ""
        raise MedlensError(f"{error}{hint}") from None


def split_model_inputs(model: str, weights: Optional[str], inputs: Optional[list[Path]]) -> tuple[Optional[str], list[Path]]:
    """With a run folder, the second positional is an input unless it names a weights file."""
    from medlens.models.run_folder import is_run_folder, is_weights_file

    inputs = list(inputs or [])
    if is_run_folder(model) and weights is not None and not is_weights_file(weights):
        return None, [Path(weights), *inputs]
    if weights is None and not is_run_folder(model):
        fail(f"{model} is a model spec: give its weights (or 'none') before the inputs, or pass a run folder")
    return weights, inputs


def parse_region(text: Optional[str]):
    """``--region``: None, ``pred``, a mask file, or a box ``x0,y0,x1,y1`` (``x0,y0,z0,x1,y1,z1`` for volumes)."""
    if text is None or text == "pred":
        return text
    if Path(text).exists():
        return Path(text)
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        fail(f"--region {text!r}: use pred, a mask file, or a box x0,y0,x1,y1")
    if len(values) not in (4, 6):
        fail(f"--region {text!r}: a box has 4 numbers (x0,y0,x1,y1) or 6 (x0,y0,z0,x1,y1,z1)")
    half = len(values) // 2
    lower, upper = values[:half], values[half:]
    if half == 2:  # x, y -> tensor order (row, column)
        lower, upper = lower[::-1], upper[::-1]
    if any(hi <= lo for lo, hi in zip(lower, upper)):
        fail(f"--region {text!r}: each upper corner must be past its lower corner")
    return (lower, upper)


def resolve_target(target: str, class_names: Optional[list[str]]):
    """``--target`` by class name (``glioma`` or ``anterior,posterior``) as well as pred/all/topK/numbers."""
    if not class_names or target in ("pred", "all") or target.startswith("top"):
        return target
    parts = [p.strip() for p in target.split(",")]
    if all(p.isdigit() for p in parts):
        return target
    indices = []
    for p in parts:
        if p.isdigit():
            indices.append(int(p))
        elif p in class_names:
            indices.append(class_names.index(p))
        else:
            raise MedlensError(f"--target {p!r} is not a class of this model ({', '.join(class_names)})")
    return ",".join(str(i) for i in indices)


def _flags_hint(weights: str, num_classes: int, in_channels: int, dims: int | None = None) -> str:
    """'; try --in-channels 1 -n 3' from the shapes of the first convolution and the last 2D weight in the file."""
    from medlens.models import read_state_dict

    try:
        state = read_state_dict(weights)
    except MedlensError:
        return ""
    convs = [v for k, v in state.items() if k.endswith("weight") and v.dim() in (4, 5)]
    heads = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    flags = []
    if convs and dims is not None and convs[0].dim() - 2 != dims:
        flags.append(f"--dims {convs[0].dim() - 2}")
    if convs and int(convs[0].shape[1]) != in_channels:
        flags.append(f"--in-channels {int(convs[0].shape[1])}")
    if heads and int(heads[-1].shape[0]) != num_classes:
        flags.append(f"-n {int(heads[-1].shape[0])}")
    return f"; try {' '.join(flags)}" if flags else ""


def check_normalize(normalize: Optional[str], in_channels: int) -> None:
    """``--normalize`` understood and fitting the channels (exit 2 otherwise)."""
    from medlens.data.prepare import parse_normalize

    try:
        parse_normalize(normalize)
    except MedlensError as error:
        fail(str(error))
    if normalize == "imagenet" and in_channels != 3:
        fail(f"--normalize imagenet needs --in-channels 3 (got {in_channels})")


def check_explain_args(target: str, normalize: Optional[str], num_classes: Optional[int], in_channels: int, class_names: Optional[str],
                       alpha: float, box_fraction: float, cmap: str) -> Optional[list[str]]:
    """Every explain argument that can be checked without reading a file; returns the class names list."""
    from medlens.core.targets import check_target_spec

    try:
        check_target_spec(target, num_classes)
    except MedlensError as error:
        words = [w.strip() for w in target.split(",")]
        names = [n.strip() for n in class_names.split(",")] if class_names else None
        by_name = all(w[:1].isalpha() and w.lower() not in ("pred", "all") and not w.lower().startswith("top") for w in words)
        if not by_name or (num_classes is not None and (names is None or any(w not in names for w in words))):
            fail(str(error))  # else: class names, checked once a run folder's classes are known
    check_normalize(normalize, in_channels)
    if not 0.0 <= alpha <= 1.0:
        fail(f"--alpha {alpha}: must be between 0 and 1")
    if not 0.0 < box_fraction <= 1.0:
        fail(f"--box-fraction {box_fraction}: must be above 0 and at most 1")
    import matplotlib

    if cmap not in matplotlib.colormaps:
        fail(f"--cmap {cmap!r} is not a matplotlib colormap (e.g. jet, viridis, inferno)")
    names = [n.strip() for n in class_names.split(",")] if class_names else None
    if names is not None and num_classes is not None and len(names) != num_classes:
        fail(f"--class-names gives {len(names)} name(s) for {num_classes} classes (--num-classes); give one per class")
    return names


@app.command("explain")
def explain_command(
    model: str = typer.Argument(..., help="a run folder of medlens train (runs/NAME), or a model spec: torchvision:resnet50, timm:efficientnet_b0, monai:UNet, pkg.module:factory, hf:FOLDER, bundle:FOLDER"),
    weights: Optional[str] = typer.Argument(None, help="for a spec: .pth/.pt/.ckpt/.safetensors weights (loaded safely), or 'none' (hf:/bundle: folders bring their own); a run folder uses its best.safetensors"),
    inputs: Optional[list[Path]] = typer.Argument(None, help="PNG/JPG/TIFF files, DICOM files or series folders, NIfTI volumes, folders"),
    method: list[str] = typer.Option(["gradcam"], "--method", "-m", help="method name; repeat for several"),
    layer: list[str] = typer.Option([], "--layer", "-l", help="layer path (repeat to fuse layers); default: automatic"),
    fusion: Optional[str] = typer.Option(None, "--fusion", help="several --layer: mean, max, product (one fused map) or none (a map per layer, side by side)"),
    target: str = typer.Option("pred", "--target", "-t", help="pred, all, topK, class numbers like 2 or 0,2, or class names"),
    out: Path = typer.Option(Path("medlens-out"), "--out", "-o", help="output folder"),
    num_classes: int = typer.Option(2, "--num-classes", "-n", help="classes of the model (a run folder knows its own)"),
    in_channels: int = typer.Option(3, "--in-channels", help="input channels of the model (a run folder knows its own)"),
    dims: int = typer.Option(2, "--dims", help="2 for images, 3 for volumes (a run folder knows its own)"),
    size: Optional[str] = typer.Option(None, "--size", help="model input size, e.g. 224 or 224,224 or 64,64,64 (default: the run's)"),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="none, imagenet, zscore or mean=a,b,c/std=d,e,f (default: the run's, else none)"),
    class_names: Optional[str] = typer.Option(None, "--class-names", help="comma-separated class names (default: the run's)"),
    model_kwargs: list[str] = typer.Option([], "--model-kwargs", help="model constructor argument key=value (YAML value); repeatable"),
    region: Optional[str] = typer.Option(None, "--region", help="segmentation: pred (each class's predicted mask), a mask file, or a box x0,y0,x1,y1"),
    boxes: str = typer.Option("components", "--boxes", help="components (boxes around the strongest regions) or none"),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="also write titled pictures (class, probability, colourbar, legend); off is faster"),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    workers: int = typer.Option(0, "--workers", help="processes reading and preparing inputs ahead of the model (0: none)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1"),
    cmap: str = typer.Option("jet", "--cmap", help="matplotlib colormap"),
    alpha: float = typer.Option(0.5, "--alpha", help="overlay opacity"),
    box_fraction: float = typer.Option(0.05, "--box-fraction", help="boxes around the top fraction of each map"),
    block: Optional[int] = typer.Option(None, "--block", help="ViT block for attention methods"),
    head_fusion: Optional[str] = typer.Option(None, "--head-fusion", help="ViT heads: mean, max or min (attention also takes none: one map per head)"),
    discard_ratio: Optional[float] = typer.Option(None, "--discard-ratio", help="rollout: share of weakest attention dropped"),
    option: list[str] = typer.Option([], "--option", help="further method option key=value; repeatable"),
    policy: Optional[str] = typer.Option(None, "--policy", help="DICOM header policy that refuses files not fitting the model, e.g. chest-radiograph"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace results already in --out"),
    dicom_out: Optional[str] = typer.Option(None, "--dicom-out", help="DICOM inputs: also write pm,seg,sr,sc (Parametric Map, Segmentation, SR, Secondary Capture) or all"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="region of each map at or above this value (0..1) for boxes and segments; default: --box-fraction"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="refuse inputs whose header claims more pixels/voxels (default 2**27)"),
) -> None:
    """Explain a model's decisions on images and volumes; writes overlays, maps, boxes and index.html.

    MODEL is a run folder written by `medlens train` (its network, best weights, preprocessing and
    class names are used: nothing to repeat) or a model spec followed by its WEIGHTS."""
    from medlens.data.prepare import parse_normalize
    from medlens.models.run_folder import is_run_folder
    from medlens.workflows.explain import explain_inputs

    weights, input_paths = split_model_inputs(model, weights, inputs)
    if not input_paths:
        fail("no inputs: give image, DICOM or NIfTI files or folders after the model")
    size_tuple = parse_size(size)
    check_model_args(num_classes, in_channels, dims, size_tuple, batch_size, max_pixels)
    run = is_run_folder(model)
    check_explain_args(target, normalize, None if run else num_classes, in_channels, None if run else class_names,
                       alpha, box_fraction, cmap)
    options = parse_options(option)
    if fusion is not None:
        if fusion not in ("mean", "max", "product", "none"):
            fail(f"--fusion {fusion!r}: use mean, max, product or none")
        if fusion == "none" and len(layer) < 2:
            fail("--fusion none shows several layers side by side: give two or more --layer")
        if fusion != "none":
            options["fusion"] = fusion
    for key, value in (("block", block), ("head_fusion", head_fusion), ("discard_ratio", discard_ratio)):
        if value is not None:
            options[key] = value
    names = [n.strip() for n in class_names.split(",")] if class_names else None
    kwargs, region_spec = parse_model_kwargs(model_kwargs), parse_region(region)
    try:
        if dicom_out or threshold is not None:  # refused before the model is built: unknown object types, non-DICOM inputs
            from medlens.workflows.explain import dicom_options

            dicom_options(input_paths, [dicom_out] if dicom_out else [], threshold)
        header_policy = _policy(policy)
        source = load_source(model, weights, num_classes, in_channels, dims, device, kwargs, names)
        pre = source.preprocessing
        if size_tuple is not None and len(size_tuple) == 1:
            size_tuple = size_tuple * (pre.dims or dims)
        pre = pre.override(size=size_tuple, class_names=names, **parse_normalize(normalize))
        if normalize is not None:  # the user's normalisation replaces a model's own (hf:/bundle:)
            pre = dataclasses.replace(pre, model_transform=None)
        chosen_target = resolve_target(target, pre.class_names)
    except (MedlensError, RuntimeError) as error:
        fail(one_line(error))
    if not run:
        check_model_fits(source.model, pre.dims or dims, pre.channels or in_channels)
    try:
        summary = explain_inputs(
            source.model, input_paths, out, methods=method, target=chosen_target,
            layer=(layer if len(layer) > 1 else (layer[0] if layer else None)),
            batch_size=batch_size, class_names=pre.class_names, cmap=cmap, alpha=alpha,
            box_fraction=box_fraction, overwrite=overwrite, policy=header_policy, method_options=options,
            preprocessing=pre, region=region_spec, boxes=boxes, titles=figures, layers_apart=fusion == "none",
            dicom_out=[dicom_out] if dicom_out else (), threshold=threshold, max_pixels=max_pixels, workers=workers,
        )
    except (MedlensError, RuntimeError) as error:  # RuntimeError: the model itself failed on the input
        fail(one_line(error))
    images = len({r["source"] for r in summary.written})
    typer.echo(f"explained {images} input(s) with {', '.join(method)}; results in {out / 'index.html'}")
    for record in summary.written:  # DICOM inputs without a PM's geometry, or a failed DICOM write
        for key in ("skipped", "error"):
            if (record.get("dicom") or {}).get(key):
                typer.secho(f"dicom-out: {record['dicom'][key]}", fg=typer.colors.YELLOW, err=True)
    seen: set[str] = set()
    for path, reason in summary.bad:
        if str(path) in seen:
            continue
        seen.add(str(path))
        typer.secho(f"skipped: {reason}" if str(path) in reason else f"skipped {path}: {reason}", fg=typer.colors.YELLOW, err=True)
    if not summary.written:
        raise typer.Exit(1)


def _policy(name: Optional[str]):
    if name is None:
        return None
    from medlens.io.dicom import POLICIES

    if name not in POLICIES:
        raise MedlensError(f"--policy {name!r} unknown; available: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]


@app.command("layers")
def layers_command(
    model: str = typer.Argument(..., help="a run folder of medlens train, or a model spec, e.g. torchvision:resnet50"),
    num_classes: int = typer.Option(2, "--num-classes", "-n"),
    in_channels: int = typer.Option(3, "--in-channels"),
    dims: int = typer.Option(2, "--dims"),
    size: Optional[str] = typer.Option(None, "--size", help="input size used to trace shapes (default: the run's, else 224)"),
    model_kwargs: list[str] = typer.Option([], "--model-kwargs", help="model constructor argument key=value (YAML value); repeatable"),
    all_layers: bool = typer.Option(False, "--all", help="list every module, not only the candidates"),
) -> None:
    """Summarise a model with torchinfo (full layer names, type, kernel/stride, output shape,
    parameters, trainable or frozen, mult-adds) and the candidate target layers."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from medlens.core.capture import auto_layer, trace_layers
    from medlens.models.run_folder import load_model_source

    size_tuple = parse_size(size)
    kwargs = parse_model_kwargs(model_kwargs)
    try:
        source = load_model_source(model, "none", num_classes, in_channels, dims, "cpu", kwargs)
        pre = source.preprocessing
        channels = pre.channels or in_channels
        if size_tuple is None:
            size_tuple = pre.size or (224,)
        if len(size_tuple) == 1:
            size_tuple = size_tuple * (pre.dims or dims)
        net = source.model
        x = torch.zeros(1, channels, *size_tuple)
        infos = trace_layers(net, x)
        chosen = auto_layer(net, x)
        stats = _torchinfo_rows(net, x)
    except (MedlensError, RuntimeError) as error:  # RuntimeError: the model itself failed on the input
        fail(one_line(error))
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    macs = sum(row.get("macs", 0) for name, row in stats.items() if row.get("leaf"))
    title = (f"{model}: {total:,} parameters ({trainable:,} trainable, {total - trainable:,} frozen), "
             f"{macs / 1e6:,.1f} M mult-adds, input {tuple(x.shape)}")
    table = Table(title=title)
    table.add_column("layer", overflow="fold")
    for column in ("type", "kernel / stride", "output shape", "parameters", "trainable", "mult-adds", "candidate"):
        table.add_column(column, no_wrap=True)
    width = 0
    for info in infos:
        candidate = info.spatial or info.name == chosen
        if not (all_layers or candidate):
            continue
        row = stats.get(info.name, {})
        mark = "default" if info.name == chosen else ("yes" if candidate else "")
        params = info.params
        frozen = row.get("frozen", 0)
        train_text = "-" if params == 0 else ("all" if frozen == 0 else ("frozen" if frozen == params else f"{params - frozen:,}"))
        table.add_row(info.name, info.kind, row.get("kernel", ""), str(info.shape), f"{params:,}", train_text,
                      f"{row['macs']:,}" if row.get("macs") else "", mark)
        width = max(width, len(info.name))
    Console(width=width + 170).print(table)  # wide enough that names are never cut (fold if ever)
    typer.echo(f"default layer: {chosen}")


def _torchinfo_rows(net, x) -> dict[str, dict[str, Any]]:
    """Per module path: kernel/stride text, mult-adds, frozen parameter count, leaf flag (torchinfo)."""
    from torchinfo import summary

    names = {id(m): n for n, m in net.named_modules()}
    stats = summary(net, input_data=x, verbose=0, col_names=("kernel_size", "output_size", "num_params", "mult_adds"), device="cpu")
    rows: dict[str, dict[str, Any]] = {}
    for info in stats.summary_list:
        name = names.get(id(info.module))
        if not name:
            continue
        module = info.module
        kernel = getattr(module, "kernel_size", None)
        stride = getattr(module, "stride", None)
        text = ""
        if kernel is not None:
            text = "x".join(str(k) for k in (kernel if isinstance(kernel, (tuple, list)) else (kernel,)))
            if stride is not None:
                text += " / " + "x".join(str(k) for k in (stride if isinstance(stride, (tuple, list)) else (stride,)))
        own = list(module.parameters(recurse=True))
        rows[name] = {"kernel": text, "macs": int(info.macs or 0), "leaf": info.is_leaf_layer,
                      "frozen": sum(p.numel() for p in own if not p.requires_grad)}
    return rows
