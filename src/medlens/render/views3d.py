"""Views of volumes: three orthogonal slices through the map's peak, and a strip of slices.

Axis names follow the tensor's (D, H, W) order: the *axial* slice fixes D (shows H x W), the
*coronal* slice fixes H (shows D x W) and the *sagittal* slice fixes W (shows D x H). Whether that
matches the patient's anatomy depends on how the volume was loaded; the slice indices are always
printed so a reader can find them in a viewer.

With ``orientation="RAS"`` (what :func:`medlens.io.read_nifti` returns: tensor axes (X, Y, Z) pointing
to the patient's Right, Anterior and Superior) the planes are named from the anatomy instead: axial
is normal to S (fixes Z), coronal normal to A (fixes Y), sagittal normal to R (fixes X). They are drawn
the radiological way, anterior / superior up, the patient's right on the viewer's left (anterior on the
left of the sagittal), with orientation letters on the edges.

The ``*_views`` / ``slice_strip`` functions return uint8 RGB arrays (fast, for per-image files);
the ``*_figure`` functions return titled matplotlib figures with a colourbar (for reports).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from medlens.errors import MedlensError
from medlens.render.overlay import overlay_tensor, to_uint8
from medlens.render.panels import MASK_COLOUR, add_colorbar, new_figure, show

VIEW_NAMES = ("Axial", "Coronal", "Sagittal")

__all__ = ["VIEW_NAMES", "orthogonal_figure", "orthogonal_views", "peak_point", "slice_strip", "slice_strip_figure"]


def _volume_and_heat(volume: Tensor, heat: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes: volume (C, D, H, W) or (D, H, W) -> (C, D, H, W); heat (D, H, W) on the same device."""
    if volume.dim() == 3:
        volume = volume[None]
    if volume.dim() != 4 or heat.dim() != 3:
        raise MedlensError(f"3D views need a volume (C, D, H, W) and a map (D, H, W); got {tuple(volume.shape)}, {tuple(heat.shape)}")
    if tuple(volume.shape[1:]) != tuple(heat.shape):
        from medlens.core.resample import upsample

        heat = upsample(heat[None, None].float(), volume.shape[1:])[0, 0]
    return volume.to(heat.device), heat


def peak_point(heat: Tensor) -> tuple[int, int, int]:
    """(z, y, x) of a (D, H, W) map's maximum (first in raster order on ties)."""
    flat = int(heat.flatten().argmax())
    d, h, w = heat.shape
    return flat // (h * w), (flat // w) % h, flat % w


def _slices(volume: Tensor, heat: Tensor, point: Sequence[int]) -> list[tuple[Tensor, Tensor, tuple[int, int]]]:
    """(image (C, a, b), heat (a, b), crosshair (row, col)) for the axial, coronal, sagittal slices."""
    z, y, x = point
    return [
        (volume[:, z], heat[z], (y, x)),
        (volume[:, :, y], heat[:, y], (z, x)),
        (volume[:, :, :, x], heat[:, :, x], (z, y)),
    ]


RAS_LETTERS = (("A", "P", "R", "L"), ("S", "I", "R", "L"), ("S", "I", "A", "P"))  # top, bottom, left, right


def _ras_slices(volume: Tensor, heat: Tensor, point: Sequence[int]) -> list[tuple[Tensor, Tensor, tuple[int, int]]]:
    """Axial, coronal, sagittal slices of an (C, X, Y, Z) RAS volume through (x, y, z), radiological display."""
    x, y, z = point
    nx, ny, nz = heat.shape

    def shown(image: Tensor) -> Tensor:  # (..., a, b) -> rows b reversed, columns a reversed
        return image.transpose(-1, -2).flip(-1, -2)

    return [
        (shown(volume[:, :, :, z]), shown(heat[:, :, z]), (ny - 1 - y, nx - 1 - x)),
        (shown(volume[:, :, y, :]), shown(heat[:, y, :]), (nz - 1 - z, nx - 1 - x)),
        (shown(volume[:, x]), shown(heat[x]), (nz - 1 - z, ny - 1 - y)),
    ]


def _plane_slices(volume: Tensor, heat: Tensor, point: Sequence[int], orientation: str | None):
    if orientation is None:
        return _slices(volume, heat, point)
    if str(orientation).upper() != "RAS":
        raise MedlensError(f"orientation {orientation!r}: only RAS volumes (or None, tensor order) can be named")
    return _ras_slices(volume, heat, point)


