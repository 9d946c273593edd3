"""The conventions of "Are attention maps a solution to the interpretability crisis in
AI-assisted medical imaging?" (Chung et al., Ghent University Global Campus), as a protocol.

The paper compares three explanations of a ViT-B/16 at 224x224:

- ``attention``: the last block's attention from the class token to the patches, averaged over
  heads, upsampled by repeating each patch's value over its 16x16 pixels (nearest);
- ``gradcam``: Grad-CAM on the token activations of ``blocks[-1].norm1`` with eigen-smoothing
  and test-time augmentation smoothing (pytorch-grad-cam's ``eigen_smooth``/``aug_smooth``);
- ``chefer``: Chefer et al.'s transformer attribution (LRP, alpha=1), bilinear upsampling.

The target is class 1 for binary models (the "disease" class), the prediction otherwise; each
map is min-max normalised and saved as a 224x224 float32 ``.npy`` per image and method:
``out_dir/<method>/<image name>.npy``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.core.targets import model_output
from medlens.core.engine import explain
from medlens.core.resample import normalise
from medlens.errors import MedlensError
from medlens.io.atomic import atomic_path
from medlens.methods.vit import vit_relevance
from medlens.core.tokens import default_token_layer

PAPER_METHODS = ("attention", "gradcam", "chefer")
MAP_SIZE = (224, 224)


def paper_target(n_classes: int) -> int | str:
    """Class 1 for a binary classifier, else each image's predicted class."""
    return 1 if n_classes == 2 else "pred"


def _smoothing_options() -> dict[str, bool]:
    """eigen- and aug-smoothing where this medlens has them (``medlens.methods.smoothing``);
    without it the protocol falls back to plain Grad-CAM rather than failing."""
    available = importlib.util.find_spec("medlens.methods.smoothing") is not None
    return {"eigen_smooth": True, "aug_smooth": True} if available else {}


def paper_maps(model: nn.Module, x: Tensor, method: str, size: Sequence[int] = MAP_SIZE) -> Tensor:
    """(B, *size) min-max normalised maps of ``method`` under the paper's conventions (224x224 by default)."""
    size = tuple(int(v) for v in size)
    n_classes = getattr(model, "num_classes", None)
    if not isinstance(n_classes, int):
        with torch.no_grad():
            n_classes = model_output(model(x[:1])).shape[1]
    target = paper_target(n_classes)
    if method == "attention":
        raw = vit_relevance(model, x, "attention", targets=target, block=-1, head_fusion="mean")[:, :1]
        maps = F.interpolate(raw, size=size, mode="nearest")  # each patch value repeated
    elif method == "gradcam":
        layer = default_token_layer(model)
        if layer is None:
            raise MedlensError(f"the attention-paper protocol needs a ViT; {type(model).__name__} has no transformer blocks")
        maps = explain(model, x, "gradcam", target=target, layer=layer, **_smoothing_options()).maps[:, :1]
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    elif method == "chefer":
        raw = vit_relevance(model, x, "chefer", targets=target)[:, :1]
        maps = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
    else:
        raise MedlensError(f"unknown attention-paper method {method!r}: use {', '.join(PAPER_METHODS)}")
    return normalise(maps)[:, 0]


def _batches(images: Iterable[tuple[str, Tensor]], size: int) -> Iterable[tuple[list[str], Tensor]]:
    names: list[str] = []
    tensors: list[Tensor] = []
    for name, image in images:
        names.append(str(name))
        tensors.append(image if image.dim() == 4 else image.unsqueeze(0))
        if len(names) == size:
            yield names, torch.cat(tensors)
            names, tensors = [], []
    if names:
        yield names, torch.cat(tensors)


def run_protocol(
    model: nn.Module,
    images: Iterable[tuple[str, Tensor]],
    out_dir: str | Path,
    methods: Sequence[str] = PAPER_METHODS,
    batch_size: int = 8,
) -> list[Path]:
    """Run the paper's explanations on ``images`` and save each map as ``.npy``.

    Args:
        model: a ViT classifier (timm / torchvision / MONAI), on the device of the images.
        images: (name, (C, 224, 224) or (1, C, 224, 224) tensor) pairs; names must be unique.
        out_dir: folder; maps go to ``out_dir/<method>/<name>.npy`` (written atomically).
        methods: a subset of ``("attention", "gradcam", "chefer")``.
        batch_size: images explained together.

    Returns:
        The paths written, in order.
    """
    unknown = [m for m in methods if m not in PAPER_METHODS]
    if unknown:
        raise MedlensError(f"unknown attention-paper method {unknown[0]!r}: use {', '.join(PAPER_METHODS)}")
    out = Path(out_dir)
    device = next(model.parameters()).device
    written: list[Path] = []
    for names, x in _batches(images, batch_size):
        x = x.to(device)
        for method in methods:
            maps = paper_maps(model, x, method).float().cpu().numpy()
            for name, array in zip(names, maps):
                path = out / method / f"{name}.npy"
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as handle:
                        np.save(handle, array)
                written.append(path)
    return written
