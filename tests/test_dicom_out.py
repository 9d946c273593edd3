"""DICOM outputs (issue 12): Parametric Map, Segmentation, SR and Secondary Capture, read back and validated.

Every object is checked with dicom3tools' ``dciodvfy`` (no "Error" lines) and read back with
pydicom/highdicom: geometry equal to the source, map values round-tripping, segment masks equal
to medlens' own masks, SR regions equal to the JSON boxes. Real files (pydicom's test files,
pydicom-data, ../shared/data), a real (tiny, random) model, no mocks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from conftest import shared_path
from medlens.core.boxes import threshold_mask, topk_mask
from medlens.errors import MedlensError
from medlens.io import read_image, write_dicom
from medlens.models import build_model
from medlens.workflows.explain import explain_inputs

NAMES = ["normal", "nodule", "effusion"]


def _read(path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def model(dims: int):
    torch.manual_seed(0)
    return build_model("medlens.models:phantom_net", num_classes=3, in_channels=1, spatial_dims=dims).eval()


def run(inputs, out: Path, dims: int, size, **options) -> list[dict]:
    options = {"methods": ["gradcam"], "target": "all", "class_names": NAMES, "dicom_out": ["all"], **options}
    summary = explain_inputs(model(dims), inputs, out, size=size, progress=False, **options)
    assert not summary.bad, summary.bad
    return summary.written


# ----------------------------------------------------------------------------------------------
# Source geometry and reading derived objects back
# ----------------------------------------------------------------------------------------------


def _orientation(ds):
    value = ds.get("ImageOrientationPatient")
    if value is None:
        value = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    return np.array([float(v) for v in value])


def _spacing(ds):
    value = ds.get("PixelSpacing")
    if value is None:
        value = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    return np.array([float(v) for v in value])


def source_frames(files: list[Path]) -> dict[tuple[str, int | None], tuple[int, np.ndarray]]:
    """(SOP instance UID, frame number or None) -> (index along the explained volume's slice axis, position)."""
    headers = [_read(f) for f in files]
    entries = []
    for ds in headers:
        if "PerFrameFunctionalGroupsSequence" in ds:
            for n, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
                entries.append(((ds.SOPInstanceUID, n + 1), frame.PlanePositionSequence[0].ImagePositionPatient, ds))
        else:
            entries.append(((ds.SOPInstanceUID, None), ds.ImagePositionPatient, ds))
    normal = np.cross(_orientation(headers[0])[:3], _orientation(headers[0])[3:])
    depth = [float(np.dot(normal, [float(v) for v in p])) for _, p, _ in entries]
    rank = np.argsort(np.argsort(depth, kind="stable"), kind="stable")
    return {key: (int(rank[i]), np.array([float(v) for v in pos])) for i, (key, pos, _) in enumerate(entries)}


def derived_frames(ds) -> list[dict]:
    """Per frame of a PM or SEG: the source it derives from, its position, its segment number."""
    frames = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        number = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
        frames.append({
            "ref": (ref.ReferencedSOPInstanceUID, number),
            "position": np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]),
            "segment": int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            if "SegmentIdentificationSequence" in item else None,
        })
    return frames


def check_geometry(ds, files: list[Path]) -> list[int]:
    """Frame of reference, orientation, spacing and every frame's position equal the source; the slice index of each frame."""
    source = _read(files[0])
    frames = source_frames(files)
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert np.allclose(_orientation(ds), _orientation(source), atol=1e-6)
    assert np.allclose(_spacing(ds), _spacing(source), atol=1e-6)
    assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
    indices = []
    for frame in derived_frames(ds):
        ref = frame["ref"] if frame["ref"] in frames else (frame["ref"][0], None)
        index, position = frames[ref]
        assert np.allclose(frame["position"], position, atol=1e-4)
        indices.append(index)
    return indices


def check_identity(ds, source) -> None:
    for tag in ("PatientID", "PatientName", "StudyInstanceUID"):
        assert str(ds.get(tag, "")) == str(source.get(tag, "")), tag
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID != source.SOPInstanceUID


