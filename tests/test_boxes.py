"""Boxes and masks from maps: hand-built maps with known answers, and scipy as the reference labeller."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from medlens.core.boxes import (
    argmax_cell_box, box_around, boxes_to_json, component_boxes, component_regions, components,
    threshold_mask, topk_mask,
)
from medlens.errors import MedlensError


def test_box_around_known_boxes_2d_3d_and_empty():
    masks = torch.zeros(3, 12, 10, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    masks[1, 0, 9] = True  # a single corner pixel
    boxes = box_around(masks)
    assert boxes.dtype == torch.long
    assert boxes.tolist() == [[2, 3, 5, 7], [0, 9, 1, 10], [-1, -1, -1, -1]]

    vol = torch.zeros(2, 8, 9, 10, dtype=torch.bool)
    vol[0, 1:4, 2:3, 5:10] = True
    vol[1, 7, 0, 0] = vol[1, 0, 8, 9] = True  # two far corners span the volume
    assert box_around(vol).tolist() == [[1, 2, 5, 4, 3, 10], [0, 0, 0, 8, 9, 10]]


def test_box_around_matches_scipy_find_objects_on_random_masks():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(6, 16, 20, generator=g) > 0.97
    for mask, box in zip(masks, box_around(masks)):
        (sl,) = ndi.find_objects(mask.numpy().astype(int)) or [None]
        expected = [-1] * 4 if sl is None else [sl[0].start, sl[1].start, sl[0].stop, sl[1].stop]
        assert box.tolist() == expected


def test_topk_mask_counts_and_ties():
    maps = torch.arange(100.0).view(1, 10, 10).repeat(2, 1, 1)
    maps[1] = 0.0
    maps[1, 0, :3] = 1.0  # three tied top pixels
    inc = topk_mask(maps, 0.05)
    assert inc[0].sum() == 5 and inc[0].flatten()[-5:].all()  # the five largest values
    assert inc[1].sum() == 100  # the 5th value is 0.0, so every pixel tied with it is included
    exact = topk_mask(maps, 0.02, ties="exact")
    assert exact.flatten(1).sum(1).tolist() == [2, 2]
    assert exact[1, 0, :3].sum() == 2  # the two kept pixels come from the tied maximum
    assert topk_mask(maps, 1e-9)[0].sum() == 1  # at least one pixel
    with pytest.raises(MedlensError, match="fraction"):
        topk_mask(maps, 0.0)
    vol = torch.rand(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    assert topk_mask(vol, 0.1).flatten(1).sum(1).tolist() == [12, 12]


def test_threshold_mask_per_map_thresholds():
    maps = torch.tensor([[[0.1, 0.5], [0.7, 0.9]], [[0.1, 0.5], [0.7, 0.9]]])
    assert threshold_mask(maps, 0.5).sum().item() == 6
    per_map = threshold_mask(maps, torch.tensor([0.8, 0.05]))
    assert per_map.flatten(1).sum(1).tolist() == [1, 4]


@pytest.mark.parametrize("shape", [(33, 47), (9, 11, 13)])
@pytest.mark.parametrize("connectivity", ["face", "full"])
def test_components_equal_scipy_label(shape, connectivity):
    g = torch.Generator().manual_seed(len(shape))
    structure = None if connectivity == "face" else np.ones((3,) * len(shape))
    for density in (0.2, 0.45, 0.6):
        mask = torch.rand(shape, generator=g) < density
        reference, count = ndi.label(mask.numpy(), structure=structure)
        labels = components(mask, connectivity)
        assert labels.dtype == torch.long and int(labels.max()) == count
        np.testing.assert_array_equal(labels.numpy(), reference)


def test_components_long_serpentine_is_one_component():
    mask = torch.zeros(41, 41, dtype=torch.bool)
    mask[::2] = True  # rows, joined alternately at the right and left ends
    for k, row in enumerate(range(1, 41, 2)):
        mask[row, -1 if k % 2 == 0 else 0] = True
    labels = components(mask)
    assert int(labels.max()) == 1 and ndi.label(mask.numpy())[1] == 1
    assert (labels[mask] == 1).all() and (labels[~mask] == 0).all()
    assert int(components(torch.zeros(5, 5, dtype=torch.bool)).max()) == 0


def test_component_boxes_strongest_first_threshold_and_fraction():
    heat = torch.zeros(30, 30)
    heat[20:25, 3:9] = 0.7
    heat[2:6, 10:14] = 0.9
    heat[15, 15] = 0.3
    assert component_boxes(heat, threshold=0.5) == [[2, 10, 6, 14], [20, 3, 25, 9]]
    assert component_boxes(heat) == component_boxes(heat, threshold=0.5)  # default threshold
    assert component_boxes(heat, fraction=16 / 900) == [[2, 10, 6, 14]]
    regions = component_regions(heat, threshold=0.2)
    assert [r["area"] for r in regions] == [16, 30, 1]
    assert regions[1]["peak"] == pytest.approx(0.7) and regions[1]["mean"] == pytest.approx(0.7)
    assert component_boxes(heat, threshold=0.2, min_size=2) == [[2, 10, 6, 14], [20, 3, 25, 9]]
    assert component_boxes(heat, threshold=0.95) == []
    with pytest.raises(MedlensError, match="not both"):
        component_boxes(heat, threshold=0.5, fraction=0.1)

    vol = torch.zeros(10, 12, 14)
    vol[1:3, 4:8, 2:5] = 1.0
    assert component_boxes(vol) == [[1, 4, 2, 3, 8, 5]]


def test_argmax_cell_box_scales_the_cell_to_input_pixels():
    raw = torch.zeros(7, 7)
    raw[2, 5] = 3.0
    assert argmax_cell_box(raw, (224, 224)) == [64, 160, 96, 192]
    # uneven scaling: cells cover floor(i*S/s) .. ceil((i+1)*S/s)
    raw = torch.zeros(3, 3)
    raw[1, 2] = 1.0
    assert argmax_cell_box(raw, (10, 10)) == [3, 6, 7, 10]
    vol = torch.zeros(2, 4, 4)
    vol[1, 0, 3] = 1.0
    assert argmax_cell_box(vol, (32, 64, 64)) == [16, 0, 48, 32, 16, 64]
    with pytest.raises(MedlensError, match="input_size"):
        argmax_cell_box(raw, (10, 10, 10))


def test_boxes_to_json_round_trip():
    text = boxes_to_json(torch.tensor([[1, 2, 5, 6], [-1, -1, -1, -1]]), image_size=(8, 9),
                         scores=[0.9, 0.1], labels=["argmax cell", "none"], method="gradcam")
    doc = json.loads(text)
    assert doc["image_size"] == [8, 9] and doc["method"] == "gradcam"
    assert doc["boxes"] == [{"lo": [1, 2], "hi": [5, 6], "xyxy": [2, 1, 6, 5], "score": 0.9, "label": "argmax cell"}]
