"""Turn a target specification into class indices, and a model output into class scores.

A classifier's output is (B, N) logits. A segmentation network's output (B, N, *spatial) is
pooled to (B, N) by the mean logit over a region (the whole image, a mask or a box), as in
MONAI's tutorials, so a U-Net explains like a classifier.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Sequence, Union

import torch
from torch import Tensor, nn

from medlens.core.hooks import Hooks
from medlens.errors import MedlensError

TargetSpec = Union[int, str, Sequence[int], Sequence[Sequence[int]], Tensor, None]
Box = tuple[Sequence[int], Sequence[int]]  # (lower corner, upper corner), exclusive upper, in pixels
Region = Union[Tensor, Box, None]


def resolve_targets(spec: TargetSpec, logits: Tensor) -> Tensor:
    """Class indices to explain, shape (B, K).

    Args:
        spec: ``None`` or ``"pred"`` (argmax), an int class, ``"all"``, ``"top3"``/``"topk:3"``,
            a numeric string, a list with one class per image, a list of equal-length class
            lists per image, or a (B,) / (B, K) integer tensor.
        logits: (B, N) class scores.
    """
    batch, n_classes = logits.shape
    device = logits.device
    if spec is None or spec == "pred":
        idx = logits.argmax(dim=1, keepdim=True)
    elif isinstance(spec, str):
        idx = _from_string(spec, logits)
    elif isinstance(spec, int):
        idx = torch.full((batch, 1), spec, dtype=torch.long, device=device)
    elif isinstance(spec, Tensor):
        if spec.is_floating_point() or spec.is_complex() or spec.dtype == torch.bool:
            raise MedlensError(f"target tensor has dtype {spec.dtype}; class indices must be an integer tensor")
        idx = spec.to(device=device, dtype=torch.long)
        idx = idx.view(-1, 1) if idx.dim() <= 1 else idx
        if idx.shape[0] == 1 and batch > 1:
            idx = idx.expand(batch, -1)
    else:
        rows = [[int(c)] if isinstance(c, (int, Tensor)) else [int(v) for v in c] for c in spec]
        if len(rows) != batch:
            raise MedlensError(f"target list has {len(rows)} entries for a batch of {batch} images")
        if len({len(r) for r in rows}) != 1:
            raise MedlensError("per-image target lists must all have the same length")
        idx = torch.tensor(rows, dtype=torch.long, device=device)
    if idx.shape[0] != batch:
        raise MedlensError(f"targets have {idx.shape[0]} rows for a batch of {batch} images")
    bad = (idx < 0) | (idx >= n_classes)
    if bool(bad.any()):
        raise MedlensError(f"target class {int(idx[bad][0])} is out of range: the model has {n_classes} classes (0..{n_classes - 1})")
    return idx


def _from_string(spec: str, logits: Tensor) -> Tensor:
    batch, n_classes = logits.shape
    text = spec.strip().lower()
    if text == "all":
        return torch.arange(n_classes, device=logits.device).expand(batch, -1)
    match = re.fullmatch(r"top[-_:]?k?[-_:]?(\d+)", text)
    if match:
        k = int(match.group(1))
        if not 1 <= k <= n_classes:
            raise MedlensError(f"target {spec!r}: k must be between 1 and {n_classes}")
        return logits.topk(k, dim=1).indices
    if re.fullmatch(r"\d+(,\d+)*", text):
        classes = [int(v) for v in text.split(",")]
        return torch.tensor(classes, device=logits.device).expand(batch, -1)
    raise MedlensError(f"target {spec!r} not understood: use pred, all, topK (e.g. top3), or class numbers like 2 or 0,2")


def is_segmentation_output(output: Tensor, x: Tensor) -> bool:
    """True when the model outputs a dense map (B, N, *spatial) of the input's rank."""
    return output.dim() == x.dim() and output.dim() > 2


def region_weights(region: Region, spatial: Sequence[int], batch: int, device: torch.device) -> Tensor | None:
    """A (B, 1, *spatial) float weight map for ``region``, or None for the whole image."""
    if region is None:
        return None
    if isinstance(region, Tensor):
        mask = region.to(device=device, dtype=torch.float32)
        if mask.dim() == len(spatial) + 1 and mask.shape[0] == batch and batch > 1:
            mask = mask.unsqueeze(1)  # (B, *S): one mask per image, no channel axis
        while mask.dim() < len(spatial) + 2:
            mask = mask.unsqueeze(0)
        if mask.dim() != len(spatial) + 2 or mask.shape[0] not in (1, batch) or mask.shape[1] != 1:
            raise MedlensError(f"region mask has shape {tuple(region.shape)}; expected (*S), (1, *S), (B, *S) or (B, 1, *S) "
                               f"for {batch} image(s) with {len(spatial)} spatial dims")
        if tuple(mask.shape[2:]) != tuple(spatial):
            mask = torch.nn.functional.interpolate(mask, size=tuple(spatial), mode="nearest")
        return mask.expand(batch, 1, *spatial)
    lower, upper = region
    if len(lower) != len(spatial) or len(upper) != len(spatial):
        raise MedlensError(f"box corners must have {len(spatial)} coordinates for a {len(spatial)}D output")
    mask = torch.zeros((batch, 1, *spatial), device=device)
    mask[(slice(None), slice(None), *(slice(int(a), int(b)) for a, b in zip(lower, upper)))] = 1.0
    return mask