def sr_boxes(ds, files: list[Path], volume: bool) -> dict[str, list[list[int]]]:
    """Boxes per explained class, rebuilt from the SR's image regions (SCOORD rectangles on source images)."""
    frames = source_frames(files) if volume else None
    boxes: dict[str, list[list[int]]] = {}

    def walk(items, group):
        for item in items:
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if item.ValueType == "CONTAINER" and meaning == "Measurement Group":
                found = {"name": None, "regions": []}
                walk(item.get("ContentSequence", []), found)
                if found["regions"]:
                    boxes.setdefault(found["name"], []).append(to_box(found["regions"]))
                continue
            if group is not None and item.ValueType == "TEXT" and meaning == "Tracking Identifier":
                group["name"] = item.TextValue.rsplit(" box ", 1)[0]
            if group is not None and item.ValueType == "SCOORD":
                ref = item.ContentSequence[0].ReferencedSOPSequence[0]
                number = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
                group["regions"].append((np.asarray(item.GraphicData, dtype=float).reshape(-1, 2),
                                         (ref.ReferencedSOPInstanceUID, number)))
            walk(item.get("ContentSequence", []), group)

    def to_box(regions):
        points = regions[0][0]
        x0, y0 = points.min(0)
        x1, y1 = points.max(0)
        plane = [int(y0), int(x0)], [int(y1), int(x1)]
        if not volume:
            return plane[0] + plane[1]
        z = [frames[ref if ref in frames else (ref[0], None)][0] for _, ref in regions]
        return [min(z), *plane[0], max(z) + 1, *plane[1]]

    walk(ds.ContentSequence, None)
    return boxes


def sr_prediction(ds) -> tuple[str, dict[str, float]]:
    predicted, probabilities = None, {}

    def walk(items):
        nonlocal predicted
        for item in items:
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning
            if item.ValueType == "NUM" and meaning.startswith("Probability of "):
                probabilities[meaning[len("Probability of "):]] = float(item.MeasuredValueSequence[0].NumericValue)
            if item.ValueType == "CODE" and meaning == "Predicted class":
                predicted = item.ConceptCodeSequence[0].CodeMeaning
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return predicted, probabilities


def check_record(out: Path, record: dict, files: list[Path], volume: bool, threshold: float | None = None,
                 box_fraction: float = 0.05) -> None:
    """Every object of one input: valid, geometry, values, masks, boxes, identity, one series per type."""
    source = _read(files[0])
    written = record["dicom"]
    assert "skipped" not in written and "error" not in written, written
    maps = np.load(out / record["npy"])  # (K, *S) at the input's own size
    if not volume:
        maps = maps[:, None]
    targets = record["targets"]
    assert len(written["pm"]) == len(targets) and len(written["sc"]) == len(targets)
    paths = [out / n for n in written["pm"] + [written["seg"], written["sr"]] + written["sc"]]
    for path in paths:
        assert dciodvfy_errors(path) == [], path
        check_identity(_read(path), source)
    series = {kind: {_read(out / n).SeriesInstanceUID for n in (names if isinstance(names, list) else [names])}
              for kind, names in written.items() if kind != "series"}
    assert all(len(uids) == 1 for uids in series.values()), series
    assert len({next(iter(uids)) for uids in series.values()}) == 4  # one new series per object type

    for k, name in enumerate(written["pm"]):
        pm = _read(out / name)
        assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
        indices = check_geometry(pm, files)
        values = pm.pixel_array.reshape(-1, pm.Rows, pm.Columns)
        assert values.dtype == np.float32 and len(values) == maps.shape[1]
        for frame, index in enumerate(indices):
            np.testing.assert_allclose(values[frame], maps[k, index], atol=1e-6)
        mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
        assert float(mapping[0].RealWorldValueSlope) == 1.0 and float(mapping[0].DoubleFloatRealWorldValueLastValueMapped) == 1.0
        assert "gradcam" in pm.ContentDescription and targets[k]["name"] in pm.ContentDescription
        assert "gradcam" in pm.SeriesDescription and record["layers"][0] in pm.SeriesDescription

    seg = _read(out / written["seg"])
    assert seg.SegmentationType == "BINARY" and len(seg.SegmentSequence) == len(targets)
    for number, segment in enumerate(seg.SegmentSequence, start=1):
        assert segment.SegmentLabel.startswith(targets[number - 1]["name"])
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "medlens" and "gradcam" in str(algorithm.AlgorithmParameters)
        assert "SegmentedPropertyCategoryCodeSequence" in segment and "SegmentedPropertyTypeCodeSequence" in segment
    indices = check_geometry(seg, files)
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns).astype(bool)
    heat = torch.from_numpy(np.load(out / record["npy"]))
    expected = threshold_mask(heat, threshold) if threshold is not None else topk_mask(heat, box_fraction)
    expected = expected.numpy() if volume else expected.numpy()[:, None]
    for frame, (info, index) in enumerate(zip(derived_frames(seg), indices)):
        np.testing.assert_array_equal(pixels[frame], expected[info["segment"] - 1, index])

    sr = _read(out / written["sr"])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    found = sr_boxes(sr, files, volume)
    for t in targets:
        assert found.get(t["name"], []) == [b["box"] for b in t["boxes"]], t["name"]
    predicted, probabilities = sr_prediction(sr)
    assert predicted == record["predicted_name"]
    assert set(probabilities) == set(NAMES) and abs(sum(probabilities.values()) - 1) < 1e-5
    assert max(probabilities, key=probabilities.get) == record["predicted_name"]

    for k, name in enumerate(written["sc"]):
        sc = _read(out / name)
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        np.testing.assert_array_equal(sc.pixel_array, np.asarray(Image.open(out / targets[k]["png"]).convert("RGB")))


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_single_frame_2d(tmp_path, name):
    path = Path(get_testdata_file(name))
    [record] = run([path], tmp_path / "out", dims=2, size=(64, 64))
    check_record(tmp_path / "out", record, [path], volume=False)


