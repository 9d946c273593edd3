"""NIfTI via nibabel: volumes read in canonical RAS orientation, maps written back in the input's own geometry.

A volume is reoriented to the closest canonical (RAS+) axis order when read, so every 3D
tensor medlens handles has the same orientation; ``meta`` keeps both the canonical affine (the
one matching the tensor) and the file's own affine. ``write_nifti`` undoes the reorientation and
writes with the file's affine, so an explanation map overlays its input in 3D Slicer or ITK-SNAP.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlens.errors import MedlensError
from medlens.io.atomic import atomic_path
from medlens.io.loaded import Loaded, check_pixel_budget, first_line


def _nib():
    import nibabel

    return nibabel


def read_nifti(path: str | Path, max_pixels: int | None = None) -> Loaded:
    """Read a .nii/.nii.gz volume, reoriented to RAS.

    Returns:
        :class:`Loaded` with ``image`` (1, X, Y, Z) float32 (a 4D file's last axis becomes the
        channels, (C, X, Y, Z); a 2D file gives (1, X, Y)), intensities after the header's
        scl_slope/scl_inter. ``meta``: ``spacing`` (mm per tensor axis), ``affine`` (canonical
        RAS, matches the tensor), ``original_affine`` and ``original_orientation`` (the file's),
        ``file_shape``, ``dtype``.

    Refused with the reason: a zero-size axis, more voxels than ``max_pixels`` (from the
    header, before reading), a file holding more data than its header's dimensions (the
    header would silently crop it), and a 4D file with more than 3 volumes (a time series:
    split it into 3D volumes first).
    """
    nib = _nib()
    path = Path(path)
    try:
        loaded = nib.load(str(path))
        if not isinstance(loaded, nib.spatialimages.SpatialImage) or getattr(loaded, "affine", None) is None:
            raise MedlensError(f"{path}: {type(loaded).__name__} is not a spatial volume (no affine)")
        shape = tuple(int(s) for s in loaded.shape)
        check_pixel_budget(path, shape[:3], max_pixels, what="voxels")
        if any(s <= 0 for s in shape):
            raise MedlensError(f"{path}: header gives a zero-size axis (shape {shape}); nothing to read")
        if len(shape) == 4 and shape[3] > 3:
            raise MedlensError(f"{path}: 4D NIfTI with {shape[3]} volumes along its 4th (time) axis; medlens explains "
                               "3D volumes (up to 3 channels): split it first, e.g. fslsplit or nibabel's four_to_three")
        canonical = nib.as_closest_canonical(loaded) if len(loaded.shape) >= 3 else loaded
        array = np.asarray(canonical.get_fdata(dtype=np.float32))
        _check_data_size(path, loaded, shape)  # after a complete read, so a gzip trailer is trustworthy
    except MedlensError:
        raise
    except FileNotFoundError:
        raise MedlensError(f"{path}: no such file") from None
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, ValueError, zlib.error, MemoryError) as error:
        raise MedlensError(f"{path}: corrupt or truncated NIfTI ({first_line(error)})") from None
    if array.ndim == 5 and array.shape[3] == 1:  # (X, Y, Z, 1, C) as some tools write vectors
        array = array[:, :, :, 0]
    if array.ndim > 4:
        raise MedlensError(f"{path}: NIfTI with {array.ndim} dimensions {array.shape}; expected 2D, 3D or 4D")
    image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0) if array.ndim == 4 else array[None]))
    spatial = min(array.ndim, 3)
    zooms = tuple(float(z) for z in canonical.header.get_zooms()[:spatial])
    meta: dict[str, Any] = {
        "source": str(path),
        "kind": "nifti",
        "spacing": zooms,
        "affine": np.asarray(canonical.affine, dtype=np.float64),
        "original_affine": np.asarray(loaded.affine, dtype=np.float64),
        "original_orientation": "".join(nib.aff2axcodes(loaded.affine)) if spatial == 3 else None,
        "orientation": "RAS" if spatial == 3 else None,
        "original_shape": tuple(image.shape),
        "file_shape": tuple(int(s) for s in loaded.shape),
        "dtype": str(loaded.get_data_dtype()),
        "value_range": None,
    }
    return Loaded(image=image, meta=meta)


def _check_data_size(path: Path, loaded: Any, shape: tuple[int, ...]) -> None:
    """Refuse a file holding more voxel data than its header's dimensions describe."""
    header = loaded.header
    try:
        offset = int(header.get_data_offset())
        expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(header.get_data_dtype()).itemsize
    except Exception:  # an unusual header: nibabel's own checks apply
        return
    name = path.name.lower()
    if name.endswith(".nii"):
        actual = path.stat().st_size
    elif name.endswith(".nii.gz") and expected < 2**32:
        with open(path, "rb") as handle:  # gzip's trailer holds the uncompressed size (mod 2**32)
            handle.seek(-4, 2)
            actual = int.from_bytes(handle.read(4), "little")
    else:
        return
    if actual - expected > max(4096, (expected - offset) // 100):  # a little padding after the data is common
        raise MedlensError(f"{path}: holds {actual - expected:,} bytes more voxel data than its header's dimensions "
                           f"{'x'.join(map(str, shape))} describe; refused (header and data disagree)")


def _as_volume(data: torch.Tensor, spatial_shape: tuple[int, ...], path: Path) -> np.ndarray:
    """(K, *S), (1, *S) or (*S) -> numpy (*S) or (*S, K), checked against the reference shape."""
    data = data.detach().float().cpu()
    if tuple(data.shape) == spatial_shape:
        data = data[None]
    if data.dim() != len(spatial_shape) + 1 or tuple(data.shape[1:]) != spatial_shape:
        raise MedlensError(f"{path}: map shape {tuple(data.shape)} does not match the reference image's "
                           f"spatial shape {spatial_shape}; upsample the map to the input first")
    array = data.numpy()
    return array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)


def write_nifti(path: str | Path, map: torch.Tensor, reference_meta: dict[str, Any], overwrite: bool = True) -> Path:
    """Write an explanation map as NIfTI in the geometry of the input it explains, atomically.

    Args:
        path: destination ``.nii`` or ``.nii.gz``.
        map: (K, *S), (1, *S) or (*S) at the input's spatial size S (as held in the ``Loaded``
            tensor); several maps are written as a 4D volume with K in the last axis.
        reference_meta: the input's ``Loaded.meta``. A NIfTI input is written back in its own
            orientation with its ``original_affine``; a DICOM input with its RAS ``affine``;
            an input without geometry with a diagonal affine of its ``spacing``.

    Returns:
        The written path.
    """
    nib = _nib()
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise MedlensError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    spatial_shape = tuple(int(s) for s in reference_meta["original_shape"][1:])
    array = _as_volume(map, spatial_shape, path).astype(np.float32)
    affine = reference_meta.get("affine")
    if affine is None:
        spacing = list(reference_meta.get("spacing") or (1.0,) * len(spatial_shape))
        affine = np.diag([*spacing, *([1.0] * (3 - len(spacing))), 1.0])
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    original = reference_meta.get("original_affine")
    if original is not None and len(spatial_shape) == 3:
        transform = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(image.affine), nib.orientations.io_orientation(original)
        )
        image = image.as_reoriented(transform)
        image = nib.Nifti1Image(np.asarray(image.dataobj), np.asarray(original, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(image, str(tmp))
    return path
