"""DICOM reading on real files: pydicom's and pydicom-data's test files and the chest radiographs in ../shared/data."""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from medlens.errors import MedlensError
from medlens.io import CHEST_RADIOGRAPH, BadFilesReport, HeaderPolicy, iter_inputs, read_image, write_nifti

CR_MONOCHROME1 = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "77654033" / "CR1" / "6154"


def _dataset(name: str):
    return pydicom.dcmread(get_testdata_file(name))


def _normalised_pydicom_voi(ds, values: np.ndarray) -> np.ndarray:
    """pydicom's VOI output scaled to [0, 1] with the output range pydicom uses for the file."""
    out = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64)
    if "VOILUTSequence" in ds:
        return out / (2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
    if "RescaleSlope" in ds:  # pydicom then windows into the rescaled range
        ends = sorted((low * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
                       high * float(ds.RescaleSlope) + float(ds.RescaleIntercept)))
        low, high = ends
    return (out - low) / (high - low)


def test_ct_is_in_hounsfield_units_with_geometry():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    loaded = read_image(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert loaded.image.shape == (1, 128, 128) and loaded.image.dtype == torch.float32
    assert np.array_equal(loaded.image[0].numpy(), expected)
    assert loaded.image.min() < -500  # air in HU, not raw stored values
    meta = loaded.meta
    assert meta["kind"] == "dicom" and meta["Modality"] == "CT" and meta["source"] == path
    assert meta["spacing"] == tuple(float(v) for v in ds.PixelSpacing)
    # voxel (row 0, column 0) sits at ImagePositionPatient, in RAS (DICOM is LPS)
    origin = meta["affine"] @ np.array([0, 0, 0, 1.0])
    lps = np.array([float(v) for v in ds.ImagePositionPatient])
    assert np.allclose(origin[:3], lps * [-1, -1, 1])
    # one step along a row (column index) moves by the row direction cosine times the column spacing
    step = meta["affine"] @ np.array([0, 1, 0, 1.0]) - origin
    row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]]) * [-1, -1, 1]
    assert np.allclose(step[:3], row_dir * float(ds.PixelSpacing[1]))


def test_window_display_matches_pydicom_windowing():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    loaded = read_image(path)
    assert loaded.meta["window"] == (float(ds.WindowCenter), float(ds.WindowWidth))
    expected = _normalised_pydicom_voi(ds, apply_modality_lut(ds.pixel_array, ds))
    assert np.allclose(loaded.display()[0].numpy(), expected, atol=1e-4)


