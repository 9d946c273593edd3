"""The Lightning data module for training, built on :mod:`medlens.data.datasets`.

* classification: an image folder with one sub-folder per class (``brain-tumor-mri/glioma/1.jpg``);
* segmentation: a Medical Segmentation Decathlon task (``imagesTr``/``labelsTr``), as 3D volumes or
  as the 2D slices of those volumes.

The split is deterministic (seeded, stratified, patient-level where a patient ID exists) and is
written to ``split.csv`` in the run folder; a resumed run reads it back, so the validation images
never change under a checkpoint. Batches are the dicts of :func:`medlens.data.datasets.collate`.

Every item is read once in :meth:`MedlensDataModule.setup` (the reads fill the per-run cache): a file
that cannot be read (truncated, corrupt, no pixel data, a mask that does not fit its image) is left
out with its reason in ``bad_files`` (the run writes them to ``bad_files.csv``) and the rest train,
instead of the run dying mid-epoch inside a DataLoader worker.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

from medlens.errors import MedlensError
from medlens.data.datasets import (
    Compose, Item, MedicalDataset, Normalise, RandomFlip, RandomIntensity, RandomResizedCrop, Resize, Sample,
    Transform, VolumeSlices, collate, index_decathlon, index_image_folder, read_split, split_items, write_split,
)
from medlens.train.config import DataConfig


def limit_items(items: list[Item], per_class: int | None, total: int | None) -> list[Item]:
    """The first ``per_class`` items of each label, then the first ``total`` (None: no limit)."""
    if per_class:
        seen: dict[int | None, int] = {}
        kept = []
        for item in items:
            seen[item.label] = seen.get(item.label, 0) + 1
            if seen[item.label] <= per_class:
                kept.append(item)
        items = kept
    return items[:total] if total else items


class MedlensDataModule(L.LightningDataModule):
    """Indexes, splits (writing ``split.csv`` to ``out_dir``) and serves the train and val loaders.

    Attributes after :meth:`prepare`: ``classes`` (names), ``train_items``, ``val_items``.
    """

    def __init__(self, config: DataConfig, task: str, out_dir: str | Path) -> None:
        super().__init__()
        self.config, self.task, self.out_dir = config, task, Path(out_dir)
        self.classes: list[str] = []
        self.train_items: list[Item] = []
        self.val_items: list[Item] = []
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.bad_files: list[tuple[str, str]] = []

    @property
    def split_path(self) -> Path:
        return self.out_dir / "split.csv"

    @property
    def spatial_dims(self) -> int:
        return 3 if self.task == "segmentation" and not self.config.slices else 2

    def prepare(self) -> "MedlensDataModule":
        """Index and split once (idempotent); the runner calls it first to size the model's head."""
        if self.classes:
            return self
        cfg, root = self.config, Path(self.config.root)
        if not root.exists():
            raise MedlensError(f"data.root {root}: folder not found")
        index = index_image_folder if cfg.kind == "image_folder" else lambda r, _c: index_decathlon(r)
        items, self.classes = index(root, cfg.classes)
        existing = Path(cfg.split_file) if cfg.split_file else self.split_path
        if existing.is_file():
            parts = read_split(existing)
        else:
            items = limit_items(items, cfg.limit_per_class, cfg.limit)
            parts = split_items(items, {"train": 1 - cfg.val_fraction, "val": cfg.val_fraction}, seed=cfg.seed)
        self.train_items, self.val_items = parts.get("train", []), parts.get("val", [])
        if not self.train_items or not self.val_items:
            raise MedlensError(f"data.root {root}: too few items ({len(items)}) for both a train and a val split")
        if not self.split_path.is_file():
            write_split(self.split_path, {"train": self.train_items, "val": self.val_items})
        return self

    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        if self.train_set is not None:
            return
        cfg = self.config
        # Left-right is the last axis of a 2D picture and the first (X, RAS) of a volume or its axial slice.
        flips = (-1,) if self.task == "classification" else (0,)
        random = [RandomResizedCrop(cfg.image_size), RandomFlip(flips), RandomIntensity()] if cfg.augment else []
        normalise = Normalise(cfg.mean, cfg.std)  # per-image z-score unless mean/std are given
        self.train_items, train_set = self._dataset(self.train_items, Compose([*random, normalise]), "train")
        self.val_items, val_set = self._dataset(self.val_items, normalise, "val")
        self.train_set, self.val_set = train_set, val_set

    def _readable(self, items: list[Item], volumes: bool) -> tuple[list[Item], dict[int, Sample]]:
        """Read every item once: (the items that read, their samples by new position); the others go to ``bad_files``."""
        cfg = self.config
        probe = MedicalDataset(items, self.classes, None if volumes else Resize(cfg.image_size), cfg.in_channels)
        kept: list[Item] = []
        samples: dict[int, Sample] = {}
        for index, item in enumerate(items):
            try:
                sample = probe.read(index) if volumes else probe[index]
            except MedlensError as error:
                self.bad_files.append((item.path, str(error)))
                continue
            samples[len(kept)] = dict(sample, index=len(kept))
            kept.append(item)
        return kept, samples

    def _dataset(self, items: list[Item], transform: Transform, part: str) -> tuple[list[Item], Dataset]:
        cfg, size = self.config, self.config.image_size
        slices = self.task == "segmentation" and cfg.slices
        kept, samples = self._readable(items, volumes=slices)
        if not kept:
            first = self.bad_files[-1] if self.bad_files else ("", "")
            raise MedlensError(f"data.root {cfg.root}: no {part} item could be read (e.g. {first[1]})")
        if slices:
            volumes = MedicalDataset(kept, self.classes, None, cfg.in_channels, cache=True)
            volumes._cache = samples  # type: ignore[assignment]  # read above; not decoded again
            return kept, VolumeSlices(volumes, axis=2, transform=Compose([Resize(size), transform]))
        dataset = ResizedCache(MedicalDataset(kept, self.classes, Resize(size), cfg.in_channels), transform)
        dataset.cache = samples
        return kept, dataset

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        size = self.config.batch_size
        # A last training batch of one image breaks BatchNorm ("Expected more than 1 value per channel"): drop it.
        drop_last = shuffle and len(dataset) > size and len(dataset) % size == 1
        return DataLoader(dataset, batch_size=size, shuffle=shuffle, collate_fn=collate, drop_last=drop_last,
                          num_workers=self.config.num_workers, persistent_workers=self.config.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class ResizedCache(Dataset):
    """Keeps each sample after its (deterministic) resize and applies ``transform`` on every access.

    A 512x512 JPEG is decoded and resized once per run instead of once per epoch; the random
    augmentations and the normalisation still run each time.
    """

    def __init__(self, resized: MedicalDataset, transform: Transform) -> None:
        self.resized, self.transform = resized, transform
        self.cache: dict[int, Sample] = {}

    def __len__(self) -> int:
        return len(self.resized)

    def __getitem__(self, index: int) -> Sample:
        if index not in self.cache:
            self.cache[index] = self.resized[index]
        return self.transform(dict(self.cache[index]))
