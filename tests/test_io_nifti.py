"""NIfTI reading and writing on real volumes: nibabel's test data and the Decathlon hippocampus."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medlens.errors import MedlensError
from medlens.io import iter_inputs, read_image, write_nifti

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
LAS_VOLUME = NIB_DATA / "anatomical.nii"  # big-endian int16, LAS


def test_hippocampus_volume_geometry(hippocampus):
    path = hippocampus / "imagesTr" / "hippocampus_001.nii.gz"
    reference = nib.load(path)
    loaded = read_image(path)
    assert loaded.meta["kind"] == "nifti" and loaded.meta["orientation"] == "RAS"
    canonical = nib.as_closest_canonical(reference)
    assert loaded.image.shape == (1, *canonical.shape)
    assert np.array_equal(loaded.image[0].numpy(), canonical.get_fdata(dtype=np.float32))
    assert loaded.meta["spacing"] == pytest.approx(tuple(float(z) for z in canonical.header.get_zooms()))
    assert np.allclose(loaded.meta["affine"], canonical.affine)
    assert np.allclose(loaded.meta["original_affine"], reference.affine)
    label = read_image(hippocampus / "labelsTr" / "hippocampus_001.nii.gz")
    assert label.spatial_shape == loaded.spatial_shape
    assert set(label.image.unique().tolist()) <= {0.0, 1.0, 2.0}


def test_las_volume_is_reoriented_to_ras_keeping_world_positions():
    reference = nib.load(LAS_VOLUME)
    assert "".join(nib.aff2axcodes(reference.affine)) == "LAS"
    loaded = read_image(LAS_VOLUME)
    assert loaded.meta["original_orientation"] == "LAS"
    assert "".join(nib.aff2axcodes(loaded.meta["affine"])) == "RAS"
    assert loaded.meta["spacing"] == pytest.approx((2.0, 2.0, 2.0))
    data = reference.get_fdata()
    # a voxel's value sits at the same world position in the file and in the reoriented tensor
    for index in [(3, 10, 5), (30, 2, 20), (0, 0, 0)]:
        world = reference.affine @ [*index, 1]
        ras_index = np.rint(np.linalg.solve(loaded.meta["affine"], world)[:3]).astype(int)
        assert loaded.image[0][tuple(ras_index)].item() == pytest.approx(data[index])


def test_map_round_trip_keeps_the_input_affine_and_orientation(tmp_path):
    loaded = read_image(LAS_VOLUME)
    heat = loaded.display()
    out = write_nifti(tmp_path / "maps" / "heat.nii.gz", heat, loaded.meta)
    written = nib.load(out)
    assert np.allclose(written.affine, nib.load(LAS_VOLUME).affine)
    assert written.shape == nib.load(LAS_VOLUME).shape  # written back in the file's own axis order
    back = read_image(out)
    assert torch.allclose(back.image, heat, atol=1e-6)
    assert np.allclose(back.meta["affine"], loaded.meta["affine"])
    assert not list(out.parent.glob(".*tmp*"))  # atomic: no temporary file left


def test_hot_voxel_lands_at_the_same_world_position(tmp_path, hippocampus):
    for path in (LAS_VOLUME, hippocampus / "imagesTr" / "hippocampus_003.nii.gz"):
        loaded = read_image(path)
        heat = torch.zeros(loaded.spatial_shape)
        index = tuple(s // 3 for s in loaded.spatial_shape)
        heat[index] = 1.0
        out = write_nifti(tmp_path / f"{path.name}.map.nii.gz", heat, loaded.meta)
        written = nib.load(out)
        file_index = np.unravel_index(int(np.argmax(written.get_fdata())), written.shape)
        assert np.allclose(written.affine @ [*file_index, 1], loaded.meta["affine"] @ [*index, 1])


def test_several_maps_become_a_4d_volume(tmp_path, hippocampus):
    loaded = read_image(hippocampus / "imagesTr" / "hippocampus_001.nii.gz")
    maps = torch.rand(3, *loaded.spatial_shape)
    out = write_nifti(tmp_path / "three.nii", maps, loaded.meta)
    assert nib.load(out).shape == (*loaded.spatial_shape, 3)
    back = read_image(out)
    assert back.image.shape == (3, *loaded.spatial_shape)
    assert torch.allclose(back.image, maps)


def test_four_d_file_channels_first():
    path = NIB_DATA / "example4d.nii.gz"
    loaded = read_image(path)
    assert loaded.image.shape == (2, 128, 96, 24)
    assert loaded.meta["spacing"] == pytest.approx((2.0, 2.0, 2.2), abs=1e-5)


def test_map_of_the_wrong_shape_or_name_is_refused(tmp_path):
    loaded = read_image(LAS_VOLUME)
    with pytest.raises(MedlensError, match="does not match"):
        write_nifti(tmp_path / "m.nii.gz", torch.zeros(10, 10, 10), loaded.meta)
    with pytest.raises(MedlensError, match=r"\.nii"):
        write_nifti(tmp_path / "m.png", loaded.image, loaded.meta)


def test_truncated_and_corrupt_nifti_give_one_line_errors(tmp_path, hippocampus):
    source = hippocampus / "imagesTr" / "hippocampus_001.nii.gz"
    compressed = source.read_bytes()
    raw = gzip.decompress(compressed)
    cases = {
        "truncated.nii.gz": compressed[: len(compressed) // 2],
        "truncated.nii": raw[: len(raw) // 2],
        "header_only.nii": raw[:200],
        "garbage.nii.gz": b"\x00" * 500,
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(MedlensError) as caught:
            read_image(path)
        message = str(caught.value)
        assert message.startswith(str(path)) and "\n" not in message, name
    results = dict(iter_inputs([tmp_path]))
    assert len(results) == 4 and all(isinstance(r, MedlensError) for r in results.values())


def test_non_volume_nifti_is_refused():
    with pytest.raises(MedlensError, match="not a spatial volume"):
        read_image(NIB_DATA / "row_major.dconn.nii")