def test_threshold_picks_segment_and_boxes(tmp_path):
    path = Path(get_testdata_file("CT_small.dcm"))
    [record] = run([path], tmp_path / "out", dims=2, size=(64, 64), threshold=0.6)
    check_record(tmp_path / "out", record, [path], volume=False, threshold=0.6)


def _reordered_enhanced(tmp_path: Path) -> Path:
    """eCT_Supplemental with its two frames' positions swapped: the file's frame order runs against the normal."""
    ds = _read(get_testdata_file("eCT_Supplemental.dcm"))
    frames = ds.PerFrameFunctionalGroupsSequence
    first, second = (list(f.PlanePositionSequence[0].ImagePositionPatient) for f in frames)
    frames[0].PlanePositionSequence[0].ImagePositionPatient = second
    frames[1].PlanePositionSequence[0].ImagePositionPatient = first
    path = tmp_path / "reordered.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("reorder", [False, True], ids=["as-stored", "frames-against-normal"])
def test_enhanced_multiframe_3d(tmp_path, reorder):
    path = _reordered_enhanced(tmp_path) if reorder else Path(get_testdata_file("eCT_Supplemental.dcm"))
    loaded = read_image(path)
    assert loaded.image.shape[1:] == (2, 512, 512)
    [record] = run([path], tmp_path / "out", dims=3, size=(8, 32, 32))
    check_record(tmp_path / "out", record, [path], volume=True)


def _series(folder: Path, count: int = 4) -> list[Path]:
    """A CT series written from CT_small: new UIDs, slices 2.5 mm apart, file names against slice order."""
    from pydicom.uid import generate_uid

    template = _read(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    folder.mkdir()
    normal = np.cross(_orientation(template)[:3], _orientation(template)[3:])
    origin = np.array([float(v) for v in template.ImagePositionPatient])
    files = []
    for z in range(count):
        ds = template.copy()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + normal * 2.5 * z]
        ds.InstanceNumber = z + 1
        ds.SliceLocation = f"{float(ds.SliceLocation) + 2.5 * z:.4f}"
        path = folder / f"slice_{count - z:02d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files  # in slice order


def test_series_folder_3d(tmp_path):
    files = _series(tmp_path / "series")
    [record] = run([tmp_path / "series"], tmp_path / "out", dims=3, size=(8, 32, 32))
    check_record(tmp_path / "out", record, files, volume=True)
    pm = _read(tmp_path / "out" / record["dicom"]["pm"][0])
    referenced = {r.ReferencedSOPInstanceUID for s in pm.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert referenced == {_read(f).SOPInstanceUID for f in files}


def test_fractional_segmentation_round_trips(tmp_path):
    path = Path(get_testdata_file("MR_small.dcm"))
    loaded = read_image(path)
    torch.manual_seed(1)
    maps = torch.rand(2, *loaded.spatial_shape)
    written = write_dicom(tmp_path, loaded.meta, maps, method="gradcam", class_names=["a", "b"], kinds=["seg"],
                          fractional=True)
    seg_path = tmp_path / written["seg"]
    assert dciodvfy_errors(seg_path) == []
    seg = _read(seg_path)
    assert seg.SegmentationType == "FRACTIONAL"
    stored = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns).astype(np.float32) / float(seg.MaximumFractionalValue)
    for frame, info in enumerate(derived_frames(seg)):
        np.testing.assert_allclose(stored[frame], maps[info["segment"] - 1].numpy(), atol=0.5 / 255 + 1e-6)


