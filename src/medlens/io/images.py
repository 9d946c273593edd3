"""PNG, JPEG, BMP and TIFF: greyscale or RGB, 8 or 16 bit, multi-page TIFF as a volume."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from medlens.errors import MedlensError
from medlens.io.atomic import atomic_path
from medlens.io.loaded import Loaded, check_pixel_budget, first_line

TIFF_SUFFIXES = (".tif", ".tiff")
# Pillow modes whose pixels are taken as they are; every other mode is converted first.
_KEEP_MODES = {"L", "RGB", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_CONVERT = {"1": "L", "LA": "L", "P": "RGB", "PA": "RGB", "RGBA": "RGB", "RGBX": "RGB", "CMYK": "RGB",
            "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "La": "L", "RGBa": "RGB"}


def read_picture(path: str | Path, max_pixels: int | None = None) -> Loaded:
    """Read a PNG/JPEG/BMP/TIFF file.

    Returns:
        :class:`Loaded` with ``image`` (1 or 3, H, W) float32 in the file's units (0-255 for
        8-bit, 0-65535 for 16-bit); a multi-page TIFF gives (C, D, H, W). ``meta`` has
        ``bit_depth`` and, for 8-bit files, ``value_range`` (0, 255) used by ``display()``.

    The size in the header is checked against ``max_pixels`` before any pixel is decoded.
    """
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        array, axes = _read_tiff(path, max_pixels)
    else:
        array, axes = _read_pillow(path, max_pixels)
    return _to_loaded(path, array, axes)


def _read_pillow(path: Path, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(path)
    except Image.DecompressionBombError as error:  # Pillow's own limit, hit in the header
        raise MedlensError(f"{path}: refused as a decompression bomb before decoding ({first_line(error)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise MedlensError(f"{path}: cannot read image ({first_line(error)})") from None
    try:
        with picture:
            width, height = picture.size
            check_pixel_budget(path, (height, width), max_pixels)
            mode = picture.mode
            if mode not in _KEEP_MODES:
                picture = picture.convert(_CONVERT.get(mode, "RGB"))
            array = np.asarray(picture)
    except MedlensError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise MedlensError(f"{path}: cannot read image ({first_line(error)})") from None
    return array, "YXS" if array.ndim == 3 else "YX"


def _read_tiff(path: Path, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    try:
        import tifffile
    except ImportError:  # Pillow reads single-page greyscale/RGB TIFF too
        return _read_pillow(path, max_pixels)
    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            check_pixel_budget(path, tuple(n for n, a in zip(series.shape, series.axes) if a != "S"), max_pixels)
            array, axes = series.asarray(), series.axes
    except MedlensError:
        raise
    except Exception as error:  # tifffile raises many types for a damaged file
        raise MedlensError(f"{path}: cannot read TIFF ({first_line(error)})") from None
    # Order the axes as (other...), Y, X, (S), then collapse the other axes (pages, time, ...) into depth.
    other = [i for i, a in enumerate(axes) if a not in "YXS"]
    keep = "YX" + ("S" if "S" in axes else "")
    array = array.transpose(other + [axes.index(a) for a in keep])
    if other:
        array = array.reshape(-1, *array.shape[len(other):])
        keep = "Z" + keep
    return array, keep


def _to_loaded(path: Path, array: np.ndarray, axes: str) -> Loaded:
    """(Z)YX(S) array -> Loaded (C, (D,) H, W); an alpha sample is dropped."""
    bit_depth = int(array.dtype.itemsize * 8) if array.dtype.kind in "ui" else None
    if array.dtype == np.bool_:
        array, bit_depth = array.astype(np.uint8) * 255, 8
    if "S" in axes:
        samples = array.shape[-1]
        array = array[..., :3] if samples >= 3 else array[..., :1]
        array = np.moveaxis(array, -1, 0)
    else:
        array = array[None]
    image = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32))
    spatial = image.dim() - 1
    meta = {
        "source": str(path),
        "kind": "image",
        "spacing": (1.0,) * spatial,
        "affine": None,
        "original_shape": tuple(image.shape),
        "bit_depth": bit_depth,
        "value_range": (0.0, 255.0) if bit_depth == 8 else None,
    }
    return Loaded(image=image, meta=meta)


def write_picture(path: str | Path, image: torch.Tensor, bits: int = 8, overwrite: bool = True) -> Path:
    """Write ``image`` (C, H, W) or (H, W) with values in [0, 1] as an 8- or 16-bit PNG/TIFF/JPEG, atomically."""
    if bits not in (8, 16):
        raise MedlensError(f"bits={bits}: only 8 or 16 bit pictures are written")
    image = image.detach().float().cpu()
    if image.dim() == 3:
        image = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
    if image.dim() not in (2, 3):
        raise MedlensError(f"{path}: a picture needs (C, H, W) or (H, W), got shape {tuple(image.shape)}")
    top = 255 if bits == 8 else 65535
    array = (image.clamp(0, 1) * top).round().numpy().astype(np.uint8 if bits == 8 else np.uint16)
    if bits == 16 and array.ndim == 3:
        raise MedlensError(f"{path}: 16-bit output is greyscale only")
    with atomic_path(path, overwrite=overwrite) as tmp:
        Image.fromarray(array).save(tmp)
    return Path(path)