def _letters(rgb: np.ndarray, boxes: Sequence[tuple[int, int]], letters: Sequence[Sequence[str]]) -> np.ndarray:
    """Write orientation letters at the middle of each panel's edges (``boxes``: (left, width) per panel)."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    h = rgb.shape[0]
    for (left, width), (top, bottom, lft, rgt) in zip(boxes, letters):
        for text, (px, py) in ((top, (left + width // 2 - 3, 2)), (bottom, (left + width // 2 - 3, h - 13)),
                               (lft, (left + 3, h // 2 - 6)), (rgt, (left + width - 10, h // 2 - 6))):
            draw.text((px + 1, py + 1), text, fill=(0, 0, 0))
            draw.text((px, py), text, fill=(255, 255, 0))
    return np.asarray(image)


def _crosshair(rgb: Tensor, row: int, col: int, colour: Tensor, gap: int) -> Tensor:
    """Blend half-transparent lines through (row, col), leaving ``gap`` pixels clear around the point."""
    h, w, _ = rgb.shape
    rows, cols = torch.arange(h, device=rgb.device), torch.arange(w, device=rgb.device)
    line = ((rows[:, None] == row) & ((cols[None] - col).abs() > gap)) | (
        (cols[None] == col) & ((rows[:, None] - row).abs() > gap))
    return torch.where(line[..., None], 0.45 * rgb + 0.55 * colour, rgb)


def _hstack(panels: Sequence[Tensor], gap: int) -> Tensor:
    """Place (h_i, w_i, 3) panels side by side on black, top-aligned, ``gap`` pixels apart."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = torch.zeros(height, width, 3, device=panels[0].device)
    left = 0
    for p in panels:
        canvas[: p.shape[0], left:left + p.shape[1]] = p
        left += p.shape[1] + gap
    return canvas