def test_maps_at_model_size_are_resampled_to_the_source_grid(tmp_path):
    path = Path(get_testdata_file("CT_small.dcm"))
    loaded = read_image(path)
    small = torch.linspace(0, 1, 16 * 16).view(1, 16, 16)
    written = write_dicom(tmp_path, loaded.meta, small, method="gradcam", class_names=["a"], kinds=["pm"])
    pm = _read(tmp_path / written["pm"][0])
    assert pm.pixel_array.shape == (128, 128)
    assert dciodvfy_errors(tmp_path / written["pm"][0]) == []


# ----------------------------------------------------------------------------------------------
# Geometry-less and non-DICOM inputs
# ----------------------------------------------------------------------------------------------


def test_chest_radiographs_get_secondary_capture_only(tmp_path, chest_dicom):
    files = sorted(chest_dicom.glob("*.dcm"))
    written = run(files, tmp_path / "out", dims=2, size=(64, 64), target="pred")
    assert len(written) == len(files)
    for record in written:
        dicom = record["dicom"]
        assert "no Frame of Reference UID" in dicom["skipped"] and "Secondary Capture only" in dicom["skipped"]
        assert set(dicom) == {"series", "skipped", "sc"} and len(dicom["sc"]) == len(record["targets"])
        source = _read(record["source"])
        for name in dicom["sc"]:
            assert dciodvfy_errors(tmp_path / "out" / name) == []
            sc = _read(tmp_path / "out" / name)
            check_identity(sc, source)
            assert sc.pixel_array.shape == (1024, 1024, 3)
        saved = json.loads((tmp_path / "out" / f"{Path(record['npy']).stem}.json").read_text())
        assert saved["dicom"]["skipped"] == dicom["skipped"]


def test_enhanced_file_without_plane_geometry_gets_secondary_capture_only(tmp_path):
    path = Path(get_testdata_file("emri_small.dcm"))  # 10 frames, its functional groups stripped
    [record] = run([path], tmp_path / "out", dims=3, size=(8, 32, 32))
    assert "Secondary Capture only" in record["dicom"]["skipped"]
    for name in record["dicom"]["sc"]:
        assert dciodvfy_errors(tmp_path / "out" / name) == []


def test_non_dicom_input_refused_before_anything_runs(tmp_path):
    picture = tmp_path / "xray.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(picture)
    with pytest.raises(MedlensError, match="DICOM inputs only"):
        explain_inputs(model(2), [Path(get_testdata_file("CT_small.dcm")), picture], tmp_path / "out",
                       dicom_out=["pm"], progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(MedlensError, match="not understood"):
        explain_inputs(model(2), [Path(get_testdata_file("CT_small.dcm"))], tmp_path / "out", dicom_out=["pm,rtstruct"],
                       progress=False)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_dicom_out(tmp_path):
    from typer.testing import CliRunner

    from medlens.cli import app

    ct = get_testdata_file("CT_small.dcm")
    chest = shared_path("chest-xray-dicom", "test4.dcm")
    runner = CliRunner()
    result = runner.invoke(app, ["explain", "medlens.models:phantom_net", "none", ct, str(chest), "--in-channels", "1",
                                 "-n", "3", "--size", "64", "--class-names", ",".join(NAMES), "--target", "all",
                                 "--dicom-out", "pm,seg,sr,sc", "--threshold", "0.5", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "test4.dcm: no Frame of Reference UID" in result.output  # stderr, mixed into output by CliRunner
    record = json.loads((tmp_path / "out" / "CT_small_gradcam.json").read_text())
    check_record(tmp_path / "out", record, [Path(ct)], volume=False, threshold=0.5)

    picture = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(picture)
    result = runner.invoke(app, ["explain", "medlens.models:phantom_net", "none", str(picture), "--dicom-out", "pm",
                                 "-o", str(tmp_path / "refused")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "DICOM inputs only" in result.output
    assert not (tmp_path / "refused").exists()


def test_threshold_alone_sets_the_boxes(tmp_path):
    from medlens.core.boxes import component_regions

    path = Path(get_testdata_file("CT_small.dcm"))
    [record] = explain_inputs(model(2), [path], tmp_path / "out", size=(64, 64), threshold=0.7, progress=False).written
    assert "dicom" not in record
    heat = torch.from_numpy(np.load(tmp_path / "out" / record["npy"]))[0]
    assert [b["box"] for b in record["targets"][0]["boxes"]] == [r["box"] for r in component_regions(heat, threshold=0.7)]
    with pytest.raises(MedlensError, match="--threshold"):
        explain_inputs(model(2), [path], tmp_path / "other", threshold=1.5, progress=False)
