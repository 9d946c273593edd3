"""Maps back into the clinic's own format: DICOM Parametric Map, Segmentation, SR and Secondary Capture.

:func:`write_dicom` writes, for one DICOM input (a single- or multi-frame file, or a series
folder read as a volume) and one explanation method, through highdicom:

- ``pm``: a Parametric Map (float32, one frame per slice) per target, in the source's geometry
  (Frame of Reference, pixel measures, plane positions and orientation copied from the source
  instances it references), with a Real World Value Mapping for the normalised relevance 0..1
  and one for the raw map's range;
- ``seg``: a Segmentation (binary, or fractional) with one segment per target class: the pixels
  at or above ``threshold``, else the top ``box_fraction`` of the map (:func:`selected_mask`);
- ``sr``: a Comprehensive 3D SR holding a TID 1500 measurement report: the prediction, each
  class's probability, and each target's boxes as image regions on the source instances;
- ``sc``: a Secondary Capture of each overlay picture, for viewers that show none of the above.

A source without the geometry a Parametric Map needs (no Frame of Reference UID, no plane
position or orientation; plain CR/DX radiographs often lack them) is written as Secondary
Capture only, and the reason is returned. Every object carries the source's patient and study;
each object type gets its own new series.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medlens.errors import MedlensError

KINDS = ("pm", "seg", "sr", "sc")
MANUFACTURER = "medlens"
SCHEME = "99MEDLENS"  # private coding scheme for concepts DICOM has no code for
SERIES_NUMBERS = {"pm": 9001, "seg": 9002, "sr": 9003, "sc": 9004}


def parse_kinds(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"pm,seg,sr,sc"`` (or ``all``) -> the object types, in a fixed order; unknown names raise."""
    if text is None or text == "" or text == ():
        return ()
    items = text.split(",") if isinstance(text, str) else [t for part in text for t in str(part).split(",")]
    names = {t.strip().lower() for t in items if t.strip()}
    if "all" in names:
        names = (names - {"all"}) | set(KINDS)
    unknown = sorted(names - set(KINDS))
    if unknown:
        raise MedlensError(f"--dicom-out {','.join(unknown)} not understood: use pm, seg, sr, sc (comma-separated) or all")
    return tuple(k for k in KINDS if k in names)


def selected_mask(heat: torch.Tensor, threshold: float | None = None, box_fraction: float = 0.05) -> torch.Tensor:
    """The region of one map (*S) a Segmentation holds: >= ``threshold``, else its top ``box_fraction``."""
    from medlens.core.boxes import threshold_mask, topk_mask

    if threshold is not None:
        return threshold_mask(heat, float(threshold))
    return topk_mask(heat[None], box_fraction)[0]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("medlens")
    except Exception:  # not installed (a PYTHONPATH checkout)
        return "0"


def _read(path: str) -> Any:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True)


@dataclass
class Source:
    """The source instances of one input and how its frames map onto the explained tensor."""

    datasets: list[Any]  # headers, in the order the frames of a derived object follow
    order: list[int]  # order[j]: index along the explained tensor's slice axis of derived frame j
    geometry: str | None  # None when a PM/SEG can be placed; else why not
    multiframe: bool


def load_source(meta: dict[str, Any]) -> Source:
    """Read the source headers of a Loaded's ``meta`` (``files`` for a series, else ``source``)."""
    from medlens.io.dicom import _frame_positions, _orientation

    if meta.get("kind") not in ("dicom", "dicom-series"):
        raise MedlensError(f"{meta.get('source', '?')}: --dicom-out needs a DICOM input (this one is {meta.get('kind')})")
    if meta.get("kind") == "dicom-series":
        datasets = [_read(p) for p in meta["files"]]  # already sorted along the slice normal
        order = list(range(len(datasets)))
        multiframe = False
    else:
        ds = _read(meta["source"])
        datasets = [ds]
        frames = int(ds.get("NumberOfFrames") or 1)
        order = list(range(frames))
        positions, orientation = _frame_positions(ds), _orientation(ds)
        if frames > 1 and positions and len(positions) == frames and orientation is not None:
            # read_dicom sorted the frames along the normal; derived frame j (file frame j) is tensor slice rank[j]
            depth = np.asarray(positions) @ np.cross(orientation[:3], orientation[3:])
            sort = np.argsort(depth, kind="stable")
            rank = np.empty(frames, dtype=int)
            rank[sort] = np.arange(frames)
            order = rank.tolist()
        multiframe = frames > 1
    return Source(datasets, order, _geometry_problem(datasets), multiframe)


