"""The attention-maps paper's benchmark (Chung et al.): datasets x initialisations x methods.

Given, per dataset, a folder of images, a folder of 224x224 box masks named like the images
(``<stem>.png`` etc.; non-zero = inside the box) and one checkpoint per initialisation (the
paper: CP-Child, DUKE, Kvasir, MURA x scratch, supervised, DINO, MAE; ViT-B/16, 2 classes), this
reproduces the paper's outputs:

- maps per method as ``.npy`` (224x224 float32, min-max normalised):
  ``out/maps/<dataset>/<initialisation>/<method>/<image stem>.npy``;
- pointing-game and IoU@{5,10,20,40} tables with methods as rows and initialisations as
  columns, one CSV per dataset and metric: ``out/<dataset>_<metric>.csv`` (means over images).

The maps follow :mod:`medlens.workflows.protocols.attention_paper` (class-1 target for binary models, the
paper's attention / Grad-CAM / Chefer conventions) for ViTs; any other registered method, or a
non-ViT model, is explained with :func:`medlens.explain` under the same target rule, resized to
224x224 and min-max normalised. The IoU box is ONE box around all top-k% pixels (ties included)
against the box of the mask (:func:`medlens.metrics.topk_box_iou`).

One dataset and several models or initialisations, as ``medlens paper-benchmark`` runs it:
:func:`index_benchmark` (class folders with YOLO boxes, or images + mask files of any size),
:func:`load_benchmark` (the one input preparation, :func:`medlens.data.prepare.prepare_loaded`;
boxes rasterised with :func:`medlens.metrics.boxes_to_masks`, masks resampled nearest, both at the
model size), :func:`benchmark_models` (per-image pointing game and IoU@k, bootstrap 95% CIs), and
:func:`medlens.workflows.protocols.paper_report.write_benchmark` (tables, figure, report.html).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.core.boxes import box_around, pixel_boxes
from medlens.core.engine import explain
from medlens.core.resample import normalise
from medlens.core.targets import model_output
from medlens.errors import MedlensError
from medlens.io.atomic import atomic_path
from medlens.data.datasets import Item
from medlens.metrics.localisation import PAPER_PERCENTAGES, boxes_to_masks, pointing_game, topk_box_iou

__all__ = [
    "BENCHMARK_SIZE", "BenchmarkData", "BenchmarkResult", "benchmark_models", "example_positions", "index_benchmark", "load_benchmark",
    "load_pairs", "paper_benchmark_maps", "run_paper_benchmark", "score_maps", "yolo_masks",
]

BENCHMARK_SIZE = (224, 224)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
Checkpoint = "str | Path | nn.Module"


def load_pairs(images: str | Path, masks: str | Path, channels: int = 3,
               mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
               ) -> tuple[list[str], Tensor, Tensor]:
    """Images resized to 224x224 (normalised with mean/std) and their box masks, matched by stem.

    Returns:
        (stems, images (N, C, 224, 224), masks (N, 224, 224) bool). Images without a mask are an error.
    """
    from medlens.io.loading import read_image

    image_dir, mask_dir = Path(images), Path(masks)
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise MedlensError(f"{image_dir if not image_dir.is_dir() else mask_dir}: not a folder")
    mask_by_stem = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.is_file() and not p.name.startswith(".")}
    paths = [p for p in sorted(image_dir.iterdir()) if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != ".txt"]
    if not paths:
        raise MedlensError(f"{image_dir}: no images")
    from medlens.data.prepare import Preprocessing, prepare_loaded

    normalised = mean is not None and std is not None
    pre = Preprocessing(channels=channels, size=BENCHMARK_SIZE, normalize="meanstd" if normalised else "none",
                        mean=tuple(mean[:channels]) if normalised else None, std=tuple(std[:channels]) if normalised else None)
    stems, xs, ms = [], [], []
    for path in paths:
        if path.stem not in mask_by_stem:
            raise MedlensError(f"{path}: no mask named {path.stem}.* in {mask_dir}")
        xs.append(prepare_loaded(read_image(path), pre, path).tensor)  # the one input preparation (medlens.data.prepare)
        mask = read_image(mask_by_stem[path.stem]).image.float().amax(0)
        ms.append(F.interpolate(mask[None, None], size=BENCHMARK_SIZE, mode="nearest")[0, 0] > 0)
        stems.append(path.stem)
    return stems, torch.stack(xs), torch.stack(ms)


def paper_benchmark_maps(model: nn.Module, x: Tensor, method: str, size: Sequence[int] = BENCHMARK_SIZE,
                         target: str = "paper") -> Tensor:
    """(B, *size) min-max normalised maps under the paper's conventions (see the module docstring).

    Args:
        model: a classifier on the device of ``x``.
        x: (B, C, H, W) model inputs.
        method: ``attention``/``gradcam``/``chefer`` on a ViT follow :func:`paper_maps`; any other
            registered method (or a non-ViT model) goes through :func:`medlens.explain`.
        size: the maps' size (224x224, the paper's, by default).
        target: ``paper`` (class 1 of a binary model, else the prediction) or ``pred``.
    """
    size = tuple(int(v) for v in size)
    try:
        from medlens.workflows.protocols.attention_paper import PAPER_METHODS, paper_maps
        from medlens.core.tokens import default_token_layer

        is_vit = default_token_layer(model) is not None
    except ImportError:  # the protocol module is optional
        PAPER_METHODS, is_vit = (), False
    if is_vit and method in PAPER_METHODS and target == "paper":
        return paper_maps(model, x, method, size)
    chosen: Any = "pred"
    if target == "paper":
        with torch.no_grad():
            n_classes = model_output(model(x[:1])).shape[1]
        chosen = 1 if n_classes == 2 else "pred"  # the paper's rule: class 1 of a binary model
    maps = explain(model, x, method, target=chosen).maps[:, :1]
    if tuple(maps.shape[2:]) != size:
        maps = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    return normalise(maps.float())[:, 0]


def _model(checkpoint: Any, build: Callable[[], nn.Module]) -> nn.Module:
    if isinstance(checkpoint, nn.Module):
        return checkpoint.eval()
    from medlens.models import load_weights

    model = build()
    if str(checkpoint).lower() not in ("none", "random", "scratch-untrained"):
        load_weights(model, checkpoint)
    return model.eval()


def run_paper_benchmark(
    checkpoints: Mapping[str, Mapping[str, Any]],
    images: Mapping[str, str | Path],
    masks: Mapping[str, str | Path],
    out_dir: str | Path,
    methods: Sequence[str] = ("attention", "gradcam", "chefer"),
    model_spec: str = "timm:vit_base_patch16_224",
    num_classes: int = 2,
    in_channels: int = 3,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    batch_size: int = 8,
    percentages: Sequence[float] = PAPER_PERCENTAGES,
    device: str | torch.device = "cpu",
) -> dict[tuple[str, str], Any]:
    """Run the benchmark and write maps and tables.

    Args:
        checkpoints: {dataset: {initialisation: weights path or built model}}, e.g.
            ``{"Kvasir": {"scratch": "k_scratch.pth", "DINO": "k_dino.pth"}}``.
        images, masks: {dataset: folder}; masks are 224x224 box masks named like the images.
        out_dir: output folder.
        methods: ``attention``, ``gradcam``, ``chefer`` (the paper's), or any registered method.
        model_spec, num_classes, in_channels: how to build a model for a weights path.
        mean, std: input normalisation (ImageNet by default; None for none).

    Returns:
        {(dataset, metric): DataFrame (methods x initialisations)}; metrics ``pointing_game`` and
        ``iou@5`` ... ``iou@40``. The same tables are written as CSV.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from medlens.models import build_model

    out = Path(out_dir)
    tables: dict[tuple[str, str], Any] = {}
    for dataset, inits in checkpoints.items():
        if dataset not in images or dataset not in masks:
            raise MedlensError(f"dataset {dataset!r}: give both an image folder and a mask folder")
        stems, x_all, m_all = load_pairs(images[dataset], masks[dataset], in_channels, mean, std)
        boxes = box_around(m_all)
        scores: dict[str, dict[tuple[str, str], float]] = {}
        for init, checkpoint in inits.items():
            model = _model(checkpoint, lambda: build_model(model_spec, num_classes=num_classes, in_channels=in_channels)).to(device)
            for method in tqdm(methods, desc=f"{dataset}/{init}", leave=False):
                per_image: list[Tensor] = []
                for start in range(0, len(stems), batch_size):
                    maps = paper_benchmark_maps(model, x_all[start : start + batch_size].to(device), method).float().cpu()
                    for stem, array in zip(stems[start : start + batch_size], maps):
                        path = out / "maps" / dataset / init / method / f"{stem}.npy"
                        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                            np.save(handle, array.numpy().astype(np.float32))
                    per_image.append(maps)
                maps = torch.cat(per_image)
                columns = {"pointing_game": pointing_game(maps, m_all)}
                ious = topk_box_iou(maps, boxes, percentages)
                columns.update({f"iou@{p:g}": ious[:, i] for i, p in enumerate(percentages)})
                for metric, values in columns.items():
                    scores.setdefault(metric, {})[(method, init)] = float(values.nanmean())
        for metric, cells in scores.items():
            table = pd.DataFrame(index=list(methods), columns=list(inits), dtype=float)
            for (method, init), value in cells.items():
                table.loc[method, init] = value
            table.index.name = "method"
            with atomic_path(out / f"{dataset}_{metric}.csv") as tmp:
                table.to_csv(tmp, float_format="%.4f")
            tables[(dataset, metric)] = table
    return tables


# ---------------------------------------------------------------- one dataset, several models (``medlens paper-benchmark``)

METRICS = ("pointing_game", *(f"iou@{p:g}" for p in PAPER_PERCENTAGES))


@dataclass
class BenchmarkData:
    """Prepared images and their annotation masks at the model size.

    Attributes:
        names: one name per image (``class/stem`` for class folders, the stem otherwise).
        labels: class index per image, None without class folders.
        x: (N, C, H, W) model inputs (:func:`medlens.data.prepare.prepare_loaded`).
        masks: (N, H, W) bool annotations at the model size (YOLO boxes rasterised, or mask files
            resampled nearest); an image without annotation has an empty mask (metrics NaN).
        displays: {image index: (C, Hd, Wd) display image in [0, 1]} for the figure's examples.
        classes: class names, when known.
    """

    names: list[str]
    labels: list[int | None]
    x: Tensor
    masks: Tensor
    displays: dict[int, Tensor] = field(default_factory=dict)
    classes: list[str] | None = None


def index_benchmark(data: str | Path, masks: str | Path | None = None,
                    bad: list[tuple[str, str]] | None = None) -> tuple[list[Item], list[str] | None]:
    """The items of ``data``: class folders with YOLO ``<stem>.txt`` box files, or (``masks`` given) a
    folder of images paired by stem with a folder of mask files. An image without its mask, or
    with a malformed box file, is appended to ``bad`` as (path, reason) and left out."""
    from medlens.data.datasets import _stem, index_image_folder
    from medlens.io.loading import is_readable

    if masks is None:
        return index_image_folder(data, bad=bad)
    image_dir, mask_dir = Path(data), Path(masks)
    by_stem = {_stem(p): p for p in sorted(mask_dir.iterdir()) if is_readable(p)}
    items = []
    for path in sorted(p for p in image_dir.iterdir() if is_readable(p)):
        mask = by_stem.get(_stem(path))
        if mask is None:
            if bad is None:
                raise MedlensError(f"{path}: no mask named {_stem(path)}.* in {mask_dir}")
            bad.append((str(path), f"no mask named {_stem(path)}.* in {mask_dir}"))
            continue
        items.append(Item(str(path), mask=str(mask)))
    if not items and bad is None:
        raise MedlensError(f"{image_dir}: no image with a mask in {mask_dir}")
    return items, None


def yolo_masks(boxes: Tensor, size: Sequence[int]) -> Tensor:
    """(H, W) bool union of the normalised YOLO boxes (N, 4) x0, y0, x1, y1 rasterised at ``size``
    (lower edges floored, upper edges ceiled: a box always covers the pixels it touches)."""
    h, w = (int(v) for v in size)
    if boxes.numel() == 0:
        return torch.zeros(h, w, dtype=torch.bool)
    return boxes_to_masks(pixel_boxes(boxes, (h, w)), (h, w)).any(dim=0)


def _annotation(item: Item, size: tuple[int, int]) -> Tensor:
    """(H, W) bool annotation of ``item`` at the model size."""
    from medlens.io.loading import read_image

    if item.mask is None:
        return yolo_masks(torch.tensor(item.boxes, dtype=torch.float32), size)
    mask = read_image(item.mask).image.float()
    if mask.dim() != 3:
        raise MedlensError(f"{item.mask}: a {mask.dim() - 1}D mask; the paper benchmark takes 2D masks")
    return F.interpolate(mask.amax(0)[None, None], size=size, mode="nearest")[0, 0] > 0


def load_benchmark(items: Sequence[Item], pre: Any, classes: Sequence[str] | None = None,
                   bad: list[tuple[str, str]] | None = None, examples: Sequence[int] = (), progress: bool = False) -> BenchmarkData:
    """Read and prepare ``items`` with ``pre`` (a :class:`medlens.data.prepare.Preprocessing` with a
    2D ``size``), the one input preparation; an unreadable image or mask goes to ``bad`` and is skipped.

    Args:
        examples: positions in ``items`` whose display images are kept (the figure's rows).
    """
    from tqdm.auto import tqdm

    from medlens.data.prepare import prepare_loaded
    from medlens.errors import one_line
    from medlens.io.loading import read_image

    if pre.size is None or len(pre.size) != 2:
        raise MedlensError(f"the paper benchmark needs a 2D model size; got {pre.size}")
    size = (int(pre.size[0]), int(pre.size[1]))
    wanted = set(examples)
    names, labels, xs, ms, displays = [], [], [], [], {}
    for position, item in enumerate(tqdm(items, desc="reading images", disable=not progress, leave=False)):
        try:
            prepared = prepare_loaded(read_image(item.path), pre, item.path)
            if prepared.tensor.dim() != 3:
                raise MedlensError(f"{item.path}: not a 2D image (the paper benchmark is 2D)")
            mask = _annotation(item, size)
        except (MedlensError, RuntimeError, OSError, ValueError) as error:
            if bad is None:
                raise
            bad.append((str(item.path), one_line(error)))
            continue
        if position in wanted:
            displays[len(names)] = prepared.display
        path = Path(item.path)
        names.append(f"{path.parent.name}/{path.stem}" if item.label is not None else path.stem)
        labels.append(item.label)
        xs.append(prepared.tensor)
        ms.append(mask)
    if not names:
        raise MedlensError("no readable image with an annotation (see bad_files.csv)")
    return BenchmarkData(names, labels, torch.stack(xs), torch.stack(ms), displays, list(classes) if classes else None)


def example_positions(items: Sequence[Item], count: int) -> list[int]:
    """``count`` positions for the figure: the first image of each class, then the second, ...
    (index order without classes)."""
    by_label: dict[Any, list[int]] = {}
    for position, item in enumerate(items):
        by_label.setdefault(item.label, []).append(position)
    pools = [list(v) for _, v in sorted(by_label.items(), key=lambda kv: str(kv[0]))]
    chosen: list[int] = []
    while len(chosen) < min(count, len(items)):
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(pool.pop(0))
    return sorted(chosen)


def score_maps(maps: Tensor, masks: Tensor, percentages: Sequence[float] = PAPER_PERCENTAGES) -> dict[str, Tensor]:
    """The paper's per-image metrics of (B, H, W) maps against (B, H, W) masks: ``pointing_game``
    (B,) and ``iou@k`` (B,) for each k (one box around the top-k% pixels vs the mask's box)."""
    columns = {"pointing_game": pointing_game(maps, masks)}
    ious = topk_box_iou(maps, box_around(masks), percentages)
    columns.update({f"iou@{p:g}": ious[:, i] for i, p in enumerate(percentages)})
    return columns


@dataclass
class BenchmarkResult:
    """Per-image rows, the bootstrap summary and the figure's maps of one benchmark run."""

    rows: Any  # DataFrame: model, method, image, label, pointing_game, iou@5 ... iou@40
    summary: Any  # DataFrame: model, method, metric, mean, ci_low, ci_high, n, n_nan
    models: list[str]
    methods: list[str]
    example_maps: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # model -> method -> (E, H, W)
    data: dict[str, BenchmarkData] = field(default_factory=dict)  # model -> its prepared data
    n_boot: int = 1000
    seed: int = 0


def benchmark_models(models: Mapping[str, nn.Module], data: BenchmarkData | Mapping[str, BenchmarkData],
                     methods: Sequence[str], batch_size: int = 8, target: str = "paper", n_boot: int = 1000,
                     seed: int = 0, percentages: Sequence[float] = PAPER_PERCENTAGES, progress: bool = False) -> BenchmarkResult:
    """Pointing game and IoU@k of every (model, method) on one dataset, with bootstrap 95% CIs.

    Args:
        models: {name: classifier (eval mode, on its device)}.
        data: one :class:`BenchmarkData` for all models, or one per model name (models whose
            preprocessing differs).
        methods: registered method names (the paper's ``attention``, ``gradcam``, ``chefer`` on ViTs).
        target: ``paper`` or ``pred`` (see :func:`paper_benchmark_maps`).
        n_boot, seed: bootstrap resamples and seed (:func:`medlens.metrics.bootstrap.summarise_table`);
            ``seed`` also seeds torch before each (model, method), so stochastic methods repeat.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from medlens.metrics.bootstrap import summarise_table

    per_model = {name: data if isinstance(data, BenchmarkData) else data[name] for name in models}
    total = sum(-(-len(d.names) // batch_size) for d in per_model.values()) * len(methods)
    bar = tqdm(total=total, desc="explaining", disable=not progress, leave=False)
    frames, example_maps = [], {}
    for name, model in models.items():
        d = per_model[name]
        device = next(model.parameters()).device
        shown = sorted(d.displays)
        for method in methods:
            bar.set_description(f"{name} / {method}")
            torch.manual_seed(seed)
            columns: dict[str, list[Tensor]] = {}
            kept = []
            for start in range(0, len(d.names), batch_size):
                x = d.x[start : start + batch_size].to(device)
                maps = paper_benchmark_maps(model, x, method, d.x.shape[2:], target).float()
                for metric, values in score_maps(maps, d.masks[start : start + batch_size].to(device), percentages).items():
                    columns.setdefault(metric, []).append(values.cpu())
                kept += [maps[i - start].cpu() for i in shown if start <= i < start + len(x)]
                bar.update(1)
            if kept:
                example_maps.setdefault(name, {})[method] = torch.stack(kept)
            frame = pd.DataFrame({metric: torch.cat(v).double().numpy() for metric, v in columns.items()})
            label = [d.classes[k] if d.classes and k is not None else "" for k in d.labels]
            frame.insert(0, "label", label)
            frame.insert(0, "image", d.names)
            frame.insert(0, "method", method)
            frame.insert(0, "model", name)
            frames.append(frame)
    bar.close()
    rows = pd.concat(frames, ignore_index=True)
    metrics = [c for c in rows.columns if c == "pointing_game" or c.startswith("iou@")]
    summary = summarise_table(rows, ("model", "method"), metrics, n_boot=n_boot, seed=seed)
    order = {(m, k): i for i, (m, k) in enumerate((m, k) for m in models for k in methods)}
    summary["_order"] = [order[(m, k)] * len(metrics) + metrics.index(t) for m, k, t in zip(summary["model"], summary["method"], summary["metric"])]
    summary = summary.sort_values("_order").drop(columns="_order").reset_index(drop=True)
    return BenchmarkResult(rows, summary, list(models), list(methods), example_maps, per_model, n_boot, seed)
