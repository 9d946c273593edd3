"""Synthetic phantoms: shapes, determinism, balance, ground truth that decides the class, files."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medlens.core.boxes import box_around
from medlens.errors import MedlensError
from medlens.data.phantoms import make_phantoms, read_phantoms, write_phantoms


def _lesion_statistics(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 2D phantom: elongation (ratio of the mask's principal second moments) and the lesion's
    core-minus-rim intensity (core: within 0.35 of the equivalent radius of the centroid)."""
    h, w = masks.shape[-2:]
    grid = torch.stack(torch.meshgrid(torch.arange(h * 1.0), torch.arange(w * 1.0), indexing="ij")).flatten(1)
    m = masks[:, 0].flatten(1).float()
    area = m.sum(1)
    centroid = (m[:, None] * grid).sum(2) / area[:, None]
    offset = grid[None] - centroid[:, :, None]
    cov = torch.einsum("nip,njp,np->nij", offset, offset, m) / area[:, None, None]
    eig = torch.linalg.eigvalsh(cov)
    elongation = eig[:, 1] / eig[:, 0]
    radius = offset.pow(2).sum(1).sqrt() / (area / torch.pi).sqrt()[:, None]
    values = images[:, 0].flatten(1)
    core, rim = (radius < 0.35) * m, ((radius > 0.6) & (radius < 0.9)) * m
    contrast = (values * core).sum(1) / core.sum(1) - (values * rim).sum(1) / rim.sum(1)
    return elongation, contrast


def test_shapes_ranges_balance_and_determinism():
    a = make_phantoms(31, size=48, seed=3, n_classes=3)
    assert a.images.shape == (31, 1, 48, 48) and a.images.dtype == torch.float32
    assert a.masks.shape == (31, 1, 48, 48) and a.masks.dtype == torch.bool
    assert a.boxes.shape == (31, 4) and a.labels.shape == (31,)
    assert 0 <= a.images.min() and a.images.max() <= 1
    assert a.labels.bincount().tolist() == [11, 10, 10]
    assert a.class_names == ("round", "elongated", "ring")
    b = make_phantoms(31, size=48, seed=3, n_classes=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.masks, b.masks)
    c = make_phantoms(31, size=48, seed=4, n_classes=3)
    assert not torch.equal(a.images, c.images)


def test_lesion_inside_body_and_box_is_box_around_mask():
    s = make_phantoms(64, size=64, seed=1)
    assert (s.masks.flatten(1).sum(1) >= 10).all()  # every phantom has a visible lesion
    assert not (s.masks & ~s.bodies).any()
    assert torch.equal(s.boxes, box_around(s.masks[:, 0]))
    lesion_mean = (s.images * s.masks).flatten(1).sum(1) / s.masks.flatten(1).sum(1)
    outside_body = (s.images * ~s.bodies).flatten(1).sum(1) / (~s.bodies).flatten(1).sum(1)
    assert (lesion_mean > outside_body + 0.3).all()


def test_the_lesion_decides_the_class():
    s = make_phantoms(150, size=64, seed=2, n_classes=3)
    elongation, contrast = _lesion_statistics(s.images, s.masks)
    round_, long_, ring = (s.labels == k for k in range(3))
    # elongated lesions are far longer than wide; round and ring ones are not
    assert elongation[long_].min() > 3 * elongation[round_ | ring].max()
    # ring lesions have a dark core; round ones do not
    assert contrast[ring].max() < contrast[round_].min() - 0.05


def test_distractors_are_fainter_and_away_from_the_lesion():
    s = make_phantoms(48, size=64, seed=5, distractors=True)
    plain = make_phantoms(48, size=64, seed=5, distractors=False)
    assert s.distractor_boxes.shape == (48, 4) and plain.distractor_boxes is None
    centre = lambda b: (b[:, :2] + b[:, 2:]).float() / 2  # noqa: E731
    gap = (centre(s.distractor_boxes) - centre(s.boxes)).norm(dim=1)
    assert (gap > 8).float().mean() > 0.9  # well apart in nearly all images
    # the distractor's brightest pixels are fainter than the lesion's
    def peak_in(boxes: torch.Tensor) -> torch.Tensor:
        return torch.stack([s.images[i, 0, b[0]:b[2], b[1]:b[3]].amax() for i, b in enumerate(boxes.tolist())])

    assert (peak_in(s.distractor_boxes) < peak_in(s.boxes)).float().mean() > 0.9


