"""Heatmap overlays, boxes and PNG files: the moment a map becomes pixels a person looks at.

Blending happens in torch on the map's device; the result leaves torch once, as a uint8
(H, W, 3) numpy array ready for PIL, matplotlib or a PNG file.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from medlens.errors import MedlensError
from medlens.io.atomic import write_bytes

# Box outlines that stay visible on top of jet/turbo/viridis: white first, then bright accents.
BOX_COLOURS = ("#ffffff", "#ffd400", "#00e5ff", "#ff4fd8", "#7CFC00")

__all__ = [
    "BOX_COLOURS", "OUTLINE_CANDIDATES", "colormap_lut", "colorize", "draw_boxes", "draw_outline", "grey_to_rgb",
    "outline", "outline_colours", "overlay", "overlay_tensor", "png_bytes", "save_png", "to_uint8",
]

#: colours an outline may take; :func:`outline_colours` picks the one farthest from a colormap's colours
OUTLINE_CANDIDATES = ("#ff00ff", "#00ff00", "#ffffff", "#00ffff", "#ffff00", "#ff0000", "#0000ff", "#000000")


@lru_cache(maxsize=32)
def _lut_array(cmap: str) -> np.ndarray:
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise MedlensError(f"unknown colormap {cmap!r}; use a matplotlib name such as jet, turbo, inferno, viridis") from None
    return colormap(np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32)


def colormap_lut(cmap: str, device: str | torch.device = "cpu") -> Tensor:
    """(256, 3) float RGB lookup table of a matplotlib colormap; entry 255 is the top colour."""
    return torch.from_numpy(_lut_array(cmap)).to(device)


def colorize(heat: Tensor, cmap: str = "jet") -> Tensor:
    """(*S) map in [0, 1] -> (*S, 3) float RGB in [0, 1] through the colormap (values clamped)."""
    if not torch.isfinite(heat).all():
        raise MedlensError("heat map contains NaN or Inf; cannot draw it")
    index = (heat.float().clamp(0, 1) * 255).round().long()
    return colormap_lut(cmap, heat.device)[index]


def grey_to_rgb(image: Tensor) -> Tensor:
    """(C, H, W) or (H, W) image in [0, 1] -> (H, W, 3) float; 1 channel is repeated, 3 kept."""
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise MedlensError(f"image to draw must be (1|3, H, W) or (H, W); got {tuple(image.shape)}")
    return image.float().clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0)


def _to_uint8(rgb: Tensor) -> np.ndarray:
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def overlay(
    image: Tensor,
    heat: Tensor,
    cmap: str = "jet",
    alpha: float = 0.5,
    alpha_by_heat: bool = False,
) -> np.ndarray:
    """Blend a colour-mapped heatmap onto an image.

    ``rgb = (1 - a) * image + a * cmap(heat)`` with ``a = alpha`` (or ``alpha * heat`` with
    ``alpha_by_heat``, so low-relevance regions show the anatomy unchanged). With ``alpha=1`` the
    result is the colormap alone: the peak (heat 1) is the colormap's top colour.

    Args:
        image: (C, H, W) with C in {1, 3}, or (H, W), values in [0, 1] (clamped).
        heat: (H, W) map in [0, 1]; another size is resized bilinearly to the image.
        cmap: a matplotlib colormap name.
        alpha: opacity of the heatmap in [0, 1].
        alpha_by_heat: scale the opacity by the heat value.

    Returns:
        (H, W, 3) uint8 numpy array.
    """
    return _to_uint8(overlay_tensor(image, heat, cmap, alpha, alpha_by_heat))


def overlay_tensor(
    image: Tensor, heat: Tensor, cmap: str = "jet", alpha: float = 0.5, alpha_by_heat: bool = False
) -> Tensor:
    """:func:`overlay` as an (H, W, 3) float tensor in [0, 1] on the map's device."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise MedlensError(f"alpha (overlay opacity) must be in [0, 1]; got {alpha}")
    base = grey_to_rgb(image.to(heat.device))
    if heat.dim() != 2:
        raise MedlensError(f"heat map to overlay must be (H, W); got {tuple(heat.shape)}")
    heat = heat.float()
    if tuple(heat.shape) != tuple(base.shape[:2]):
        from medlens.core.resample import upsample

        heat = upsample(heat[None, None], base.shape[:2])[0, 0]
    weight = float(alpha) * (heat.clamp(0, 1)[..., None] if alpha_by_heat else 1.0)
    return (1 - weight) * base + weight * colorize(heat, cmap)