def _enlarge(rgb: Tensor, min_height: int) -> Tensor:
    """Nearest-neighbour upscale by the smallest integer factor that makes the image ``min_height`` tall."""
    factor = max(1, -(-min_height // rgb.shape[0]))
    return rgb.repeat_interleave(factor, 0).repeat_interleave(factor, 1) if factor > 1 else rgb


def _colour(colour: str, device: torch.device) -> Tensor:
    from matplotlib.colors import to_rgb

    return torch.tensor(to_rgb(colour), device=device)


def _with_outline(rgb: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return rgb
    from medlens.render.overlay import outline

    return torch.where(outline(mask.to(rgb.device))[..., None], _colour(MASK_COLOUR, rgb.device), rgb)


def orthogonal_views(
    volume: Tensor,
    heat: Tensor,
    point: Sequence[int] | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    alpha_by_heat: bool = False,
    mask: Tensor | None = None,
    crosshair: str = "#ffffff",
    gap: int = 2,
    min_height: int = 192,
    orientation: str | None = None,
) -> np.ndarray:
    """Axial | coronal | sagittal overlays through ``point`` (default: the map's peak), with a crosshair.

    Args:
        volume: (C, D, H, W) or (D, H, W) in [0, 1].
        heat: (D, H, W) map in [0, 1] (resized to the volume if needed).
        point: (z, y, x) to slice through; default :func:`peak_point` of ``heat``.
        mask: optional (D, H, W) ground truth, outlined in magenta.
        min_height: small volumes are enlarged (nearest neighbour, integer factor f) to at least
            this height so a person can read them; 1 keeps the native size.
        orientation: ``"RAS"`` for (C, X, Y, Z) volumes in RAS: planes named from the anatomy,
            radiological display and orientation letters (see the module notes); None: tensor order.

    Returns:
        (f * max(H, D), f * (W + W + H + 2 * gap), 3) uint8 array.
    """
    volume, heat = _volume_and_heat(volume, heat)
    point = tuple(point) if point is not None else peak_point(heat)
    if len(point) != 3 or any(not 0 <= p < s for p, s in zip(point, heat.shape)):
        raise MedlensError(f"point {point} is not inside the volume of size {tuple(heat.shape)}")
    colour = _colour(crosshair, heat.device)
    masks = [m for _, m, _ in _plane_slices(mask[None].float(), mask.float(), point, orientation)] if mask is not None else [None] * 3
    panels = []
    for (image, slice_heat, (row, col)), slice_mask in zip(_plane_slices(volume, heat, point, orientation), masks):
        rgb = _with_outline(overlay_tensor(image, slice_heat, cmap, alpha, alpha_by_heat), slice_mask)
        panels.append(_crosshair(rgb, row, col, colour, gap=max(2, min(rgb.shape[:2]) // 20)))
    stacked = _enlarge(_hstack(panels, gap), min_height)
    if orientation is None:
        return to_uint8(stacked)
    factor = stacked.shape[0] // max(p.shape[0] for p in panels)
    lefts, left = [], 0
    for p in panels:
        lefts.append((left * factor, p.shape[1] * factor))
        left += p.shape[1] + gap
    return _letters(to_uint8(stacked), lefts, RAS_LETTERS)


def _strip_indices(length: int, n: int) -> list[int]:
    n = max(1, min(n, length))
    return [min(length - 1, int((i + 0.5) * length / n)) for i in range(n)]


def slice_strip(
    volume: Tensor,
    heat: Tensor,
    axis: int = 0,
    n: int = 8,
    cmap: str = "jet",
    alpha: float = 0.5,
    alpha_by_heat: bool = False,
    mask: Tensor | None = None,
    gap: int = 2,
    min_height: int = 128,
) -> np.ndarray:
    """``n`` evenly spaced slices along ``axis`` (0 = D, 1 = H, 2 = W), overlaid, side by side.

    Returns:
        (f * h, f * (n * w + (n - 1) * gap), 3) uint8 array, where (h, w) is the slice size and f
        the integer enlargement that makes it at least ``min_height`` tall (1 keeps native size).
    """
    volume, heat = _volume_and_heat(volume, heat)
    if axis not in (0, 1, 2):
        raise MedlensError(f"slice axis must be 0, 1 or 2; got {axis}")
    panels = []
    for index in _strip_indices(heat.shape[axis], n):
        rgb = overlay_tensor(volume.select(axis + 1, index), heat.select(axis, index), cmap, alpha, alpha_by_heat)
        panels.append(_with_outline(rgb, mask.select(axis, index) if mask is not None else None))
    return to_uint8(_enlarge(_hstack(panels, gap), min_height))


def orthogonal_figure(
    volume: Tensor,
    heat: Tensor,
    point: Sequence[int] | None = None,
    mask: Tensor | None = None,
    title: str | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    orientation: str | None = None,
) -> Figure:
    """Titled axial / coronal / sagittal panels through ``point`` (default the peak), with crosshair
    lines, the ground-truth outline (magenta) and a relevance colourbar."""
    volume, heat = _volume_and_heat(volume, heat)
    point = tuple(point) if point is not None else peak_point(heat)
    fig = new_figure(8.4, 3.1)
    axes = fig.subplots(1, 3)
    masks = _plane_slices(mask[None].float(), mask.float(), point, orientation) if mask is not None else [(None, None, None)] * 3
    order = "zyx" if orientation is None else "xyz"
    fixed = ("z", "y", "x")
    for n, (ax, name, axis_index, (image, slice_heat, (row, col)), (_, slice_mask, _)) in enumerate(zip(
        axes, VIEW_NAMES, fixed, _plane_slices(volume, heat, point, orientation), masks
    )):
        rgb = to_uint8(overlay_tensor(image, slice_heat, cmap, alpha))
        show(ax, rgb, f"{name} ({axis_index} = {point[order.index(axis_index)]})", slice_mask)
        ax.axhline(row, color="white", lw=0.6, alpha=0.7)
        ax.axvline(col, color="white", lw=0.6, alpha=0.7)
        if orientation is not None:
            top, bottom, left, right = RAS_LETTERS[n]
            for text, xy, ha, va in ((top, (0.5, 0.98), "center", "top"), (bottom, (0.5, 0.02), "center", "bottom"),
                                     (left, (0.02, 0.5), "left", "center"), (right, (0.98, 0.5), "right", "center")):
                ax.text(*xy, text, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=8, weight="bold")
    add_colorbar(fig, axes.tolist(), cmap)
    fig.suptitle(title or f"Slices through the map's peak at (z, y, x) = {point}", fontsize=10)
    return fig


def slice_strip_figure(
    volume: Tensor,
    heat: Tensor,
    axis: int = 0,
    n: int = 8,
    mask: Tensor | None = None,
    title: str | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> Figure:
    """``n`` evenly spaced, titled slices along ``axis`` with the ground-truth outline and a colourbar."""
    volume, heat = _volume_and_heat(volume, heat)
    if axis not in (0, 1, 2):
        raise MedlensError(f"slice axis must be 0, 1 or 2; got {axis}")
    indices = _strip_indices(heat.shape[axis], n)
    fig = new_figure(1.7 * len(indices) + 0.8, 2.3)
    axes = np.atleast_1d(fig.subplots(1, len(indices)))
    for ax, index in zip(axes, indices):
        rgb = to_uint8(overlay_tensor(volume.select(axis + 1, index), heat.select(axis, index), cmap, alpha))
        show(ax, rgb, f"{'zyx'[axis]} = {index}", mask.select(axis, index) if mask is not None else None)
    add_colorbar(fig, axes.tolist(), cmap)
    fig.suptitle(title or f"{VIEW_NAMES[axis]} slices", fontsize=10)
    return fig