def test_voi_lut_sequence_display_matches_pydicom():
    path = get_testdata_file("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    loaded = read_image(path)
    assert loaded.meta["voi_lut"] is not None and loaded.meta["window"] is None
    expected = _normalised_pydicom_voi(ds, apply_modality_lut(ds.pixel_array, ds))
    assert np.allclose(loaded.display()[0].numpy(), expected, atol=1e-4)


def test_monochrome1_is_inverted_so_bright_is_high(tmp_path):
    ds = pydicom.dcmread(CR_MONOCHROME1)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    # no extension: recognised by the DICM preamble
    entries = list(iter_inputs([CR_MONOCHROME1.parent]))
    assert [type(r).__name__ for _, r in entries] == ["Loaded"]
    loaded = entries[0][1]
    modality = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    image = loaded.image[0].double().numpy()
    assert loaded.meta["inverted"] is True
    # inversion is a reflection: image + modality values is one constant (the range's ends summed)
    total = image + modality
    assert np.allclose(total, total.flat[0])
    assert np.corrcoef(image.ravel(), modality.ravel())[0, 1] < -0.999
    # the displayed picture is the negative of pydicom's (uninverted) windowing
    expected = 1 - _normalised_pydicom_voi(ds, modality)
    assert np.allclose(loaded.display()[0].numpy(), expected, atol=1e-3)


def test_multi_frame_volume_with_slice_spacing():
    path = get_testdata_file("emri_small.dcm")
    ds = pydicom.dcmread(path)
    loaded = read_image(path)
    assert loaded.image.shape == (1, 10, 64, 64) and loaded.is_3d
    assert np.array_equal(loaded.image[0].numpy(), ds.pixel_array.astype(np.float32))
    assert loaded.meta["spacing"][0] == pytest.approx(float(ds.SpacingBetweenSlices))
    assert loaded.meta["frames"] == 10


def test_enhanced_ct_uses_functional_groups():
    path = get_testdata_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds  # only in the shared functional groups
    shared = ds.SharedFunctionalGroupsSequence[0]
    intercept = float(shared.PixelValueTransformationSequence[0].RescaleIntercept)
    loaded = read_image(path)
    positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert loaded.meta["spacing"][0] == pytest.approx(abs(positions[1] - positions[0]))
    assert loaded.meta["window"] == (float(shared.FrameVOILUTSequence[0].WindowCenter),
                                     float(shared.FrameVOILUTSequence[0].WindowWidth))
    stored = torch.from_numpy(ds.pixel_array.astype(np.float32))
    frames = {float(loaded.image[0, k].sum()) for k in range(2)}
    assert frames == {float((stored[k] + intercept).sum()) for k in range(2)}
    for k in range(2):  # each frame's first voxel sits at its own ImagePositionPatient
        world = (loaded.meta["affine"] @ [k, 0, 0, 1])[2]
        match = int(np.argmin([abs(world - z) for z in positions]))
        assert torch.equal(loaded.image[0, k], stored[match] + intercept)


def test_rgb_dicom_has_three_channels():
    ds = _dataset("SC_rgb.dcm")
    loaded = read_image(get_testdata_file("SC_rgb.dcm"))
    assert loaded.image.shape == (3, 100, 100)
    assert np.array_equal(loaded.image.permute(1, 2, 0).numpy(), ds.pixel_array.astype(np.float32))
    assert 0 <= float(loaded.display().min()) and float(loaded.display().max()) <= 1


def test_rle_compressed_equals_uncompressed():
    plain = read_image(get_testdata_file("MR_small.dcm"))
    rle = read_image(get_testdata_file("MR_small_RLE.dcm"))
    assert "RLE" in rle.meta["transfer_syntax"]
    assert torch.equal(plain.image, rle.image)


def _decoder_available(uid) -> bool:
    return pydicom.pixels.get_decoder(uid).is_available


def test_jpeg2000_multiframe_lossless_equals_uncompressed():
    if not _decoder_available(pydicom.uid.JPEG2000Lossless):
        pytest.skip("no JPEG 2000 decoder installed for pydicom (Pillow with OpenJPEG, pylibjpeg or gdcm)")
    plain = read_image(get_testdata_file("emri_small.dcm"))
    j2k = read_image(get_testdata_file("emri_small_jpeg_2k_lossless.dcm"))
    assert torch.equal(plain.image, j2k.image)


def test_unsupported_compression_names_the_transfer_syntax():
    if _decoder_available(pydicom.uid.JPEGLosslessSV1):
        pytest.skip("a JPEG Lossless decoder is installed, so this file decodes")
    path = get_testdata_file("JPEG-LL.dcm")
    with pytest.raises(MedlensError, match="JPEG Lossless") as caught:
        read_image(path)
    assert str(caught.value).startswith(path) and "\n" not in str(caught.value)


def test_truncated_and_corrupt_files_give_one_line_errors(tmp_path):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    for name, content in [("half.dcm", data[: len(data) // 2]), ("head.dcm", data[:300]),
                          ("text.dcm", b"this is not a DICOM file\n" * 20)]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(MedlensError) as caught:
            read_image(path)
        message = str(caught.value)
        assert message.startswith(str(path)) and "\n" not in message


def test_dicom_without_pixel_data(tmp_path):
    ds = _dataset("CT_small.dcm")
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(MedlensError, match="no pixel data"):
        read_image(path)


def _write_series(folder: Path, orientation: list[float], seed: int = 0) -> np.ndarray:
    """Split emri_small's 10 real frames into single-slice files, shuffled names, reversed InstanceNumber."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = _dataset("emri_small.dcm").pixel_array
    template = _dataset("CT_small.dcm")
    normal = np.cross(orientation[:3], orientation[3:])
    names = [f"IMG{n:04d}" for n in range(len(frames))]
    random.Random(seed).shuffle(names)
    for index, frame in enumerate(frames):
        ds = copy.deepcopy(template)
        ds.Rows, ds.Columns = frame.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = frame.astype(np.uint16).tobytes()
        ds.ImageOrientationPatient = orientation
        ds.ImagePositionPatient = list(np.array([12.0, -30.0, 40.0]) + normal * 1.2 * index)
        ds.InstanceNumber = len(frames) - index
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / names[index], enforce_file_format=True)
    return frames


def test_series_folder_sorted_along_slice_normal(tmp_path):
    sagittal = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # slices stack along x, not z
    frames = _write_series(tmp_path / "series", sagittal)
    loaded = read_image(tmp_path / "series")
    assert loaded.meta["kind"] == "dicom-series" and loaded.image.shape == (1, 10, 64, 64)
    expected = frames.astype(np.float32) + float(_dataset("CT_small.dcm").RescaleIntercept)
    assert np.array_equal(loaded.image[0].numpy(), expected)
    assert loaded.meta["spacing"] == pytest.approx((1.2, 0.661468, 0.661468))
    # slice k's first voxel is at that slice's ImagePositionPatient (RAS)
    normal = np.cross(sagittal[:3], sagittal[3:])
    for k in (0, 9):
        lps = np.array([12.0, -30.0, 40.0]) + normal * 1.2 * k
        assert np.allclose((loaded.meta["affine"] @ [k, 0, 0, 1])[:3], lps * [-1, -1, 1])


def test_series_map_written_as_nifti_lands_on_the_same_voxel(tmp_path):
    _write_series(tmp_path / "series", [1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    loaded = read_image(tmp_path / "series")
    heat = torch.zeros(loaded.spatial_shape)
    heat[7, 20, 41] = 1.0
    out = write_nifti(tmp_path / "map.nii.gz", heat, loaded.meta)
    back = read_image(out)
    hot = np.unravel_index(int(back.image[0].argmax()), back.spatial_shape)
    world_back = back.meta["affine"] @ [*hot, 1]
    world_series = loaded.meta["affine"] @ [7, 20, 41, 1]
    assert np.allclose(world_back, world_series, atol=1e-4)


def test_mixed_series_and_duplicates_are_refused(tmp_path):
    _write_series(tmp_path / "mixed", [1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    other = pydicom.dcmread(next((tmp_path / "mixed").iterdir()))
    other.SeriesInstanceUID = pydicom.uid.generate_uid()
    other.save_as(tmp_path / "mixed" / "zzz_other", enforce_file_format=True)
    with pytest.raises(MedlensError, match="mixed series"):
        read_image(tmp_path / "mixed")
    _write_series(tmp_path / "dup", [1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    first = next(iter(sorted((tmp_path / "dup").iterdir())))
    shutil.copy(first, tmp_path / "dup" / "zzz_copy")
    with pytest.raises(MedlensError, match="same position"):
        read_image(tmp_path / "dup")


def test_folder_run_reports_bad_files_and_reads_the_rest(tmp_path):
    _write_series(tmp_path / "run" / "series", [1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "run" / "mr.dcm")
    (tmp_path / "run" / "broken.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:2000])
    (tmp_path / "empty").mkdir()
    results = dict(iter_inputs([tmp_path / "run", tmp_path / "empty"]))
    assert set(results) == {tmp_path / "run" / "series", tmp_path / "run" / "mr.dcm",
                            tmp_path / "run" / "broken.dcm", tmp_path / "empty"}
    assert results[tmp_path / "run" / "series"].image.shape == (1, 10, 64, 64)
    assert results[tmp_path / "run" / "mr.dcm"].image.shape == (1, 64, 64)
    assert isinstance(results[tmp_path / "run" / "broken.dcm"], MedlensError)
    assert "no image" in str(results[tmp_path / "empty"])


def test_chest_radiograph_policy_refuses_test4_to_test6_with_reasons(chest_dicom, tmp_path):
    results = dict(iter_inputs([chest_dicom], policy=CHEST_RADIOGRAPH))
    reasons = {path.name: str(r) for path, r in results.items() if isinstance(r, MedlensError)}
    accepted = sorted(path.name for path, r in results.items() if not isinstance(r, MedlensError))
    assert accepted == ["test1.dcm", "test2.dcm", "test3.dcm"]
    assert "BodyPartExamined RIBCAGE" in reasons["test4.dcm"]
    assert "Modality CT" in reasons["test5.dcm"]
    assert "PatientPosition XX" in reasons["test6.dcm"]
    for path, loaded in results.items():
        if not isinstance(loaded, MedlensError):
            assert loaded.image.shape == (1, 1024, 1024)
            assert loaded.meta["StudyDescription"] in {"No Finding", "Cardiomegaly", "Effusion"}
    report = BadFilesReport()
    for path, error in results.items():
        if isinstance(error, MedlensError):
            report.add(path, error)
    text = report.write(tmp_path / "bad.csv").read_text().splitlines()
    assert text[0] == "path,reason" and len(text) == 4 and "RIBCAGE" in "".join(text)
    assert "| " in report.write(tmp_path / "bad.md").read_text()


def test_custom_policy_and_missing_tags():
    meta = read_image(get_testdata_file("CT_small.dcm")).meta
    assert HeaderPolicy(modality=frozenset({"CT"})).check(meta) is None
    strict = HeaderPolicy(name="head MR", modality=frozenset({"MR"}), body_part=frozenset({"HEAD"}),
                          require=frozenset({"BodyPartExamined"}))
    reason = strict.check(dict(meta, BodyPartExamined=None))
    assert "Modality CT (expected MR)" in reason and "BodyPartExamined missing" in reason
    with pytest.raises(MedlensError, match="refused by the head MR header policy"):
        strict.enforce(meta)
