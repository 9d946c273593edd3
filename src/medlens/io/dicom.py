"""DICOM via pydicom: real units, display window, MONOCHROME1, multi-frame, series folders, header policy.

Pixel values pass through the Modality LUT (rescale slope/intercept or a Modality LUT sequence,
DICOM PS3.3 C.11.1) so CT is in Hounsfield units. The VOI LUT or window centre/width
(PS3.3 C.11.2) is kept in ``meta`` for ``Loaded.display()``. MONOCHROME1 images are inverted
within their value range so that a higher value is brighter, like every other image.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from medlens.errors import MedlensError
from medlens.io.loaded import Loaded, _is_dicom, check_pixel_budget, first_line, is_readable

HEADER_TAGS = (
    "Modality", "BodyPartExamined", "PatientPosition", "ViewPosition", "PhotometricInterpretation",
    "PatientID", "StudyDescription", "SeriesDescription", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "InstanceNumber", "Manufacturer",
)


def _pydicom():
    import pydicom

    return pydicom


def read_header(path: str | Path, with_pixels: bool = False):
    """The pydicom dataset of ``path``; a damaged or non-DICOM file raises a one-line MedlensError."""
    pydicom = _pydicom()
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=not with_pixels)
    except pydicom.errors.InvalidDicomError:
        ds = _forced(pydicom, path)  # a file written without the preamble (e.g. an RTSTRUCT) still has a header
        if ds is not None:
            return ds
        raise MedlensError(f"{path}: not a DICOM file (no DICM preamble or file meta)") from None
    except (EOFError, OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise MedlensError(f"{path}: corrupt or truncated DICOM ({first_line(error)})") from None


def _forced(pydicom, path: Path):
    """The dataset of a preamble-less DICOM file when it parses to real elements, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
        return ds if ("SOPClassUID" in ds or "Modality" in ds) else None
    except Exception:  # noqa: BLE001 - anything that does not parse is simply not DICOM
        return None


def _first_number(value: Any) -> float | None:
    """A DS/IS value or the first of a multi-valued one as float, None when absent or empty."""
    if not isinstance(value, (str, bytes)) and isinstance(value, Sequence):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _header_meta(ds) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for tag in HEADER_TAGS:
        value = ds.get(tag)
        meta[tag] = None if value is None else (int(value) if tag == "InstanceNumber" and value != "" else str(value))
    return meta


def header_meta(path: str | Path) -> dict[str, Any]:
    """The header tags of ``path`` (``HEADER_TAGS``) plus ``source`` and ``kind``, without reading pixels."""
    return dict(_header_meta(read_header(path)), source=str(path), kind="dicom")


def _shared_group(ds, sequence: str, item: str):
    """A value from the Shared Functional Groups of an enhanced multi-frame file, if present."""
    for group in ds.get("SharedFunctionalGroupsSequence", []):
        for entry in group.get(sequence, []):
            if item in entry:
                return entry[item].value
    return None


def _pixel_spacing(ds) -> tuple[float, float]:
    spacing = next((value for value in (ds.get("PixelSpacing"), ds.get("ImagerPixelSpacing"),
                                        _shared_group(ds, "PixelMeasuresSequence", "PixelSpacing"))
                    if value is not None and len(value) >= 2 and float(value[0]) > 0), None)
    if spacing is None or len(spacing) < 2 or min(float(spacing[0]), float(spacing[1])) <= 0:
        return 1.0, 1.0
    return float(spacing[0]), float(spacing[1])


def _slice_spacing(ds) -> float:
    for value in (ds.get("SpacingBetweenSlices"), _shared_group(ds, "PixelMeasuresSequence", "SpacingBetweenSlices"),
                  ds.get("SliceThickness"), _shared_group(ds, "PixelMeasuresSequence", "SliceThickness")):
        number = _first_number(value)
        if number:
            return abs(number)
    return 1.0


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _frame_values(ds, sequence: str, keywords: tuple[str, ...]) -> list[tuple[Any, ...]] | None:
    """Per-frame values from an enhanced multi-frame file's functional groups (per-frame, else shared)."""
    shared = [_shared_group(ds, sequence, k) for k in keywords]
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if not frames:
        return None if all(v is None for v in shared) else [tuple(shared)]
    values = []
    for frame in frames:
        entry = frame.get(sequence)
        item = entry[0] if entry else None
        values.append(tuple(item[k].value if item is not None and k in item else default
                            for k, default in zip(keywords, shared)))
    return None if all(v is None for row in values for v in row) else values


