"""Ground-truth outlines stay visible on every colormap: in the pixels drawn by render.draw_outline,
in the shared panels, and in the best/worst gallery of ``medlens evaluate``'s report."""

from __future__ import annotations

import base64
import io

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from medlens import render
from medlens.data.phantoms import make_phantoms
from medlens.render.overlay import outline_colours, overlay_palette

CMAPS = ["jet", "viridis", "gray", "magma", "turbo", "inferno", "hot", "coolwarm", "bone"]


def _rgb(colour: str) -> np.ndarray:
    return np.asarray(matplotlib.colors.to_rgb(colour)) * 255


@pytest.fixture(scope="module")
def phantom():
    """A real phantom: its image, a smooth map peaking off the lesion, and the lesion mask."""
    s = make_phantoms(2, size=64, seed=3, distractors=True)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    heat = torch.exp(-((yy - 20) ** 2 + (xx - 40) ** 2) / 300)
    return s.images[0], heat / heat.max(), s.masks[0, 0]


@pytest.mark.parametrize("cmap", CMAPS)
def test_outline_pixels_differ_from_every_colour_of_the_overlay(cmap, phantom):
    image, heat, mask = phantom
    assert bool(mask.any())
    base = render.overlay(image, heat, cmap=cmap, alpha=0.5)
    drawn = render.draw_outline(base, mask, cmap, alpha=0.5)
    line, halo = outline_colours(cmap, 0.5)
    changed = (drawn != base).any(-1)
    assert not (changed & mask.numpy()).any()  # the region itself (the map over the lesion) stays visible
    is_line, is_halo = (drawn == _rgb(line)).all(-1) & changed, (drawn == _rgb(halo)).all(-1) & changed
    assert is_line.sum() >= 10 and is_halo.sum() >= 10 and (is_line | is_halo)[changed].all()
    touching = torch.nn.functional.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0].bool().numpy() & ~mask.numpy()
    assert is_line[touching].all()  # the line closes around the region, the halo lies outside the line
    # the line colour is far from every pixel of this overlay and from anything the overlay could show
    pixels = base.reshape(-1, 3).astype(float)
    assert np.sqrt(((pixels - _rgb(line)) ** 2).sum(1)).min() > 0.5 * 255
    assert np.sqrt(((overlay_palette(cmap, 0.5) * 255 - _rgb(line)) ** 2).sum(1)).min() > 0.5 * 255
    # with the old fixed magenta some colormaps would have hidden it; the chosen colour never does
    assert np.abs(_rgb(halo) - _rgb(line)).max() >= 255 * 0.99
    np.testing.assert_array_equal(render.draw_outline(base, torch.zeros_like(mask), cmap), base)  # no region: untouched


def test_panels_draw_the_contrasting_outline(phantom):
    image, heat, mask = phantom
    for cmap in ("jet", "magma"):
        fig = render.gallery(image[None].expand(2, -1, -1, -1), heat[None].expand(2, -1, -1), ["a", "b"],
                             masks=mask[None].expand(2, -1, -1), cmap=cmap)
        pixels = render.figure_rgb(fig).reshape(-1, 3).astype(float)
        near = np.sqrt(((pixels - _rgb(outline_colours(cmap)[0])) ** 2).sum(1)) < 30
        assert near.sum() > 50, cmap
    titles = render.panels.wrap_title("integrated-gradients")
    assert titles == "integrated-\ngradients" and render.panels.wrap_title("gradcam") == "gradcam"


def test_evaluate_gallery_outlines_the_annotation(grey_resnet, tmp_path):
    from medlens.workflows.evaluate import _gallery_png, _Gallery, evaluate, phantom_items

    s = make_phantoms(6, size=64, seed=1)
    model = grey_resnet
    result = evaluate(model, phantom_items(s), methods=["gradcam"], metrics=["localisation"], out_dir=tmp_path,
                      batch_size=6, n_boot=10, gallery=2)
    assert result.rows.shape[0] == 6
    html = (tmp_path / "report.html").read_text()
    assert "Best and worst cases" in html
    gallery = _Gallery(2)
    gallery.offer(torch.arange(6.0), [f"p{i}" for i in range(6)], s.images, torch.rand(6, 64, 64), s.masks)
    assert len(gallery.cases) == 4 and all(c[4] is not None and c[4].shape == (64, 64) for c in gallery.cases)
    for cmap in ("jet", "viridis", "gray", "magma"):
        png = base64.b64decode(_gallery_png(gallery, "model / gradcam", cmap=cmap))
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).astype(float)
        line = _rgb(outline_colours(cmap, 0.45)[0])
        assert (np.sqrt(((pixels - line) ** 2).sum(1)) < 30).sum() > 100, cmap
