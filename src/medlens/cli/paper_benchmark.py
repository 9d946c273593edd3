"""``medlens paper-benchmark``: the attention-maps paper's benchmark (Chung et al.) on one dataset.

Pointing game and IoU at the top 5/10/20/40% of each map, per method and per model or
initialisation, with bootstrap 95% CIs; a figure of examples x methods and report.html.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from medlens.cli.app import app
from medlens.cli.explain import check_model_args, check_model_fits, check_normalize, fail, load_source, parse_model_kwargs, parse_size
from medlens.errors import MedlensError, one_line

INITS = ("weights", "random")
TARGETS = ("paper", "pred")
RANDOM_WEIGHTS = ("none", "-", "random")


def parse_model(text: str, init: str) -> tuple[str, Optional[str]]:
    """``SPEC=WEIGHTS``, ``SPEC`` (with ``--init random``) or a run folder: (spec or folder, weights or None)."""
    from medlens.models.run_folder import is_run_folder

    spec, sep, weights = text.partition("=")
    if is_run_folder(text):
        return text, None
    if is_run_folder(spec):  # RUN=WEIGHTS: the run's network with other weights
        if weights.lower() not in RANDOM_WEIGHTS and not Path(weights).is_file():
            fail(f"--model {text!r}: no weights file {weights}")
        return spec, weights
    if not spec:
        fail(f"--model {text!r}: give SPEC=WEIGHTS (e.g. torchvision:resnet18=best.pth), a run folder, or SPEC with --init random")
    if Path(spec).is_dir():
        fail(f"--model {spec}: a folder without config.yaml is not a run folder")
    if sep and weights.lower() not in RANDOM_WEIGHTS and not Path(weights).is_file():
        fail(f"--model {text!r}: no weights file {weights}")
    if not sep or weights.lower() in RANDOM_WEIGHTS:
        if init != "random":
            fail(f"--model {text!r} has no weights: give SPEC=WEIGHTS, or --init random for a seeded random initialisation")
        return spec, None
    return spec, weights


def model_name(spec: str, weights: Optional[str], seed: int, taken: set[str]) -> str:
    """A table label: the run folder's or the weights file's name, or ``SPEC (random, seed N)``; unique."""
    from medlens.models.run_folder import is_run_folder

    if is_run_folder(spec):
        name = Path(spec).name + (f" ({Path(weights).stem})" if weights is not None else "")
    elif weights is not None:
        name = Path(weights).stem
    else:
        name = f"{spec.split(':')[-1]} (random, seed {seed})"
    unique, k = name, 2
    while unique in taken:
        unique, k = f"{name} #{k}", k + 1
    taken.add(unique)
    return unique


def check_arguments(data: Path, masks: Optional[Path], models: list[str], methods: list[str], init: str, target: str,
                    normalize: Optional[str], in_channels: int, limit: Optional[int], n_boot: int, examples: int,
                    cmap: str) -> None:
    """Every check that needs no file read: exit 2 with one line naming the flag."""
    from medlens.core.engine import method_class

    if init not in INITS:
        fail(f"--init {init!r}: use {' or '.join(INITS)}")
    if target not in TARGETS:
        fail(f"--target {target!r}: use paper (class 1 of a binary model, else the prediction) or pred")
    if not models:
        fail("--model: give at least one (SPEC=WEIGHTS, a run folder, or SPEC with --init random)")
    if not methods:
        fail("--method: give at least one")
    for method in methods:
        try:
            method_class(method)
        except MedlensError as error:
            fail(f"--method {error}")
    check_normalize(normalize, in_channels)
    if limit is not None and limit < 1:
        fail(f"--limit {limit}: give a positive number of images (or leave --limit out for all)")
    if n_boot < 1:
        fail(f"--bootstrap {n_boot}: must be at least 1")
    if examples < 0:
        fail(f"--examples {examples}: must be 0 (no figure) or more")
    import matplotlib

    if cmap not in matplotlib.colormaps:
        fail(f"--cmap {cmap!r} is not a matplotlib colormap (e.g. jet, viridis, inferno)")
    if not data.is_dir():
        fail(f"DATA {data}: not a folder (class folders with YOLO .txt boxes, or an image folder with --masks)")
    if masks is not None and not masks.is_dir():
        fail(f"--masks {masks}: not a folder")


def _preprocessing(source: Any, shape: Optional[tuple[int, ...]], normalize: Optional[str], in_channels: int):
    """The model's preparation with the flags applied: --size (else the run's, else 224), --normalize."""
    import dataclasses

    from medlens.data.prepare import parse_normalize
    from medlens.workflows.protocols.paper_benchmark import BENCHMARK_SIZE

    pre = source.preprocessing
    if pre.channels is None:
        pre = pre.override(channels=in_channels)
    size = (shape * 2 if len(shape) == 1 else shape) if shape is not None else (pre.size or BENCHMARK_SIZE)
    pre = pre.override(size=tuple(size), dims=2, **parse_normalize(normalize))
    if normalize is not None:  # the user's normalisation replaces a model's own (hf:/bundle:)
        pre = dataclasses.replace(pre, model_transform=None)
    return pre


@app.command("paper-benchmark")
def paper_benchmark_command(
    data: Path = typer.Argument(..., help="class folders of images with YOLO <stem>.txt boxes (label xc yc w h, normalised), or an image folder with --masks"),
    masks: Optional[Path] = typer.Option(None, "--masks", help="folder of mask files named like the images (any size, resampled nearest; non-zero = inside)"),
    model: list[str] = typer.Option([], "--model", help="SPEC=WEIGHTS (e.g. timm:vit_base_patch16_224=dino.pth), a run folder, or SPEC with --init random; repeat for several models/initialisations"),
    init: str = typer.Option("weights", "--init", help="weights (every --model brings weights) or random (a SPEC without weights gets a random initialisation seeded with --seed)"),
    method: list[str] = typer.Option(["gradcam"], "--method", "-m", help="method name; repeat (the paper: attention, gradcam, chefer on ViTs)"),
    out: Path = typer.Option(Path("medlens-paper-benchmark"), "--out", "-o", help="output folder"),
    num_classes: int = typer.Option(2, "--num-classes", "-n", help="classes of a SPEC model (a run folder knows its own)"),
    in_channels: int = typer.Option(3, "--in-channels", help="input channels of a SPEC model"),
    size: Optional[str] = typer.Option(None, "--size", help="model input size, e.g. 224 or 96,96 (default: the run's, else 224, the paper's)"),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="none, imagenet, zscore or mean=a,b,c/std=d,e,f (default: the run's, else none)"),
    model_kwargs: list[str] = typer.Option([], "--model-kwargs", help="model constructor argument key=value (YAML value); repeatable"),
    target: str = typer.Option("paper", "--target", "-t", help="paper (class 1 of a binary model, else the prediction) or pred"),
    limit: Optional[int] = typer.Option(None, "--limit", help="at most this many images, drawn stratified by class with --seed"),
    examples: int = typer.Option(6, "--examples", help="images in the figure (one per class in turn); 0 for none"),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    n_boot: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples for the 95% CIs"),
    seed: int = typer.Option(0, "--seed", help="seeds the random initialisation, --limit's draw, stochastic methods and the bootstrap"),
    cmap: str = typer.Option("jet", "--cmap", help="matplotlib colormap of the figure"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier benchmark in --out"),
) -> None:
    """The attention-maps paper's benchmark: pointing game and IoU@5/10/20/40% per method and model,
    bootstrap 95% CIs (paper_table.csv/.md, summary.csv, rows.csv), a figure of examples x methods
    and report.html. Unreadable images are listed in bad_files.csv and skipped."""
    shape = parse_size(size)
    check_model_args(num_classes, in_channels, 2, shape, batch_size)
    check_arguments(data, masks, model, method, init, target, normalize, in_channels, limit, n_boot, examples, cmap)
    parsed = [parse_model(text, init) for text in model]
    kwargs = parse_model_kwargs(model_kwargs)
    bad: list = []
    try:
        from medlens.workflows.explain import prepare_out_dir

        prepare_out_dir(out, overwrite, what="a paper benchmark")
        result, n_images = _run(data, masks, parsed, method, shape, normalize, num_classes, in_channels, kwargs, target,
                                limit, examples, batch_size, n_boot, seed, device, bad)
        files = _write(result, out, data, masks, n_images, cmap, bad)
    except (MedlensError, RuntimeError) as error:  # RuntimeError: the model itself failed on the input
        fail(one_line(error))
    except OSError as error:
        fail(f"cannot write to {error.filename or out} ({error.strerror or error})")
    for path, reason in bad:
        typer.secho(f"skipped {path}: {reason}", fg=typer.colors.YELLOW, err=True)
    _print(result, out, files)


def _run(data, masks, parsed, methods, shape, normalize, num_classes, in_channels, kwargs, target, limit, examples,
         batch_size, n_boot, seed, device, bad):
    """Build the models, read the data once per distinct preprocessing, benchmark; (result, images scored)."""
    import json

    import torch

    from medlens.cli.evaluate import stratified_subset
    from medlens.models.run_folder import is_run_folder
    from medlens.workflows.protocols.paper_benchmark import benchmark_models, example_positions, index_benchmark, load_benchmark

    models, pres, taken = {}, {}, set()
    for spec, weights in parsed:
        torch.manual_seed(seed)  # a SPEC without weights: the same seed gives the same network
        run = is_run_folder(spec)
        source = load_source(spec, weights if run else (weights or "none"), num_classes, in_channels, 2, device, kwargs)
        if not run:
            check_model_fits(source.model, 2, in_channels)
        name = model_name(spec, weights, seed, taken)
        models[name], pres[name] = source.model, _preprocessing(source, shape, normalize, in_channels)
    items, classes = index_benchmark(data, masks, bad=bad)
    if not items:
        raise MedlensError(f"{data}: no image to benchmark (see bad_files.csv)")
    if limit is not None:
        items = stratified_subset(items, limit, seed)
    shown = example_positions(items, examples)
    prepared, per_model = {}, {}
    for name, pre in pres.items():
        key = json.dumps(pre.to_dict(), sort_keys=True, default=str) + str(id(pre.model_transform))
        if key not in prepared:
            prepared[key] = load_benchmark(items, pre, classes, bad if not prepared else [], shown, progress=True)
        per_model[name] = prepared[key]
    result = benchmark_models(models, per_model, methods, batch_size=batch_size, target=target, n_boot=n_boot,
                              seed=seed, progress=True)
    return result, len(next(iter(per_model.values())).names)


def _write(result, out: Path, data: Path, masks: Optional[Path], n_images: int, cmap: str, bad: list) -> list[Path]:
    """The tables, figures, report.html and bad_files.csv; the manifest lists them for --overwrite."""
    from medlens.io.report import write_bad_files
    from medlens.workflows.explain import MANIFEST
    from medlens.workflows.protocols.paper_report import write_benchmark

    source = f"{data} with masks {masks}" if masks is not None else f"{data} (YOLO boxes)"
    notes = [f"{len(bad)} file(s) skipped, listed in bad_files.csv."] if bad else []
    files = write_benchmark(result, out, cmap=cmap, notes=notes,
                            subtitle=f"{source}: {n_images} image(s), {len(result.models)} model(s), {len(result.methods)} method(s)")
    if bad:
        files.append(write_bad_files(out / "bad_files.csv", bad))
    with open(out / MANIFEST, "a", encoding="utf-8") as handle:  # what --overwrite removes next time
        handle.write("".join(f"{Path(f).name}\n" for f in [*files, out / "bad_files.csv"]))
    return files


def _print(result, out: Path, files: list[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    from medlens.workflows.protocols.paper_report import paper_table

    table = paper_table(result)
    metrics = [m for m in result.summary["metric"].drop_duplicates()]
    view = Table(title="pointing game and IoU@k: mean [95% bootstrap CI]")
    for column in ("model", "method", "n", *metrics):
        view.add_column(column)
    for _, row in table.iterrows():
        view.add_row(str(row["model"]), str(row["method"]), str(int(row["n"])),
                     *(f"{row[m]:.3f} [{row[m + '_ci_low']:.3f}, {row[m + '_ci_high']:.3f}]" for m in metrics))
    console = Console(width=200)
    console.print(view)
    console.print(f"wrote {len(files)} files to {out} (report.html, paper_table.csv/.md, summary.csv, rows.csv)")