def _rescale(ds) -> tuple[np.ndarray, np.ndarray]:
    """Rescale slope and intercept per frame (1 value for a classic file): top level, else functional groups."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        rows = [(ds.get("RescaleSlope"), ds.get("RescaleIntercept"))]
    else:
        rows = _frame_values(ds, "PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")) or [(1, 0)]
    slopes = np.array([_first_number(s) if _first_number(s) is not None else 1.0 for s, _ in rows])
    intercepts = np.array([_first_number(i) or 0.0 for _, i in rows])
    return slopes, intercepts


def _apply_modality(array: np.ndarray, ds) -> np.ndarray:
    """Stored values -> real units: the Modality LUT sequence, else slope * x + intercept (per frame if given)."""
    if "ModalityLUTSequence" in ds:
        return _pydicom().pixels.apply_modality_lut(array, ds)
    slopes, intercepts = _rescale(ds)
    if len(slopes) > 1 and array.ndim >= 3 and array.shape[0] == len(slopes):
        shape = (-1,) + (1,) * (array.ndim - 1)
        return array * slopes.reshape(shape) + intercepts.reshape(shape)
    return array * slopes[0] + intercepts[0]


def _modality_range(ds) -> tuple[float, float]:
    """The value range after the Modality LUT, from the stored bit range (not the image content)."""
    low, high = _stored_range(ds)
    if "ModalityLUTSequence" in ds:
        data = np.asarray(ds.ModalityLUTSequence[0].LUTData, dtype=np.float64)
        return float(data.min()), float(data.max())
    slopes, intercepts = _rescale(ds)
    ends = np.concatenate([low * slopes + intercepts, high * slopes + intercepts])
    return float(ends.min()), float(ends.max())


_NON_IMAGE_MODALITIES = {"RTSTRUCT": "a structure set", "RTPLAN": "a treatment plan", "RTDOSE": "a dose grid",
                         "SR": "a structured report", "PR": "a presentation state", "KO": "a key-object selection",
                         "REG": "a registration", "SEG": "a segmentation", "DOC": "an encapsulated document"}


def _check_size(ds, path: Path, max_pixels: int | None) -> None:
    """Refuse from the header: a zero-size or over-budget image, and pixel data shorter than the header describes."""
    if "Rows" not in ds or "Columns" not in ds:
        return
    frames = int(_first_number(ds.get("NumberOfFrames")) or 1)
    shape = (frames, int(ds.Rows), int(ds.Columns)) if frames > 1 else (int(ds.Rows), int(ds.Columns))
    check_pixel_budget(path, shape, max_pixels)
    times = int(_first_number(ds.get("NumberOfTemporalPositions")) or 1)
    if frames > 1 and times > 1:
        raise MedlensError(f"{path}: 4D multi-frame DICOM: {frames} frames over {times} time points; medlens reads "
                           "one 3D volume per file: split it by time point first")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    raw = ds.get("PixelData")
    if raw is not None and syntax is not None and not getattr(syntax, "is_compressed", True) and "BitsAllocated" in ds:
        samples = int(ds.get("SamplesPerPixel", 1))
        need = frames * shape[-1] * shape[-2] * samples * int(ds.BitsAllocated) // 8
        have = len(raw)
        if have < need:
            raise MedlensError(f"{path}: truncated DICOM: pixel data has {have:,} of the {need:,} bytes its header describes")


def _decode(ds, path: Path) -> np.ndarray:
    """Decoded pixels as stored (YBR converted to RGB, palette colour applied), or a one-line error."""
    pydicom = _pydicom()
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        modality = str(ds.get("Modality", ""))
        if modality in _NON_IMAGE_MODALITIES:
            raise MedlensError(f"{path}: DICOM {modality} ({_NON_IMAGE_MODALITIES[modality]}) holds no image; "
                               "explain the image series it refers to")
        if "Rows" in ds and "Columns" in ds:
            raise MedlensError(f"{path}: DICOM has no pixel data: the header describes a {ds.Rows}x{ds.Columns} image "
                               "but the file ends before any pixel data (truncated or stripped file)")
        raise MedlensError(f"{path}: DICOM has no pixel data (Modality {ds.get('Modality', '?')}, "
                           f"SOP class {ds.get('SOPClassUID', '?')})")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = ds.pixel_array
            if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
                array = pydicom.pixels.apply_color_lut(array, ds)
    except (RuntimeError, NotImplementedError):
        name = getattr(syntax, "name", syntax)
        raise MedlensError(f"{path}: no installed pydicom pixel handler decodes transfer syntax '{name}' "
                           "(install pylibjpeg or python-gdcm)") from None
    except (ValueError, EOFError, AttributeError, KeyError, TypeError, IndexError) as error:
        raise MedlensError(f"{path}: corrupt or truncated pixel data ({first_line(error)})") from None
    return array


def _voi(ds, invert_about: float | None) -> tuple[tuple[float, float] | None, dict[str, Any] | None]:
    """The display window (centre, width) or VOI LUT of ``ds``, mirrored when the pixels were inverted."""
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        data = np.asarray(item.LUTData, dtype=np.float32)[: entries or 65536]
        if invert_about is not None:  # value x now sits at invert_about - x, and bright must stay bright
            first, data = int(invert_about - (first + len(data) - 1)), (2**bits - 1) - data[::-1]
        return None, {"first": first, "data": np.ascontiguousarray(data), "bits": bits}
    centre, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    if centre is None or width is None:  # enhanced multi-frame: the first frame's window
        frame_windows = _frame_values(ds, "FrameVOILUTSequence", ("WindowCenter", "WindowWidth"))
        if frame_windows:
            centre, width = (_first_number(v) for v in frame_windows[0])
    if centre is None or width is None:
        return None, None
    if invert_about is not None:
        centre = invert_about - centre
    return (centre, width), None


def _frame_positions(ds) -> list[list[float]] | None:
    positions = []
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        plane = frame.get("PlanePositionSequence")
        if not plane or "ImagePositionPatient" not in plane[0]:
            return None
        positions.append([float(v) for v in plane[0].ImagePositionPatient])
    return positions or None


def _orientation(ds) -> np.ndarray | None:
    value = ds.get("ImageOrientationPatient") or _shared_group(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    return None if value is None or len(value) != 6 else np.asarray([float(v) for v in value])


def _affine(orientation: np.ndarray | None, origin: Any, spacing: tuple[float, ...], normal: np.ndarray | None = None):
    """Voxel (d, h, w) or (h, w) index -> RAS mm, from DICOM's LPS patient geometry; None without it."""
    if orientation is None or origin is None:
        return None
    row_dir, col_dir = orientation[:3], orientation[3:]  # along a row (w), down a column (h)
    affine = np.eye(4)
    columns = [col_dir * spacing[-2], row_dir * spacing[-1]]
    if len(spacing) == 3:  # index (d, h, w): the slice step comes first
        columns.insert(0, normal if normal is not None else np.cross(row_dir, col_dir) * spacing[0])
    else:  # index (h, w, 0): a one-slice volume
        columns.append(np.cross(row_dir, col_dir))
    affine[:3, :3] = np.stack(columns, axis=1)
    affine[:3, 3] = [float(v) for v in origin]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS


def _pixels_to_tensor(array: np.ndarray, ds) -> torch.Tensor:
    """Decoded array -> float32 tensor (C, H, W) or (C, D, H, W)."""
    samples = int(ds.get("SamplesPerPixel", 1))
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        samples = 3
    if samples == 1:
        array = array[None]
    else:
        array = np.moveaxis(array, -1, 0)[:3]
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _place_frames(image: torch.Tensor, ds) -> tuple[torch.Tensor, tuple[float, ...], np.ndarray | None]:
    """Spacing and RAS affine of a decoded image; frames with positions are sorted along the slice normal."""
    rows, cols = _pixel_spacing(ds)
    orientation = _orientation(ds)
    if image.dim() == 3:
        return image, (rows, cols), _affine(orientation, ds.get("ImagePositionPatient"), (rows, cols))
    positions = _frame_positions(ds)
    if not positions or len(positions) != image.shape[1] or orientation is None:
        spacing = (_slice_spacing(ds), rows, cols)
        return image, spacing, _affine(orientation, positions[0] if positions else ds.get("ImagePositionPatient"), spacing)
    points = np.asarray(positions)
    distinct = len({tuple(np.round(p, 3)) for p in points.tolist()})
    if distinct < len(points):  # frames repeat positions: time points or several stacks interleaved
        raise MedlensError(f"{ds.filename if hasattr(ds, 'filename') else 'DICOM'}: 4D multi-frame DICOM: {len(points)} frames "
                           f"at {distinct} positions (time points or several stacks); medlens reads one 3D volume "
                           "per file: split it by time point first")
    order = np.argsort(points @ np.cross(orientation[:3], orientation[3:]), kind="stable")
    image, points = image[:, torch.from_numpy(order)], points[order]
    step = (points[-1] - points[0]) / max(len(points) - 1, 1)
    spacing = (float(np.linalg.norm(step)) or _slice_spacing(ds), rows, cols)
    return image, spacing, _affine(orientation, points[0], spacing, step if np.linalg.norm(step) else None)