def _geometry_problem(datasets: list[Any]) -> str | None:
    from medlens.io.dicom import _frame_positions, _orientation

    ds = datasets[0]
    if "FrameOfReferenceUID" not in ds:
        return "no Frame of Reference UID"
    if _orientation(ds) is None:
        return "no Image Orientation (Patient)"
    if all("ImagePositionPatient" in d for d in datasets):
        pass
    elif len(datasets) > 1 or not _frame_positions(ds):
        return "no Image Position (Patient) / plane positions"
    spacing = ds.get("PixelSpacing")
    if spacing is None:
        from medlens.io.dicom import _shared_group

        spacing = _shared_group(ds, "PixelMeasuresSequence", "PixelSpacing")
    if spacing is None:
        return "no Pixel Spacing"
    return None


def _on_grid(maps: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """(K, *S) maps resampled to the input's own size (the source's pixel grid) when they are not."""
    from medlens.core.resample import upsample

    maps = maps.detach().float().cpu()
    spatial = tuple(int(s) for s in meta["original_shape"][1:])
    if tuple(maps.shape[1:]) != spatial:
        if maps.dim() - 1 != len(spatial):
            raise MedlensError(f"{meta.get('source')}: map shape {tuple(maps.shape)} does not fit the input {spatial}")
        maps = upsample(maps[None], spatial)[0]
    return maps


def _frames(maps: torch.Tensor, source: Source, meta: dict[str, Any]) -> np.ndarray:
    """(K, *S) maps -> (K, F, H, W) float32 on the source's pixel grid, in the source's frame order."""
    array = _on_grid(maps, meta).numpy().astype(np.float32)
    if array.ndim == 3:
        array = array[:, None]
    return np.ascontiguousarray(array[:, source.order])


def _code(value: str, meaning: str, scheme: str = SCHEME):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


def _algorithm(method: str, layers: Sequence[str]):
    from highdicom import AlgorithmIdentificationSequence
    from pydicom.sr.codedict import codes

    parameters = {"method": method}
    if layers:
        parameters["layers"] = ",".join(layers)[:64]
    return AlgorithmIdentificationSequence(
        name="medlens", family=codes.cid7162.ArtificialIntelligence, version=_version()[:16], parameters=parameters,
    )


def _label(text: str) -> str:
    """A Code String (CS) for a content label: upper case, digits, underscore, at most 16 characters."""
    import re

    return (re.sub(r"[^A-Z0-9_]+", "_", text.upper()).strip("_") or "MEDLENS")[:16]


def _lo(text: str) -> str:
    return text.replace("\\", "/")[:64]


def _common(series: str, number: int) -> dict[str, Any]:
    from highdicom import UID

    return dict(series_instance_uid=series, series_number=number, sop_instance_uid=UID(), manufacturer=MANUFACTURER)


def build_parametric_map(
    source: Source, frames: np.ndarray, series_uid: str, instance: int, method: str, layers: Sequence[str],
    class_name: str, raw_range: tuple[float, float] | None = None,
):
    """One target's map (F, H, W) float32 in [0, 1] as a Parametric Map on the source's geometry."""
    import highdicom as hd

    unit = _code("1", "no units", "UCUM")
    mappings = [hd.pm.RealWorldValueMapping(
        lut_label="RELEVANCE", lut_explanation=f"{method} relevance, normalised 0..1", unit=unit,
        value_range=(0.0, 1.0), slope=1.0, intercept=0.0,
        quantity_definition=_code("RELEVANCE", "Normalised explanation relevance"),
    )]
    if raw_range is not None and np.isfinite(raw_range).all() and raw_range[1] > raw_range[0]:
        low, high = float(raw_range[0]), float(raw_range[1])
        mappings.append(hd.pm.RealWorldValueMapping(
            lut_label="RAW", lut_explanation=f"{method} raw map, min-max {low:.6g}..{high:.6g}", unit=unit,
            value_range=(0.0, 1.0), slope=high - low, intercept=low,
            quantity_definition=_code("RAWMAP", "Raw explanation map value"),
        ))
    layer_text = ",".join(layers) if layers else "input"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hd.pm.ParametricMap(
            source_images=source.datasets, pixel_array=frames.astype(np.float32), **_common(series_uid, SERIES_NUMBERS["pm"]),
            instance_number=instance, manufacturer_model_name=_lo(f"medlens {method}"), software_versions=_version()[:64],
            device_serial_number="0", contains_recognizable_visual_features=False, real_world_value_mappings=mappings,
            window_center=0.5, window_width=1.0, content_label=_label(f"{method}_{class_name}"),
            content_description=_lo(f"{method} map, layer {layer_text}, class {class_name}"),
            series_description=_lo(f"medlens {method} {layer_text} {class_name}"), image_flavor="VOLUME",
        )


def build_segmentation(
    source: Source, masks: np.ndarray, series_uid: str, method: str, layers: Sequence[str], class_names: Sequence[str],
    fractional: bool = False,
):
    """Masks (K, F, H, W) (bool, or [0, 1] when ``fractional``) as one Segmentation, a segment per class."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = _algorithm(method, layers)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k + 1, segment_label=_lo(f"{name} ({method})"),
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=_code("EXPLREGION", "Explanation region"),
            algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=_lo(f"{method} {name}"),
        )
        for k, name in enumerate(class_names)
    ]
    pixels = np.moveaxis(masks, 0, -1)  # (F, H, W, K)
    pixels = pixels.astype(np.float32) if fractional else pixels.astype(np.uint8)
    layer_text = ",".join(layers) if layers else "input"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hd.seg.Segmentation(
            source_images=source.datasets, pixel_array=pixels, segmentation_type="FRACTIONAL" if fractional else "BINARY",
            segment_descriptions=segments, **_common(series_uid, SERIES_NUMBERS["seg"]), instance_number=1,
            manufacturer_model_name=_lo(f"medlens {method}"), software_versions=_version()[:64], device_serial_number="0",
            omit_empty_frames=False, content_label=_label(f"{method}_SEG"),
            content_description=_lo(f"{method} regions, layer {layer_text}"),
            series_description=_lo(f"medlens {method} regions {layer_text}"),
        )


def _regions(source: Source, box: Sequence[int], shape3d: bool):
    """Image regions (2D SCOORD rectangles) of one box: one per slice it spans for a volume."""
    import highdicom as hd

    if shape3d:
        z0, y0, x0, z1, y1, x1 = (int(v) for v in box)
    else:
        (y0, x0, y1, x1), z0, z1 = (int(v) for v in box), 0, 1
    rows, columns = int(source.datasets[0].Rows), int(source.datasets[0].Columns)
    if min(z0, y0, x0) < 0 or z1 > len(source.order) or y1 > rows or x1 > columns:
        raise MedlensError(f"box {list(box)} lies outside the input ({len(source.order)} x {rows} x {columns}); "
                           "give boxes at the input's own size")
    slices = range(z0, z1)
    rectangle = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)  # pixel edges
    position = {tensor_index: j for j, tensor_index in enumerate(source.order)}
    regions = []
    for z in slices:
        j = position[z]
        ds = source.datasets[0] if source.multiframe else source.datasets[j]
        ref = hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID,
                                         referenced_frame_numbers=[j + 1] if source.multiframe else None)
        regions.append(hd.sr.ImageRegion(graphic_type="POLYLINE", graphic_data=rectangle, source_image=ref))
    return regions


def build_report(
    source: Source, series_uid: str, method: str, layers: Sequence[str], predicted_name: str,
    probabilities: Sequence[float], all_names: Sequence[str], targets: Sequence[dict[str, Any]], shape3d: bool,
):
    """A TID 1500 Measurement Report (Comprehensive 3D SR): prediction, class probabilities, boxes as regions.

    ``targets``: one dict per explained target with ``name`` and ``boxes`` (medlens boxes).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.sr.AlgorithmIdentification(name="medlens", version=_version()[:16], parameters=[method])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name="medlens"),
    )
    context = hd.sr.ObservationContext(observer_device_context=device)
    unit = _code("1", "no units", "UCUM")
    finding = _code("PREDICTION", "Model prediction")
    probability_items = [
        hd.sr.Measurement(name=_code("PROB", f"Probability of {name}"), value=float(p), unit=unit, algorithm_id=algorithm)
        for name, p in zip(all_names, probabilities)
    ]
    groups: list[Any] = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="prediction"),
        finding_type=finding, algorithm_id=algorithm, measurements=probability_items,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(_code("PREDCLASS", "Predicted class"),
                                                             _code(_label(predicted_name), predicted_name))],
    )]
    method_code = _code(_label(method), f"medlens {method}")
    for t in targets:
        for n, b in enumerate(t["boxes"]):
            box = b["box"] if isinstance(b, dict) else b
            if min(int(v) for v in box) < 0:
                continue
            identifier = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=_lo(f"{t['name']} box {n + 1}"))
            common = dict(tracking_identifier=identifier, finding_type=_code("EXPLREGION", "Explanation region"),
                          method=method_code, algorithm_id=algorithm,
                          qualitative_evaluations=[hd.sr.QualitativeEvaluation(_code("TARGET", "Explained class"),
                                                                               _code(_label(t["name"]), t["name"]))])
            if shape3d:
                groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_regions=_regions(source, box, True), **common))
            else:
                groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    referenced_region=_regions(source, box, False)[0], **common))
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=_code("EXPLAIN", "Model explanation"),
        imaging_measurements=groups,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hd.sr.Comprehensive3DSR(
            evidence=source.datasets, content=report, **_common(series_uid, SERIES_NUMBERS["sr"]), instance_number=1,
            series_description=_lo(f"medlens {method} report"),
        )


