"""``medlens explain`` and ``medlens layers``."""

from __future__ import annotations

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


def load_model(spec: str, weights: str, num_classes: int, in_channels: int, dims: int, device: str):
    """Build ``spec`` and load ``weights`` ('none' keeps the random initialisation)."""
    import torch

    from medlens.models import build_model, load_weights

    model = build_model(spec, num_classes=num_classes, in_channels=in_channels, spatial_dims=dims)
    if weights.lower() not in ("none", "-", "random"):
        try:
            load_weights(getattr(model, "hf", model), weights)  # an hf: model's own modules take plain HF keys
        except MedlensError as error:
            hint = _flags_hint(weights, num_classes, in_channels, dims) if "does not fit" in str(error) else ""
            raise MedlensError(f"{error}{hint}") from None
    chosen = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    return model.to(chosen).eval()


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


def check_explain_args(target: str, normalize: str, num_classes: int, in_channels: int, class_names: Optional[str],
                       alpha: float, box_fraction: float, cmap: str) -> Optional[list[str]]:
    """Every explain argument that can be checked without reading a file; returns the class names list."""
    from medlens.core.targets import check_target_spec

    try:
        check_target_spec(target, num_classes)
    except MedlensError as error:
        fail(str(error))
    if normalize is not None and normalize not in ("none", "imagenet", "zscore"):
        fail(f"--normalize {normalize!r} not understood: use none, imagenet or zscore")
    if normalize == "imagenet" and in_channels != 3:
        fail(f"--normalize imagenet needs --in-channels 3 (got {in_channels})")
    if not 0.0 <= alpha <= 1.0:
        fail(f"--alpha {alpha}: must be between 0 and 1")
    if not 0.0 < box_fraction <= 1.0:
        fail(f"--box-fraction {box_fraction}: must be above 0 and at most 1")
    import matplotlib

    if cmap not in matplotlib.colormaps:
        fail(f"--cmap {cmap!r} is not a matplotlib colormap (e.g. jet, viridis, inferno)")
    names = [n.strip() for n in class_names.split(",")] if class_names else None
    if names is not None and len(names) != num_classes:
        fail(f"--class-names gives {len(names)} name(s) for {num_classes} classes (--num-classes); give one per class")
    return names


@app.command("explain")
def explain_command(
    model: str = typer.Argument(..., help="model spec: torchvision:resnet50, timm:efficientnet_b0, monai:UNet, pkg.module:factory, hf:FOLDER, bundle:FOLDER"),
    weights: str = typer.Argument(..., help=".pth/.pt/.ckpt/.safetensors weights (loaded safely), or 'none' (hf:/bundle: folders bring their own)"),
    inputs: list[Path] = typer.Argument(..., help="PNG/JPG/TIFF files, DICOM files or series folders, NIfTI volumes, folders"),
    method: list[str] = typer.Option(["gradcam"], "--method", "-m", help="method name; repeat for several"),
    layer: list[str] = typer.Option([], "--layer", "-l", help="layer path (repeat to fuse layers); default: automatic"),
    target: str = typer.Option("pred", "--target", "-t", help="pred, all, topK, or class numbers like 2 or 0,2"),
    out: Path = typer.Option(Path("medlens-out"), "--out", "-o", help="output folder"),
    num_classes: int = typer.Option(2, "--num-classes", "-n", help="classes of the model"),
    in_channels: int = typer.Option(3, "--in-channels", help="input channels of the model"),
    dims: int = typer.Option(2, "--dims", help="2 for images, 3 for volumes"),
    size: Optional[str] = typer.Option(None, "--size", help="model input size, e.g. 224 or 224,224 or 64,64,64"),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="none, imagenet or zscore (default: the model's own preprocessing for hf:/bundle:, else none)"),
    class_names: Optional[str] = typer.Option(None, "--class-names", help="comma-separated class names"),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
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
    """Explain a model's decisions on images and volumes; writes overlays, maps, boxes and index.html."""
    from medlens.workflows.explain import explain_inputs

    size_tuple = parse_size(size)
    check_model_args(num_classes, in_channels, dims, size_tuple, batch_size, max_pixels)
    names = check_explain_args(target, normalize, num_classes, in_channels, class_names, alpha, box_fraction, cmap)
    options = parse_options(option)
    for key, value in (("block", block), ("head_fusion", head_fusion), ("discard_ratio", discard_ratio)):
        if value is not None:
            options[key] = value
    if size_tuple is not None and len(size_tuple) == 1:
        size_tuple = size_tuple * dims
    try:
        if dicom_out or threshold is not None:  # refused before the model is built: unknown object types, non-DICOM inputs
            from medlens.workflows.explain import dicom_options

            dicom_options(inputs, [dicom_out] if dicom_out else [], threshold)
        header_policy = _policy(policy)
        net = load_model(model, weights, num_classes, in_channels, dims, device)
        size_tuple, normalization, names = model_preprocessing(net, size_tuple, normalize, ",".join(names) if names else None)
    except (MedlensError, RuntimeError) as error:
        fail(one_line(error))
    check_model_fits(net, dims, in_channels)
    try:
        summary = explain_inputs(
            net, inputs, out, methods=method, target=target, layer=(layer if len(layer) > 1 else (layer[0] if layer else None)),
            size=size_tuple, normalize=normalization, batch_size=batch_size,
            class_names=names, cmap=cmap, alpha=alpha,
            box_fraction=box_fraction, overwrite=overwrite, policy=header_policy, method_options=options,
            dicom_out=[dicom_out] if dicom_out else (), threshold=threshold, max_pixels=max_pixels,
        )
    except (MedlensError, RuntimeError) as error:  # RuntimeError: the model itself failed on the input
        fail(one_line(error))
    images = len({r["source"] for r in summary.written})
    typer.echo(f"explained {images} input(s) with {', '.join(method)}; results in {out / 'index.html'}")
    for record in summary.written:  # DICOM inputs without a PM's geometry, or a failed DICOM write
        for key in ("skipped", "error"):
            if (record.get("dicom") or {}).get(key):
                typer.secho(f"dicom-out: {record['dicom'][key]}", fg=typer.colors.YELLOW, err=True)
    for path, reason in summary.bad:
        typer.secho(f"skipped: {reason}" if str(path) in reason else f"skipped {path}: {reason}", fg=typer.colors.YELLOW, err=True)
    if not summary.written:
        raise typer.Exit(1)


