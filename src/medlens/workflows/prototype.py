"""Writing class prototypes (:func:`medlens.methods.prototype.class_prototype`) for ``medlens prototype``.

Each prototype is saved under its class's name: ``STEM_<class>.png`` (2D: titled with the class and
the model, drawn pixel for pixel at a readable size with a colourbar of its values) and all of them
together, in the order asked, as ``STEM.npy`` (model units, (B, C, *S)).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Sequence

from torch import Tensor

from medlens.io.atomic import write_bytes

__all__ = ["class_file_names", "save_prototypes"]


def _slug(name: str) -> str:
    """A file-name-safe form of a class name: letters, digits, '-', '_' and '.' kept, the rest '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "class"


def class_file_names(targets: Sequence[int], class_names: Sequence[str] | None) -> list[str]:
    """One file-name part per prototype: the class's name (``class3`` without names); a class asked
    for twice, or two names that make the same part, get ``-2``, ``-3``... so no file overwrites another."""
    parts, seen = [], {}
    for k in targets:
        name = class_names[k] if class_names is not None and 0 <= k < len(class_names) else f"class{k}"
        base = _slug(str(name))
        seen[base] = seen.get(base, 0) + 1
        parts.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return parts


def save_prototypes(
    images: Tensor,
    targets: Sequence[int],
    probabilities: Sequence[float],
    out: Path,
    model_label: str,
    class_names: Sequence[str] | None = None,
    overwrite: bool = True,
    min_pixels: int = 256,
) -> list[Path]:
    """Write ``out.npy`` (all prototypes, (B, C, *S) in model units) and, for 2D, ``out_<class>.png`` each.

    Args:
        images: (B, C, *S) prototypes.
        targets: the B classes; probabilities: the model's probability of each for its prototype.
        out: the path stem (its suffix, if any, is replaced).
        model_label: how the model is named in the PNG titles (a spec or a run folder).
        min_pixels: the smaller side of each drawn image in PNG pixels (nearest upsampling).

    Returns:
        The paths written, the .npy first.
    """
    import numpy as np

    from medlens.render.panels import prototype_figure, save_figure

    buffer = io.BytesIO()
    np.save(buffer, images.detach().cpu().numpy())
    written = [write_bytes(out.with_suffix(".npy"), buffer.getvalue(), overwrite=overwrite)]
    if images.dim() != 4:
        return written
    parts = class_file_names(list(targets), class_names)
    for image, k, p, part in zip(images, targets, probabilities, parts):
        name = class_names[k] if class_names is not None and 0 <= k < len(class_names) else f"class {k}"
        title = f"prototype of {name} (class {k}, p={float(p):.2f})\nmodel: {model_label}"
        if image.shape[0] not in (1, 3):  # neither grey nor RGB: the channels' mean
            image, title = image.mean(0, keepdim=True), title + f" (mean of {image.shape[0]} channels)"
        fig = prototype_figure(image, title, min_pixels)
        written.append(save_figure(fig, out.with_name(f"{out.stem}_{part}.png"), overwrite=overwrite,
                                   metadata={"Title": title.replace("\n", " · "), "Description": f"class={k}; model={model_label}"}))
    return written
