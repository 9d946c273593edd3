"""Streaming input for dataset-scale runs: a torch ``Dataset`` over planned inputs, decoded in
DataLoader worker processes, and a collate that groups same-shape items into model batches.

A bad item never raises: decoding errors, unreadable annotations and non-finite pixels become an
error record (``{"index", "path", "error"}``) that travels through the loader beside the good
items of its batch, so the runner can report it and carry on with the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from medlens.errors import one_line


@dataclass(frozen=True)
class PlannedItem:
    """One input of the run: its position in the plan, its path, and a planning error if any."""

    index: int
    path: str
    error: str | None = None


def annotation_files(path: Path) -> dict[str, Path]:
    """Annotations beside an image: ``x_mask.<ext>``, ``x_box.json`` (phantoms), ``x.txt`` (YOLO)."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"):
        if name.lower().endswith(suffix):
            stem, ext = name[: -len(suffix)], suffix
            break
    else:
        stem, ext = path.stem, path.suffix
    found = {}
    for key, candidate in (("mask", path.with_name(f"{stem}_mask{ext}")), ("mask", path.with_name(f"{stem}_mask.png")),
                           ("box_json", path.with_name(f"{stem}_box.json")), ("yolo", path.with_name(f"{stem}.txt"))):
        if key not in found and candidate.is_file():
            found[key] = candidate
    return found