def _patient_orientation(ds) -> tuple[str, str] | None:
    from medlens.io.dicom import _orientation

    value = ds.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(str(v) for v in value):
        return str(value[0]), str(value[1])
    iop = _orientation(ds)
    if iop is None:
        return None
    letters = []
    for axis in (iop[:3], iop[3:]):  # LPS: +x L, +y P, +z H
        text = ""
        for i in np.argsort(-np.abs(axis)):
            if abs(axis[i]) > 1e-3 and len(text) < 3:
                text += ("L", "P", "H")[i] if axis[i] > 0 else ("R", "A", "F")[i]
        letters.append(text or "L")
    return letters[0], letters[1]


def build_secondary_capture(ds, rgb: np.ndarray, series_uid: str, instance: int, description: str, same_grid: bool):
    """An overlay picture (H, W, 3) uint8 as a Secondary Capture in the source's patient and study."""
    import highdicom as hd

    orientation = _patient_orientation(ds) if same_grid else None
    spacing = ds.get("PixelSpacing") if same_grid else None
    sex = ds.get("PatientSex") or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc = hd.sc.SCImage(
            pixel_array=np.ascontiguousarray(rgb[..., :3].astype(np.uint8)), photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT", study_instance_uid=ds.StudyInstanceUID,
            **_common(series_uid, SERIES_NUMBERS["sc"]), instance_number=instance,
            patient_id=ds.get("PatientID"), patient_name=ds.get("PatientName"),
            patient_birth_date=ds.get("PatientBirthDate"), patient_sex=sex if sex in ("M", "F", "O") else None,
            accession_number=ds.get("AccessionNumber"), study_id=ds.get("StudyID"), study_date=ds.get("StudyDate") or None,
            study_time=ds.get("StudyTime") or None, referring_physician_name=ds.get("ReferringPhysicianName"),
            pixel_spacing=tuple(float(v) for v in spacing) if spacing is not None else None,
            patient_orientation=orientation or ("L", "F"), series_description=_lo(description),
        )
    if orientation is None:
        sc.PatientOrientation = None  # Type 2: present, empty, when the picture has no known orientation
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "NO"
    return sc


