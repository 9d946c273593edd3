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


def parse_size(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        fail(f"--size {text!r} is not like 224 or 224,224 or 64,64,64")
    return size


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
        load_weights(getattr(model, "hf", model), weights)  # an hf: model's own modules take plain HF keys
    chosen = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    return model.to(chosen).eval()


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
) -> None:
    """Explain a model's decisions on images and volumes; writes overlays, maps, boxes and index.html."""
    from medlens.workflows.explain import explain_inputs

    options = parse_options(option)
    for key, value in (("block", block), ("head_fusion", head_fusion), ("discard_ratio", discard_ratio)):
        if value is not None:
            options[key] = value
    size_tuple = parse_size(size)
    if size_tuple is not None and len(size_tuple) == 1:
        size_tuple = size_tuple * dims
    try:
        if dicom_out or threshold is not None:  # refused before the model is built: unknown object types, non-DICOM inputs
            from medlens.workflows.explain import dicom_options

            dicom_options(inputs, [dicom_out] if dicom_out else [], threshold)
        net = load_model(model, weights, num_classes, in_channels, dims, device)
        size_tuple, normalization, names = model_preprocessing(net, size_tuple, normalize, class_names)
        header_policy = _policy(policy)
        summary = explain_inputs(
            net, inputs, out, methods=method, target=target, layer=(layer if len(layer) > 1 else (layer[0] if layer else None)),
            size=size_tuple, normalize=normalization, batch_size=batch_size,
            class_names=names, cmap=cmap, alpha=alpha,
            box_fraction=box_fraction, overwrite=overwrite, policy=header_policy, method_options=options,
            dicom_out=[dicom_out] if dicom_out else (), threshold=threshold,
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