def model_preprocessing(net: Any, size: Optional[tuple[int, ...]], normalize: Optional[str], class_names: Optional[str]):
    """(size, normalisation, class names) for the run: each the user's (--size, --normalize,
    --class-names) or else the model's own (``net.preprocessing`` of hf:/bundle: models)."""
    prep = getattr(net, "preprocessing", None)
    names = class_names.split(",") if class_names else None
    if prep is None:
        return size, normalize or "none", names
    if names is None and prep.class_names:
        names = list(prep.class_names)
    if size is None and prep.transform is None:  # a bundle's transforms resize themselves
        size = prep.size
    return size, (prep if normalize is None else normalize), names


def _policy(name: Optional[str]):
    if name is None:
        return None
    from medlens.io.dicom import POLICIES

    if name not in POLICIES:
        raise MedlensError(f"--policy {name!r} unknown; available: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]


@app.command("layers")
def layers_command(
    model: str = typer.Argument(..., help="model spec, e.g. torchvision:resnet50"),
    num_classes: int = typer.Option(2, "--num-classes", "-n"),
    in_channels: int = typer.Option(3, "--in-channels"),
    dims: int = typer.Option(2, "--dims"),
    size: str = typer.Option("224", "--size", help="input size used to trace shapes"),
    all_layers: bool = typer.Option(False, "--all", help="list every module, not only the candidates"),
) -> None:
    """Summarise a model (layer, type, output shape, parameters) and the candidate target layers."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from medlens.core.capture import auto_layer, trace_layers

    size_tuple = parse_size(size) or (224,)
    if len(size_tuple) == 1:
        size_tuple = size_tuple * dims
    try:
        net = load_model(model, "none", num_classes, in_channels, dims, "cpu")
        x = torch.zeros(1, in_channels, *size_tuple)
        infos = trace_layers(net, x)
        chosen = auto_layer(net, x)
    except (MedlensError, RuntimeError) as error:  # RuntimeError: the model itself failed on the input
        fail(one_line(error))
    table = Table(title=f"{model}: {sum(p.numel() for p in net.parameters()):,} parameters, input {tuple(x.shape)}")
    for column in ("layer", "type", "output shape", "parameters", "candidate"):
        table.add_column(column)
    for info in infos:
        candidate = info.spatial or info.name == chosen
        if not (all_layers or candidate):
            continue
        mark = "default" if info.name == chosen else ("yes" if candidate else "")
        table.add_row(info.name, info.kind, str(info.shape), f"{info.params:,}", mark)
    Console().print(table)
    typer.echo(f"default layer: {chosen}")
