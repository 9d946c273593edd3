"""Lightning data modules for the two training tasks.

* classification: an image folder with one sub-folder per class (``brain-tumor-mri/glioma/1.jpg``);
* segmentation: a Medical Segmentation Decathlon task (``imagesTr``/``labelsTr``), as 3D volumes or
  as the 2D slices of those volumes.

The split is deterministic (seeded, stratified per class) and written to ``split.csv`` in the run
folder; a resumed run reads it back so the validation images never change under a checkpoint.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from medlens.errors import MedlensError
from medlens.io.atomic import atomic_path
from medlens.train.config import DataConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Sample:
    """One training item: an image file, its class index, and (segmentation) its label volume."""

    path: str
    label: int = -1
    mask: str | None = None


# ------------------------------------------------------------------------------------------- scanning


def scan_image_folder(root: Path, classes: Sequence[str] | None = None) -> tuple[list[Sample], list[str]]:
    """List ``root/<class>/<image>`` files; classes are the sub-folders (sorted) unless given."""
    if not root.is_dir():
        raise MedlensError(f"data.root {root}: folder not found")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(classes) if classes else found
    missing = [c for c in names if c not in found]
    if missing:
        raise MedlensError(f"data.root {root}: no folder for class(es) {', '.join(missing)}")
    samples = [
        Sample(str(f), index)
        for index, name in enumerate(names)
        for f in sorted((root / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise MedlensError(f"data.root {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return samples, names


def scan_decathlon(root: Path) -> tuple[list[Sample], list[str]]:
    """Pair ``imagesTr`` with ``labelsTr`` through ``dataset.json`` (or by file name)."""
    if not root.is_dir():
        raise MedlensError(f"data.root {root}: folder not found")
    manifest = root / "dataset.json"
    names = ["background"]
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text())
        except json.JSONDecodeError as err:
            raise MedlensError(f"{manifest}: not valid JSON ({err.msg} at line {err.lineno})") from None
        labels = meta.get("labels", {})
        names = [labels[k] for k in sorted(labels, key=int)] if labels else names
        pairs = [(root / e["image"], root / e["label"]) for e in meta.get("training", [])]
    else:
        pairs = [(p, root / "labelsTr" / p.name) for p in sorted((root / "imagesTr").glob("*.nii*"))]
    pairs = [(i, m) for i, m in pairs if not i.name.startswith(".")]
    if not pairs:
        raise MedlensError(f"data.root {root}: no imagesTr/*.nii.gz volumes found")
    absent = [str(m) for _, m in pairs if not m.is_file()] + [str(i) for i, _ in pairs if not i.is_file()]
    if absent:
        raise MedlensError(f"data.root {root}: {len(absent)} listed file(s) missing, first {absent[0]}")
    return [Sample(str(i), -1, str(m)) for i, m in pairs], names


# ------------------------------------------------------------------------------------------- splitting


def split_samples(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split, stratified by class (all one group for segmentation), at least one per side."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in sorted({s.label for s in samples}):
        group = [s for s in samples if s.label == label]
        order = torch.randperm(len(group), generator=generator).tolist()
        n_val = min(max(1, round(len(group) * val_fraction)), len(group) - 1) if len(group) > 1 else 0
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return train, val


def write_split(path: Path, train: list[Sample], val: list[Sample]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "path", "label", "mask"])
        for name, group in (("train", train), ("val", val)):
            writer.writerows([name, s.path, s.label, s.mask or ""] for s in group)


def read_split(path: Path) -> tuple[list[Sample], list[Sample]]:
    groups: dict[str, list[Sample]] = {"train": [], "val": []}
    try:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                groups[row["split"]].append(Sample(row["path"], int(row["label"]), row["mask"] or None))
    except (KeyError, ValueError) as err:
        raise MedlensError(f"split file {path}: not a medlens split.csv ({err})") from None
    if not groups["train"] or not groups["val"]:
        raise MedlensError(f"split file {path}: needs both train and val rows")
    return groups["train"], groups["val"]


def _limit(samples: list[Sample], per_class: int | None, total: int | None) -> list[Sample]:
    if per_class:
        counts: dict[int, int] = {}
        kept = []
        for s in samples:
            counts[s.label] = counts.get(s.label, 0) + 1
            if counts[s.label] <= per_class:
                kept.append(s)
        samples = kept
    return samples[:total] if total else samples


# ------------------------------------------------------------------------------------------- datasets


def read_picture(path: str, channels: int, size: Sequence[int]) -> Tensor:
    """Decode an image to (channels, *size) floats in [0, 1]; JPEGs decode at reduced size (draft)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode = "L" if channels == 1 else "RGB"
            image.draft(mode, (size[-1], size[0]))
            pixels = torch.frombuffer(bytearray(image.convert(mode).tobytes()), dtype=torch.uint8)
            width, height = image.size
    except (OSError, UnidentifiedImageError) as err:
        raise MedlensError(f"{path}: not a readable image ({err})") from None
    picture = pixels.view(height, width, -1).permute(2, 0, 1).float().div_(255)
    return F.interpolate(picture[None], size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0]


