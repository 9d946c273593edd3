"""Rendering: overlay colours, boxes, panels and 3D views as real PNG files, self-contained HTML."""

from __future__ import annotations

import re

import matplotlib
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import medlens
from medlens import render
from medlens.errors import MedlensError
from medlens.data.phantoms import make_phantoms


def _top_colour(cmap: str) -> np.ndarray:
    return np.round(np.asarray(matplotlib.colormaps[cmap](1.0)[:3]) * 255).astype(np.uint8)


@pytest.mark.parametrize("cmap", ["jet", "inferno"])
def test_overlay_shape_dtype_and_peak_colour(cmap):
    image = torch.rand(1, 20, 30, generator=torch.Generator().manual_seed(0))
    heat = torch.zeros(20, 30)
    heat[7, 11] = 1.0
    rgb = render.overlay(image, heat, cmap=cmap, alpha=1.0)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[7, 11], _top_colour(cmap))
    plain = render.overlay(image, heat, alpha=0.0)  # alpha 0: the grey image itself
    np.testing.assert_array_equal(plain[..., 0], np.round(image[0].numpy() * 255).astype(np.uint8))
    half = render.overlay(image, heat, cmap=cmap, alpha=0.5).astype(int)
    expected = np.round(0.5 * image[0, 7, 11].item() * 255 + 0.5 * _top_colour(cmap))
    assert np.abs(half[7, 11] - expected).max() <= 1
    weighted = render.overlay(image, heat, cmap=cmap, alpha=1.0, alpha_by_heat=True)
    np.testing.assert_array_equal(weighted[0, 0], plain[0, 0])  # zero heat leaves the anatomy
    small = render.overlay(torch.rand(3, 20, 30), torch.rand(5, 6))  # RGB image, map resized
    assert small.shape == (20, 30, 3)
    with pytest.raises(MedlensError, match="NaN"):
        render.overlay(image, torch.full((20, 30), float("nan")))
    with pytest.raises(MedlensError, match="colormap"):
        render.overlay(image, heat, cmap="no-such-map")


def test_draw_boxes_outlines_and_save_png(tmp_path):
    rgb = np.zeros((40, 50, 3), dtype=np.uint8)
    out = render.draw_boxes(rgb, [[5, 10, 15, 30], [-1, -1, -1, -1]], colors=["#ff0000"], width=1)
    assert (out[5, 10:30] == [255, 0, 0]).all() and (out[14, 10:30] == [255, 0, 0]).all()
    assert (out[5:15, 10] == [255, 0, 0]).all() and (out[5:15, 29] == [255, 0, 0]).all()
    assert out[10, 20].sum() == 0 and rgb.sum() == 0  # inside untouched, input not modified
    path = render.save_png(tmp_path / "boxes.png", out)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), out)


def _phantom_explanation():
    torch.manual_seed(0)
    s = make_phantoms(3, size=48, seed=0, n_classes=3)
    model = torchvision.models.resnet18(num_classes=3)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return s, medlens.explain(model, s.images, method="gradcam", target="all")


def test_panels_gallery_and_method_grid_pngs(tmp_path):
    s, e = _phantom_explanation()
    fig = render.explanation_panels(s.images, e, 0, class_names=s.class_names, label=int(s.labels[0]), mask=s.masks[0])
    titles = [ax.get_title() for ax in fig.axes]
    assert "Image" in titles and any(t.startswith("Prediction:") for t in titles)
    assert sum(t.startswith("gradcam:") for t in titles) == 3
    path = render.save_figure(fig, tmp_path / "panels.png", dpi=100)
    w, h = Image.open(path).size
    assert (w, h) == (round(fig.get_figwidth() * 100), round(fig.get_figheight() * 100))
    grid = render.method_grid(s.images, {"Grad-CAM": e.maps[:, 0], "other": e.maps[:, 1]}, masks=s.masks)
    gallery = render.gallery(s.images, e.maps[:, 0], titles=list("abc"), ncols=2)
    for name, figure in (("grid", grid), ("gallery", gallery)):
        rgb = np.asarray(Image.open(render.save_figure(figure, tmp_path / f"{name}.png", dpi=80)).convert("RGB"))
        assert rgb.shape[0] > 150 and rgb.shape[1] > 150 and rgb.std() > 10


def test_3d_orthogonal_views_and_slice_strip(tmp_path):
    volume = torch.rand(1, 10, 12, 14, generator=torch.Generator().manual_seed(0)) * 0.5
    heat = torch.zeros(10, 12, 14)
    heat[3, 5, 9] = 1.0
    assert render.peak_point(heat) == (3, 5, 9)
    views = render.orthogonal_views(volume, heat, alpha=1.0, min_height=1, gap=2)
    assert views.shape == (12, 14 + 14 + 12 + 4, 3) and views.dtype == np.uint8
    top = _top_colour("jet")
    np.testing.assert_array_equal(views[5, 9], top)  # axial (y, x)
    np.testing.assert_array_equal(views[3, 16 + 9], top)  # coronal (z, x)
    np.testing.assert_array_equal(views[3, 32 + 5], top)  # sagittal (z, y)
    assert render.orthogonal_views(volume, heat).shape[0] >= 192  # enlarged for reading
    strip = render.slice_strip(volume[0], heat, axis=0, n=5, min_height=1, gap=1)
    assert strip.shape == (12, 5 * 14 + 4, 3)
    fig = render.orthogonal_figure(volume, heat, mask=heat > 0)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["Axial (z = 3)", "Coronal (y = 5)", "Sagittal (x = 9)"]
    for name, figure in (("ortho", fig), ("strip", render.slice_strip_figure(volume, heat, n=4))):
        path = render.save_figure(figure, tmp_path / f"{name}.png", dpi=90)
        assert Image.open(path).size == (round(figure.get_figwidth() * 90), round(figure.get_figheight() * 90))


def test_html_is_self_contained_and_holds_the_images():
    rgb = render.overlay(torch.rand(1, 8, 8), torch.rand(8, 8))
    uri = render.png_data_uri(rgb)
    fig_uri = render.png_data_uri(render.gallery(torch.rand(2, 1, 8, 8), titles=["x", "y"]))
    page = render.html_page("Report <1>", [
        ("Summary", render.table_html([{"method": "gradcam", "hit rate": 0.931, "n": 40}], ["method", "hit rate", "n"])),
        ("Images", render.gallery_html([(uri, "phantom <a>"), {"uri": fig_uri, "caption": "gallery"}])),
        render.figure_html(uri, "wide figure", wide=True),
    ])
    assert uri in page and fig_uri in page
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "Report &lt;1&gt;" in page and "phantom &lt;a&gt;" in page  # text is escaped
    assert '<td class="num">0.931</td>' in page and '<td class="num">40</td>' in page
    assert page.count("<section>") == 3
