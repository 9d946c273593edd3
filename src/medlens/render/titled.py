"""A titled overlay drawn with Pillow: title, subtitle, relevance colourbar, legend and a note.

``medlens explain`` writes one such picture per map; drawn with matplotlib (a figure, a layout
pass, a resampling of the full scan, a savefig) it cost most of the command's time. Pillow
composes the same picture from the overlay's own pixels, the colormap's colours and matplotlib's
bundled DejaVu font in a few milliseconds.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Sequence

import numpy as np

from medlens.render.overlay import PNG_COMPRESS_LEVEL

RELEVANCE_LABEL = "relevance (normalised)"
MARGIN, BAR_WIDTH, BAR_GAP = 12, 16, 10


@lru_cache(maxsize=8)
def _font(size: int):
    from matplotlib import get_data_path
    from PIL import ImageFont

    try:
        return ImageFont.truetype(f"{get_data_path()}/fonts/ttf/DejaVuSans.ttf", size)
    except OSError:  # pragma: no cover - matplotlib ships the font
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _fitted(draw, text: str, width: int, size: int = 13, smallest: int = 9) -> tuple[str, object]:
    """(text, font) that fits ``width`` pixels: a smaller font first, then the middle elided."""
    for s in range(size, smallest - 1, -1):
        if _text_width(draw, text, _font(s)) <= width:
            return text, _font(s)
    font = _font(smallest)
    keep = len(text)
    while keep > 8 and _text_width(draw, text[: keep // 2] + "…" + text[-(keep // 2):], font) > width:
        keep -= 2
    return text[: keep // 2] + "…" + text[-(keep // 2):], font


def _colourbar(cmap: str, height: int) -> np.ndarray:
    """(height, BAR_WIDTH, 3) uint8 strip from 1 (top) to 0 (bottom)."""
    from matplotlib import colormaps

    colours = (colormaps[cmap](np.linspace(1.0, 0.0, height))[:, :3] * 255).round().astype(np.uint8)
    return np.repeat(colours[:, None, :], BAR_WIDTH, axis=1)


def titled_picture(rgb: np.ndarray, title: str, subtitle: str, cmap: str, note: str | None = None,
                   legend: Sequence[tuple[str, str]] = (), width: int | None = None) -> bytes:
    """PNG bytes of ``rgb`` (H, W, 3 uint8) under a two-line title, with a 0..1 colourbar of
    ``cmap`` on the right, ``legend`` entries (label, colour) along the bottom of the image and
    ``note`` (e.g. "flat map: no evidence for this class") boxed in its centre.

    ``width``: the image's drawn width in pixels (default about 360 px per unit of aspect ratio,
    at most 1080, the height at most 600); larger overlays are shrunk to it first.
    """
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    aspect = w / max(h, 1)
    image_w = int(width or min(1080, max(300, round(360 * aspect))))
    image_h = max(1, round(image_w / aspect))
    if image_h > 600:
        image_h, image_w = 600, max(1, round(600 * aspect))
    picture = Image.fromarray(np.ascontiguousarray(rgb[..., :3].astype(np.uint8)))
    if (w, h) != (image_w, image_h):
        resample = Image.Resampling.BILINEAR if w > image_w else Image.Resampling.NEAREST
        picture = picture.resize((image_w, image_h), resample, reducing_gap=2.0 if w > image_w else None)
    bar_zone = BAR_GAP + BAR_WIDTH + 34 + 18  # strip, tick labels, rotated label
    title_h = 2 * 17 + 10
    canvas_w = max(MARGIN + image_w + bar_zone + MARGIN, 300)
    canvas = Image.new("RGB", (canvas_w, title_h + image_h + MARGIN), "white")
    draw = ImageDraw.Draw(canvas)
    left = (canvas_w - bar_zone - image_w) // 2
    canvas.paste(picture, (left, title_h))
    draw.rectangle((left - 1, title_h - 1, left + image_w, title_h + image_h), outline="black")
    for row, line in enumerate((title, subtitle)):
        text, font = _fitted(draw, line, canvas_w - 2 * MARGIN)
        draw.text((canvas_w / 2, 6 + 17 * row), text, fill="black", font=font, anchor="ma")
    _draw_colourbar(canvas, draw, cmap, left + image_w + BAR_GAP, title_h, image_h)
    if legend:
        _draw_legend(canvas, legend, left, title_h, image_w, image_h)
    if note:
        _draw_note(canvas, note, left, title_h, image_w, image_h)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _draw_colourbar(canvas, draw, cmap: str, x: int, top: int, image_h: int) -> None:
    from PIL import Image

    bar_h = max(20, round(0.85 * image_h))
    y = top + (image_h - bar_h) // 2
    canvas.paste(Image.fromarray(_colourbar(cmap, bar_h)), (x, y))
    draw.rectangle((x - 1, y - 1, x + BAR_WIDTH, y + bar_h), outline="black")
    font = _font(11)
    for value in (0.0, 0.5, 1.0):
        ty = y + round((1.0 - value) * (bar_h - 1))
        draw.line((x + BAR_WIDTH, ty, x + BAR_WIDTH + 4, ty), fill="black")
        draw.text((x + BAR_WIDTH + 6, ty), f"{value:.1f}", fill="black", font=font, anchor="lm")
    label = Image.new("RGB", (_text_width(draw, RELEVANCE_LABEL, _font(12)) + 4, 16), "white")
    from PIL import ImageDraw

    ImageDraw.Draw(label).text((2, 0), RELEVANCE_LABEL, fill="black", font=_font(12))
    label = label.rotate(90, expand=True)
    canvas.paste(label, (x + BAR_WIDTH + 34, top + max(0, (image_h - label.height) // 2)))


def _draw_legend(canvas, legend: Sequence[tuple[str, str]], left: int, top: int, image_w: int, image_h: int) -> None:
    from PIL import Image, ImageDraw

    font = _font(11)
    probe = ImageDraw.Draw(canvas)
    entries = [(label, colour, _text_width(probe, label, font)) for label, colour in legend]
    width = sum(22 + tw + 12 for _, _, tw in entries) + 6
    box_h = 20
    x0 = left + max(0, (image_w - width) // 2)
    y0 = top + image_h - box_h - 4
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.rounded_rectangle((x0, y0, x0 + width, y0 + box_h), radius=4, fill=(255, 255, 255, 200), outline=(120, 120, 120, 255))
    x = x0 + 6
    for label, colour, tw in entries:
        draw.line((x, y0 + box_h // 2, x + 16, y0 + box_h // 2), fill=colour, width=3)
        draw.text((x + 22, y0 + box_h // 2), label, fill="black", font=font, anchor="lm")
        x += 22 + tw + 12
    canvas.paste(Image.alpha_composite(canvas.convert("RGBA"), layer).convert("RGB"))


def _draw_note(canvas, note: str, left: int, top: int, image_w: int, image_h: int) -> None:
    from PIL import Image, ImageDraw

    probe = ImageDraw.Draw(canvas)
    text, font = _fitted(probe, note, image_w - 16, size=13)
    tw = _text_width(probe, text, font)
    cx, cy = left + image_w // 2, top + image_h // 2
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.rectangle((cx - tw // 2 - 6, cy - 11, cx + tw // 2 + 6, cy + 11), fill=(0, 0, 0, 180))
    draw.text((cx, cy), text, fill="white", font=font, anchor="mm")
    canvas.paste(Image.alpha_composite(canvas.convert("RGBA"), layer).convert("RGB"))
