"""The one entry point every command uses to read inputs: ``read_image`` and ``iter_inputs``.

``read_image`` picks the reader from the file (extension, the DICOM ``DICM`` preamble, or a folder
holding one DICOM series) and returns a :class:`Loaded`: the pixels as a float32 tensor in their
real units plus the metadata needed to display them and to write results back in place.
``iter_inputs`` expands files and folders and yields each input with either its ``Loaded`` or
the ``MedlensError`` that explains why it could not be read, so a folder run can report bad files
and carry on with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from medlens.errors import MedlensError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


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


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _is_dicom(path: Path) -> bool:
    """DICOM by extension, or a file of any name carrying the 128-byte preamble + ``DICM``."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
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


def read_image(path: str | Path, policy: Any | None = None) -> Loaded:
    """Read one image, DICOM file, NIfTI volume or DICOM series folder.

    Args:
        path: a file, or a folder holding exactly one DICOM series.
        policy: optional :class:`medlens.io.dicom.HeaderPolicy`; a DICOM input that does not
            fit it raises with the reason. Ignored for non-DICOM inputs.

    Returns:
        :class:`Loaded` with ``image`` (C, *S) float32 and ``meta``.

    Raises:
        MedlensError: one line naming the file and the problem.
    """
    from medlens.io import dicom, images, nifti

    path = Path(path)
    if not path.exists():
        raise MedlensError(f"{path}: no such file or folder")
    if path.is_dir():
        loaded = dicom.read_dicom_series(path)
        if policy is not None:
            policy.enforce(loaded.meta)
        return loaded
    if _is_nifti(path):
        return nifti.read_nifti(path)
    if _is_image(path):
        return images.read_picture(path)
    if _is_dicom(path):
        if policy is not None:  # refuse on the header alone, before decoding any pixels
            policy.enforce(dicom.header_meta(path))
        return dicom.read_dicom(path)
    raise MedlensError(
        f"{path}: unrecognised file type (expected {', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)}, or DICOM)"
    )


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files and DICOM series folders named by ``paths``, folders expanded recursively, sorted.

    A folder whose DICOM files are slices of one series (several files sharing a
    SeriesInstanceUID with ImagePositionPatient) becomes one entry, the folder itself; a
    folder holding slices of several series also stays one entry so reading it reports the
    mix. Other DICOM files (radiographs, multi-frame files) stay separate. Annotation images
    beside their image (``x_mask.png`` next to ``x.png``, as phantoms and many datasets store
    them) are not inputs and are left out of folders.
    """
    from medlens.io.dicom import is_series_folder

    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file() or not path.exists():
            found.append(path)
            continue
        for folder in sorted([path, *(p for p in path.rglob("*") if p.is_dir())]):
            files = sorted(p for p in folder.iterdir() if is_readable(p))
            dicoms = [p for p in files if not _is_nifti(p) and not _is_image(p)]
            if len(dicoms) > 1 and is_series_folder(dicoms):
                found.append(folder)
                files = [p for p in files if p not in set(dicoms)]
            found.extend(p for p in files if not _is_annotation(p))
    return found


ANNOTATION_SUFFIXES = ("_mask", "_seg", "_label", "_labels")


def _is_annotation(path: Path) -> bool:
    """True for ``x_mask.png`` (or _seg/_label) when an image ``x.<ext>`` lies beside it."""
    name = path.name.lower()
    ext = next((e for e in (*NIFTI_SUFFIXES[::-1], *IMAGE_SUFFIXES) if name.endswith(e)), None)
    if ext is None:
        return False
    stem = path.name[: -len(ext)]
    for suffix in ANNOTATION_SUFFIXES:
        if stem.lower().endswith(suffix):
            base = stem[: -len(suffix)]
            return any(path.with_name(base + e).exists() for e in (*IMAGE_SUFFIXES, *NIFTI_SUFFIXES))
    return False


def plan_inputs(paths: Iterable[str | Path]) -> list[tuple[Path, MedlensError | None]]:
    """Every input ``paths`` names, folders expanded (see :func:`expand_inputs`), each with None,
    or with the error of a folder that holds nothing readable. Nothing is read yet, so a caller
    can count the work (a progress bar's total) and then pass the plan to :func:`iter_inputs`."""
    plan: list[tuple[Path, MedlensError | None]] = []
    for raw in paths:
        path = Path(raw)
        entries = expand_inputs([path]) if path.is_dir() else [path]
        if not entries:
            plan.append((path, MedlensError(f"{path}: folder holds no image, DICOM or NIfTI file")))
        plan.extend((entry, None) for entry in entries)
    return plan


def iter_inputs(
    paths: Iterable[str | Path], policy: Any | None = None, plan: list[tuple[Path, MedlensError | None]] | None = None
) -> Iterator[tuple[Path, Loaded | MedlensError]]:
    """Yield ``(path, Loaded)`` for each readable input, or ``(path, MedlensError)`` for a bad one.

    Folders are expanded recursively (images, NIfTI, DICOM with or without extension, a DICOM
    series folder as one volume). A folder with nothing readable in it yields one error for the
    folder. Nothing is raised for a bad file, so the caller can list it and go on. ``plan``, from
    :func:`plan_inputs` on the same ``paths``, saves expanding the folders a second time.
    """
    for entry, problem in plan if plan is not None else plan_inputs(paths):
        if problem is not None:
            yield entry, problem
            continue
        try:
            yield entry, read_image(entry, policy=policy)
        except MedlensError as error:
            yield entry, error
