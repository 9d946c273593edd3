"""Matplotlib figures a clinician reads: per-class panels, galleries and method comparisons.

Every function returns a :class:`matplotlib.figure.Figure` built on the Agg backend (no display
needed, no global pyplot state); :func:`figure_png` turns it into PNG bytes and :func:`save_figure`
writes it atomically. Figures are closed by both.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from medlens.errors import MedlensError
from medlens.io.atomic import write_bytes
from medlens.render.overlay import PNG_COMPRESS_LEVEL, draw_outline, overlay

MASK_COLOUR = "#ff00ff"  # ground-truth outlines: magenta, a colour no common heat colormap uses
RELEVANCE_LABEL = "relevance (normalised)"

__all__ = [
    "class_panels", "explanation_panels", "figure_png", "figure_rgb", "gallery", "method_grid", "new_figure",
    "prototype_figure", "save_figure", "wrap_title",
]


def new_figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas (thread-safe, never shown, never leaked into pyplot)."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = 110, metadata: Mapping[str, str] | None = None) -> bytes:
    """Render a figure to PNG bytes; ``metadata``: PNG text chunks (e.g. ``{"Title": ...}``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white", metadata=dict(metadata) if metadata else None,
                pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return buffer.getvalue()


def figure_rgb(fig: Figure, dpi: int = 110) -> np.ndarray:
    """Render a figure to an (H, W, 3) uint8 array."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(figure_png(fig, dpi))).convert("RGB"))


def save_figure(fig: Figure, path: str | Path, dpi: int = 110, overwrite: bool = True,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write a figure as PNG atomically (``metadata``: PNG text chunks, see :func:`figure_png`)."""
    return write_bytes(path, figure_png(fig, dpi, metadata), overwrite)


def add_colorbar(fig: Figure, axes, cmap: str, label: str = RELEVANCE_LABEL) -> None:
    """One shared 0..1 colourbar beside ``axes``."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), ax=axes, shrink=0.85, pad=0.02)
    bar.set_label(label, fontsize=9)
    bar.set_ticks([0, 0.5, 1])
    bar.ax.tick_params(labelsize=8)


def show(ax, rgb: np.ndarray, title: str | None = None, mask: Tensor | None = None, cmap: str | None = None,
         alpha: float = 0.5, fontsize: float = 9) -> None:
    """Draw an RGB image on ``ax`` without ticks, with an optional ground-truth outline.

    With ``cmap`` (the colormap of the overlay in ``rgb``) the outline is a double line in
    :func:`medlens.render.overlay.outline_colours` (a colour far from every colour of that overlay,
    with a black or white halo), drawn just outside the region into the pixels of the picture enlarged
    (nearest) to at least 192 px, so the line stays thin next to the image's own pixels; without it,
    a magenta contour.
    """
    if mask is not None and cmap is not None and bool(mask.any()):
        factor = max(1, -(-192 // max(rgb.shape[:2])))
        rgb = draw_outline(np.repeat(np.repeat(rgb, factor, 0), factor, 1), mask, cmap, alpha=alpha)
    ax.imshow(rgb, interpolation="nearest")
    if mask is not None and cmap is None and bool(mask.any()):
        ax.contour(mask.float().cpu().numpy(), levels=[0.5], colors=MASK_COLOUR, linewidths=1.2)
    if title:
        ax.set_title(title, fontsize=fontsize)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def wrap_title(text: str, width: int = 14) -> str:
    """Break a long panel title (e.g. ``integrated-gradients``) on hyphens, spaces or underscores into
    lines of at most about ``width`` characters, so neighbouring titles never run into each other."""
    import re

    lines, line = [], ""
    for piece in re.findall(r"[^-_ ]+[-_ ]?", text) or [text]:
        if line and len(line) + len(piece.rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    lines.append(line.rstrip())
    return "\n".join(lines)


def _grey(image: Tensor) -> np.ndarray:
    return overlay(image, torch.zeros(image.shape[-2:], device=image.device), alpha=0.0)


def _name(class_names: Sequence[str] | None, k: int) -> str:
    return class_names[k] if class_names is not None and 0 <= k < len(class_names) else f"class {k}"


def _prediction_bars(ax, probabilities: Tensor, class_names: Sequence[str] | None, label: int | None) -> None:
    """Horizontal bars of class probabilities, the predicted class highlighted, the true one marked."""
    probs = probabilities.float().cpu()
    top = int(probs.argmax())
    order = probs.argsort(descending=True)[:6].tolist()[::-1]  # at most six bars, best on top
    names = [_name(class_names, k) + ("  (true)" if label is not None and k == label else "") for k in order]
    colours = ["#d62728" if k == top else "#9aa5b1" for k in order]
    ax.barh(range(len(order)), probs[order].numpy(), color=colours)
    ax.set_yticks(range(len(order)), names, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xticks([0, 0.5, 1])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(f"Prediction: {_name(class_names, top)} ({float(probs[top]):.2f})", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def class_panels(
    image: Tensor,
    maps: Tensor,
    targets: Sequence[int],
    class_names: Sequence[str] | None = None,
    probabilities: Tensor | None = None,
    label: int | None = None,
    mask: Tensor | None = None,
    method: str = "",
    cmap: str = "jet",
    alpha: float = 0.5,
    title: str | None = None,
) -> Figure:
    """Image | ground truth | prediction | one map per explained class, in one row.

    Args:
        image: (C, H, W) in [0, 1].
        maps: (K, H, W) maps in [0, 1], one per target.
        targets: the K explained class indices.
        class_names: names for the class indices.
        probabilities: (N,) class probabilities; drawn as bars in the prediction panel.
        label: the true class, if known.
        mask: (H, W) ground-truth region (e.g. lesion), outlined on the image and maps in a colour
            that contrasts with ``cmap`` (:func:`medlens.render.overlay.outline_colours`).
        method: the method's name, shown in the map titles.
        title: optional figure title (e.g. the file name).
    """
    if maps.dim() != 3 or image.dim() != 3:
        raise MedlensError(f"class panels need image (C, H, W) and maps (K, H, W); got {tuple(image.shape)}, {tuple(maps.shape)}")
    k = maps.shape[0]
    columns = 2 + (probabilities is not None) + k
    fig = new_figure(2.3 * columns + 0.8, 2.9)
    axes = fig.subplots(1, columns)
    base = _grey(image)
    show(axes[0], base, "Image")
    truth = "Ground truth" + (f": {_name(class_names, label)}" if label is not None else "")
    show(axes[1], base, truth if (label is not None or mask is not None) else "Ground truth: unknown", mask, cmap, alpha)
    col = 2
    if probabilities is not None:
        _prediction_bars(axes[col], probabilities, class_names, label)
        col += 1
    for j in range(k):
        cls = int(targets[j])
        score = f" (p={float(probabilities[cls]):.2f})" if probabilities is not None else ""
        show(axes[col + j], overlay(image, maps[j], cmap=cmap, alpha=alpha),
             f"{method + ': ' if method else ''}{_name(class_names, cls)}{score}", mask, cmap, alpha)
    add_colorbar(fig, axes[col:], cmap)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def explanation_panels(
    x: Tensor,
    explanation,
    index: int = 0,
    class_names: Sequence[str] | None = None,
    label: int | None = None,
    mask: Tensor | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    title: str | None = None,
    display: Tensor | None = None,
) -> Figure:
    """:func:`class_panels` for image ``index`` of a :class:`medlens.Explanation` of input ``x``.

    ``display``: the picture to draw on, (C, *S) or (B, C, *S) in [0, 1] (e.g. ``Loaded.display()``
    or :func:`medlens.data.prepare.prepare_loaded`'s ``display``). Without it, a model input outside
    [0, 1] (z-scored, ImageNet-normalised) is min-max rescaled for drawing, never clipped.

    For a volume, the panels show the axial slice through the peak of the explained class's map
    (the predicted class when explained, else the first foreground target; named in the title); use
    :mod:`medlens.render.views3d` for the full orthogonal views.
    """
    maps = explanation.maps[index]
    if display is not None:
        image = (display[index] if display.dim() == x.dim() else display).detach().float()
    else:
        image = x[index].detach().float()
        low, high = float(image.min()), float(image.max())
        if low < 0 or high > 1:  # model units, not an image: rescale instead of clipping to near-binary
            image = (image - low) / max(high - low, 1e-12)
    if tuple(image.shape[1:]) != tuple(maps.shape[1:]):
        from medlens.core.resample import upsample

        maps = upsample(maps[None], image.shape[1:])[0]
    if mask is not None and mask.dim() == image.dim():  # (1, *S) -> (*S)
        mask = mask[0]
    if image.dim() == 4:
        targets = explanation.targets[index].tolist()
        predicted = int(explanation.predictions[index])
        if explanation.task == "segmentation":
            foreground = [k for k, t in enumerate(targets) if t != 0]
            k = foreground[0] if foreground else 0
        else:
            k = targets.index(predicted) if predicted in targets else 0
        depth = int(maps[min(k, maps.shape[0] - 1)].flatten().argmax()) // (maps.shape[-1] * maps.shape[-2])
        image, maps = image[:, depth], maps[:, depth]
        mask = mask[depth] if mask is not None else None
        title = (title + " · " if title else "") + f"axial slice {depth} (through the peak)"
    probabilities = None
    if explanation.task == "classification":
        probabilities = explanation.logits[index].float().softmax(0)
    return class_panels(image.float(), maps, explanation.targets[index].tolist(), class_names, probabilities, label,
                        mask, explanation.method, cmap, alpha, title)


def gallery(
    images: Tensor,
    maps: Tensor | None = None,
    titles: Sequence[str] | None = None,
    ncols: int = 6,
    masks: Tensor | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    title: str | None = None,
) -> Figure:
    """A grid of images (with their maps overlaid, when given).

    Args:
        images: (N, C, H, W) in [0, 1].
        maps: (N, H, W) maps in [0, 1], or None to show the images alone.
        titles: a title per image.
        masks: (N, H, W) or (N, 1, H, W) ground-truth regions, outlined in a colour that contrasts
            with ``cmap`` (:func:`medlens.render.overlay.outline_colours`).
    """
    n = images.shape[0]
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = new_figure(2.1 * ncols + (0.8 if maps is not None else 0), 2.3 * nrows + (0.3 if title else 0))
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).reshape(-1)
    if masks is not None and masks.dim() == 4:
        masks = masks[:, 0]
    for i, ax in enumerate(axes):
        if i >= n:
            ax.set_axis_off()
            continue
        rgb = overlay(images[i], maps[i], cmap=cmap, alpha=alpha) if maps is not None else _grey(images[i])
        show(ax, rgb, titles[i] if titles is not None else None, masks[i] if masks is not None else None, cmap,
             alpha if maps is not None else 0.0)
    if maps is not None:
        add_colorbar(fig, axes[:n].tolist(), cmap)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def method_grid(
    images: Tensor,
    maps: Mapping[str, Tensor],
    row_titles: Sequence[str] | None = None,
    masks: Tensor | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    title: str | None = None,
) -> Figure:
    """Rows of images, columns of methods: the same images explained by every method.

    Args:
        images: (N, C, H, W) in [0, 1].
        maps: method name -> (N, H, W) maps in [0, 1].
        row_titles: a title per image (e.g. "label: round · pred: round"), shown on the image column.
        masks: (N, H, W) or (N, 1, H, W) ground-truth regions, outlined on every panel in a colour that
            contrasts with ``cmap``. Method names are wrapped on hyphens so column titles never overlap.
    """
    n, names = images.shape[0], list(maps)
    titles = [wrap_title(name) for name in names]
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    fig = new_figure(2.1 * (len(names) + 1) + 0.9, 2.1 * n + 0.25 * lines + (0.45 if title else 0.1))
    axes = np.asarray(fig.subplots(n, len(names) + 1)).reshape(n, len(names) + 1)
    if masks is not None and masks.dim() == 4:
        masks = masks[:, 0]
    for i in range(n):
        mask = masks[i] if masks is not None else None
        first = (row_titles[i] if row_titles is not None else None) or "Image"
        show(axes[i, 0], _grey(images[i]), wrap_title(first, 18), mask, cmap, 0.0, fontsize=10)
        for j, name in enumerate(names):
            show(axes[i, j + 1], overlay(images[i], maps[name][i], cmap=cmap, alpha=alpha), titles[j] if i == 0 else None,
                 mask, cmap, alpha, fontsize=11)
    add_colorbar(fig, axes[:, 1:].reshape(-1).tolist(), cmap)
    if title:
        fig.suptitle(title, fontsize=13)
    return fig


def prototype_figure(image: Tensor, title: str, min_pixels: int = 256, label: str = "value (model units)") -> Figure:
    """One optimised input (a class prototype), titled, drawn pixel for pixel (nearest) at least
    ``min_pixels`` wide and tall, with a colourbar of its values.

    Args:
        image: (C, H, W) with C in {1, 3}, in the model's own units (any range). One channel is drawn
            in grey against a colourbar of those units; three channels are min-max scaled to RGB
            (the colourbar then shows the shared range of the scaling).
        title: e.g. ``"class: glioma (p=0.99)\\nmodel: runs/brain"``; lines longer than 44 characters
            are wrapped at spaces.
        min_pixels: the smaller side of the drawn image, in PNG pixels (at 110 dpi).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise MedlensError(f"a prototype figure draws a (1|3, H, W) image; got {tuple(image.shape)}")
    values = image.detach().float().cpu()
    low, high = float(values.min()), float(values.max())
    high = high if high > low else low + 1e-6
    side = max(min_pixels, *values.shape[1:]) / 100  # inches at 100 dpi; saved at 110 dpi: a margin more
    h, w = values.shape[1:]
    fig = new_figure(side * max(1.0, w / h) + 1.4, side * max(1.0, h / w) + 0.9)
    ax = fig.subplots()
    if values.shape[0] == 1:
        ax.imshow(values[0].numpy(), cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    else:
        ax.imshow(((values - low) / (high - low)).permute(1, 2, 0).numpy(), interpolation="nearest")
    import textwrap

    ax.set_title("\n".join(textwrap.fill(line, 44, break_long_words=False) for line in title.splitlines()), fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    bar = fig.colorbar(ScalarMappable(norm=Normalize(low, high), cmap="gray"), ax=ax, shrink=0.85, pad=0.02)
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    return fig
