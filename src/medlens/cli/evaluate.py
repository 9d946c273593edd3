"""``medlens evaluate``: which explanation method can I trust for this model and this dataset?"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional

import typer

from medlens.cli.app import app
from medlens.cli.explain import load_source, check_model_args, check_model_fits, fail, load_model, parse_options, parse_size
from medlens.errors import MedlensError, one_line


def _phantom_fields(source: str, size, dims: int) -> tuple[int, int, int]:
    """``phantoms[:N[:SIZE[:DIMS]]]`` checked (exit 2 naming the argument)."""
    fields = source.split(":")[1:]
    if source.split(":")[0] != "phantoms" or len(fields) > 3 or not all(f.isdigit() for f in fields):
        fail(f"data {source!r}: use phantoms, phantoms:N, phantoms:N:SIZE or phantoms:N:SIZE:DIMS with whole numbers")
    n = int(fields[0]) if fields else 32
    px = int(fields[1]) if len(fields) > 1 else (size[0] if size else 64)
    dims = int(fields[2]) if len(fields) > 2 else dims
    if n < 1 or px < 8 or px > 1024 or dims not in (2, 3):
        fail(f"data {source!r}: need N >= 1, 8 <= SIZE <= 1024 and DIMS 2 or 3")
    return n, px, dims


def stratified_subset(items: list, limit: int, seed: int) -> list:
    """At most ``limit`` items, dealt round-robin over the classes (labels) in a seeded shuffle, index order kept."""
    import random

    if limit <= 0:
        raise MedlensError(f"--limit {limit}: give a positive number of images (or leave --limit out for all)")
    if limit >= len(items):
        return list(items)
    by_label: dict = {}
    for position, item in enumerate(items):
        by_label.setdefault(getattr(item, "label", None), []).append(position)
    rng = random.Random(seed)
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_label.items(), key=lambda kv: str(kv[0]))]
    chosen: list[int] = []
    while len(chosen) < limit:
        for pool in pools:
            if pool and len(chosen) < limit:
                chosen.append(pool.pop())
    return [items[i] for i in sorted(chosen)]


def _data(source: str, size, channels: int, limit: Optional[int], split: Optional[Path], part: str, seed: int, dims: int = 2,
          bad: Optional[list] = None, preprocessing=None, workers: int = 0):
    """Items for the runner: ``phantoms[:N[:SIZE[:DIMS]]]`` or a dataset folder / Decathlon / CSV."""
    from medlens.workflows.evaluate import folder_items, phantom_items

    if source.startswith("phantoms"):
        from medlens.data.phantoms import make_phantoms

        n, px, dims = _phantom_fields(source, size, dims)
        items = phantom_items(make_phantoms(n, px, dims, seed=seed))
    else:
        if not Path(source).exists():
            raise MedlensError(f"{source}: no such dataset folder or file (or use phantoms:N)")
        subset = None
        if split is not None:
            from medlens.data.datasets import read_split

            parts = read_split(split)
            if part not in parts:
                raise MedlensError(f"{split}: no part {part!r}; it has {', '.join(parts)}")
            subset = parts[part]
        if limit is not None:  # stratified by class and seeded, not the first N files (one class)
            from medlens.data.datasets import index_source

            subset = stratified_subset(subset if subset is not None else index_source(source)[0], limit, seed)
        return folder_items(source, size=size, channels=channels, items=subset, bad=bad, preprocessing=preprocessing,
                            workers=workers)
    return itertools.islice(items, limit) if limit else items


@app.command("evaluate")
def evaluate_command(
    model: str = typer.Argument(..., help="a run folder of medlens train (runs/NAME: its network, weights, preprocessing), or a model spec, e.g. torchvision:resnet18"),
    data: str = typer.Argument(..., help="dataset folder (class folders + YOLO boxes, images+masks, Decathlon), a CSV, or phantoms[:N[:SIZE[:DIMS]]]"),
    weights: list[str] = typer.Option([], "--weights", "-w", help="weights file; repeat to compare several models (none = random init)"),
    method: list[str] = typer.Option(["gradcam"], "--method", "-m", help="method name; repeat for several"),
    metric: list[str] = typer.Option(["localisation", "faithfulness", "complexity"], "--metric",
                                     help="localisation, faithfulness, complexity, robustness, sanity, catalogue, catalogue_more (infidelity, irof, sufficiency, continuity, consistency, focus, MPRTs, ...), or one metric by name (faithfulness_correlation, irof, ...); repeat"),
    out: Path = typer.Option(Path("medlens-eval"), "--out", "-o", help="output folder"),
    num_classes: int = typer.Option(2, "--num-classes", "-n"),
    in_channels: int = typer.Option(3, "--in-channels"),
    dims: int = typer.Option(2, "--dims", help="2 for images, 3 for volumes"),
    size: Optional[str] = typer.Option(None, "--size", help="resize inputs to this, e.g. 224 or 128,128 (default: the run's)"),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="none, imagenet, zscore or mean=a,b,c/std=d,e,f (default: the run's; for a spec, zscore when --size is given)"),
    model_kwargs: list[str] = typer.Option([], "--model-kwargs", help="model constructor argument key=value (YAML value); repeatable"),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="layer for layer methods; default automatic"),
    target: str = typer.Option("label", "--target", "-t", help="label (the annotated class) or pred"),
    option: list[str] = typer.Option([], "--option", help="method option key=value (all methods)"),
    split: Optional[Path] = typer.Option(None, "--split", help="split CSV written by medlens train / write_split"),
    part: str = typer.Option("test", "--part", help="which part of --split to evaluate"),
    limit: Optional[int] = typer.Option(None, "--limit", help="evaluate at most this many images, drawn stratified by class with --seed"),
    steps: int = typer.Option(20, "--steps", help="deletion/insertion steps"),
    baseline: str = typer.Option("zero", "--baseline", help="deletion baseline: zero, min, mean, blur"),
    road: bool = typer.Option(True, "--road/--no-road", help="run ROAD (noisy linear imputation)"),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    workers: int = typer.Option(0, "--workers", help="processes that read and prepare the images ahead of the model (same results)"),
    n_boot: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples for the 95% CIs"),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier evaluation in --out"),
) -> None:
    """Evaluate explanation methods: localisation against boxes/masks, faithfulness, complexity,
    sanity; per-image rows, summary tables with bootstrap 95% CIs and report.html."""
    from rich.console import Console

    from medlens.workflows.evaluate import evaluate
    from medlens.workflows.explain import prepare_out_dir

    from medlens.cli.explain import parse_model_kwargs
    from medlens.data.prepare import parse_normalize
    from medlens.models.run_folder import is_run_folder

    shape = parse_size(size)
    check_model_args(num_classes, in_channels, dims, shape, batch_size)
    kwargs = parse_model_kwargs(model_kwargs)
    if limit is not None and limit < 1:
        fail(f"--limit {limit}: give a positive number of images (or leave --limit out for all)")
    if workers < 0:
        fail(f"--workers {workers}: must be 0 or more")
    if target not in ("label", "pred"):
        fail(f"--target {target!r}: use label or pred")
    if steps < 1:
        fail(f"--steps {steps}: must be at least 1")
    if n_boot < 1:
        fail(f"--bootstrap {n_boot}: must be at least 1")
    if baseline not in ("zero", "min", "mean", "blur"):
        fail(f"--baseline {baseline!r}: use zero, min, mean or blur")
    if data.startswith("phantoms"):
        _phantom_fields(data, shape, dims)
    elif not Path(data).exists():
        fail(f"{data}: no such dataset folder or file (or use phantoms:N)")
    opts = parse_options(option)
    bad: list = []
    try:
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise MedlensError(f"--out {out} is not empty; pass --overwrite to replace an evaluation there, or choose another folder")
        models = {}
        pre = None
        run = is_run_folder(model)
        for w in weights or ([None] if run else ["none"]):
            name = Path(model).name if w is None else ("random" if w.lower() in ("none", "-", "random") else Path(w).stem)
            source = load_source(model, w, num_classes, in_channels, dims, device, kwargs)
            models[name] = source.model
            if not run:
                check_model_fits(models[name], dims, in_channels)
            pre = source.preprocessing
        if run or normalize is not None:
            if pre.channels is None:
                pre = pre.override(channels=in_channels)
            if shape is not None:
                pre = pre.override(size=shape * (pre.dims or dims) if len(shape) == 1 else shape)
            if normalize is None and not run:
                normalize = "zscore" if shape is not None else "none"
            pre = pre.override(**parse_normalize(normalize))
        else:
            pre = None  # a bare spec without --normalize: the former behaviour (z-score when --size is given)
        prepare_out_dir(out, overwrite, what="an evaluation")
        items = _data(data, shape if pre is None else pre.size, pre.channels if pre is not None else in_channels,
                      limit, split, part, seed, dims, bad=bad, preprocessing=pre, workers=workers)
        result = evaluate(models, items, method, metric, out_dir=out, batch_size=batch_size, target=target, layer=layer,
                          method_options={m: opts for m in method}, steps=steps, baseline=baseline, road=road,
                          n_boot=n_boot, seed=seed)
    except (MedlensError, RuntimeError) as err:  # RuntimeError: the model itself failed on the input
        fail(one_line(err))
    except OSError as err:
        fail(f"cannot write to {err.filename or out} ({err.strerror or err})")
    from medlens.workflows.explain import MANIFEST

    with open(out / MANIFEST, "a", encoding="utf-8") as handle:  # what --overwrite removes next time
        handle.write("".join(f"{Path(f).name}\n" for f in [*result.files, out / "bad_files.csv"]))
    console = Console()
    if bad:
        from medlens.io.report import write_bad_files

        write_bad_files(out / "bad_files.csv", bad)
        for path, reason in bad:
            typer.secho(f"skipped {path}: {reason}", fg=typer.colors.YELLOW, err=True)
    typer.echo(result.table())
    if result.empty_note():
        typer.echo(result.empty_note())
    if result.sanity is not None:
        hits = result.sanity.loc[result.sanity["flagged"], ["method", "mode"]].drop_duplicates()
        flagged = [f"{m} ({mode})" for m, mode in zip(hits["method"], hits["mode"])]
        console.print(f"sanity check: {'flagged ' + ', '.join(flagged) if flagged else 'every method changes under randomisation'}")
    console.print(f"wrote {len(result.files)} files to {out} (report.html, summary.md, rows.csv)")