def test_spurious_marker_follows_the_label_at_the_requested_rate():
    s = make_phantoms(400, size=32, seed=0, spurious_marker=True, spurious_correlation=0.8, distractors=False)
    assert abs(s.marker_agrees.float().mean().item() - 0.8) < 0.06
    right_corner = s.marker_boxes[:, 1] > 16  # label 1's marker is top-right, label 0's top-left
    assert torch.equal(right_corner == (s.labels == 1), s.marker_agrees)
    for i in range(3):
        b = s.marker_boxes[i].tolist()
        assert s.images[i, 0, b[0]:b[2], b[1]:b[3]].max() > 0.9  # bright letter block
        assert not s.bodies[i, 0, b[0]:b[2], b[1]:b[3]].any()  # outside the body


def test_3d_phantoms_same_api():
    s = make_phantoms(6, size=24, dims=3, seed=0, spurious_marker=True)
    assert s.images.shape == (6, 1, 24, 24, 24) and s.boxes.shape == (6, 6)
    assert torch.equal(s.boxes, box_around(s.masks[:, 0]))
    assert not (s.masks & ~s.bodies).any() and (s.masks.flatten(1).sum(1) >= 8).all()
    assert s.marker_boxes.shape == (6, 6)


def test_bad_arguments_are_refused():
    with pytest.raises(MedlensError, match="dims"):
        make_phantoms(2, dims=4)
    with pytest.raises(MedlensError, match="n_classes"):
        make_phantoms(2, n_classes=5)
    with pytest.raises(MedlensError, match="PNG"):
        write_phantoms("/tmp/unused", make_phantoms(1, size=16, dims=3), fmt="png")


def test_written_png_files_reread_with_matching_mask_and_box(tmp_path):
    s = make_phantoms(5, size=40, seed=7, n_classes=3)
    table = write_phantoms(tmp_path, s, fmt="png")
    rows = list(csv.DictReader(table.open()))
    assert [int(r["label"]) for r in rows] == s.labels.tolist()
    for i, row in enumerate(rows):
        image = np.asarray(Image.open(tmp_path / row["image"]))
        mask = np.asarray(Image.open(tmp_path / row["mask"])) > 0
        box = json.loads((tmp_path / row["box"]).read_text())
        assert image.dtype == np.uint8 and image.shape == (40, 40)
        np.testing.assert_allclose(image / 255.0, s.images[i, 0].numpy(), atol=0.5 / 255 + 1e-6)
        np.testing.assert_array_equal(mask, s.masks[i, 0].numpy())
        assert box["box"] == box_around(torch.from_numpy(mask)[None])[0].tolist() == s.boxes[i].tolist()
        assert box["class_name"] == s.class_names[s.labels[i]]
    back = read_phantoms(tmp_path)
    assert torch.equal(back.masks, s.masks) and torch.equal(back.boxes, s.boxes) and back.class_names == s.class_names
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_written_nifti_volumes_reread_with_matching_mask_and_box(tmp_path):
    s = make_phantoms(2, size=20, dims=3, seed=1)
    write_phantoms(tmp_path, s, fmt="nifti")
    for i, name in enumerate(s.names):
        volume = nib.load(tmp_path / f"{name}.nii.gz")
        mask = np.asarray(nib.load(tmp_path / f"{name}_mask.nii.gz").dataobj) > 0
        np.testing.assert_allclose(volume.get_fdata(), s.images[i, 0].numpy(), atol=1e-6)
        np.testing.assert_array_equal(mask, s.masks[i, 0].numpy())
        box = json.loads((tmp_path / f"{name}_box.json").read_text())["box"]
        assert box == box_around(torch.from_numpy(mask)[None])[0].tolist() == s.boxes[i].tolist()
    back = read_phantoms(tmp_path)
    assert back.images.shape == (2, 1, 20, 20, 20) and torch.equal(back.masks, s.masks)
