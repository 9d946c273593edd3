"""``medlens run``: dataset-scale explain + evaluate (streamed, sharded, resumable, multi-process).

The small-run ``medlens explain`` (PNG, .npy, JSON per input, index.html) stays the default for a
handful of files; ``medlens run`` is for folders of thousands: one Parquet results table, one
Zarr store of maps, chosen overlays, a manifest, ``--resume``, and Lightning Fabric processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medlens.cli.app import app
from medlens.cli.explain import fail, load_model, load_source, parse_options, parse_size, split_model_inputs
from medlens.errors import MedlensError, one_line


def run_folder_preprocessing(folder: str):
    """A run folder's preprocessing (size, channels, normalisation, class names) read from its
    config, without building the network (a finished run is resumed without a model)."""
    from medlens.models.run_folder import read_run, run_preprocessing

    config, classes = read_run(folder)
    pre = run_preprocessing(config, classes, source=str(Path(folder) / "config.yaml"))
    count = (config.get("model") or {}).get("num_classes") or (len(classes) if classes else None)
    if pre.class_names is None and count:
        pre.class_names = [f"class {i}" for i in range(int(count))]
    return pre


@app.command("run")
def run_command(
    model: str = typer.Argument(..., help="a run folder of medlens train (runs/NAME: its network, weights, preprocessing), or a model spec, e.g. torchvision:resnet18"),
    weights: Optional[str] = typer.Argument(None, help="weights file, or 'none' (not with a run folder unless other weights are wanted)"),
    inputs: Optional[list[Path]] = typer.Argument(None, help="files and folders (expanded recursively)"),
    out: Path = typer.Option(..., "--out", "-o", help="run folder (results/, maps.zarr, manifest.json, summary.html)"),
    method: list[str] = typer.Option(["gradcam"], "--method", "-m", help="method; repeat for several"),
    layer: Optional[str] = typer.Option(None, "--layer", "-l"),
    target: str = typer.Option("pred", "--target", "-t", help="pred, all, topK, or class numbers"),
    num_classes: int = typer.Option(2, "--num-classes", "-n"),
    in_channels: int = typer.Option(3, "--in-channels"),
    dims: int = typer.Option(2, "--dims"),
    size: Optional[str] = typer.Option(None, "--size", help="model input size, e.g. 224"),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="none, imagenet, zscore or mean=a,b,c/std=d,e,f (default: the run folder's, else none)"),
    class_names: Optional[str] = typer.Option(None, "--class-names"),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes decoding inputs"),
    shard_size: int = typer.Option(64, "--shard-size", help="inputs per Parquet part (the unit of resumption)"),
    map_dtype: str = typer.Option("float16", "--map-dtype", help="float16 or float32"),
    overlays: str = typer.Option("worst:16", "--overlays", help="all, none, worst:K, best:K, sample:K"),
    deletion_steps: int = typer.Option(0, "--deletion-steps", help="deletion-curve steps per map (0: no deletion AUC)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out (same configuration)"),
    devices: str = typer.Option("1", "--devices", help="processes (or GPUs) per node, or auto"),
    num_nodes: int = typer.Option(1, "--num-nodes"),
    accelerator: str = typer.Option("cpu", "--accelerator", help="cpu, cuda or auto"),
    strategy: str = typer.Option("ddp", "--strategy", help="ddp (gloo on CPU, nccl on CUDA)"),
    precision: str = typer.Option("32", "--precision", help="32, bf16 or fp16 (autocast for the forward pass)"),
    box_fraction: float = typer.Option(0.05, "--box-fraction", help="boxes around the top fraction of each map (0: none)"),
    n_boot: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples for the summary CIs"),
    ci: str = typer.Option("percentile", "--ci", help="percentile or bca"),
    option: list[str] = typer.Option([], "--option", help="method option key=value"),
    nifti: bool = typer.Option(False, "--nifti", help="also write each volume's maps as NIfTI in its own geometry (OUT/nifti/)"),
    progress: bool = typer.Option(False, "--progress/--no-progress"),
) -> None:
    """Explain (and score) a dataset at scale: Parquet table, Zarr maps, resumable, multi-process."""
    from medlens.data.prepare import parse_normalize
    from medlens.models.run_folder import is_run_folder
    from medlens.workflows.dataset_run import run_dataset

    weights, inputs = split_model_inputs(model, weights, inputs)
    if not inputs:
        fail("no inputs: give image, DICOM or NIfTI files or folders after the model")
    size_tuple = parse_size(size)
    opts = parse_options(option)
    try:
        pre = run_folder_preprocessing(model) if is_run_folder(model) else None
        if size_tuple is not None and len(size_tuple) == 1:
            size_tuple = size_tuple * ((pre.dims if pre is not None else None) or dims)
        if pre is not None:
            pre = pre.override(size=size_tuple, **(parse_normalize(normalize) if normalize is not None else {}))
        elif parse_normalize(normalize or "none")["normalize"] == "meanstd":  # checked before any file is read
            from medlens.data.prepare import Preprocessing

            pre = Preprocessing(size=size_tuple, dims=dims, **parse_normalize(normalize))
        chosen = weights if weights is not None else (str(Path(model) / "best.safetensors") if is_run_folder(model) else "none")
        weights_id = chosen
        if Path(chosen).is_file():
            from medlens.io.store import sha256_file

            weights_id = f"{chosen}#{sha256_file(Path(chosen))[:16]}"
        if is_run_folder(model):
            factory = lambda: load_source(model, weights, num_classes, in_channels, dims, "cpu").model  # noqa: E731
        else:
            factory = lambda: load_model(model, weights, num_classes, in_channels, dims, "cpu")  # noqa: E731
        result = run_dataset(
            factory, inputs, out, methods=method, target=target, layer=layer, size=size_tuple, normalize=normalize or "none",
            preprocessing=pre,
            batch_size=batch_size, workers=workers, shard_size=shard_size, map_dtype=map_dtype, overlays=overlays,
            deletion_steps=deletion_steps, resume=resume, devices=int(devices) if devices.isdigit() else devices,
            num_nodes=num_nodes, accelerator=accelerator, strategy=strategy, precision=precision,
            class_names=class_names.split(",") if class_names else None, box_fraction=box_fraction,
            method_options=opts, n_boot=n_boot, ci=ci, progress=progress, nifti=nifti,
            config_extra={"model": model, "weights": weights_id, "num_classes": num_classes, "in_channels": in_channels, "dims": dims},
        )
    except (MedlensError, RuntimeError) as error:
        fail(one_line(error))
    if result.rank != 0:
        return
    typer.echo(f"{result.done} of {result.planned} input(s) explained, {result.failed} failed "
               f"({result.parts_computed} part(s) computed, {result.parts_reused} reused, {result.world_size} process(es), "
               f"{result.seconds:.1f}s); results in {out / 'results'}, summary in {out / 'summary.html'}")
    for path, reason in result.bad:
        typer.secho(f"skipped: {reason}", fg=typer.colors.YELLOW, err=True)
    if result.done == 0:
        raise typer.Exit(1)