def outline(mask: Tensor) -> Tensor:
    """(H, W) bool mask -> (H, W) bool one-pixel inner boundary (mask pixels with a 4-neighbour outside)."""
    import torch.nn.functional as F

    outside = (~mask.bool())[None, None].float()
    near_outside = F.max_pool2d(outside, (3, 1), stride=1, padding=(1, 0)) + F.max_pool2d(
        outside, (1, 3), stride=1, padding=(0, 1))
    return mask.bool() & (near_outside[0, 0] > 0)


def _hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float32) / 255


def _luminance(rgb: np.ndarray) -> float:
    """WCAG relative luminance of an sRGB colour in [0, 1]."""
    linear = np.where(rgb <= 0.03928, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return float(linear @ np.array([0.2126, 0.7152, 0.0722]))


def overlay_palette(cmap: str, alpha: float = 0.5, greys: int = 11) -> np.ndarray:
    """(256 * greys, 3) every colour an :func:`overlay` with ``alpha`` can give: the colormap blended
    over grey levels 0..1 (``alpha=1``: the colormap alone)."""
    lut = _lut_array(cmap)
    grey = np.linspace(0.0, 1.0, greys, dtype=np.float32)[:, None, None]
    return ((1 - alpha) * grey + alpha * lut[None]).reshape(-1, 3)


@lru_cache(maxsize=64)
def outline_colours(cmap: str, alpha: float = 0.5) -> tuple[str, str]:
    """(line, halo) hex colours for an outline that stays visible on ``cmap`` overlays.

    The line is the :data:`OUTLINE_CANDIDATES` colour whose smallest RGB distance to every colour
    the overlay can show (:func:`overlay_palette`) is largest; the halo, drawn just outside the line,
    is black or white, whichever has the higher WCAG contrast ratio with the line (a double outline
    reads on dark and on bright pixels alike).
    """
    palette = overlay_palette(cmap, alpha)
    distance = {c: float(np.sqrt(((palette - _hex_rgb(c)) ** 2).sum(1)).min()) for c in OUTLINE_CANDIDATES}
    line = max(OUTLINE_CANDIDATES, key=lambda c: distance[c])  # ties: the earlier candidate
    lum = _luminance(_hex_rgb(line))
    halo = "#000000" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "#ffffff"
    return line, halo


def _dilate(mask: Tensor, width: int) -> Tensor:
    import torch.nn.functional as F

    return F.max_pool2d(mask[None, None].float(), 2 * width + 1, stride=1, padding=width)[0, 0] > 0


def draw_outline(
    rgb: np.ndarray, mask: Tensor, cmap: str = "jet", width: int | None = None, alpha: float = 0.5,
    colours: tuple[str, str] | None = None,
) -> np.ndarray:
    """Draw a double outline of ``mask`` on a copy of ``rgb``: a line of ``width`` pixels just outside
    the region and a halo of the same width around the line, in :func:`outline_colours` of ``cmap``
    (or the given ``(line, halo)`` colours). The region's own pixels are left as they are.

    Args:
        rgb: (H, W, 3) uint8 image (e.g. from :func:`overlay`).
        mask: (H, W) region; another size is resized (nearest) to the image.
        width: line width in pixels; default 1 px per 128 px of the image's longer side (at least 1).

    Returns:
        (H, W, 3) uint8 copy with the outline drawn.
    """
    picture = np.array(rgb, dtype=np.uint8, copy=True)
    if picture.ndim != 3 or picture.shape[2] != 3:
        raise MedlensError(f"draw_outline draws on an (H, W, 3) uint8 image; got {picture.shape}")
    region = mask.detach().cpu().bool()
    if region.dim() != 2:
        raise MedlensError(f"outline mask must be (H, W); got {tuple(region.shape)}")
    if tuple(region.shape) != picture.shape[:2]:
        import torch.nn.functional as F

        region = F.interpolate(region[None, None].float(), size=picture.shape[:2], mode="nearest")[0, 0] > 0
    if not bool(region.any()):
        return picture
    width = width or max(1, round(max(picture.shape[:2]) / 128))
    line, halo = colours or outline_colours(cmap, alpha)
    near = _dilate(region, width)
    ring = near & ~region  # the line: within ``width`` pixels outside the region
    rim = _dilate(region, 2 * width) & ~near  # the halo, around the line
    picture[rim.numpy()] = np.round(_hex_rgb(halo) * 255).astype(np.uint8)
    picture[ring.numpy()] = np.round(_hex_rgb(line) * 255).astype(np.uint8)
    return picture


def to_uint8(rgb: Tensor) -> np.ndarray:
    """(H, W, 3) float tensor in [0, 1] -> uint8 numpy array (values clamped)."""
    return _to_uint8(rgb)


def _box_rows(boxes: Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    rows = boxes.tolist() if isinstance(boxes, Tensor) else [list(map(int, b)) for b in boxes]
    for box in rows:
        if len(box) != 4:
            raise MedlensError(f"draw_boxes draws 2D boxes [y0, x0, y1, x1]; got {box}")
    return rows


def draw_boxes(
    rgb: np.ndarray,
    boxes: Tensor | Sequence[Sequence[int]],
    colors: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    width: int | None = None,
) -> np.ndarray:
    """Draw box outlines (and optional text labels) on a copy of an RGB image.

    Args:
        rgb: (H, W, 3) uint8.
        boxes: (K, 4) boxes ``[y0, x0, y1, x1]`` (hi exclusive, as in :mod:`medlens.core.boxes`);
            empty boxes (all -1) are skipped.
        colors: a colour per box (any PIL colour); defaults cycle through :data:`BOX_COLOURS`.
        labels: optional text per box, written just above the box (below it at the image's top edge).
        width: line width in pixels; default scales with the image (1 px per 128 px).

    Returns:
        (H, W, 3) uint8 copy with the boxes drawn.
    """
    from PIL import Image, ImageDraw, ImageFont

    picture = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    pen = ImageDraw.Draw(picture)
    width = width or max(1, round(max(picture.size) / 128))
    font = ImageFont.load_default(size=max(8, min(picture.size) // 16))
    palette = list(colors) if colors else list(BOX_COLOURS)
    for k, (y0, x0, y1, x1) in enumerate(_box_rows(boxes)):
        if min(y0, x0, y1, x1) < 0:
            continue
        colour = palette[k % len(palette)]
        pen.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
        if labels is not None and k < len(labels) and labels[k]:
            # the label sits just outside the box (above, or below at the top edge), never over the region
            _, top, _, bottom = pen.textbbox((0, 0), str(labels[k]), font=font)
            y_text = y0 - width - bottom if y0 - width - bottom >= 0 else min(y1 + width, picture.size[1] - bottom)
            box_text = pen.textbbox((x0, y_text), str(labels[k]), font=font)
            pen.rectangle([box_text[0] - 1, box_text[1] - 1, box_text[2] + 1, box_text[3] + 1], fill="#000000")
            pen.text((x0, y_text), str(labels[k]), fill=colour, font=font)
    return np.asarray(picture)


#: zlib level of every PNG medlens writes: 1 encodes several times faster than PIL's default (6) for
#: files about 10-30% larger (overlays are noisy: little is gained by squeezing harder)
PNG_COMPRESS_LEVEL = 1


def png_bytes(rgb: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Encode an (H, W, 3) or (H, W) uint8 array as PNG (``compress_level``: zlib 0-9)."""
    from PIL import Image

    array = np.asarray(rgb)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise MedlensError(f"PNG needs a uint8 (H, W) or (H, W, 3) array; got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def save_png(path: str | Path, rgb: np.ndarray, overwrite: bool = True) -> Path:
    """Write ``rgb`` as a PNG file atomically (temporary file, then rename)."""
    return write_bytes(path, png_bytes(rgb), overwrite)
