"""PNG/JPEG/TIFF reading on real pictures: the brain MRI JPEGs, scikit-image's bundled retina and IHC images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import skimage
import tifffile
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from medlens.errors import MedlensError
from medlens.io import iter_inputs, read_image, write_picture

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"


def _ct_uint16() -> np.ndarray:
    """A real 16-bit greyscale picture: CT_small's stored values shifted to unsigned."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    return (ds.pixel_array.astype(np.int32) + 2000).astype(np.uint16)


def test_brain_mri_jpeg_greyscale(brain_mri):
    path = next(iter(sorted((brain_mri / "glioma").glob("*.jpg"))))
    loaded = read_image(path)
    expected = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert loaded.image.shape == (1, 512, 512) and loaded.image.dtype == torch.float32
    assert np.array_equal(loaded.image[0].numpy(), expected)
    assert loaded.meta["kind"] == "image" and loaded.meta["bit_depth"] == 8
    assert torch.allclose(loaded.display(), loaded.image / 255)


def test_rgb_jpeg_and_png():
    for name in ("retina.jpg", "ihc.png"):
        path = SKIMAGE_DATA / name
        loaded = read_image(path)
        expected = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        assert loaded.image.shape == (3, *expected.shape[:2])
        assert np.array_equal(loaded.image.permute(1, 2, 0).numpy(), expected)


def test_sixteen_bit_png_and_tiff_keep_their_values(tmp_path):
    values = _ct_uint16()
    Image.fromarray(values).save(tmp_path / "ct16.png")
    tifffile.imwrite(tmp_path / "ct16.tif", values)
    for name in ("ct16.png", "ct16.tif"):
        loaded = read_image(tmp_path / name)
        assert loaded.meta["bit_depth"] == 16
        assert np.array_equal(loaded.image[0].numpy(), values.astype(np.float32)), name
        shown = loaded.display()
        assert float(shown.min()) == 0.0 and float(shown.max()) == 1.0  # min-max, not /65535


def test_rgb_16bit_tiff_and_multipage_tiff(tmp_path):
    values = _ct_uint16()
    rgb = np.stack([values, values // 2, values // 3], axis=-1)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb, photometric="rgb")
    loaded = read_image(tmp_path / "rgb16.tif")
    assert loaded.image.shape == (3, 128, 128)
    assert np.array_equal(loaded.image.permute(1, 2, 0).numpy(), rgb.astype(np.float32))
    pages = read_image(SKIMAGE_DATA / "multipage.tif")
    assert pages.image.shape == (1, 2, 15, 10) and pages.is_3d
    assert np.array_equal(pages.image[0].numpy(), tifffile.imread(SKIMAGE_DATA / "multipage.tif").astype(np.float32))
    colour_pages = read_image(SKIMAGE_DATA / "multipage_rgb.tif")  # samples stored before rows (QSYX)
    stored = tifffile.imread(SKIMAGE_DATA / "multipage_rgb.tif")
    assert colour_pages.image.shape == (3, 2, 10, 10)
    assert np.array_equal(colour_pages.image.numpy(), np.moveaxis(stored, 1, 0).astype(np.float32))


def test_alpha_and_palette_pictures_become_rgb(tmp_path):
    retina = Image.open(SKIMAGE_DATA / "retina.jpg").resize((64, 64))
    retina.convert("RGBA").save(tmp_path / "alpha.png")
    retina.convert("P").save(tmp_path / "palette.png")
    alpha = read_image(tmp_path / "alpha.png")
    assert alpha.image.shape == (3, 64, 64)
    assert np.array_equal(alpha.image.permute(1, 2, 0).numpy(), np.asarray(retina, dtype=np.float32))
    palette = read_image(tmp_path / "palette.png")
    assert palette.image.shape == (3, 64, 64)
    assert np.array_equal(palette.image.permute(1, 2, 0).numpy(),
                          np.asarray(Image.open(tmp_path / "palette.png").convert("RGB"), dtype=np.float32))


def test_write_picture_round_trip(tmp_path):
    grey = torch.from_numpy(_ct_uint16().astype(np.float32)) / 65535
    out = write_picture(tmp_path / "out" / "grey16.png", grey[None], bits=16)
    back = read_image(out)
    assert torch.allclose(back.image[0] / 65535, grey, atol=1 / 65535)
    colour = read_image(SKIMAGE_DATA / "ihc.png").display()
    back = read_image(write_picture(tmp_path / "colour.png", colour))
    assert torch.allclose(back.display(), colour, atol=1 / 255)
    with pytest.raises(MedlensError, match="bits"):
        write_picture(tmp_path / "x.png", colour, bits=12)


def test_truncated_and_fake_pictures_give_one_line_errors(tmp_path, brain_mri):
    jpeg = next(iter(sorted((brain_mri / "pituitary").glob("*.jpg")))).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (tmp_path / "fake.png").write_bytes(b"not a picture at all")
    tiff = (SKIMAGE_DATA / "multipage.tif").read_bytes()
    (tmp_path / "truncated.tif").write_bytes(tiff[:100])
    (tmp_path / "notes.txt").write_text("ignored: not an image")
    results = dict(iter_inputs([tmp_path]))
    assert set(p.name for p in results) == {"truncated.jpg", "fake.png", "truncated.tif"}
    for path, error in results.items():
        assert isinstance(error, MedlensError), path
        assert str(error).startswith(str(path)) and "\n" not in str(error)


def test_unknown_extension_and_missing_path(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MedlensError, match="unrecognised file type"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(MedlensError, match="no such file"):
        read_image(tmp_path / "absent.png")
