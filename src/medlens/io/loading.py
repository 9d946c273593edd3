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
from medlens.io.loaded import (  # noqa: F401  (re-exported)
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    Loaded,
    _is_dicom,
    _is_image,
    _is_nifti,
    check_finite,
    check_regular,
    first_line,
    is_readable,
)

def read_image(path: str | Path, policy: Any | None = None, max_pixels: int | None = None) -> Loaded:
    """Read one image, DICOM file, NIfTI volume or DICOM series folder.

    Args:
        path: a file, or a folder holding exactly one DICOM series.
        policy: optional :class:`medlens.io.dicom.HeaderPolicy`; a DICOM input that does not
            fit it raises with the reason. Ignored for non-DICOM inputs.
        max_pixels: most pixels/voxels an input may hold, checked from its header before
            decoding (default :data:`medlens.io.loaded.MAX_PIXELS`).

    Returns:
        :class:`Loaded` with ``image`` (C, *S) float32 and ``meta``.

    Raises:
        MedlensError: one line naming the file and the problem: only regular files are opened
        (a FIFO or device is refused unopened), the header's size is checked against
        ``max_pixels`` before decoding, and pixels holding NaN/Inf or a zero-size axis are refused.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise MedlensError(f"{path}: no such file or folder")
    if path.is_dir():
        from medlens.io import dicom

        loaded = dicom.read_dicom_series(path)
        if policy is not None:
            policy.enforce(loaded.meta)
    else:
        check_regular(path)
        loaded = _read_file(path, policy, max_pixels)
    if any(s == 0 for s in loaded.image.shape):
        raise MedlensError(f"{path}: image has a zero-size axis (shape {tuple(loaded.image.shape)})")
    check_finite(path, loaded.image)
    return loaded


def _read_file(path: Path, policy: Any | None, max_pixels: int | None) -> Loaded:
    from medlens.io import dicom, images, nifti

    try:
        if _is_nifti(path):
            return nifti.read_nifti(path, max_pixels=max_pixels)
        if _is_image(path):
            return images.read_picture(path, max_pixels=max_pixels)
        if _is_dicom(path):
            if policy is not None:  # refuse on the header alone, before decoding any pixels
                policy.enforce(dicom.header_meta(path))
            return dicom.read_dicom(path, max_pixels=max_pixels)
    except MemoryError:
        raise MedlensError(f"{path}: out of memory decoding it; refused (lower --max-pixels)") from None
    raise MedlensError(
        f"{path}: unrecognised file type (expected {', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)}, or DICOM)"
    )


def _under(path: Path, folders: list[Path]) -> bool:
    if not folders:
        return False
    resolved = path.resolve()
    return any(resolved == f or f in resolved.parents for f in folders)


def expand_inputs(paths: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> list[Path]:
    """Files and DICOM series folders named by ``paths``, folders expanded recursively, sorted.

    A folder whose DICOM files are slices of one series (several files sharing a
    SeriesInstanceUID with ImagePositionPatient) becomes one entry, the folder itself; a
    folder holding slices of several series also stays one entry so reading it reports the
    mix. Other DICOM files (radiographs, multi-frame files) stay separate. Annotation images
    beside their image (``x_mask.png`` next to ``x.png``, as phantoms and many datasets store
    them) are not inputs and are left out of folders. Folders in ``exclude`` (the run's output
    folder) are never entered.
    """
    exclude = list(exclude)
    from medlens.io.dicom import is_series_folder

    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():  # files, FIFOs and missing paths: reading reports what they are
            found.append(path)
            continue
        skip = [Path(p).resolve() for p in exclude]
        folders = [path, *(p for p in path.rglob("*") if p.is_dir())]
        for folder in sorted(f for f in folders if not _under(f, skip)):
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


def plan_inputs(paths: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> list[tuple[Path, MedlensError | None]]:
    """Every input ``paths`` names, folders expanded (see :func:`expand_inputs`), each with None,
    or with the error of a folder that holds nothing readable. Nothing is read yet, so a caller
    can count the work (a progress bar's total) and then pass the plan to :func:`iter_inputs`.
    Nothing inside a folder of ``exclude`` (the run's own output folder) is planned."""
    plan: list[tuple[Path, MedlensError | None]] = []
    exclude = list(exclude)
    for raw in paths:
        path = Path(raw)
        entries = expand_inputs([path], exclude) if path.is_dir() else [path]
        if not entries:
            plan.append((path, MedlensError(f"{path}: folder holds no image, DICOM or NIfTI file")))
        plan.extend((entry, None) for entry in entries)
    return plan


def iter_inputs(
    paths: Iterable[str | Path], policy: Any | None = None, plan: list[tuple[Path, MedlensError | None]] | None = None,
    max_pixels: int | None = None,
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
            yield entry, read_image(entry, policy=policy, max_pixels=max_pixels)
        except MedlensError as error:
            yield entry, error