def read_dicom(path: str | Path, max_pixels: int | None = None) -> Loaded:
    """Read one DICOM file (single- or multi-frame).

    Returns:
        :class:`Loaded`; ``image`` is (C, H, W) for one frame, (C, D, H, W) for several, in
        Modality LUT units (HU for CT). ``meta`` holds the header tags in ``HEADER_TAGS``,
        ``window`` (centre, width) or ``voi_lut``, ``inverted`` (MONOCHROME1), ``spacing``,
        ``affine`` (RAS, when the file carries its geometry) and ``transfer_syntax``. Frames of an
        enhanced multi-frame file with per-frame positions are sorted along the slice normal, and
        its functional-group rescale and window are used when the top level has none.
    """
    path = Path(path)
    ds = read_header(path, with_pixels=True)
    _check_size(ds, path, max_pixels)
    array = _decode(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    grey = int(ds.get("SamplesPerPixel", 1)) == 1 and photometric != "PALETTE COLOR"
    value_range = None if grey or array.dtype.kind not in "ui" else (0.0, float(np.iinfo(array.dtype).max))
    invert_about = None
    if grey:
        array = _apply_modality(array.astype(np.float64), ds)
        if photometric == "MONOCHROME1":
            low, high = _modality_range(ds)
            invert_about = low + high
            array = invert_about - array
    image = _pixels_to_tensor(np.asarray(array), ds)
    image, spacing, affine = _place_frames(image, ds)
    window, voi_lut = _voi(ds, invert_about) if grey else (None, None)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    meta = _header_meta(ds)
    meta.update(
        source=str(path), kind="dicom", spacing=spacing, original_shape=tuple(image.shape), affine=affine,
        window=window, voi_lut=voi_lut, inverted=invert_about is not None, value_range=value_range,
        frames=int(_first_number(ds.get("NumberOfFrames")) or 1), transfer_syntax=getattr(syntax, "name", None),
    )
    return Loaded(image=image, meta=meta)


# ----------------------------------------------------------------------------------------------
# Series folders
# ----------------------------------------------------------------------------------------------


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_readable(p) and _is_dicom(p))


def _safe_headers(files: Iterable[Path]) -> list[tuple[Path, Any]]:
    headers = []
    for path in files:
        try:
            headers.append((path, read_header(path)))
        except MedlensError:
            continue
    return headers


def is_series_folder(files: list[Path]) -> bool:
    """Whether ``files`` hold slices of a series: one SeriesInstanceUID with several positioned single-frame files.

    A folder of separate radiographs (each its own series) is not a series folder; a folder
    with several positioned series is (and reading it reports the mix).
    """
    counts: dict[str, int] = defaultdict(int)
    for _, ds in _safe_headers(files):
        frames = int(_first_number(ds.get("NumberOfFrames")) or 1)
        if frames == 1 and "ImagePositionPatient" in ds:
            counts[str(ds.get("SeriesInstanceUID", ""))] += 1
    return any(count > 1 for count in counts.values())


