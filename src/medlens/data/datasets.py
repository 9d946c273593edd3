"""Datasets for training the models medlens explains: an index of items, a split on disk, a torch Dataset.

Indexes: an image folder with one subfolder per class (YOLO box files ``N.txt`` beside the
images are read too), a folder of images with a folder of masks, a Medical Segmentation
Decathlon folder (``dataset.json`` or ``imagesTr``/``labelsTr``), or a CSV of
``path,label[,x0,y0,x1,y1]``. ``split_items`` makes a deterministic split, by patient where a
patient ID exists, that ``write_split``/``read_split`` keep on disk. :class:`MedicalDataset`
reads items through ``medlens.io.read_image`` and returns dict samples that the torch-native
transforms (2D and 3D) of this module resize, crop, flip and normalise.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medlens.errors import MedlensError
from medlens.io.atomic import write_text
from medlens.io.loading import IMAGE_SUFFIXES, NIFTI_SUFFIXES, _is_dicom, is_readable, read_image

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]


@dataclass
class Item:
    """One entry of a dataset index.

    Attributes:
        path: the image (any format ``read_image`` reads).
        label: class index for classification, or None.
        mask: path of the label image/volume for segmentation, or None.
        boxes: boxes as normalised (x0, y0, x1, y1) in [0, 1] of the image width/height.
        box_labels: one class index per box, as written in the box file.
        patient: patient ID used to keep a patient's images in one split, or None.
    """

    path: str
    label: int | None = None
    mask: str | None = None
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    box_labels: list[int] = field(default_factory=list)
    patient: str | None = None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", *NIFTI_SUFFIXES, *IMAGE_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# ----------------------------------------------------------------------------------------------
# Indexes
# ----------------------------------------------------------------------------------------------


def read_yolo_boxes(path: str | Path) -> tuple[list[int], list[tuple[float, float, float, float]]]:
    """Read a YOLO box file: one ``label x_centre y_centre width height`` line per box, normalised.

    Returns:
        (labels, boxes) with boxes as normalised (x0, y0, x1, y1), clipped to [0, 1].
    """
    path = Path(path)
    labels, boxes = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            label, xc, yc, w, h = int(fields[0]), *(float(v) for v in fields[1:5])
            if len(fields) != 5:
                raise ValueError
        except ValueError:
            raise MedlensError(f"{path}: line {number} is not 'label x_centre y_centre width height': {line!r}") from None
        if not all(0.0 <= v <= 1.0 for v in (xc, yc, w, h)):
            raise MedlensError(f"{path}: line {number} has coordinates outside [0, 1] (YOLO boxes are normalised)")
        labels.append(label)
        boxes.append((max(xc - w / 2, 0.0), max(yc - h / 2, 0.0), min(xc + w / 2, 1.0), min(yc + h / 2, 1.0)))
    return labels, boxes


def index_image_folder(root: str | Path, classes: Sequence[str] | None = None,
                       bad: list[tuple[str, str]] | None = None) -> tuple[list[Item], list[str]]:
    """Index ``root/<class>/<image>``; a YOLO ``<image stem>.txt`` beside an image gives its boxes.

    Args:
        root: folder with one subfolder per class.
        classes: class names in label order; default the subfolder names sorted. A subfolder
            not in ``classes`` is an error.
        bad: when a list, an image whose YOLO file is malformed is left out and appended to it
            as (path, reason) instead of stopping the indexing.

    Returns:
        (items, classes).
    """
    root = Path(root)
    if not root.is_dir():
        raise MedlensError(f"{root}: not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise MedlensError(f"{root}: empty folder (expected one subfolder of images per class)")
    classes = list(classes) if classes is not None else [p.name for p in folders]
    items = []
    for folder in folders:
        if folder.name not in classes:
            raise MedlensError(f"{folder}: class '{folder.name}' is not in the class list {classes}")
        for path in sorted(p for p in folder.rglob("*") if is_readable(p)):
            box_file = path.with_name(_stem(path) + ".txt")
            try:
                box_labels, boxes = read_yolo_boxes(box_file) if box_file.is_file() else ([], [])
            except MedlensError as error:
                if bad is None:
                    raise
                bad.append((str(path), str(error)))
                continue
            items.append(Item(str(path), label=classes.index(folder.name), boxes=boxes, box_labels=box_labels,
                              patient=_dicom_patient(path)))
    if not items:
        raise MedlensError(f"{root}: class folders hold no image")
    return items, classes


def _dicom_patient(path: Path) -> str | None:
    """The PatientID of a DICOM file (header only), None for other files or an empty ID."""
    if not _is_dicom(path):
        return None
    from medlens.io.dicom import read_header

    try:
        patient = str(read_header(path).get("PatientID", "") or "").strip()
    except MedlensError:
        return None  # the dataset reports the bad file when it reads it
    return patient or None


def index_mask_folder(images: str | Path, masks: str | Path) -> list[Item]:
    """Pair every image in ``images`` with the file of the same stem in ``masks`` (any readable format)."""
    images, masks = Path(images), Path(masks)
    by_stem = {_stem(p): p for p in sorted(masks.iterdir()) if is_readable(p)} if masks.is_dir() else {}
    image_files = sorted(p for p in images.iterdir() if is_readable(p)) if images.is_dir() else []
    if not image_files:
        raise MedlensError(f"{images}: empty folder or not a folder (expected images)")
    items = []
    for path in image_files:
        mask = by_stem.get(_stem(path))
        if mask is None:
            raise MedlensError(f"{path}: no mask named {_stem(path)}.* in {masks}")
        items.append(Item(str(path), mask=str(mask)))
    return items


class GuessedClasses(list):
    """A class list guessed without a manifest (a Decathlon folder without dataset.json): mask values
    beyond it are further foreground labels, not errors."""


def index_decathlon(root: str | Path) -> tuple[list[Item], list[str]]:
    """Index a Medical Segmentation Decathlon task: ``dataset.json``'s training pairs, else imagesTr/labelsTr.

    Returns:
        (items, classes) with classes from ``dataset.json`` labels (default background/foreground).
        The patient ID of an item is its case name (one case per patient in the Decathlon).
    """
    root = Path(root)
    manifest = root / "dataset.json"
    classes: list[str] = GuessedClasses(["background", "foreground"])
    if manifest.is_file():
        try:
            spec = json.loads(manifest.read_text())
        except json.JSONDecodeError as error:
            raise MedlensError(f"{manifest}: invalid JSON ({error.msg} at line {error.lineno})") from None
        labels = spec.get("labels") or {}
        classes = [labels[k] for k in sorted(labels, key=int)] if labels else classes
        pairs = [((root / entry["image"]).resolve(), (root / entry["label"]).resolve()) for entry in spec.get("training", [])]
        items = [Item(str(image), mask=str(label), patient=_stem(image)) for image, label in pairs]
        missing = next((p for item in items for p in (item.path, item.mask) if not Path(p).is_file()), None)
        if missing:
            raise MedlensError(f"{manifest}: lists {missing}, which does not exist")
    else:
        items = [Item(it.path, mask=it.mask, patient=_stem(Path(it.path)))
                 for it in index_mask_folder(root / "imagesTr", root / "labelsTr")]
    if not items:
        raise MedlensError(f"{root}: no training pairs found")
    return items, classes


_BOX_COLUMNS = ("x0", "y0", "x1", "y1")


def index_csv(path: str | Path, classes: Sequence[str] | None = None, root: str | Path | None = None) -> tuple[list[Item], list[str]]:
    """Index a CSV with columns ``path,label`` and optionally ``x0,y0,x1,y1`` (normalised box), ``mask``, ``patient``.

    Relative paths are taken from ``root`` (default the CSV's folder). A label is a class name
    or an index; one outside ``classes`` is an error naming the row.
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    try:
        rows = list(csv.DictReader(path.open(newline="")))
    except (OSError, csv.Error, UnicodeDecodeError) as error:
        raise MedlensError(f"{path}: cannot read CSV ({error})") from None
    if not rows or "path" not in rows[0]:
        raise MedlensError(f"{path}: empty CSV or no 'path' column")
    names = [r.get("label", "") for r in rows]
    if classes is None:
        classes = sorted({n for n in names if n != ""}, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    classes = list(classes)
    items = []
    for number, row in enumerate(rows, start=2):
        image = Path(row["path"]) if Path(row["path"]).is_absolute() else base / row["path"]
        item = Item(str(image), label=_label_index(row.get("label", ""), classes, f"{path}:{number}"),
                    mask=str(base / row["mask"]) if row.get("mask") else None,
                    patient=row.get("patient") or row.get("patient_id") or None)
        if all(row.get(c) not in (None, "") for c in _BOX_COLUMNS):
            item.boxes = [tuple(float(row[c]) for c in _BOX_COLUMNS)]
            item.box_labels = [item.label if item.label is not None else 0]
        items.append(item)
    return items, classes


def _label_index(value: str, classes: list[str], where: str) -> int | None:
    if value in ("", None):
        return None
    if value in classes:
        return classes.index(value)
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(classes):
        return int(value)
    raise MedlensError(f"{where}: label '{value}' is not in the class list {classes}")


def index_source(source: str | Path, classes: Sequence[str] | None = None,
                 bad: list[tuple[str, str]] | None = None) -> tuple[list[Item], list[str], str]:
    """Index any supported source, returning (items, classes, task) with task "classification" or "segmentation"."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        items, names = index_csv(source, classes)
        return items, names, "segmentation" if items and items[0].mask else "classification"
    if (source / "dataset.json").is_file() or (source / "imagesTr").is_dir():
        items, names = index_decathlon(source)
        return items, names, "segmentation"
    items, names = index_image_folder(source, classes, bad=bad)
    return items, names, "classification"


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def split_items(
    items: Sequence[Item], fractions: dict[str, float] | None = None, seed: int = 0
) -> dict[str, list[Item]]:
    """Split deterministically into named parts, keeping each patient's items together.

    Items are grouped by ``patient`` (an item without one is its own group); groups are
    shuffled with ``seed`` and dealt out per class label (stratified by a group's first label),
    so the same items and seed always give the same split.

    Args:
        fractions: part name -> fraction, e.g. {"train": 0.8, "val": 0.2} (the default);
            normalised to sum to one.
    """
    fractions = fractions or {"train": 0.8, "val": 0.2}
    total = sum(fractions.values())
    if total <= 0 or any(f < 0 for f in fractions.values()):
        raise MedlensError(f"split fractions {fractions}: must be non-negative with a positive sum")
    groups: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        groups[item.patient if item.patient is not None else f"\0{item.path}"].append(item)
    strata: dict[Any, list[str]] = defaultdict(list)
    for key in sorted(groups):
        strata[groups[key][0].label].append(key)
    parts: dict[str, list[Item]] = {name: [] for name in fractions}
    rng = random.Random(seed)
    for label in sorted(strata, key=lambda v: (v is None, v if v is not None else 0)):
        keys = strata[label]
        rng.shuffle(keys)
        bounds = _cut_points(len(keys), [f / total for f in fractions.values()])
        for name, start, stop in zip(fractions, bounds[:-1], bounds[1:]):
            parts[name].extend(item for key in keys[start:stop] for item in groups[key])
    return parts


def _cut_points(count: int, shares: list[float]) -> list[int]:
    """Cumulative boundaries that give each share round(share * count) items, summing to count."""
    cumulative, points = 0.0, [0]
    for share in shares:
        cumulative += share
        points.append(min(count, int(math.floor(cumulative * count + 0.5))))
    points[-1] = count
    return points


SPLIT_COLUMNS = ["split", "path", "label", "mask", "patient", "boxes", "box_labels"]


def write_split(path: str | Path, parts: dict[str, list[Item]], overwrite: bool = True) -> Path:
    """Write a split as CSV (one row per item: split, path, label, mask, patient, boxes, box_labels)."""
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SPLIT_COLUMNS)
    for name, items in parts.items():
        for item in items:
            boxes = ";".join(" ".join(repr(float(v)) for v in box) for box in item.boxes)
            writer.writerow([name, item.path, "" if item.label is None else item.label, item.mask or "",
                             item.patient or "", boxes, " ".join(str(v) for v in item.box_labels)])
    return write_text(path, buffer.getvalue(), overwrite=overwrite)


def read_split(path: str | Path) -> dict[str, list[Item]]:
    """Read a split written by :func:`write_split`."""
    path = Path(path)
    try:
        rows = list(csv.DictReader(path.open(newline="")))
    except OSError as error:
        raise MedlensError(f"{path}: cannot read split ({error.strerror})") from None
    if rows and set(SPLIT_COLUMNS) - set(rows[0]):
        raise MedlensError(f"{path}: not a split file (missing columns {sorted(set(SPLIT_COLUMNS) - set(rows[0]))})")
    parts: dict[str, list[Item]] = defaultdict(list)
    for row in rows:
        boxes = [tuple(float(v) for v in box.split()) for box in row["boxes"].split(";") if box.strip()]
        parts[row["split"]].append(Item(
            row["path"], label=int(row["label"]) if row["label"] != "" else None, mask=row["mask"] or None,
            boxes=boxes, box_labels=[int(v) for v in row["box_labels"].split()], patient=row["patient"] or None,
        ))
    return dict(parts)


def prepare_split(source: str | Path, split_csv: str | Path, fractions: dict[str, float] | None = None,
                  seed: int = 0, classes: Sequence[str] | None = None) -> tuple[dict[str, list[Item]], list[str], str]:
    """Index ``source`` and split it, or reuse the split already at ``split_csv`` (so a resumed run sees the same items).

    Returns:
        (parts, classes, task) as :func:`index_source` and :func:`split_items` give them.
    """
    items, names, task = index_source(source, classes)
    split_csv = Path(split_csv)
    if split_csv.is_file():
        parts = read_split(split_csv)
        known = {item.path for item in items}
        stale = next((item.path for part in parts.values() for item in part if item.path not in known), None)
        if stale is not None:
            raise MedlensError(f"{split_csv}: lists {stale}, which is not in {source}; delete the split to make a new one")
        return parts, names, task
    parts = split_items(items, fractions, seed)
    write_split(split_csv, parts)
    return parts, names, task


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class MedicalDataset(Dataset):
    """A torch Dataset over :class:`Item` s, read with ``medlens.io.read_image``.

    Each sample is a dict: ``image`` float32 (C, *S) (``Loaded.display()`` in [0, 1] by default,
    or real units with ``intensity="raw"``), ``label`` (long scalar, -1 when absent), ``mask``
    (long (1, *S), only for items with a mask), ``boxes`` (float (N, 4) normalised x0, y0, x1, y1),
    ``box_labels`` (long (N,)), ``index`` and ``path``. Use :func:`collate` in the DataLoader.

    Args:
        items: the index.
        classes: class names; a label or mask value outside them is an error naming the file.
        transform: applied to each sample (see :func:`train_transforms`, :func:`eval_transforms`).
        channels: 1 or 3 to average or repeat channels so every image has this many; None keeps them.
        cache: keep the read samples (after ``pre_transform``) in memory, so each file is decoded once a run.
        pre_transform: a deterministic transform (e.g. ``Resize``) applied once before caching;
            ``transform`` (the random augmentation) still runs on every access.
    """

    def __init__(self, items: Sequence[Item], classes: Sequence[str] | None = None, transform: Transform | None = None,
                 channels: int | None = None, intensity: str = "display", cache: bool = False,
                 pre_transform: Transform | None = None) -> None:
        if not items:
            raise MedlensError("dataset: no items (empty folder or empty split)")
        if intensity not in ("display", "raw"):
            raise MedlensError(f"intensity={intensity!r}: expected 'display' or 'raw'")
        self.items, self.classes = list(items), list(classes) if classes is not None else None
        self.guessed_classes = isinstance(classes, GuessedClasses)
        self.transform, self.channels, self.intensity = transform, channels, intensity
        self.pre_transform = pre_transform
        self._cache: dict[int, Sample] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        return self.finish(self.read_cached(index), self.transform)

    def finish(self, sample: Sample, transform: Transform | None) -> Sample:
        """Transform, then match the channel count (greyscale is repeated last, so transforms do a third of the work)."""
        sample = transform(sample) if transform is not None else sample
        return dict(sample, image=_match_channels(sample["image"], self.channels))

    def read_cached(self, index: int) -> Sample:
        """The sample after ``pre_transform``, from the cache when caching (a shallow copy, safe to transform)."""
        if self._cache is not None and index in self._cache:
            return dict(self._cache[index])
        sample = self.read(index)
        sample = self.pre_transform(sample) if self.pre_transform is not None else sample
        if self._cache is not None:
            self._cache[index] = sample
        return dict(sample)

    def read(self, index: int) -> Sample:
        """The untransformed sample ``index``, checked against the class list."""
        item = self.items[index]
        loaded = read_image(item.path)
        image = loaded.display() if self.intensity == "display" else loaded.image
        sample: Sample = {
            "image": image,
            "label": torch.tensor(-1 if item.label is None else item.label, dtype=torch.long),
            "boxes": torch.tensor(item.boxes, dtype=torch.float32).reshape(-1, 4),
            "box_labels": torch.tensor(item.box_labels, dtype=torch.long),
            "index": index,
            "path": item.path,
        }
        if self.classes is not None and item.label is not None and not 0 <= item.label < len(self.classes):
            raise MedlensError(f"{item.path}: label {item.label} is outside the class list {self.classes}")
        if item.mask is not None:
            sample["mask"] = self._read_mask(item, tuple(image.shape[1:]))
        return sample

    def _read_mask(self, item: Item, spatial_shape: tuple[int, ...]) -> torch.Tensor:
        mask = read_image(item.mask).image
        mask = mask[:1] if mask.shape[0] > 1 else mask
        if tuple(mask.shape[1:]) != spatial_shape:
            raise MedlensError(f"{item.mask}: mask shape {tuple(mask.shape[1:])} differs from its image "
                               f"{item.path} {spatial_shape}")
        mask = mask.round().long()
        if self.classes is not None:
            low, high = int(mask.min()), int(mask.max())
            if low < 0 or (high >= len(self.classes) and not self.guessed_classes):
                raise MedlensError(f"{item.mask}: mask value {high if high >= len(self.classes) else low} is outside "
                                   f"the class list {self.classes}")
        return mask


def _match_channels(image: torch.Tensor, channels: int | None) -> torch.Tensor:
    if channels is None or image.shape[0] == channels:
        return image
    if channels == 3 and image.shape[0] == 1:
        return image.repeat(3, *([1] * (image.dim() - 1)))
    if channels == 1:
        return image.mean(dim=0, keepdim=True)
    raise MedlensError(f"channels={channels}: cannot make {channels} channels from {image.shape[0]}")


def collate(batch: list[Sample]) -> Sample:
    """Stack images, labels and masks; keep boxes, box labels and paths as per-sample lists."""
    out: Sample = {"image": torch.stack([s["image"] for s in batch]),
                   "label": torch.stack([s["label"] for s in batch]),
                   "boxes": [s["boxes"] for s in batch], "box_labels": [s["box_labels"] for s in batch],
                   "index": torch.tensor([s["index"] for s in batch]), "path": [s["path"] for s in batch]}
    if all("mask" in s for s in batch):
        out["mask"] = torch.stack([s["mask"] for s in batch])
    return out


class VolumeSlices(Dataset):
    """2D slices along one axis of a 3D :class:`MedicalDataset`, for training a 2D model on volumes.

    Args:
        volumes: a dataset of 3D samples (with ``cache=True`` each volume is read once).
        axis: spatial axis to slice (0, 1 or 2 of (D, H, W) / (X, Y, Z)).
        transform: applied to each 2D slice sample.
        foreground_only: keep only slices whose mask has a non-zero voxel.
    """

    def __init__(self, volumes: MedicalDataset, axis: int = 2, transform: Transform | None = None,
                 foreground_only: bool = False) -> None:
        self.volumes, self.axis, self.transform = volumes, axis, transform
        self.index: list[tuple[int, int]] = []
        for v in range(len(volumes)):
            sample = volumes.read_cached(v)
            depth = sample["image"].shape[1 + axis]
            for k in range(depth):
                if foreground_only and "mask" in sample and not bool(sample["mask"].select(1 + axis, k).any()):
                    continue
                self.index.append((v, k))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:
        v, k = self.index[i]
        volume = self.volumes.read_cached(v)
        sample = dict(volume, index=i, path=f"{volume['path']}#{k}")
        sample["image"] = volume["image"].select(1 + self.axis, k)
        if "mask" in volume:
            sample["mask"] = volume["mask"].select(1 + self.axis, k)
        return self.volumes.finish(sample, self.transform)


# ----------------------------------------------------------------------------------------------
# Transforms: torch-native, 2D and 3D, on sample dicts
# ----------------------------------------------------------------------------------------------


def _size(size: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    return (int(size),) * ndim if isinstance(size, int) else tuple(int(s) for s in size)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Iterable[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample


class Resize:
    """Resize image (bilinear/trilinear) and mask (nearest) to ``size``; normalised boxes are unchanged."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = size

    def __call__(self, sample: Sample) -> Sample:
        image = sample["image"]
        size = _size(self.size, image.dim() - 1)
        if tuple(image.shape[1:]) == size:
            return sample
        mode = "bilinear" if len(size) == 2 else "trilinear"
        sample = dict(sample, image=F.interpolate(image[None], size=size, mode=mode, align_corners=False,
                                                  antialias=len(size) == 2)[0])
        if "mask" in sample:
            sample["mask"] = F.interpolate(sample["mask"][None].float(), size=size, mode="nearest-exact")[0].long()
        return sample


def _crop(sample: Sample, start: Sequence[int], size: Sequence[int]) -> Sample:
    """Crop (zero-padding where the window leaves the image) and move normalised 2D boxes with it."""
    image = sample["image"]
    spatial = tuple(image.shape[1:])
    pad = []
    for dim in reversed(range(len(size))):  # F.pad wants last dim first
        before = max(-start[dim], 0)
        after = max(start[dim] + size[dim] - spatial[dim], 0)
        pad += [before, after]
    shifted = [s + pad[2 * (len(size) - 1 - d)] for d, s in enumerate(start)]
    window = tuple(slice(s, s + n) for s, n in zip(shifted, size))
    sample = dict(sample, image=F.pad(image, pad)[(slice(None), *window)])
    if "mask" in sample:
        sample["mask"] = F.pad(sample["mask"], pad)[(slice(None), *window)]
    if len(size) == 2 and sample.get("boxes") is not None and len(sample["boxes"]):
        height, width = spatial
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        offset = torch.tensor([start[1], start[0], start[1], start[0]], dtype=torch.float32)
        new = torch.tensor([size[1], size[0], size[1], size[0]], dtype=torch.float32)
        boxes = ((sample["boxes"] * scale - offset) / new).clamp(0, 1)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        sample["boxes"], sample["box_labels"] = boxes[keep], sample["box_labels"][keep]
    return sample


class CenterCrop:
    """Crop the centre ``size`` window (zero-padding a smaller image)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = size

    def window_start(self, spatial: Sequence[int], size: Sequence[int]) -> list[int]:
        return [(s - n) // 2 for s, n in zip(spatial, size)]

    def __call__(self, sample: Sample) -> Sample:
        spatial = sample["image"].shape[1:]
        size = _size(self.size, len(spatial))
        return _crop(sample, self.window_start(spatial, size), size)


class RandomCrop(CenterCrop):
    """Crop a random ``size`` window (zero-padding, centred, along a side shorter than the window)."""

    def window_start(self, spatial: Sequence[int], size: Sequence[int]) -> list[int]:
        return [int(torch.randint(0, s - n + 1, ())) if s > n else (s - n) // 2 for s, n in zip(spatial, size)]


class RandomResizedCrop:
    """Crop a random window covering ``scale`` of each side, then resize to ``size`` (light zoom)."""

    def __init__(self, size: int | Sequence[int], scale: tuple[float, float] = (0.85, 1.0)) -> None:
        self.size, self.scale = size, scale

    def __call__(self, sample: Sample) -> Sample:
        spatial = sample["image"].shape[1:]
        factor = float(torch.empty(()).uniform_(*self.scale))
        window = [max(1, int(round(s * factor))) for s in spatial]
        return Resize(self.size)(RandomCrop(window)(sample))


class RandomFlip:
    """Flip along each of ``axes`` (spatial axes, 0-based) with probability ``p``; 2D boxes follow."""

    def __init__(self, axes: Sequence[int] = (-1,), p: float = 0.5) -> None:
        self.axes, self.p = tuple(axes), p

    def __call__(self, sample: Sample) -> Sample:
        spatial = sample["image"].dim() - 1
        for axis in self.axes:
            if float(torch.rand(())) >= self.p:
                continue
            axis = axis % spatial
            sample = dict(sample, image=sample["image"].flip(1 + axis))
            if "mask" in sample:
                sample["mask"] = sample["mask"].flip(1 + axis)
            if spatial == 2 and len(sample.get("boxes", ())):
                boxes = sample["boxes"].clone()
                lo, hi = (0, 2) if axis == 1 else (1, 3)  # x for the last axis, y for the first
                boxes[:, lo], boxes[:, hi] = 1 - sample["boxes"][:, hi], 1 - sample["boxes"][:, lo]
                sample["boxes"] = boxes
        return sample


class RandomIntensity:
    """Light contrast/brightness jitter: x * (1 + U(-scale, scale)) + U(-shift, shift), with probability ``p``."""

    def __init__(self, scale: float = 0.1, shift: float = 0.05, p: float = 0.8) -> None:
        self.scale, self.shift, self.p = scale, shift, p

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return sample
        gain = 1 + float(torch.empty(()).uniform_(-self.scale, self.scale))
        bias = float(torch.empty(()).uniform_(-self.shift, self.shift))
        return dict(sample, image=sample["image"] * gain + bias)


class Normalise:
    """``(x - mean) / std`` per channel, or per-image z-score when mean and std are None."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        self.mean, self.std = mean, std

    def __call__(self, sample: Sample) -> Sample:
        image = sample["image"]
        if self.mean is None or self.std is None:
            return dict(sample, image=(image - image.mean()) / image.std().clamp_min(1e-6))
        shape = (-1,) + (1,) * (image.dim() - 1)
        mean = torch.as_tensor(self.mean, dtype=image.dtype).reshape(shape)
        std = torch.as_tensor(self.std, dtype=image.dtype).reshape(shape)
        return dict(sample, image=(image - mean) / std)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transforms(size: int | Sequence[int], ndim: int = 2, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, flip_axes: Sequence[int] = (-1,)) -> Compose:
    """Training pipeline: light random zoom-crop to ``size``, flips, intensity jitter, normalise."""
    return Compose([RandomResizedCrop(_size(size, ndim)), RandomFlip(flip_axes),
                    RandomIntensity(), Normalise(mean, std)])


def eval_transforms(size: int | Sequence[int], ndim: int = 2, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> Compose:
    """Evaluation pipeline: resize to ``size`` and normalise, nothing random."""
    return Compose([Resize(_size(size, ndim)), Normalise(mean, std)])
