"""Datasets, splits and transforms on the real brain MRI (class folders + YOLO boxes) and hippocampus (Decathlon) data."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from medlens.errors import MedlensError
from medlens.data.datasets import (
    IMAGENET_MEAN, IMAGENET_STD, CenterCrop, Item, MedicalDataset, RandomFlip, Resize, VolumeSlices, collate, eval_transforms, index_csv,
    index_decathlon, index_image_folder, index_mask_folder, index_source, prepare_split, read_split,
    read_yolo_boxes, split_items, train_transforms, write_split,
)

# README of ../shared/data: YOLO label 0 pituitary, 1 meningioma, 2 glioma
YOLO_LABEL = {"pituitary": 0, "meningioma": 1, "glioma": 2}


@pytest.fixture(scope="module")
def brain_index():
    from conftest import shared_path  # pytest puts tests/ on sys.path for its conftest

    return index_image_folder(shared_path("brain-tumor-mri"))


def test_image_folder_index_with_yolo_boxes(brain_mri, brain_index):
    items, classes = brain_index
    assert classes == ["glioma", "meningioma", "pituitary"]
    assert len(items) == len(list(brain_mri.rglob("*.jpg")))
    for item in items[::97]:
        folder = classes[item.label]
        assert f"/{folder}/" in item.path
        assert item.boxes and all(label == YOLO_LABEL[folder] for label in item.box_labels)
    first = items[0]
    label, xc, yc, w, h = (float(v) for v in open(first.path[:-4] + ".txt").read().split())
    assert first.boxes[0] == pytest.approx((xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2))


def test_split_is_deterministic_stratified_and_round_trips(tmp_path, brain_index):
    items, _ = brain_index
    parts = split_items(items, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    again = split_items(list(reversed(items)), {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    assert {k: [i.path for i in v] for k, v in parts.items()} == {k: [i.path for i in v] for k, v in again.items()}
    paths = [i.path for part in parts.values() for i in part]
    assert len(paths) == len(set(paths)) == len(items)
    totals = Counter(i.label for i in items)
    for name, share in (("train", 0.7), ("val", 0.15)):
        counts = Counter(i.label for i in parts[name])
        for label, total in totals.items():
            assert abs(counts[label] - share * total) <= 1
    other_seed = split_items(items, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=4)
    assert {i.path for i in other_seed["val"]} != {i.path for i in parts["val"]}
    written = write_split(tmp_path / "split.csv", parts)
    assert read_split(written) == parts


def test_patient_level_split_keeps_patients_together(brain_index):
    items, _ = brain_index
    grouped = [Item(i.path, label=i.label, patient=f"P{n // 7}") for n, i in enumerate(items[:300])]
    parts = split_items(grouped, seed=0)
    patients = {name: {i.patient for i in part} for name, part in parts.items()}
    assert not patients["train"] & patients["val"]
    assert len(parts["train"]) + len(parts["val"]) == 300


def test_samples_transforms_and_loader(brain_index):
    items, classes = brain_index
    picked = [items[0], items[-1], items[len(items) // 2], items[5]]
    torch.manual_seed(0)
    dataset = MedicalDataset(picked, classes, transform=train_transforms(64), channels=3)
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["label"].tolist() == [i.label for i in picked]
    assert len(batch["boxes"]) == 4 and all(b.shape[1] == 4 for b in batch["boxes"])
    assert all(((b >= 0) & (b <= 1)).all() for b in batch["boxes"])
    imagenet = MedicalDataset(picked[:1], classes, channels=3,
                              transform=eval_transforms(48, mean=IMAGENET_MEAN, std=IMAGENET_STD))[0]
    grey = MedicalDataset(picked[:1], classes, transform=Resize(48))[0]["image"][0]
    for c in range(3):  # the greyscale image, normalised with each channel's statistics
        assert torch.allclose(imagenet["image"][c], (grey - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=1e-5)
    plain = MedicalDataset(picked, classes, transform=eval_transforms(48))[1]
    assert plain["image"].shape == (1, 48, 48)
    assert abs(float(plain["image"].mean())) < 1e-4 and abs(float(plain["image"].std()) - 1) < 1e-3


def _box_mean(sample) -> float:
    height, width = sample["image"].shape[1:]
    x0, y0, x1, y1 = (sample["boxes"][0] * torch.tensor([width, height, width, height])).round().long().tolist()
    return float(sample["image"][:, y0:y1, x0:x1].mean())


def test_boxes_follow_flips_and_crops(brain_index):
    items, classes = brain_index
    sample = MedicalDataset(items[:1], classes, transform=Resize(128))[0]
    before = _box_mean(sample)
    for transform in (RandomFlip(axes=(-1,), p=1.0), RandomFlip(axes=(0,), p=1.0), CenterCrop(100), CenterCrop(150)):
        moved = transform(sample)
        assert moved["boxes"].shape == (1, 4)
        assert _box_mean(moved) == pytest.approx(before, rel=0.05), type(transform).__name__
    flipped = RandomFlip(axes=(-1,), p=1.0)(sample)
    assert torch.allclose(flipped["boxes"][0, [0, 2]], 1 - sample["boxes"][0, [2, 0]])


def test_decathlon_volumes_masks_and_3d_transforms(hippocampus):
    items, classes = index_decathlon(hippocampus)
    spec = json.loads((hippocampus / "dataset.json").read_text())
    assert len(items) == len(spec["training"]) and classes == ["background", "Anterior", "Posterior"]
    assert all(item.patient for item in items)
    dataset = MedicalDataset(items[:2], classes, cache=True)
    raw = dataset[0]
    assert raw["mask"].shape == raw["image"].shape and raw["mask"].dtype == torch.long
    assert set(raw["mask"].unique().tolist()) == {0, 1, 2}
    torch.manual_seed(0)
    augmented = MedicalDataset(items[:2], classes, transform=train_transforms(32, ndim=3, flip_axes=(0, 1, 2)))[1]
    assert augmented["image"].shape == (1, 32, 32, 32) and augmented["mask"].shape == (1, 32, 32, 32)
    assert set(augmented["mask"].unique().tolist()) <= {0, 1, 2}
    slices = VolumeSlices(dataset, axis=2, transform=eval_transforms(32), foreground_only=True)
    assert 0 < len(slices) < sum(dataset[v]["image"].shape[3] for v in range(2))
    piece = slices[0]
    assert piece["image"].shape == (1, 32, 32) and piece["mask"].any()


def test_decathlon_without_manifest_pairs_by_name(tmp_path, hippocampus):
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
        for case in ("hippocampus_001.nii.gz", "hippocampus_003.nii.gz"):
            (tmp_path / folder / case).symlink_to(hippocampus / folder / case)
    items, names, task = index_source(tmp_path)
    assert task == "segmentation" and len(items) == 2 and names == ["background", "foreground"]
    assert items[0].mask.endswith("labelsTr/hippocampus_001.nii.gz")


def test_csv_index_with_boxes_and_patients(tmp_path, brain_index):
    items, classes = brain_index
    rows = [items[0], items[-1]]
    with open(tmp_path / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "x0", "y0", "x1", "y1", "patient"])
        for n, item in enumerate(rows):
            writer.writerow([item.path, classes[item.label], *item.boxes[0], f"P{n}"])
    indexed, names, task = index_source(tmp_path / "data.csv")
    assert task == "classification" and sorted(names) == sorted({classes[i.label] for i in rows})
    assert [names[i.label] for i in indexed] == [classes[i.label] for i in rows]
    assert indexed[1].boxes[0] == pytest.approx(rows[1].boxes[0]) and indexed[1].patient == "P1"
    sample = MedicalDataset(indexed, names)[0]
    assert sample["boxes"].shape == (1, 4)


def test_bad_labels_masks_and_folders_are_one_line_errors(tmp_path, brain_index, hippocampus):
    items, classes = brain_index
    (tmp_path / "data.csv").write_text(f"path,label\n{items[0].path},glioma\n{items[1].path},astrocytoma\n")
    with pytest.raises(MedlensError, match=r"data\.csv:3: label 'astrocytoma' is not in the class list"):
        index_csv(tmp_path / "data.csv", classes=classes)
    with pytest.raises(MedlensError, match="outside the class list"):
        MedicalDataset([Item(items[0].path, label=5)], classes)[0]
    mismatched = Item(str(hippocampus / "imagesTr" / "hippocampus_001.nii.gz"),
                      mask=str(hippocampus / "labelsTr" / "hippocampus_003.nii.gz"))
    with pytest.raises(MedlensError, match="hippocampus_003.nii.gz: mask shape .* differs from its image"):
        MedicalDataset([mismatched])[0]
    one_class = Item(mismatched.path, mask=str(hippocampus / "labelsTr" / "hippocampus_001.nii.gz"))
    with pytest.raises(MedlensError, match="mask value 2 is outside the class list"):
        MedicalDataset([one_class], ["background", "hippocampus"])[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedlensError, match="empty folder"):
        index_image_folder(tmp_path / "empty")
    with pytest.raises(MedlensError, match="not in the class list"):
        index_image_folder(hippocampus.parent / "brain-tumor-mri", classes=["glioma", "pituitary"])
    (tmp_path / "bad.txt").write_text("2 0.5 0.5 0.2\n")
    with pytest.raises(MedlensError, match="line 1"):
        read_yolo_boxes(tmp_path / "bad.txt")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "a.png").symlink_to(items[0].path)
    with pytest.raises(MedlensError, match="no mask named a"):
        index_mask_folder(tmp_path / "images", tmp_path / "masks")


def test_dicom_class_folders_split_by_patient_id(tmp_path, chest_dicom):
    # test1, test4, test5 and test6 carry PatientID 2: they must land in one part whatever the seed
    for name, folder in [("test1", "normal"), ("test4", "normal"), ("test2", "abnormal"), ("test3", "abnormal"),
                         ("test5", "normal"), ("test6", "abnormal")]:
        (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / folder / name).symlink_to(chest_dicom / f"{name}.dcm")  # no extension: DICM preamble
    items, classes = index_image_folder(tmp_path / "data")
    assert classes == ["abnormal", "normal"] and len(items) == 6
    assert {item.patient for item in items} == {"2", "1", "61"}
    for seed in range(6):
        parts = split_items(items, {"train": 0.5, "val": 0.5}, seed=seed)
        where = {item.path.rsplit("/", 1)[1]: name for name, part in parts.items() for item in part}
        assert len({where[n] for n in ("test1", "test4", "test5", "test6")}) == 1


def test_prepare_split_reuses_the_split_on_disk(tmp_path, hippocampus):
    first, classes, task = prepare_split(hippocampus, tmp_path / "split.csv", {"train": 0.9, "val": 0.1}, seed=1)
    assert task == "segmentation" and len(first["val"]) == 20
    again, _, _ = prepare_split(hippocampus, tmp_path / "split.csv", {"train": 0.5, "val": 0.5}, seed=9)
    assert again == first  # the file wins over new fractions and seed
    (tmp_path / "split.csv").write_text((tmp_path / "split.csv").read_text().replace("hippocampus_001", "hippocampus_999"))
    with pytest.raises(MedlensError, match="hippocampus_999.*not in"):
        prepare_split(hippocampus, tmp_path / "split.csv")


def test_mask_image_folder_pairs_and_resizes_masks(tmp_path, brain_index):
    from PIL import Image

    items, _ = brain_index
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    areas = {}
    for n, item in enumerate(items[:3]):
        (tmp_path / "images" / f"case{n}.jpg").symlink_to(item.path)
        x0, y0, x1, y1 = (round(v * 512) for v in item.boxes[0])
        mask = torch.zeros(512, 512, dtype=torch.uint8)
        mask[y0:y1, x0:x1] = 1
        Image.fromarray(mask.numpy()).save(tmp_path / "masks" / f"case{n}.png")
        areas[f"case{n}"] = float(mask.float().mean())
    pairs = index_mask_folder(tmp_path / "images", tmp_path / "masks")
    assert [p.mask.rsplit("/", 1)[1] for p in pairs] == ["case0.png", "case1.png", "case2.png"]
    dataset = MedicalDataset(pairs, ["background", "tumour"], transform=Resize(128))
    for i, pair in enumerate(pairs):
        sample = dataset[i]
        assert sample["mask"].shape == (1, 128, 128) and set(sample["mask"].unique().tolist()) <= {0, 1}
        name = pair.path.rsplit("/", 1)[1][:-4]
        assert float(sample["mask"].float().mean()) == pytest.approx(areas[name], abs=0.01)
    Image.fromarray(torch.zeros(100, 100, dtype=torch.uint8).numpy()).save(tmp_path / "masks" / "case0.png")
    with pytest.raises(MedlensError, match="case0.png: mask shape"):
        dataset[0]


def test_cache_keeps_the_pre_transformed_sample_and_augments_each_time(brain_index):
    items, classes = brain_index
    dataset = MedicalDataset(items[:2], classes, transform=RandomFlip(p=0.5), cache=True, pre_transform=Resize(40))
    torch.manual_seed(1)
    seen = [dataset[0]["image"] for _ in range(8)]
    assert all(s.shape == (1, 40, 40) for s in seen)
    assert any(not torch.equal(seen[0], s) for s in seen)  # flipped on some accesses, not cached after the flip
    cached = dataset._cache[0]["image"]
    assert all(torch.equal(s, cached) or torch.equal(s, cached.flip(-1)) for s in seen)
