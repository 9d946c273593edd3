"""One input preparation: a :class:`~medlens.io.loaded.Loaded` to what the model takes and what a person sees.

Every command that feeds a model (``explain``, ``evaluate``, ``prototype``, the paper benchmark, the
demo) goes through :func:`prepare_loaded` with a :class:`Preprocessing` record, and training uses the
same steps (:mod:`medlens.train.data`): intensities scaled to [0, 1] (``Loaded.display()``: DICOM VOI
LUT or window, the pixel type's range, else min-max), resized to the model size (bilinear with
antialiasing in 2D, trilinear in 3D, as :class:`medlens.data.datasets.Resize`), the channel count
matched (greyscale repeated, RGB averaged), then normalised (:class:`medlens.data.datasets.Normalise`:
per-channel mean/std or a per-image z-score). The display image is kept apart, at the
input's own size and in [0, 1], so pictures are never drawn from a z-scored tensor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from medlens.errors import MedlensError
from medlens.io.loaded import Loaded

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE_CHOICES = ("none", "imagenet", "zscore", "meanstd")
NORMALIZE_HELP = "none, imagenet, zscore (per image), or mean=0.5,0.5,0.5/std=0.2,0.2,0.2; default: the run's, else none"


@dataclass
class Preprocessing:
    """How an input becomes a model tensor: the same record for training, explaining and evaluating.

    Attributes:
        channels: the model's input channels (None: keep the file's).
        size: spatial model size, e.g. (96, 96) or (32, 48, 32); None keeps the input's size.
        normalize: ``none``, ``imagenet``, ``zscore`` (per image) or ``meanstd`` (``mean``/``std`` per channel).
        dims: spatial dimensions of the model (2 or 3).
        class_names: the model's class names in output order, when known.
        task: ``classification`` or ``segmentation``.
        slice_axis: for a 2D model trained on the slices of volumes, the sliced axis (X, Y, Z order).
        source: where the record came from (a run folder's config, or the command line).
        model_transform: a model's own normalisation (the image processor of an ``hf:`` model, a
            MONAI bundle's transforms: :class:`medlens.models.preprocessing.Preprocessing`),
            applied to the resized [0, 1] tensor in place of ``normalize``.
    """

    channels: int | None = None
    size: tuple[int, ...] | None = None
    normalize: str = "none"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dims: int | None = None
    class_names: list[str] | None = None
    task: str = "classification"
    slice_axis: int | None = None
    source: str = "command line"
    model_transform: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE_CHOICES:
            raise MedlensError(f"--normalize {self.normalize!r} not understood: use {', '.join(NORMALIZE_CHOICES[:3])} or mean=.../std=...")
        if self.normalize == "meanstd" and (self.mean is None or self.std is None):
            raise MedlensError("normalize 'meanstd' needs both mean and std")
        if self.size is not None:
            self.size = tuple(int(v) for v in self.size)

    def override(self, **changes: Any) -> "Preprocessing":
        """A copy with the given fields replaced; None values leave a field as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def mean_std(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """(mean, std) for :class:`~medlens.data.datasets.Normalise` (None, None is a per-image z-score)."""
        if self.normalize == "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        return (self.mean, self.std) if self.normalize == "meanstd" else (None, None)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(replace(self, model_transform=None))
        record.pop("model_transform")
        return record


def parse_normalize(text: str | None) -> dict[str, Any]:
    """``--normalize`` text to Preprocessing fields: ``none``/``imagenet``/``zscore`` or ``mean=a,b,c/std=d,e,f``.

    None (flag not given) gives an empty dict, so a run folder's own normalisation is kept.
    """
    if text is None:
        return {}
    text = text.strip()
    if text in ("none", "imagenet", "zscore"):
        return {"normalize": text}
    if text.startswith("mean="):
        try:
            mean_part, std_part = text.split("/")
            mean = tuple(float(v) for v in mean_part.partition("=")[2].split(","))
            std = tuple(float(v) for v in std_part.partition("=")[2].split(","))
        except ValueError:
            raise MedlensError(f"--normalize {text!r}: write mean=0.5,0.5,0.5/std=0.25,0.25,0.25") from None
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise MedlensError(f"--normalize {text!r}: mean and std need the same count and std > 0")
        return {"normalize": "meanstd", "mean": mean, "std": std}
    raise MedlensError(f"--normalize {text!r} not understood: {NORMALIZE_HELP}")


@dataclass
class PreparedInput:
    """One input for the model and for the picture.

    Attributes:
        tensor: (C_model, *size) float32 in model units (what the network was trained on).
        display: (C, *S_original) float32 in [0, 1] from the original intensities (DICOM window).
        meta: the reader's geometry and header (``affine``, ``spacing``, ``original_shape``, ...).
    """

    tensor: Tensor
    display: Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    #: set for a volume prepared for a 2D model trained on its slices: ``tensor`` is then
    #: (n_slices, C_model, *size), the slices along this axis (X, Y, Z order)
    slice_axis: int | None = None


def model_tensor(display: Tensor, pre: Preprocessing, where: str = "input") -> Tensor:
    """(C, *S) image in [0, 1] to the model tensor: resize, match channels, normalise (training order)."""
    from medlens.data.datasets import Normalise, Resize, _match_channels

    x = display.float()
    if pre.size is not None and len(pre.size) != x.dim() - 1:
        raise MedlensError(f"{where}: size {list(pre.size)} has {len(pre.size)} axes for a {x.dim() - 1}D image")
    if pre.channels is not None and x.shape[0] != pre.channels and x.shape[0] != 1 and pre.channels != 1:
        raise MedlensError(f"{where}: image has {x.shape[0]} channels; the model takes {pre.channels}")
    if pre.normalize == "imagenet" and pre.channels not in (None, 3):
        raise MedlensError("--normalize imagenet needs 3-channel model inputs")
    if pre.size is not None:
        x = Resize(pre.size)({"image": x})["image"]
    x = _match_channels(x, pre.channels)
    if pre.model_transform is not None and pre.normalize == "none":
        return pre.model_transform(x).contiguous()
    if pre.normalize != "none":
        mean, std = pre.mean_std()
        if mean is not None and len(mean) not in (1, x.shape[0]):
            raise MedlensError(f"{where}: normalisation has {len(mean)} channel means for a {x.shape[0]}-channel image")
        x = Normalise(mean, std)({"image": x})["image"]
    return x.contiguous()


def prepare_loaded(loaded: Loaded, pre: Preprocessing, path: str | Path | None = None) -> PreparedInput:
    """A read input to (model tensor, display image in [0, 1] at its own size, its geometry)."""
    where = str(path or loaded.meta.get("source", "input"))
    display = loaded.display().float()
    if pre.slice_axis is not None and display.dim() == 4:
        return PreparedInput(slice_tensors(display, pre, where), display, dict(loaded.meta), Path(where), pre.slice_axis)
    return PreparedInput(model_tensor(display, pre, where), display, dict(loaded.meta), Path(where))


def slice_tensors(volume: Tensor, pre: Preprocessing, where: str = "input") -> Tensor:
    """(C, X, Y, Z) volume in [0, 1] to (n, C_model, *size) model slices along ``pre.slice_axis``,
    each prepared as training prepared it (:class:`medlens.data.datasets.VolumeSlices`: the slice
    resized, then normalised on its own)."""
    axis = int(pre.slice_axis or 0)
    if not 0 <= axis < volume.dim() - 1:
        raise MedlensError(f"{where}: slice axis {axis} does not exist in a {volume.dim() - 1}D volume")
    slices = volume.movedim(1 + axis, 0)  # (n, C, *plane)
    return torch.stack([model_tensor(plane, pre, f"{where} slice {i}") for i, plane in enumerate(slices)])


def prepare_batch(images: Sequence[Tensor] | Tensor, pre: Preprocessing) -> Tensor:
    """Display-range images (each (C, *S) in [0, 1]) to a (N, C_model, *size) model batch."""
    return torch.stack([model_tensor(image, pre) for image in images])


def to_model_units(image: Tensor, pre: Preprocessing) -> Tensor:
    """The same preparation for an image already at model size (a prototype start or class mean)."""
    return model_tensor(image, pre)