class ImageFolderDataset(Dataset):
    """Images of one split, resized to ``size`` and standardised per image; returns (image, label)."""

    def __init__(self, samples: list[Sample], channels: int, size: Sequence[int], augment: bool = False) -> None:
        self.samples, self.channels, self.size, self.augment = samples, channels, list(size), augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        sample = self.samples[index]
        image = read_picture(sample.path, self.channels, self.size)
        if self.augment:
            image = light_augment(image)
        return standardise(image), sample.label


def standardise(image: Tensor) -> Tensor:
    """Zero mean, unit variance per image (MRI intensities have no fixed scale)."""
    return (image - image.mean()) / image.std().clamp_min(1e-6)


def light_augment(image: Tensor) -> Tensor:
    """A random horizontal flip and a +-10% intensity scale: safe for brain MRI and radiographs."""
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image * (0.9 + 0.2 * torch.rand(()))


def read_volume(path: str) -> Tensor:
    """A NIfTI volume in closest-canonical (RAS) orientation as a float tensor."""
    import nibabel as nib

    try:
        volume = nib.as_closest_canonical(nib.load(path))
        return torch.from_numpy(volume.get_fdata(dtype="float32").copy())
    except Exception as err:  # nibabel raises many types for damaged files
        raise MedlensError(f"{path}: not a readable NIfTI volume ({str(err).splitlines()[0]})") from None


class VolumeDataset(Dataset):
    """Decathlon image/label volumes resampled to ``size`` (trilinear / nearest), held in memory.

    With ``slices=True`` each item is one axial slice (last axis) as a 2D image and mask.
    Returns (image (1,*S) float, mask (1,*S) long).
    """

    def __init__(self, samples: list[Sample], size: Sequence[int], slices: bool = False, augment: bool = False) -> None:
        self.samples, self.augment = samples, augment
        self.images, self.masks = [], []
        for sample in samples:
            image, mask = read_volume(sample.path), read_volume(sample.mask or "")
            if image.shape != mask.shape:
                raise MedlensError(f"{sample.mask}: label shape {tuple(mask.shape)} differs from image {tuple(image.shape)}")
            # Slices resample in-plane only; volumes take 3 sizes (or one for a cube).
            target = (size[0], size[-1], image.shape[-1]) if slices else (tuple(size) * 3)[-3:] if len(size) == 1 else tuple(size)
            self.images.append(standardise(F.interpolate(image[None, None], size=target, mode="trilinear")[0]))
            self.masks.append(F.interpolate(mask[None, None], size=target, mode="nearest")[0].long())
        self.index = [(v, z) for v, m in enumerate(self.masks) for z in range(m.shape[-1])] if slices else None

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if self.index is not None:
            volume, z = self.index[index]
            image, mask = self.images[volume][..., z], self.masks[volume][..., z]
        else:
            image, mask = self.images[index], self.masks[index]
        if self.augment and torch.rand(()) < 0.5:
            image, mask = image.flip(1), mask.flip(1)  # left-right flip keeps anterior/posterior labels
        return image, mask


# ------------------------------------------------------------------------------------------- module


class MedlensDataModule(L.LightningDataModule):
    """Scans, splits (writing ``split.csv`` to ``out_dir``) and serves the train and val loaders.

    Attributes after ``setup()``: ``classes`` (names), ``train_samples``, ``val_samples``.
    """

    def __init__(self, config: DataConfig, task: str, out_dir: str | Path) -> None:
        super().__init__()
        self.config, self.task, self.out_dir = config, task, Path(out_dir)
        self.classes: list[str] = []
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def split_path(self) -> Path:
        return self.out_dir / "split.csv"

    def prepare(self) -> "MedlensDataModule":
        """Scan and split once (idempotent); called by ``setup`` and by the runner to size the model."""
        if self.classes:
            return self
        cfg, root = self.config, Path(self.config.root)
        samples, self.classes = (scan_image_folder(root, cfg.classes) if cfg.kind == "image_folder" else scan_decathlon(root))
        existing = Path(cfg.split_file) if cfg.split_file else self.split_path
        if existing.is_file():
            self.train_samples, self.val_samples = read_split(existing)
        else:
            samples = _limit(samples, cfg.limit_per_class, cfg.limit)
            self.train_samples, self.val_samples = split_samples(samples, cfg.val_fraction, cfg.seed)
            if not self.val_samples:
                raise MedlensError(f"data.root {root}: too few images to hold out a validation split")
        if not self.split_path.is_file():
            write_split(self.split_path, self.train_samples, self.val_samples)
        return self

    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        if self.train_set is not None:
            return
        cfg = self.config
        if self.task == "classification":
            self.train_set = ImageFolderDataset(self.train_samples, cfg.in_channels, cfg.image_size, cfg.augment)
            self.val_set = ImageFolderDataset(self.val_samples, cfg.in_channels, cfg.image_size)
        else:
            self.train_set = VolumeDataset(self.train_samples, cfg.image_size, cfg.slices, cfg.augment)
            self.val_set = VolumeDataset(self.val_samples, cfg.image_size, cfg.slices)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        return DataLoader(
            dataset, batch_size=self.config.batch_size, shuffle=shuffle, num_workers=self.config.num_workers,
            persistent_workers=self.config.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
