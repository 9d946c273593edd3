"""``medlens serve``: the REST API on a real uvicorn server (loopback, free port), real scans,
a tiny real model; security refusals; a load test with concurrent clients."""

from __future__ import annotations

import io
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import shared_path

httpx = pytest.importorskip("httpx")

from medlens.serve import Limits, ServedModel, create_app, parse_bytes, served_model, sniff  # noqa: E402
from medlens.serve.background import background_server  # noqa: E402

MAX_UPLOAD = 3 * 1024 * 1024


class Broken(nn.Module):
    """A model that fails on every input, as a model with a bug does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        raise RuntimeError("shape mismatch in the broken test model")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    data = root / "data"
    (data / "xray").mkdir(parents=True)
    (data / "hippo").mkdir()
    (data / "mri").mkdir()
    shutil.copy(shared_path("chest-xray-dicom", "test1.dcm"), data / "xray" / "test1.dcm")
    shutil.copy(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz"), data / "hippo" / "image.nii.gz")
    shutil.copy(shared_path("hippocampus", "labelsTr", "hippocampus_001.nii.gz"), data / "hippo" / "label.nii.gz")
    shutil.copy(shared_path("brain-tumor-mri", "glioma", "1841.jpg"), data / "mri" / "1841.jpg")
    (data / "notes.dcm").write_text("this is not a DICOM file\n")
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(data / "mri" / "1841.jpg", outside / "secret.jpg")
    (data / "escape.jpg").symlink_to(outside / "secret.jpg")
    (data / "linkdir").symlink_to(outside, target_is_directory=True)
    return data


@pytest.fixture(scope="module")
def server(data_dir):
    torch.manual_seed(0)
    models = [
        served_model("medlens.models:phantom_net", dims=2, size=(64, 64), name="phantom-2d"),
        served_model("medlens.models:phantom_net", dims=3, name="phantom-3d"),
        ServedModel("broken", Broken().eval(), dims=2, in_channels=1, size=(32, 32)),
    ]
    app = create_app(models, data_dir=data_dir, max_upload=MAX_UPLOAD)
    with background_server(app) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


def alive(client) -> None:
    assert client.get("/api/models").status_code == 200


def test_listings_and_openapi(server):
    models = server.get("/api/models").json()
    assert [m["name"] for m in models] == ["phantom-2d", "phantom-3d", "broken"]
    assert models[0]["dims"] == 2 and models[1]["dims"] == 3 and models[0]["classes"] == ["class 0", "class 1"]
    assert "gradcam" in [m["name"] for m in server.get("/api/methods").json()]
    files = server.get("/api/files").json()["files"]
    assert {"xray/test1.dcm", "hippo/image.nii.gz", "mri/1841.jpg"} <= set(files)
    assert "escape.jpg" not in files and not any(f.startswith("linkdir") for f in files)
    schema = server.get("/openapi.json").json()
    assert {"/api/explain", "/api/open", "/api/models", "/api/files"} <= set(schema["paths"])
    page = server.get("/")
    assert page.status_code == 200 and "medlens" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"] and page.headers["x-frame-options"] == "DENY"
    assert server.get("/static/app.js").status_code == 200


def test_explain_uploaded_dicom_with_box(server):
    data = shared_path("chest-xray-dicom", "test2.dcm").read_bytes()
    # the name says nothing: the content is sniffed
    r = server.post("/api/explain", files={"file": ("upload.bin", data)}, data={"model": "phantom-2d", "method": "gradcam", "box": "300,300,700,700"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shape"] == [1024, 1024]
    assert abs(sum(p["probability"] for p in body["probabilities"]) - 1) < 1e-5
    assert body["prediction"]["class"] in (0, 1) and body["targets"][0]["boxes"]
    assert 0 <= body["metrics"]["energy_pointing_game"] <= 1 and body["metrics"]["pointing_game"] in (0.0, 1.0)
    maps = np.load(io.BytesIO(server.get(body["downloads"]["npy"]).content))
    assert maps.shape == (1, 1024, 1024) and maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1
    png = server.get(body["downloads"]["png"])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    raw = server.get(body["downloads"]["raw"])
    assert raw.headers["x-shape"] == "1024,1024" and len(raw.content) == 1024 * 1024


def test_explain_volume_with_mask_and_slices(server, tmp_path):
    import nibabel as nib

    opened = server.post("/api/open", data={"path": "hippo/image.nii.gz"}).json()
    assert opened["dims"] == 3 and len(opened["shape"]) == 3
    r = server.post("/api/explain", data={"image_id": opened["image_id"], "model": "phantom-3d", "method": "gradcam", "mask_path": "hippo/label.nii.gz"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shape"] == opened["shape"] and body["metrics"]["empty_annotation"] == 0.0
    assert 0 <= body["metrics"]["relevance_mass"] <= 1
    nii = tmp_path / "map.nii.gz"
    nii.write_bytes(server.get(body["downloads"]["nifti"]).content)
    assert nib.load(nii).shape[:3] == tuple(opened["shape"])
    for axis in (0, 1, 2):
        s = server.get(f"/api/images/{opened['image_id']}/slice.png", params={"axis": axis, "index": 3})
        assert s.status_code == 200 and s.content.startswith(b"\x89PNG")
    assert server.get(body["downloads"]["raw"].replace("/raw", "/slice.png"), params={"axis": 1}).status_code == 200
    assert server.get(f"/api/images/{opened['image_id']}/slice.png", params={"axis": 0, "index": 999}).status_code == 400
    # a 2D model on a volume is a one-line 400
    wrong = server.post("/api/explain", data={"image_id": opened["image_id"], "model": "phantom-2d"})
    assert wrong.status_code == 400 and "3D" in wrong.json()["detail"]


def test_zip_of_a_dicom_series_upload(server):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(shared_path("chest-xray-dicom", "test3.dcm"), "series/IM0001")
        archive.writestr("series/README.txt", "not a DICOM: skipped by content")
    r = server.post("/api/open", files={"file": ("series.zip", buffer.getvalue())})
    assert r.status_code == 200, r.text
    assert r.json()["shape"] == [1024, 1024] and r.json()["kind"] == "dicom"


@pytest.mark.parametrize("path, status", [
    ("../outside/secret.jpg", 403),
    ("mri/../../outside/secret.jpg", 403),
    ("/etc/passwd", 403),
    ("escape.jpg", 403),  # a symlink out of --data
    ("linkdir/secret.jpg", 403),  # a symlinked folder out of --data
    ("mri/none.jpg", 404),
])
def test_paths_confined_to_data(server, path, status):
    for route in ("/api/open", "/api/explain"):
        r = server.post(route, data={"path": path, "model": "phantom-2d"})
        assert r.status_code == status, (route, path, r.text)
        assert "\n" not in r.json()["detail"]
    r = server.post("/api/explain", data={"path": "mri/1841.jpg", "mask_path": path, "model": "phantom-2d"})
    assert r.status_code == status
    alive(server)


def test_oversized_upload_is_413(server):
    r = server.post("/api/open", files={"file": ("big.dcm", b"\0" * (MAX_UPLOAD + 200_000))})
    assert r.status_code == 413 and "max-upload" in r.json()["detail"]
    alive(server)


def test_text_named_dcm_is_refused(server, tmp_path):
    r = server.post("/api/open", files={"file": ("scan.dcm", b"hello, I am text\n" * 20)})
    assert r.status_code == 415 and "checked by content" in r.json()["detail"]
    r = server.post("/api/open", data={"path": "notes.dcm"})
    assert r.status_code == 415
    # content that looks like DICOM but is broken: a 400 with one line
    r = server.post("/api/open", files={"file": ("x.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00garbage")})
    assert r.status_code == 400 and "\n" not in r.json()["detail"]
    alive(server)


def test_zip_bomb_is_refused(server):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("IM0001", b"\0" * (64 * 1024 * 1024))
    assert len(buffer.getvalue()) < MAX_UPLOAD
    r = server.post("/api/open", files={"file": ("scan.zip", buffer.getvalue())})
    assert r.status_code == 413 and "zip bomb" in r.json()["detail"]
    alive(server)


def test_zip_limits_members_and_total(tmp_path):
    from medlens.serve.app import HTTPProblem, safe_extract_zip

    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as archive:
        for i in range(30):
            archive.writestr(f"{i}.dcm", b"x")
    with pytest.raises(HTTPProblem) as info:
        safe_extract_zip(many, tmp_path / "out", Limits(zip_members=10))
    assert info.value.status == 413
    with pytest.raises(HTTPProblem) as info:
        safe_extract_zip(many, tmp_path / "out2", Limits(zip_total=10))
    assert info.value.status == 413


def test_model_error_is_500_and_server_keeps_serving(server):
    r = server.post("/api/explain", data={"path": "mri/1841.jpg", "model": "broken", "method": "gradcam"})
    assert r.status_code == 500 and "broken test model" in r.json()["detail"]
    r = server.post("/api/explain", data={"path": "mri/1841.jpg", "model": "nope"})
    assert r.status_code == 404
    r = server.post("/api/explain", data={"path": "mri/1841.jpg", "model": "phantom-2d", "method": "nope"})
    assert r.status_code == 400
    alive(server)


def test_token_required_when_set(data_dir):
    app = create_app(served_model("medlens.models:phantom_net", dims=2, size=(32, 32)), data_dir=data_dir, token="s3cret")
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/api/models").status_code == 401
        assert client.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/").status_code == 200  # the page itself holds no data


def test_cli_refuses_non_loopback_without_token():
    from typer.testing import CliRunner

    from medlens.cli import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--token" in result.output
    result = CliRunner().invoke(app, ["serve", "--max-upload", "lots"])
    assert result.exit_code == 2


def test_sniff_and_sizes():
    assert sniff(b"\x89PNG\r\n\x1a\n....") == "png" and sniff(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff(b"\0" * 128 + b"DICM") == "dicom" and sniff(b"PK\x03\x04") == "zip" and sniff(b"hello") is None
    assert parse_bytes("512MB") == 512 << 20 and parse_bytes("10KB") == 10 << 10 and parse_bytes("2048") == 2048


def test_load_concurrent_clients_match_sequential(server):
    """8 concurrent clients x 25 explain requests: no errors, every map equal to the sequential one."""
    image_id = server.post("/api/open", data={"path": "mri/1841.jpg"}).json()["image_id"]
    methods = ("gradcam", "saliency")
    expected = {}
    for method in methods:
        body = server.post("/api/explain", data={"image_id": image_id, "model": "phantom-2d", "method": method}).json()
        expected[method] = body["map_sha256"]
        reference_npy = server.get(body["downloads"]["npy"]).content
    assert expected["gradcam"] != expected["saliency"]
    errors: list[str] = []
    digests: list[tuple[str, str]] = []
    last_npy: list[bytes] = []

    def client_loop(n: int) -> None:
        with httpx.Client(base_url=str(server.base_url), timeout=60) as client:
            for i in range(25):
                method = methods[(n + i) % 2]
                r = client.post("/api/explain", data={"image_id": image_id, "model": "phantom-2d", "method": method})
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                digests.append((method, r.json()["map_sha256"]))
                if i == 24 and method == methods[1]:
                    last_npy.append(client.get(r.json()["downloads"]["npy"]).content)

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(digests) == 200
    assert all(d == expected[m] for m, d in digests)
    assert last_npy and all(b == reference_npy for b in last_npy)


def test_nifti_declaring_huge_volume_is_refused(server):
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((4000, 4000, 4000))
    raw = header.binaryblock + b"\0" * 4 + b"\0" * 1024  # vox_offset 352: header, extension flag, some data
    r = server.post("/api/open", files={"file": ("bomb.nii.gz", gzip.compress(raw))})
    assert r.status_code == 413 and "voxels" in r.json()["detail"]
    alive(server)


def test_busy_model_answers_503_not_a_hang(data_dir):
    limits = Limits(lock_timeout=0.2)
    model = served_model("medlens.models:phantom_net", dims=2, size=(32, 32), name="m")
    app = create_app(model, data_dir=data_dir, limits=limits)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        model.lock.acquire()  # another request holding the model
        try:
            r = client.post("/api/explain", data={"path": "mri/1841.jpg", "model": "m"})
        finally:
            model.lock.release()
        assert r.status_code == 503 and "busy" in r.json()["detail"]
        assert client.post("/api/explain", data={"path": "mri/1841.jpg", "model": "m"}).status_code == 200


def test_model_from_a_training_run_folder(tmp_path):
    import json as json_lib

    import yaml

    from medlens.models import build_model, save_weights

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "name": "t", "task": "classification", "model": {"spec": "medlens.models:phantom_net"},
        "data": {"in_channels": 1, "image_size": [48, 48]},
    }))
    (run / "metrics.json").write_text(json_lib.dumps({"classes": ["glioma", "meningioma", "pituitary"]}))
    torch.manual_seed(1)
    trained = build_model("medlens.models:phantom_net", num_classes=3, in_channels=1, spatial_dims=2)
    save_weights(trained, run / "best.safetensors")
    served = served_model(str(run))
    assert served.name == "run" and served.size == (48, 48) and served.dims == 2
    assert served.classes() == ["glioma", "meningioma", "pituitary"]
    assert torch.equal(served.model.fc.weight, trained.fc.weight)
    # the run's training normalisation (a per-image z-score here) is what the server applies
    from medlens.data.prepare import model_tensor

    pre = served.input_preparation()
    assert pre.normalize == "zscore" and pre.size == (48, 48)
    x = model_tensor(torch.rand(1, 60, 60), pre)
    assert x.shape == (1, 48, 48) and abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 0.05
    with pytest.raises(Exception, match="only .pt"):
        served_model("medlens.models:phantom_net", weights=str(run / "config.yaml"))


@pytest.mark.slow  # a fresh interpreter imports torch: ~10-20 s on a loaded machine
def test_cli_serves_on_loopback(data_dir, tmp_path):
    """`medlens serve` as a real process: it answers on 127.0.0.1 and stops cleanly."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(__import__("os").environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1")
    code = "from medlens.cli import app; app()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--port", str(port), "--data", str(data_dir), "--size", "32", "--class-names", "a,b"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/api/models", timeout=2).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode() if proc.poll() is not None else "no answer"
                time.sleep(0.3)
        assert models[0]["classes"] == ["a", "b"] and models[0]["size"] == [32, 32]
        r = httpx.post(f"http://127.0.0.1:{port}/api/explain", data={"path": "mri/1841.jpg"}, timeout=60)
        assert r.status_code == 200 and r.json()["prediction"]["name"] in ("a", "b")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