def model_output(out: object) -> Tensor:
    """The prediction tensor of a model output: a tensor, the first element of a tuple (MONAI's
    ViT returns ``(logits, hidden_states)``), or the ``logits``/``out`` entry of a dict or object."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    for key in ("logits", "out"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(value, Tensor):
            return value
    raise MedlensError(f"model returned {type(out).__name__}; expected a tensor, a tuple starting with one, or logits")


def pool_scores(output: object, x: Tensor, region: Region = None) -> Tensor:
    """Class scores (B, N): the logits themselves, or a segmentation map's mean logit over ``region``."""
    output = model_output(output)
    if not is_segmentation_output(output, x):
        if output.dim() != 2:
            raise MedlensError(f"model output has shape {tuple(output.shape)}; expected (B, classes) or (B, classes, *spatial)")
        return output
    spatial_dims = tuple(range(2, output.dim()))
    weights = region_weights(region, output.shape[2:], output.shape[0], output.device)
    if weights is None:
        return output.mean(dim=spatial_dims)
    total = weights.sum(dim=spatial_dims)
    if bool((total == 0).any()):
        raise MedlensError("the region to pool the segmentation scores over is empty")
    return (output * weights).sum(dim=spatial_dims) / total


def check_target_spec(spec: str, n_classes: int | None = None) -> str:
    """Check a ``--target`` string before anything is read; returns it normalised (lower case, no spaces).

    Accepts ``pred``, ``all``, ``topK`` (``top3``, ``top-3``, ``topk:3``) and class numbers
    (``2``, ``0,2``); with ``n_classes`` the classes and K are also checked against the model.

    Raises:
        MedlensError: one line naming ``--target`` and what is wrong.
    """
    text = str(spec).strip().lower().replace(" ", "")
    if text in ("pred", "all"):
        return text
    match = re.fullmatch(r"top[-_:]?k?[-_:]?(\d+)", text)
    if match:
        k = int(match.group(1))
        if k < 1 or (n_classes is not None and k > n_classes):
            raise MedlensError(f"--target {spec!r}: k must be between 1 and {n_classes if n_classes else 'the number of classes'}")
        return text
    if re.fullmatch(r"\d+(,\d+)*", text):
        classes = [int(v) for v in text.split(",")]
        if n_classes is not None and max(classes) >= n_classes:
            raise MedlensError(f"--target {spec!r}: class {max(classes)} is out of range for {n_classes} classes (0..{n_classes - 1})")
        if len(set(classes)) != len(classes):
            raise MedlensError(f"--target {spec!r}: a class is named twice")
        return text
    raise MedlensError(f"--target {spec!r} not understood: use pred, all, topK (e.g. top3), or class numbers like 2 or 0,2")


def region_rows(region: Region, x: Tensor, image: Tensor) -> Region:
    """The pooling region for a stack of inputs made from the images ``image`` (b,) of the batch
    ``x`` (B, C, *S): a per-image mask (B, 1, *S) is indexed so that every copy keeps its own
    image's region; a shared region (None, a box, one mask) is returned as it is."""
    if isinstance(region, Tensor) and region.dim() == x.dim() and region.shape[0] == x.shape[0] > 1:
        return region[image.to(region.device)]
    return region


#: what a classifier's target score is: its logit, its softmax probability, or the log of it
SCORE_KINDS = ("logit", "probability", "log-probability")
_SCORE_ALIASES = {"softmax": "probability", "prob": "probability", "log-softmax": "log-probability",
                  "logprob": "log-probability", "log_probability": "log-probability"}


def score_kind(kind: str) -> str:
    """The canonical name of a score kind (``softmax`` -> ``probability``); MedlensError if unknown."""
    canonical = _SCORE_ALIASES.get(kind, kind)
    if canonical not in SCORE_KINDS:
        raise MedlensError(f"unknown score {kind!r}: use {', '.join(SCORE_KINDS)}")
    return canonical


def apply_score(logits: Tensor, kind: str) -> Tensor:
    """(B, N) class logits -> (B, N) scores of ``kind``: unchanged, softmax, or log-softmax."""
    kind = score_kind(kind)
    if kind == "probability":
        return logits.softmax(dim=1)
    if kind == "log-probability":
        return logits.log_softmax(dim=1)
    return logits


@contextmanager
def scored(model: nn.Module, kind: str = "logit") -> Iterator[str]:
    """Inside, every forward pass of ``model`` returns its classifier scores as ``kind``, so every
    method (gradients, perturbations, attention) and metric explains that score with no code of
    its own: the target is a function of the output, applied by a forward hook. Segmentation
    (B, N, *S) outputs are left as they are (their target is the region-pooled logit).
    The hook is removed on exit. Yields the canonical kind."""
    kind = score_kind(kind)
    if kind == "logit":
        yield kind
        return

    def transform(_module: nn.Module, _inputs: object, output: object) -> object:
        out = model_output(output)
        return apply_score(out, kind) if out.dim() == 2 else output

    with Hooks() as hooks:
        hooks.forward(model, transform)
        yield kind