def _annotations(path: Path, original: Sequence[int], spatial: Sequence[int]) -> tuple[Tensor | None, Tensor | None]:
    """(mask (*S) bool at model size or None, box ``lo..., hi...`` at model size or None)."""
    files = annotation_files(path)
    nd = len(spatial)
    mask = box = None
    if "mask" in files:
        from medlens.io.loading import read_image

        m = read_image(files["mask"]).image.float()
        m = m.amax(0) if m.dim() == nd + 1 else m
        m = torch.nn.functional.interpolate(m[None, None], size=tuple(spatial), mode="nearest")[0, 0] > 0
        mask = m
    if "box_json" in files:
        doc = json.loads(files["box_json"].read_text())
        src = doc.get("image_size", list(original))
        b = [float(v) for v in doc["box"]]
        box = torch.tensor([int(b[i] * spatial[i] / src[i] + 0.0) for i in range(nd)]
                           + [int(-(-b[nd + i] * spatial[i] // src[i])) for i in range(nd)], dtype=torch.long)
    elif "yolo" in files and nd == 2:
        from medlens.data.datasets import read_yolo_boxes

        _, boxes = read_yolo_boxes(files["yolo"])
        if boxes:
            h, w = spatial
            x0 = min(b[0] for b in boxes); y0 = min(b[1] for b in boxes)  # noqa: E702
            x1 = max(b[2] for b in boxes); y1 = max(b[3] for b in boxes)  # noqa: E702
            import math

            box = torch.tensor([math.floor(y0 * h), math.floor(x0 * w), math.ceil(y1 * h), math.ceil(x1 * w)], dtype=torch.long)
            if mask is None:
                from medlens.metrics.localisation import boxes_to_masks

                mask = boxes_to_masks(box[None], tuple(spatial))[0].bool()
    if box is None and mask is not None and bool(mask.any()):
        from medlens.core.boxes import box_around

        box = box_around(mask[None])[0].long()
    if mask is None and box is not None:
        from medlens.metrics.localisation import boxes_to_masks

        mask = boxes_to_masks(box[None], tuple(spatial))[0].bool()
    return mask, box


#: what :func:`medlens.io.nifti.write_nifti` needs of an input's meta to write a map in its geometry
GEOMETRY_KEYS = ("original_shape", "affine", "original_affine", "spacing")


class ExplainDataset(Dataset):
    """Items of the plan, read and prepared for the model; a bad item gives an error record.
    ``preprocessing`` (a :class:`medlens.data.prepare.Preprocessing`, e.g. a run folder's)
    replaces ``channels``, ``size`` and ``normalize``.

    Each good item is ``{"index", "path", "x" (C, *S) float32, "mask" (*S) bool or None,
    "box" (2 nd,) long or None, "original" (the input's own spatial size), "geometry" (with
    ``geometry=True``, a volume's :data:`GEOMETRY_KEYS` of its meta; else None)}``; a bad one is
    ``{"index", "path", "error"}``.
    """

    def __init__(self, items: Sequence[PlannedItem], channels: int | None, size: Sequence[int] | None,
                 normalize: str = "none", policy: Any = None, annotations: bool = True, geometry: bool = False,
                 preprocessing: Any = None) -> None:
        self.items = list(items)
        self.channels, self.size, self.normalize, self.policy = channels, size, normalize, policy
        self.annotations, self.geometry, self.preprocessing = annotations, geometry, preprocessing

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.items[position]
        record: dict[str, Any] = {"index": item.index, "path": item.path}
        if item.error is not None:
            return {**record, "error": item.error}
        try:
            from medlens.io.loading import read_image
            from medlens.workflows.explain import prepare

            path = Path(item.path)
            loaded = read_image(path, policy=self.policy)
            prepared = prepare(path, loaded, self.channels, self.size, self.normalize, preprocessing=self.preprocessing)
            x = prepared.tensor.float().contiguous()
            if not bool(torch.isfinite(x).all()):
                return {**record, "error": f"{path}: image has NaN or Inf values"}
            mask = box = None
            if self.annotations:
                mask, box = _annotations(path, loaded.spatial_shape, tuple(x.shape[1:]))
            geometry = {k: loaded.meta.get(k) for k in GEOMETRY_KEYS} if self.geometry and loaded.is_3d else None
            return {**record, "x": x, "mask": mask, "box": box, "original": tuple(loaded.spatial_shape), "geometry": geometry}
        except Exception as error:  # any decoding problem is this item's, not the run's
            text = one_line(error)
            return {**record, "error": text if item.path in text else f"{item.path}: {text}"}


def collate_by_shape(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One loader batch -> ``{"groups": [same-shape groups], "errors": [error records]}``.

    A group holds ``indices``, ``paths``, ``x`` (B, C, *S), ``masks`` (B, *S) bool or None,
    ``boxes`` (B, 2 nd) long or None (a missing annotation is empty, so its metrics are NaN).
    Items keep their order within a group; groups are in order of first appearance.
    """
    errors = [r for r in records if "error" in r]
    by_shape: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for r in records:
        if "error" not in r:
            by_shape.setdefault(tuple(r["x"].shape), []).append(r)
    groups = []
    for shape, members in by_shape.items():
        spatial = shape[1:]
        nd = len(spatial)
        has_mask = any(m["mask"] is not None for m in members)
        has_box = any(m["box"] is not None for m in members)
        groups.append({
            "indices": [m["index"] for m in members], "paths": [m["path"] for m in members],
            "originals": [m["original"] for m in members], "geometries": [m.get("geometry") for m in members],
            "x": torch.stack([m["x"] for m in members]),
            "masks": torch.stack([m["mask"] if m["mask"] is not None else torch.zeros(spatial, dtype=torch.bool)
                                  for m in members]) if has_mask else None,
            "boxes": torch.stack([m["box"] if m["box"] is not None else torch.zeros(2 * nd, dtype=torch.long)
                                  for m in members]) if has_box else None,
        })
    return {"groups": groups, "errors": errors}


def make_loader(dataset: ExplainDataset, batches: Sequence[Sequence[int]], workers: int = 0,
                prefetch: int = 2) -> DataLoader:
    """A DataLoader yielding :func:`collate_by_shape` batches for the given position lists, decoded
    in ``workers`` processes with at most ``prefetch`` batches in flight per worker."""
    options: dict[str, Any] = {}
    if workers > 0:
        options = {"prefetch_factor": prefetch, "persistent_workers": False}
    return DataLoader(dataset, batch_sampler=[list(b) for b in batches], num_workers=workers,
                      collate_fn=collate_by_shape, **options)

