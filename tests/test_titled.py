"""The titled overlay drawn with Pillow: title, colourbar of the map's colormap, legend, flat note."""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image

from medlens.render.titled import titled_picture


def _picture(**kwargs) -> np.ndarray:
    rgb = np.full((512, 256, 3), 40, np.uint8)
    return np.asarray(Image.open(io.BytesIO(titled_picture(rgb, "scan.jpg | gradcam | layer4", "class glioma, p = 0.91", "viridis", **kwargs))).convert("RGB"))


def test_title_colourbar_and_legend_are_drawn() -> None:
    out = _picture(legend=[("boxes 1-2", "#00ff00"), ("annotated box", "#ff00ff")])
    height, width = out.shape[:2]
    assert 500 < height < 700 and width > 300  # a tall scan keeps its aspect, limited to 600 px high
    title_band = out[:40]
    assert (title_band.sum(-1) < 200).sum() > 100  # dark text pixels in the title rows
    top, bottom = colormaps["viridis"](1.0)[:3], colormaps["viridis"](0.0)[:3]
    for colour in (top, bottom):
        target = np.round(np.array(colour) * 255)
        assert (np.abs(out.astype(int) - target).sum(-1) <= 3).sum() >= 16  # the colourbar's ends
    assert (np.abs(out.astype(int) - [0, 255, 0]).sum(-1) <= 30).sum() >= 20  # legend line colours
    assert (np.abs(out.astype(int) - [255, 0, 255]).sum(-1) <= 30).sum() >= 20


def test_flat_note_and_long_titles() -> None:
    plain, noted = _picture(), _picture(note="flat map: no evidence for this class")
    assert plain.shape == noted.shape and (plain != noted).any(axis=-1).sum() > 200
    long = titled_picture(np.zeros((64, 64, 3), np.uint8), "x" * 400, "y", "jet")
    assert Image.open(io.BytesIO(long)).width < 800  # elided, never widened past the picture


def test_fast_regions_equal_the_reference_components() -> None:
    """explain's scipy-labelled boxes equal core.boxes.component_regions (boxes, areas, peaks, means)."""
    import torch

    from medlens.core.boxes import component_regions
    from medlens.workflows.explain import fast_regions

    gen = torch.Generator().manual_seed(0)
    for size, fraction in ((96, 0.05), (64, 0.2), (33, 0.1)):
        heat = torch.nn.functional.avg_pool2d(torch.rand(1, 1, size, size, generator=gen), 7, 1, 3)[0, 0]
        ours, reference = fast_regions(heat, fraction, limit=100), component_regions(heat, fraction=fraction)
        assert len(ours) == len(reference) > 1
        for a, b in zip(ours, reference):
            assert a["box"] == b["box"] and a["area"] == b["area"]
            assert abs(a["peak"] - b["peak"]) < 1e-6 and abs(a["mean"] - b["mean"]) < 1e-5
