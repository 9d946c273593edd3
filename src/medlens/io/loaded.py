"""The record every reader returns (:class:`Loaded`) and how files are recognised.

Readers (images, DICOM, NIfTI) import only this module, so ``loading`` can import them without a cycle.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medlens.errors import MedlensError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

# Pixels (voxels x samples are not counted: one per position) an input may hold, checked from
# the file's header before any pixel is decoded. 2**27 is a 512^3 volume or an 11585^2 picture,
# 512 MiB as one float32 channel; a decompression bomb (a 140 KB PNG claiming 12000x12000) is
# refused here instead of filling memory. ``--max-pixels`` changes it per run.
MAX_PIXELS = 2**27


@dataclass
class Loaded:
    """One input: pixels in real units and the metadata that places them.

    Attributes:
        image: float32 tensor (C, H, W) for 2D or (C, D, H, W) for 3D; C is 1 (greyscale) or
            3 (RGB). Values are in the file's real units (Hounsfield units for CT after the
            rescale, 0-255 for an 8-bit PNG).
        meta: at least ``source`` (path str), ``kind`` ("image", "dicom", "nifti",
            "dicom-series"), ``spacing`` (mm per spatial axis, in tensor order), ``affine``
            (4x4 numpy voxel-to-RAS matrix or None), ``original_shape``; DICOM adds its
            header tags (Modality, BodyPartExamined, PatientPosition, ...) and the display
            window or VOI LUT.
    """

    image: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])

    @property
    def is_3d(self) -> bool:
        return self.image.dim() == 4

    def display(self) -> torch.Tensor:
        """Intensities scaled to [0, 1] for display or model input, shape (C, *S).

        Uses, in order: the DICOM VOI LUT, the DICOM window (centre/width, DICOM PS3.3
        C.11.2.1.2 linear function), the value range of the file's pixel type (8-bit images),
        else the image's own min-max (a flat image gives zeros).
        """
        image = self.image.float()
        if self.meta.get("voi_lut") is not None:
            return _apply_voi_lut(image, self.meta["voi_lut"])
        window = self.meta.get("window")
        if window is not None:
            centre, width = float(window[0]), float(window[1])
            if width <= 1:
                return (image > centre - 0.5).float()
            return ((image - (centre - 0.5)) / (width - 1.0) + 0.5).clamp(0, 1)
        value_range = self.meta.get("value_range")
        low, high = value_range if value_range is not None else (image.min(), image.max())
        span = float(high - low)
        if span <= 0:
            return torch.zeros_like(image)
        return ((image - low) / span).clamp(0, 1)


def _apply_voi_lut(image: torch.Tensor, lut: dict[str, Any]) -> torch.Tensor:
    """Map values through a DICOM VOI LUT (first mapped value + table), output scaled to [0, 1]."""
    table = torch.as_tensor(lut["data"], dtype=torch.float32, device=image.device)
    index = (image - float(lut["first"])).round().clamp(0, table.numel() - 1).long()
    top = float(2 ** int(lut["bits"]) - 1)
    return (table[index] / top).clamp(0, 1)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def check_regular(path: Path) -> None:
    """Raise unless ``path`` is a regular file; a FIFO, device or socket is never opened (it could block forever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MedlensError(f"{path}: no such file or folder") from None
    except OSError as error:
        raise MedlensError(f"{path}: cannot stat ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
        raise MedlensError(f"{path}: is a {kind}, not a regular file; not opened")


def check_pixel_budget(path: Path, shape: tuple[int, ...], max_pixels: int | None = None, what: str = "pixels") -> None:
    """Refuse, from the header's ``shape`` alone, an input with a zero-size axis or more than ``max_pixels`` positions."""
    shape = tuple(int(s) for s in shape)
    if any(s <= 0 for s in shape):
        raise MedlensError(f"{path}: header gives a zero-size axis (shape {shape}); nothing to read")
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    total = 1
    for s in shape:
        total *= s
    if total > limit:
        raise MedlensError(f"{path}: header claims {'x'.join(map(str, shape))} = {total:,} {what}, over the limit of "
                           f"{limit:,} (--max-pixels); refused before decoding")


def check_finite(path: Path, image: torch.Tensor) -> None:
    """Refuse an input holding NaN or Inf values (one bad file never costs the rest of its batch)."""
    bad = ~torch.isfinite(image)
    if bool(bad.any()):
        raise MedlensError(f"{path}: {int(bad.sum()):,} of {image.numel():,} values are NaN or Inf; refused")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _is_dicom(path: Path) -> bool:
    """DICOM by extension, or a file of any name carrying the 128-byte preamble + ``DICM``."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if not path.is_file():  # never open a FIFO or device to sniff it
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_readable(path: Path) -> bool:
    """Whether ``path`` is a file medlens recognises as an image, DICOM or NIfTI.

    Hidden files (names starting with a dot, such as unfinished atomic writes) and DICOMDIR
    index files are not inputs.
    """
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR" or not path.is_file():
        return False
    return _is_nifti(path) or _is_image(path) or _is_dicom(path)