def read_dicom_series(folder: str | Path) -> Loaded:
    """Assemble the single-frame DICOM files of one series in ``folder`` into a volume.

    Slices are sorted by the projection of ImagePositionPatient on the slice normal
    (the cross product of the ImageOrientationPatient direction cosines); the slice spacing is
    the mean step between sorted positions. Files from different series, with different
    orientation or size, or two slices at the same position raise a one-line MedlensError.

    Returns:
        :class:`Loaded` with ``image`` (C, D, H, W), ``meta["kind"] == "dicom-series"``,
        ``spacing`` (slice, row, column) mm and a RAS ``affine``.
    """
    folder = Path(folder)
    files = _dicom_files(folder)
    if not files:
        raise MedlensError(f"{folder}: folder holds no DICOM file")
    headers = [(path, read_header(path)) for path in files]
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(series) > 1:
        raise MedlensError(f"{folder}: mixed series in one folder ({len(series)} SeriesInstanceUIDs); "
                           "put each series in its own folder")
    _check_same(folder, headers, "ImageOrientationPatient", _orientation)
    _check_same(folder, headers, "Rows x Columns", lambda ds: (ds.get("Rows"), ds.get("Columns")))
    orientation = _orientation(headers[0][1])
    if orientation is None or any("ImagePositionPatient" not in ds for _, ds in headers):
        missing = next(p for p, ds in headers if "ImagePositionPatient" not in ds or _orientation(ds) is None)
        raise MedlensError(f"{missing}: slice has no ImagePositionPatient/ImageOrientationPatient, "
                           "so the series cannot be ordered")
    normal = np.cross(orientation[:3], orientation[3:])
    depth = {path: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for path, ds in headers}
    ordered = sorted(headers, key=lambda item: depth[item[0]])
    steps = np.diff([depth[p] for p, _ in ordered])
    if len(steps) and np.min(np.abs(steps)) < 1e-4:
        twin = ordered[int(np.argmin(np.abs(steps))) + 1][0]
        raise MedlensError(f"{twin}: two slices at the same position in {folder} (mixed series or duplicate file)")
    slices = [read_dicom(path) for path, _ in ordered]
    first = slices[0]
    image = torch.stack([s.image for s in slices], dim=1)
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in ordered])
    step = (positions[-1] - positions[0]) / max(len(positions) - 1, 1) if len(positions) > 1 else normal
    slice_spacing = float(np.linalg.norm(step)) if len(positions) > 1 else _slice_spacing(ordered[0][1])
    spacing = (slice_spacing, *first.meta["spacing"])
    meta = dict(first.meta)
    meta.update(
        source=str(folder), kind="dicom-series", spacing=spacing, original_shape=tuple(image.shape),
        affine=_affine(orientation, positions[0], spacing, step), files=[str(p) for p, _ in ordered],
        slice_positions=[float(depth[p]) for p, _ in ordered], frames=len(slices),
        irregular_spacing=bool(len(steps) > 1 and np.ptp(steps) > 1e-2 * max(abs(np.mean(steps)), 1e-6)),
    )
    return Loaded(image=image, meta=meta)


def _check_same(folder: Path, headers: list[tuple[Path, Any]], what: str, key) -> None:
    reference = key(headers[0][1])
    for path, ds in headers[1:]:
        value = key(ds)
        if isinstance(value, np.ndarray) or isinstance(reference, np.ndarray):
            same = value is not None and reference is not None and np.allclose(value, reference, atol=1e-4)
        else:
            same = value == reference
        if not same:
            raise MedlensError(f"{path}: {what} differs from {headers[0][0].name} in {folder} (mixed series)")


# ----------------------------------------------------------------------------------------------
# Header policy
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderPolicy:
    """Which DICOM headers a model accepts; a file that does not fit is refused with the reason.

    Each field is a set of accepted values (case-insensitive); an empty set accepts anything.
    ``require`` lists tags that must be present: with it, a missing tag is a refusal too.
    """

    name: str = "custom"
    modality: frozenset[str] = field(default_factory=frozenset)
    body_part: frozenset[str] = field(default_factory=frozenset)
    patient_position: frozenset[str] = field(default_factory=frozenset)
    require: frozenset[str] = field(default_factory=frozenset)

    def reasons(self, meta: dict[str, Any]) -> list[str]:
        """Every way ``meta`` (a Loaded's meta, or a dict of DICOM tags) misses the policy."""
        problems = []
        for tag, accepted in (("Modality", self.modality), ("BodyPartExamined", self.body_part),
                              ("PatientPosition", self.patient_position)):
            value = meta.get(tag)
            if value in (None, ""):
                if tag in self.require:
                    problems.append(f"{tag} missing (expected {_choices(accepted)})")
                continue
            if accepted and str(value).strip().upper() not in {a.upper() for a in accepted}:
                problems.append(f"{tag} {value!s} (expected {_choices(accepted)})")
        return problems

    def check(self, meta: dict[str, Any]) -> str | None:
        """The reason ``meta`` is refused, or None when it fits."""
        problems = self.reasons(meta)
        return "; ".join(problems) if problems else None

    def enforce(self, meta: dict[str, Any]) -> None:
        """Raise a one-line MedlensError naming the file and the reason when ``meta`` is refused."""
        if meta.get("kind") not in (None, "dicom", "dicom-series"):
            return
        reason = self.check(meta)
        if reason:
            raise MedlensError(f"{meta.get('source', '?')}: refused by the {self.name} header policy: {reason}")


def _choices(values: frozenset[str]) -> str:
    return " or ".join(sorted(values)) if values else "any value"


CHEST_RADIOGRAPH = HeaderPolicy(
    name="chest radiograph",
    modality=frozenset({"CR", "DX"}),
    body_part=frozenset({"CHEST"}),
    patient_position=frozenset({"PA", "AP"}),
    require=frozenset({"Modality"}),
)
"""Projection radiographs of the chest (CR/DX, BodyPartExamined CHEST, PA or AP)."""

POLICIES = {"chest-radiograph": CHEST_RADIOGRAPH}
