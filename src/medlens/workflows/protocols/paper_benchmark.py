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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.core.boxes import box_around
from medlens.core.engine import explain
from medlens.core.resample import normalise
from medlens.errors import MedlensError
from medlens.io.atomic import atomic_path
from medlens.metrics.localisation import PAPER_PERCENTAGES, pointing_game, topk_box_iou

__all__ = ["BENCHMARK_SIZE", "load_pairs", "paper_benchmark_maps", "run_paper_benchmark"]

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


def paper_benchmark_maps(model: nn.Module, x: Tensor, method: str) -> Tensor:
    """(B, 224, 224) maps under the paper's conventions (see the module docstring)."""
    try:
        from medlens.workflows.protocols.attention_paper import PAPER_METHODS, paper_maps
        from medlens.core.tokens import default_token_layer

        is_vit = default_token_layer(model) is not None
    except ImportError:  # the protocol module is optional
        PAPER_METHODS, is_vit = (), False
    if is_vit and method in PAPER_METHODS:
        return paper_maps(model, x, method)
    with torch.no_grad():
        n_classes = model(x[:1]).shape[1]
    target: Any = 1 if n_classes == 2 else "pred"  # the paper's rule: class 1 of a binary model
    maps = explain(model, x, method, target=target).maps[:, :1]
    return normalise(F.interpolate(maps.float(), size=BENCHMARK_SIZE, mode="bilinear", align_corners=False))[:, 0]


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
