"""Bad input never costs a good file (issue 14): a corpus generated at test time, nothing binary committed.

Every case asserts the one-line message and exit status, that the good inputs of the same run are
written completely, that nothing partial is left behind and that the model is unchanged.
"""

from __future__ import annotations

import os
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from medlens.errors import MedlensError

SPEC = "medlens.models:phantom_net"
GOOD = ("good_a.png", "good_b.png")


# ------------------------------------------------------------------------------------------ corpus


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose IHDR claims width x height (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _nifti(path: Path, array: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _ct(**changes):
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def _make_fifo(p: Path) -> None:
    os.mkfifo(p)


def _make_socket(p: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(p))
    sock.close()


def _make_truncated_jpeg(p: Path) -> None:
    Image.fromarray((np.random.default_rng(0).random((48, 48)) * 255).astype(np.uint8)).save(p.with_suffix(".full.jpg"))
    data = p.with_suffix(".full.jpg").read_bytes()
    p.with_suffix(".full.jpg").unlink()
    p.write_bytes(data[: len(data) // 3])


def _make_float_tiff(value: float):
    def make(p: Path) -> None:
        import tifffile

        array = np.ones((32, 32), np.float32)
        array[3, 4] = value
        tifffile.imwrite(p, array)
    return make


def _make_nan_nifti(p: Path) -> None:
    array = np.ones((8, 8, 8), np.float32)
    array[1, 2, 3] = np.nan
    _nifti(p, array)


def _make_zero_dim_nifti(p: Path) -> None:
    _nifti(p, np.ones((8, 8, 8), np.float32))
    raw = bytearray(p.read_bytes())
    struct.pack_into("<h", raw, 44, 0)  # dim[2] = 0
    p.write_bytes(bytes(raw))


def _make_4d_nifti(p: Path) -> None:
    _nifti(p, np.ones((8, 8, 8, 10), np.float32))


def _make_cropping_header_nifti(p: Path) -> None:
    _nifti(p, np.ones((16, 16, 16), np.float32))
    raw = bytearray(p.read_bytes())
    struct.pack_into("<h", raw, 46, 4)  # dim[3] = 4 of 16: the header would silently crop the data
    p.write_bytes(bytes(raw))


def _make_truncated_nifti(p: Path) -> None:
    _nifti(p.with_name("full.nii.gz"), np.random.default_rng(0).random((16, 16, 16)).astype(np.float32))
    data = p.with_name("full.nii.gz").read_bytes()
    p.with_name("full.nii.gz").unlink()
    p.write_bytes(data[: len(data) // 2])


def _make_nan_slope_dicom(p: Path) -> None:
    import pydicom

    ds = _ct()
    ds["RescaleSlope"] = pydicom.DataElement(0x00281053, "DS", "NaN")
    ds.save_as(p, enforce_file_format=True)


def _make_truncated_dicom(p: Path) -> None:
    ds = _ct()
    ds.save_as(p.with_name("full.dcm"), enforce_file_format=True)
    data = p.with_name("full.dcm").read_bytes()
    p.with_name("full.dcm").unlink()
    p.write_bytes(data[: len(data) - 9000])


def _make_rtstruct(p: Path) -> None:
    from pydicom.data import get_testdata_file

    p.write_bytes(Path(get_testdata_file("rtstruct.dcm")).read_bytes())


def _make_4d_dicom(p: Path) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    ds.NumberOfTemporalPositions = 2
    ds.save_as(p, enforce_file_format=True)


def _make_3d_volume(p: Path) -> None:
    _nifti(p, np.random.default_rng(1).random((16, 16, 16)).astype(np.float32))


def _write(data: bytes):
    return lambda p: p.write_bytes(data)


# (file name, maker, fragment of the one-line reason)
BAD_FILES = [
    ("fifo.png", _make_fifo, "is a FIFO, not a regular file"),
    ("socket.png", _make_socket, "is a socket, not a regular file"),
    ("bomb.png", lambda p: _png_header_only(p, 20000, 20000), "decompression bomb"),
    ("big.png", lambda p: _png_header_only(p, 12000, 12000), "over the limit"),
    ("empty.png", _write(b""), "cannot read image"),
    ("random.png", _write(os.urandom(2048)), "cannot read image"),
    ("text.jpg", _write(b"this is not a picture\n" * 20), "cannot read image"),
    ("truncated.jpg", _make_truncated_jpeg, "cannot read image"),
    ("nan.tif", _make_float_tiff(float("nan")), "NaN or Inf"),
    ("inf.tif", _make_float_tiff(float("inf")), "NaN or Inf"),
    ("neginf.tif", _make_float_tiff(float("-inf")), "NaN or Inf"),
    ("random.tif", _write(os.urandom(512)), "cannot read TIFF"),
    ("nan.nii.gz", _make_nan_nifti, "NaN or Inf"),
    ("zerodim.nii", _make_zero_dim_nifti, "zero-size axis"),
    ("fourd.nii.gz", _make_4d_nifti, "4D NIfTI with 10 volumes"),
    ("cropped.nii", _make_cropping_header_nifti, "more voxel data than its header"),
    ("truncated.nii.gz", _make_truncated_nifti, "corrupt or truncated NIfTI"),
    ("empty.nii.gz", _write(b""), "corrupt or truncated NIfTI"),
    ("nanslope.dcm", _make_nan_slope_dicom, "NaN or Inf"),
    ("truncated.dcm", _make_truncated_dicom, "truncated DICOM"),
    ("rtstruct.dcm", _make_rtstruct, "RTSTRUCT"),
    ("fourd.dcm", _make_4d_dicom, "4D multi-frame DICOM"),
    ("random.dcm", _write(os.urandom(600)), "not a DICOM file"),
    ("notes.xyz", _write(b"hello"), "unrecognised file type"),
    ("volume.nii.gz", _make_3d_volume, "2D"),  # a volume for a 2D model: refused for this input only
]
READER_CASES = [c for c in BAD_FILES if c[0] != "volume.nii.gz"]


def _good(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name in GOOD:
        path = folder / name
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _invoke(args: list[str]):
    from medlens.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _assert_complete(out: Path, stems) -> None:
    """Each good input has its JSON, map and overlay; no staging folder or temporary file is left."""
    for stem in stems:
        assert (out / f"{stem}_gradcam.json").is_file(), sorted(os.listdir(out))
        assert (out / f"{stem}_gradcam.npy").is_file()
        assert list(out.glob(f"{stem}_gradcam_c*.png"))
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".medlens-outputs"]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from medlens.models import build_model, save_weights

    torch.manual_seed(0)
    model = build_model(SPEC, num_classes=2, in_channels=1, spatial_dims=2)
    return save_weights(model, tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, weights):
    """One explain run over two good pictures and every bad file: the per-case tests read its results."""
    root = tmp_path_factory.mktemp("corpus")
    good = _good(root / "good")
    bad_dir = root / "bad"
    bad_dir.mkdir()
    for name, make, _ in BAD_FILES:
        make(bad_dir / name)
    before = Path(weights).read_bytes()
    out = root / "out"
    inputs = [good[0], *(bad_dir / name for name, _, _ in BAD_FILES), root / "missing.png", "/dev/null", good[1]]
    result = _invoke(["explain", SPEC, weights, *inputs, "--in-channels", "1", "-o", out])
    assert Path(weights).read_bytes() == before  # the model file is never touched
    return result, out


def test_corpus_run_keeps_every_good_input(corpus_run):
    result, out = corpus_run
    assert result.exit_code == 0, result.output
    assert "explained 2 input(s)" in result.output
    _assert_complete(out, ["good_a", "good_b"])
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name,fragment", [(n, f) for n, _, f in BAD_FILES] + [("missing.png", "no such file"), ("null", "is a device")])
def test_corpus_bad_file_is_skipped_in_one_line(corpus_run, name, fragment):
    result, out = corpus_run
    lines = [line for line in result.output.splitlines() if line.startswith("skipped") and f"/{name}:" in line]
    assert len(lines) == 1, result.output
    assert fragment in lines[0], lines[0]
    stem = name.split(".")[0]
    assert not [p for p in out.iterdir() if p.name.startswith(stem + "_")], "nothing of a bad input is written"
    assert name in (out / "bad_files.csv").read_text()


@pytest.mark.parametrize("name,make,fragment", READER_CASES, ids=[c[0] for c in READER_CASES])
def test_reader_refuses_in_one_line(tmp_path, name, make, fragment):
    from medlens.io.loading import read_image

    path = tmp_path / name
    make(path)
    with pytest.raises(MedlensError) as info:
        read_image(path)
    message = str(info.value)
    assert fragment in message and "\n" not in message and name in message


def test_pixel_budget_is_an_argument(tmp_path):
    from medlens.io.loading import read_image

    path = _good(tmp_path)[0]
    assert read_image(path, max_pixels=32 * 32).image.shape == (1, 32, 32)
    with pytest.raises(MedlensError, match="over the limit of 1,023"):
        read_image(path, max_pixels=1023)


def test_fifo_inside_a_folder_is_never_opened(tmp_path, weights):
    _good(tmp_path / "in")
    os.mkfifo(tmp_path / "in" / "pipe.png")
    result = _invoke(["explain", SPEC, weights, tmp_path / "in", "--in-channels", "1", "-o", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    _assert_complete(tmp_path / "out", ["good_a", "good_b"])


# ------------------------------------------------------------------------------------------ arguments


ARG_CASES = [
    (["--size", "-5"], "--size"),
    (["--size", "0"], "--size"),
    (["--size", "20000"], "--size"),
    (["--size", "abc"], "--size"),
    (["--size", "32,32,32,32"], "--size"),
    (["--size", "32,32,32"], "--size"),
    (["--in-channels", "0"], "--in-channels"),
    (["--in-channels", "-3"], "--in-channels"),
    (["-n", "0"], "--num-classes"),
    (["--dims", "4"], "--dims"),
    (["--dims", "3"], "--dims"),  # a 2D model
    (["--target", "banana"], "--target"),
    (["--target", "7"], "--target"),
    (["--target", "top0"], "--target"),
    (["--target", "top9"], "--target"),
    (["--target", "-1"], "--target"),
    (["--target", "0,0"], "--target"),
    (["--normalize", "minmax"], "--normalize"),
    (["--normalize", "imagenet"], "--normalize"),  # a 1-channel model
    (["--target", "all", "--class-names", "cat"], "--class-names"),
    (["--class-names", "a,b,c"], "--class-names"),
    (["--batch-size", "0"], "--batch-size"),
    (["--alpha", "1.5"], "--alpha"),
    (["--alpha", "-0.1"], "--alpha"),
    (["--box-fraction", "0"], "--box-fraction"),
    (["--box-fraction", "2"], "--box-fraction"),
    (["--cmap", "no-such-map"], "--cmap"),
    (["--max-pixels", "0"], "--max-pixels"),
    (["--option", "novalue"], "--option"),
    (["--policy", "no-such-policy"], "--policy"),
]


@pytest.mark.parametrize("extra,flag", ARG_CASES, ids=[" ".join(c[0]) for c in ARG_CASES])
def test_argument_errors_exit_2_before_reading(tmp_path, weights, extra, flag):
    good = _good(tmp_path / "in")
    out = tmp_path / "out"
    args = ["explain", SPEC, weights, *good, "-o", out]
    if "--in-channels" not in extra:
        args += ["--in-channels", "1"]
    result = _invoke(args + extra)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and flag in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists(), "nothing is written for an argument error"


def test_weights_that_do_not_fit_name_the_flags(tmp_path):
    from medlens.models import build_model, save_weights

    path = save_weights(build_model(SPEC, num_classes=3, in_channels=1, spatial_dims=2), tmp_path / "three.safetensors")
    result = _invoke(["explain", SPEC, path, *_good(tmp_path / "in"), "--in-channels", "1", "-o", tmp_path / "out"])
    assert result.exit_code == 2 and "try -n 3" in result.output, result.output


# ------------------------------------------------------------------------------------------ weights


def _weights_cases():
    def flipped(p: Path, src: Path) -> None:
        raw = bytearray(src.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        p.write_bytes(bytes(raw))

    def truncated(p: Path, src: Path) -> None:
        p.write_bytes(src.read_bytes()[: src.stat().st_size // 2])

    def nan(p: Path, src: Path) -> None:
        from medlens.models import read_state_dict

        state = read_state_dict(src)
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key].clone().fill_(float("nan"))
        torch.save(state, p)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    return [
        ("flipped.pth", flipped, "fails its CRC check"),
        ("truncated.pth", truncated, "truncated"),
        ("random.pth", lambda p, s: p.write_bytes(b"\x00" + os.urandom(4096)), "neither a zip archive nor a pickle"),
        ("empty.pth", lambda p, s: p.write_bytes(b""), "empty"),
        ("nan.pth", nan, "NaN or Inf"),
        ("evil.pth", lambda p, s: torch.save({"x": Evil()}, p), "pickles"),
        ("folder.pth", lambda p, s: p.mkdir(), "is a folder"),
        ("truncated.safetensors", lambda p, s: p.write_bytes(s.with_suffix(".safetensors").read_bytes()[:-10]), "truncated"),
        ("random.safetensors", lambda p, s: p.write_bytes(os.urandom(64)), "safetensors"),
        ("missing.pth", lambda p, s: None, "not found"),
    ]


@pytest.mark.parametrize("name,make,fragment", _weights_cases(), ids=[c[0] for c in _weights_cases()])
def test_bad_weights_refused_in_one_line(tmp_path, weights, name, make, fragment):
    from medlens.models import build_model, load_weights, save_weights

    torch.manual_seed(1)
    model = build_model(SPEC, num_classes=2, in_channels=1, spatial_dims=2)
    src = save_weights(model, tmp_path / "src.pth")
    save_weights(model, tmp_path / "src.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / name
    make(path, src)
    with pytest.raises(MedlensError) as info:
        load_weights(model, path)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model is unchanged"


def test_bad_weights_through_the_cli(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(b"\x00" + os.urandom(1000))
    result = _invoke(["explain", SPEC, path, *_good(tmp_path / "in"), "--in-channels", "1", "-o", tmp_path / "out"])
    assert result.exit_code == 2 and "neither a zip archive nor a pickle" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------ outputs


def test_long_name_is_shortened_with_a_stable_hash(tmp_path, weights):
    good = _good(tmp_path / "in")
    long = tmp_path / "in" / ("x" * 250 + ".png")
    long.write_bytes(good[0].read_bytes())
    for run in ("a", "b"):
        result = _invoke(["explain", SPEC, weights, long, "--in-channels", "1", "-o", tmp_path / run])
        assert result.exit_code == 0, result.output
    names_a = sorted(os.listdir(tmp_path / "a"))
    assert names_a == sorted(os.listdir(tmp_path / "b")) and max(len(n) for n in names_a) < 200


def test_input_folder_as_out_is_refused(tmp_path, weights):
    _good(tmp_path / "in")
    result = _invoke(["explain", SPEC, weights, tmp_path / "in", "--in-channels", "1", "-o", tmp_path / "in", "--overwrite"])
    assert result.exit_code == 2 and "lies in --out" in result.output
    assert sorted(os.listdir(tmp_path / "in")) == sorted(GOOD)


def test_out_inside_the_input_folder_is_never_read(tmp_path, weights):
    _good(tmp_path / "in")
    out = tmp_path / "in" / "results"
    for _ in range(2):
        result = _invoke(["explain", SPEC, weights, tmp_path / "in", "--in-channels", "1", "-o", out, "--overwrite"])
        assert result.exit_code == 0 and "explained 2 input(s)" in result.output, result.output
    assert len(list(out.glob("*.json"))) == 2


@pytest.mark.parametrize("where,fragment", [("/proc/medlens-out", "cannot write"), ("file", "is a file"), ("nonempty", "not empty")])
def test_bad_out_is_one_line_exit_2(tmp_path, weights, where, fragment):
    good = _good(tmp_path / "in")
    out = Path(where) if where.startswith("/") else tmp_path / where
    if where == "file":
        out.write_text("x")
    if where == "nonempty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    result = _invoke(["explain", SPEC, weights, *good, "--in-channels", "1", "-o", out])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output, result.output


def test_overwrite_leaves_no_file_of_the_earlier_run(tmp_path, weights):
    good = _good(tmp_path / "in")
    out = tmp_path / "out"
    assert _invoke(["explain", SPEC, weights, *good, "--in-channels", "1", "-o", out]).exit_code == 0
    (out / "mine.txt").write_text("not medlens")
    result = _invoke(["explain", SPEC, weights, good[0], "--in-channels", "1", "-o", out, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not list(out.glob("good_b*")), "the earlier run's results are removed"
    assert (out / "mine.txt").exists(), "files medlens did not write stay"


def test_failure_while_writing_leaves_nothing_of_that_input(tmp_path, weights, monkeypatch):
    import medlens.workflows.explain as runner

    real = runner.png_bytes
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("drawing failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "png_bytes", flaky)
    good = _good(tmp_path / "in")
    result = _invoke(["explain", SPEC, weights, *good, "--in-channels", "1", "-o", tmp_path / "out", "-b", "1"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert not list(out.glob("good_a*")), sorted(os.listdir(out))
    _assert_complete(out, ["good_b"])


def test_full_disk_stops_in_one_line(tmp_path, weights, monkeypatch):
    import errno

    import medlens.workflows.explain as runner

    real = runner.os.replace
    calls = {"n": 0}

    def full(src, dst):
        calls["n"] += 1
        if calls["n"] > 6:  # one input: three atomic writes in its staging folder, three moves into --out
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(runner.os, "replace", full)
    good = _good(tmp_path / "in")
    result = _invoke(["explain", SPEC, weights, *good, "--in-channels", "1", "-o", tmp_path / "out", "-b", "1", "--no-figures"])
    monkeypatch.undo()
    assert result.exit_code == 2 and "No space left on device" in result.output and "stopped after 1 complete" in result.output
    _assert_complete(tmp_path / "out", ["good_a"])


# ------------------------------------------------------------------------------------------ other commands


@pytest.mark.parametrize("args,fragment", [
    (["evaluate", SPEC, "phantoms:abc", "--in-channels", "1"], "phantoms"),
    (["evaluate", SPEC, "phantoms:2:x", "--in-channels", "1"], "phantoms"),
    (["evaluate", SPEC, "phantoms:2:32", "--in-channels", "1", "--limit", "0"], "--limit"),
    (["evaluate", SPEC, "phantoms:2:32", "--in-channels", "1", "-n", "0"], "--num-classes"),
    (["evaluate", SPEC, "phantoms:2:32", "--in-channels", "1", "--target", "x"], "--target"),
    (["evaluate", SPEC, "phantoms:2:32", "--in-channels", "1", "--size", "0"], "--size"),
    (["prototype", SPEC, "none", "-c", "-1"], "--class"),
    (["prototype", SPEC, "none", "-c", "5"], "--class"),
    (["prototype", SPEC, "none", "-c", "0", "--steps", "0"], "--steps"),
    (["prototype", SPEC, "none", "-c", "0", "--out", "/proc/medlens/proto"], "cannot write"),
    (["demo", "--n", "5"], "--n"),
])
def test_other_commands_check_arguments(tmp_path, args, fragment):
    result = _invoke(args + (["-o", tmp_path / "out"] if args[0] == "evaluate" else []))
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output, result.output


def test_demo_out_an_existing_file(tmp_path):
    (tmp_path / "f").write_text("x")
    result = _invoke(["demo", "--out", tmp_path / "f"])
    assert result.exit_code == 2 and "is a file" in result.output


def test_evaluate_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.txt").write_text("x")
    result = _invoke(["evaluate", SPEC, "phantoms:2:32", "--in-channels", "1", "-o", tmp_path / "out"])
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_evaluate_goes_past_bad_items(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / "data" / cls / f"{cls}{i}.png")
    _make_truncated_jpeg(tmp_path / "data" / "a" / "broken.jpg")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "data" / "b" / "boxed.png")
    (tmp_path / "data" / "b" / "boxed.txt").write_text("0 0.5 0.5\n")
    out = tmp_path / "out"
    result = _invoke(["evaluate", SPEC, tmp_path / "data", "--in-channels", "1", "-m", "gradcam", "--metric", "complexity",
                      "--bootstrap", "10", "-o", out])
    assert result.exit_code == 0, result.output
    bad = (out / "bad_files.csv").read_text()
    assert "broken.jpg" in bad and "boxed.png" in bad
    import pandas as pd

    assert pd.read_csv(out / "rows.csv")["image"].nunique() == 4


def test_resume_checkpoint_checks(tmp_path):
    from medlens.train.run import check_checkpoint

    for name, data in (("empty.ckpt", b""), ("random.ckpt", os.urandom(500))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MedlensError, match="--resume: checkpoint"):
            check_checkpoint(tmp_path / name)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, good)
    check_checkpoint(good)
    good.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(MedlensError, match="truncated"):
        check_checkpoint(good)


def test_training_loader_never_ends_on_a_batch_of_one():
    from types import SimpleNamespace

    from medlens.train.data import MedlensDataModule

    module = MedlensDataModule.__new__(MedlensDataModule)
    module.config = SimpleNamespace(batch_size=4, num_workers=0)
    assert module._loader(list(range(9)), shuffle=True).drop_last
    assert not module._loader(list(range(8)), shuffle=True).drop_last
    assert not module._loader(list(range(9)), shuffle=False).drop_last


# ------------------------------------------------------------------------------------------ API


def _model():
    from medlens.models import build_model

    torch.manual_seed(0)
    return build_model(SPEC, num_classes=2, in_channels=1, spatial_dims=2).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_precisions_are_cast(dtype):
    from medlens import explain

    result = explain(_model(), torch.rand(1, 1, 32, 32).to(dtype), "gradcam")
    assert result.maps.shape == (1, 1, 32, 32) and torch.isfinite(result.maps).all()


@pytest.mark.parametrize("x,target,fragment", [
    (torch.rand(0, 1, 32, 32), "pred", "empty"),
    (torch.rand(1, 1, 0, 32), "pred", "zero-size"),
    (torch.rand(2, 1, 32, 32), torch.tensor([0.7, 1.2]), "integer tensor"),
    (torch.rand(2, 1, 32, 32), torch.tensor([True, False]), "integer tensor"),
    (torch.randint(0, 255, (1, 1, 32, 32)), "pred", "convert images to float"),
])
def test_api_refuses_in_one_line(x, target, fragment):
    from medlens import explain

    with pytest.raises(MedlensError, match=fragment):
        explain(_model(), x, "gradcam", target=target)


# ------------------------------------------------------------------------------------------ properties


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".png", ".jpg", ".tif", ".bmp", ".nii", ".nii.gz", ".dcm"]))
def test_readers_on_arbitrary_bytes_raise_only_medlens_errors(tmp_path, data, suffix):
    from medlens.io.loading import read_image

    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        loaded = read_image(path)
    except MedlensError as error:
        assert "\n" not in str(error)
    else:
        assert torch.isfinite(loaded.image).all()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.tuples(st.integers(1, 70000), st.integers(1, 70000)))
def test_png_headers_within_budget_or_refused(tmp_path, header):
    from medlens.io.loading import read_image

    width, height = header
    path = tmp_path / "h.png"
    _png_header_only(path, width, height)
    try:
        read_image(path, max_pixels=4096)
    except MedlensError as error:
        if width * height > 4096:
            assert "over the limit" in str(error) or "bomb" in str(error)


@settings(max_examples=150, deadline=None)
@given(spec=st.text(max_size=12), n=st.integers(1, 6))
def test_target_parsing_never_raises_anything_else(spec, n):
    from medlens.core.targets import check_target_spec, resolve_targets

    logits = torch.randn(2, n)
    try:
        text = check_target_spec(spec, n)
    except MedlensError:
        return
    idx = resolve_targets(text, logits)  # a spec the CLI accepts always resolves
    assert idx.shape[0] == 2 and int(idx.min()) >= 0 and int(idx.max()) < n


@settings(max_examples=60, deadline=None)
@given(classes=st.lists(st.integers(0, 9), min_size=1, max_size=4, unique=True), n=st.integers(1, 10))
def test_class_list_targets_agree_with_resolve(classes, n):
    from medlens.core.targets import check_target_spec, resolve_targets

    spec = ",".join(map(str, classes))
    if max(classes) < n:
        assert resolve_targets(check_target_spec(spec, n), torch.randn(1, n)).tolist() == [classes]
    else:
        with pytest.raises(MedlensError):
            check_target_spec(spec, n)


def test_decathlon_without_manifest_keeps_a_further_label(tmp_path):
    from conftest import shared_path

    from medlens.data.datasets import MedicalDataset, index_source

    real = shared_path("hippocampus")
    for part in ("imagesTr", "labelsTr"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "hippocampus_001.nii.gz").write_bytes((real / part / "hippocampus_001.nii.gz").read_bytes())
    items, classes, _ = index_source(tmp_path)
    sample = MedicalDataset(items, classes).read(0)  # labels 1 and 2 (anterior, posterior) without dataset.json
    assert int(sample["mask"].max()) == 2