def _save(ds, path: Path, source_ds=None) -> str:
    from medlens.io.atomic import atomic_path

    if source_ds is not None and "Laterality" not in ds:  # PM, SC: General Series Type 2C, the source's or empty
        ds.Laterality = source_ds.get("Laterality") if source_ds is not None and source_ds.get("Laterality") else None
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path.name


def write_dicom(
    out_dir: str | Path,
    meta: dict[str, Any],
    maps: torch.Tensor,
    *,
    method: str,
    class_names: Sequence[str],
    kinds: Sequence[str] = KINDS,
    layers: Sequence[str] = (),
    stem: str | None = None,
    predicted_name: str | None = None,
    probabilities: Sequence[float] | None = None,
    all_class_names: Sequence[str] | None = None,
    boxes: Sequence[Sequence[Any]] | None = None,
    raw_ranges: Sequence[tuple[float, float] | None] | None = None,
    overlays: Sequence[np.ndarray] | None = None,
    threshold: float | None = None,
    box_fraction: float = 0.05,
    fractional: bool = False,
) -> dict[str, Any]:
    """Write the DICOM objects of one input's explanation to ``out_dir``.

    Args:
        meta: the input's ``Loaded.meta`` (a DICOM file or series folder; ``files`` lists a series' slices).
        maps: (K, *S) maps in [0, 1] at the input's own size (resampled to it when not).
        method, layers: the method and the layers it used, named in labels and descriptions.
        class_names: the name of each map's target class (K names).
        kinds: any of ``pm``, ``seg``, ``sr``, ``sc``.
        predicted_name, probabilities, all_class_names: the prediction and every class's
            probability, for the SR (``all_class_names`` defaults to ``class N``).
        boxes: per target, its medlens boxes (lists, or dicts with ``box``), for the SR.
        raw_ranges: per target, (min, max) of the raw map, for the Parametric Map's second mapping.
        overlays: per target, the overlay picture (H, W, 3) uint8, for the Secondary Capture.
        threshold, box_fraction: the Segmentation's region (see :func:`selected_mask`).
        fractional: a fractional Segmentation of the map values instead of binary masks.

    Returns:
        ``{"pm": [names], "seg": name, "sr": name, "sc": [names], "series": {kind: uid}}`` for what
        was written, plus ``"skipped"`` (the reason) when geometry-less input got Secondary Capture only.
    """
    import highdicom as hd

    kinds = parse_kinds(list(kinds))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or Path(str(meta.get("source", "input"))).name
    source = load_source(meta)
    names = list(class_names)
    if len(names) != maps.shape[0]:
        raise MedlensError(f"write_dicom: {maps.shape[0]} maps but {len(names)} class names")
    frames = _frames(maps, source, meta)  # (K, F, H, W)
    shape3d = maps.dim() == 4
    record: dict[str, Any] = {"series": {}}
    wanted = list(kinds)
    if source.geometry is not None and set(wanted) & {"pm", "seg", "sr"}:
        reason = f"{meta.get('source')}: {source.geometry}, so no Parametric Map, Segmentation or SR; wrote Secondary Capture only"
        record["skipped"] = reason
        wanted = ["sc"]
    series = {k: hd.UID() for k in wanted}
    record["series"] = dict(series)
    ds0 = source.datasets[0]
    if "pm" in wanted:
        record["pm"] = []
        for k, name in enumerate(names):
            raw = raw_ranges[k] if raw_ranges is not None else None
            pm = build_parametric_map(source, frames[k], series["pm"], k + 1, method, layers, name, raw)
            record["pm"].append(_save(pm, out / f"{stem}_pm_c{k}.dcm", ds0))
    if "seg" in wanted:
        if fractional:
            masks = frames
        else:
            grid = _on_grid(maps, meta)
            masks = _frames(torch.stack([selected_mask(m, threshold, box_fraction) for m in grid]).float(), source, meta) > 0.5
        seg = build_segmentation(source, masks, series["seg"], method, layers, names, fractional)
        record["seg"] = _save(seg, out / f"{stem}_seg.dcm")
    if "sr" in wanted:
        n_all = len(probabilities) if probabilities is not None else 0
        everyone = list(all_class_names) if all_class_names else [f"class {c}" for c in range(n_all)]
        targets = [{"name": n, "boxes": list(boxes[k]) if boxes is not None else []} for k, n in enumerate(names)]
        sr = build_report(source, series["sr"], method, layers, predicted_name or names[0],
                          list(probabilities or []), everyone, targets, shape3d)
        record["sr"] = _save(sr, out / f"{stem}_sr.dcm")
    if "sc" in wanted and overlays is not None:
        record["sc"] = []
        for k, (name, rgb) in enumerate(zip(names, overlays)):
            rgb = np.asarray(rgb)
            same = not shape3d and tuple(rgb.shape[:2]) == tuple(frames.shape[-2:])
            sc = build_secondary_capture(ds0, rgb, series["sc"], k + 1, f"medlens {method} overlay {name}", same)
            record["sc"].append(_save(sc, out / f"{stem}_sc_c{k}.dcm", ds0))
    return record



def check_dicom_inputs(plan: Sequence[tuple[Path, Any]]) -> None:
    """Refuse (one line) a run with ``--dicom-out`` that names a NIfTI or picture input; folders pass."""
    from medlens.io.loaded import _is_dicom

    for path, problem in plan:
        path = Path(path)
        if problem is None and not path.is_dir() and not _is_dicom(path):
            raise MedlensError(f"{path}: --dicom-out writes DICOM objects for DICOM inputs only (files or series "
                               "folders); this input is not DICOM. Drop --dicom-out or this input")


def write_for_record(
    out: Path, meta: dict[str, Any], maps: torch.Tensor, record: dict[str, Any], result: Any, i: int,
    kinds: Sequence[str], threshold: float | None, box_fraction: float, class_names: Sequence[str] | None,
    fractional: bool = False,
) -> dict[str, Any]:
    """The runner's hook: write_dicom for one input and method from its JSON ``record`` and Explanation.

    Errors become ``{"error": reason}`` so that one bad header does not stop the run.
    """
    from PIL import Image

    try:
        logits = result.logits[i].detach().float().cpu()
        probabilities = torch.softmax(logits, 0).tolist() if result.task == "classification" else None
        everyone = list(class_names) if class_names else [f"class {c}" for c in range(logits.numel())]
        raw = result.raw[i].detach().float().cpu()
        raw_ranges = [(float(raw[k].min()), float(raw[k].max())) for k in range(raw.shape[0])]
        overlays = [np.asarray(Image.open(out / t["png"]).convert("RGB")) for t in record["targets"]]
        stem = Path(record["npy"]).stem
        return write_dicom(
            out, meta, maps, method=record["method"], class_names=[t["name"] for t in record["targets"]], kinds=kinds,
            layers=record.get("layers") or (), stem=stem, predicted_name=record.get("predicted_name"),
            probabilities=probabilities, all_class_names=everyone, boxes=[t["boxes"] for t in record["targets"]],
            raw_ranges=raw_ranges if len(raw_ranges) == maps.shape[0] else None, overlays=overlays,
            threshold=threshold, box_fraction=box_fraction, fractional=fractional,
        )
    except (MedlensError, ValueError, TypeError, KeyError, AttributeError, IndexError, OSError) as error:
        from medlens.errors import one_line

        return {"error": f"{meta.get('source')}: DICOM output failed: {one_line(error)}"}
