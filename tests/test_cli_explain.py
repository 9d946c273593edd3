"""``medlens explain``, ``medlens layers`` and ``medlens demo`` end to end, on phantoms written to
disk, real brain MRI JPEGs, real chest X-ray DICOMs and real hippocampus NIfTI volumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medlens.cli import app
from medlens.models import PhantomNet
from medlens.workflows.demo import DemoConfig, run_demo, train_classifier
from medlens.models import save_weights
from medlens.data.phantoms import make_phantoms, write_phantoms

runner = CliRunner()


@pytest.fixture(scope="module")
def trained_phantom_model(tmp_path_factory) -> tuple[Path, Path]:
    """Weights of a PhantomNet trained on 2D phantoms, and a folder of held-out phantom PNGs."""
    root = tmp_path_factory.mktemp("phantom-model")
    data = make_phantoms(486, 64, 2, seed=3)
    torch.manual_seed(0)
    model = PhantomNet(2, 1, 2)
    train_classifier(model, data.images[:480], data.labels[:480], epochs=8, progress=False)
    weights = save_weights(model, root / "model.safetensors")
    write_phantoms(root / "phantoms", data.subset(slice(480, 486)))
    return weights, root / "phantoms"


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_explain_folder_writes_overlays_maps_boxes_and_reports_bad_files(trained_phantom_model, tmp_path):
    weights, phantoms = trained_phantom_model
    inputs = tmp_path / "inputs"
    shutil.copytree(phantoms, inputs)
    (inputs / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    result = run("explain", "medlens.models:phantom_net", weights, inputs, "--in-channels", "1", "-m", "gradcam",
                 "-m", "layercam", "--target", "all", "--class-names", "round,elongated", "--out", out)
    assert result.exit_code == 0, result.output
    images = sorted(p for p in phantoms.glob("*.png") if "mask" not in p.name)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert len(records) == 2 * len(images)  # one record per (image, method)
    for record in records:
        assert record["auto_layer"] == "features" and [t["name"] for t in record["targets"]] == ["round", "elongated"]
        for target in record["targets"]:
            assert (out / target["png"]).exists() and target["boxes"], target
            lo_y, lo_x, hi_y, hi_x = target["boxes"][0]["box"]
            assert 0 <= lo_y < hi_y <= 64 and 0 <= lo_x < hi_x <= 64
        maps = np.load(out / record["npy"])
        assert maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() == pytest.approx(1.0)
    assert "broken.png" in (out / "bad_files.csv").read_text()
    assert "broken.png" in result.output and "index.html" in result.output
    page = (out / "index.html").read_text()
    assert page.count("<figure") == 2 * 2 * len(images) and "skipped" in page

    again = run("explain", "medlens.models:phantom_net", weights, inputs, "--in-channels", "1", "--out", out)
    assert again.exit_code == 2 and "not empty" in again.output and "--overwrite" in again.output
    forced = run("explain", "medlens.models:phantom_net", weights, inputs, "--in-channels", "1", "--out", out, "--overwrite")
    assert forced.exit_code == 0, forced.output


def test_explain_maps_point_at_the_lesion_of_a_trained_model(trained_phantom_model, tmp_path):
    weights, phantoms = trained_phantom_model
    out = tmp_path / "out"
    result = run("explain", "medlens.models:phantom_net", weights, phantoms, "--in-channels", "1", "-m", "gradcam", "--out", out)
    assert result.exit_code == 0, result.output
    inside = []
    for record in (json.loads(p.read_text()) for p in out.glob("*.json")):
        stem = Path(record["source"]).name.removesuffix(".png")
        mask = np.asarray(Image.open(Path(record["source"]).with_name(f"{stem}_mask.png"))) > 0
        heat = np.load(out / record["npy"])[0]
        inside.append(heat[mask].mean() > heat[~mask].mean())
    assert len(inside) == 6 and sum(inside) >= 5


def test_explain_refuses_bad_arguments_with_one_line(trained_phantom_model, tmp_path):
    weights, phantoms = trained_phantom_model
    cases = [
        (["medlens.models:phantom_net", tmp_path / "missing.safetensors", phantoms, "--in-channels", "1"], "missing.safetensors"),
        (["medlens.models:phantom_net", weights, phantoms, "--in-channels", "1", "-m", "gradcma"], "gradcma"),
        (["medlens.models:phantom_net", weights, phantoms, "--in-channels", "1", "--layer", "features.99"], "features.99"),
        (["medlens.models:phantom_net", weights, phantoms, "--in-channels", "1", "--size", "3x"], "--size"),
        (["nosuchlib:net", weights, phantoms], "nosuchlib"),
    ]
    for i, (args, needle) in enumerate(cases):
        result = run("explain", *args, "--out", tmp_path / f"out{i}")
        assert result.exit_code != 0, (args, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0], result.output


def test_explain_real_brain_mri_jpegs_with_a_torchvision_model(brain_mri, tmp_path):
    files = sorted((brain_mri / "glioma").glob("*.jpg"))[:2] + sorted((brain_mri / "pituitary").glob("*.jpg"))[:1]
    out = tmp_path / "out"
    result = run("explain", "torchvision:resnet18", "none", *files, "--num-classes", "3", "--size", "96",
                 "--normalize", "imagenet", "-m", "gradcam++", "--out", out)
    assert result.exit_code == 0, result.output
    for path in files:
        record = json.loads((out / f"{path.stem}_gradcampp.json").read_text())
        assert record["auto_layer"] == "layer4"
        original = Image.open(path)
        overlay = Image.open(out / record["targets"][0]["png"])
        assert overlay.size == original.size  # written at the image's own size, not the model's
        assert np.load(out / record["npy"]).shape[1:] == original.size[::-1]


def test_explain_real_chest_dicoms_with_the_header_policy(chest_dicom, tmp_path):
    out = tmp_path / "out"
    result = run("explain", "torchvision:resnet18", "none", chest_dicom, "--size", "64", "--policy", "chest-radiograph",
                 "-m", "gradcam", "--out", out)
    assert result.exit_code == 0, result.output
    explained = {Path(json.loads(p.read_text())["source"]).name for p in out.glob("*.json")}
    refused = (out / "bad_files.csv").read_text() if (out / "bad_files.csv").exists() else ""
    assert explained and all(name.endswith(".dcm") for name in explained)
    assert all(f"test{i}.dcm" in explained or f"test{i}.dcm" in refused for i in range(1, 7))
    unknown = run("explain", "torchvision:resnet18", "none", chest_dicom, "--policy", "knee", "--out", tmp_path / "o2")
    assert unknown.exit_code == 2 and "chest-radiograph" in unknown.output


def test_explain_real_hippocampus_volume_with_a_monai_3d_unet_keeps_the_affine(hippocampus, tmp_path):
    volume = sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    result = run("explain", "monai:UNet", "none", volume, "--dims", "3", "--in-channels", "1", "--num-classes", "3",
                 "--size", "32", "--target", "1", "-m", "gradcam", "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads(next(out.glob("*.json")).read_text())
    written, source = nib.load(out / record["nifti"]), nib.load(volume)
    assert written.shape[:3] == source.shape[:3]
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert Image.open(out / record["targets"][0]["png"]).mode == "RGB"  # three orthogonal slices


def test_layers_lists_candidates_and_the_default():
    result = run("layers", "torchvision:resnet18", "--size", "64")
    assert result.exit_code == 0, result.output
    assert "default layer: layer4" in result.output and "layer3" in result.output
    assert run("layers", "torchvision:resnet18", "--size", "64", "--all").output.count("\n") > result.output.count("\n")


def test_demo_trains_explains_scores_and_reports(tmp_path):
    out = tmp_path / "demo"
    config = DemoConfig(n=80, size=32, epochs=3, methods=["gradcam", "saliency", "rollout"], sanity_images=2)
    result = run_demo(out, config, progress=False)
    assert [r["method"] for r in result.rows] == ["gradcam", "saliency"]
    assert "self-attention" in result.skipped["rollout"]
    for row in result.rows:
        assert 0 <= row["pointing_game"] <= 1 and 0 <= row["auroc"] <= 1 and row["ms_per_image"] > 0
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "rollout" in page and "src=\"http" not in page
    assert (out / "results.csv").read_text().splitlines()[0].startswith("method,pointing_game")
    assert len(list((out / "phantoms").glob("*_mask.png"))) == 16
    refused = run("demo", "--out", out, "--n", "20", "--size", "32", "--epochs", "1", "-m", "gradcam")
    assert refused.exit_code == 2 and "--overwrite" in refused.output


def test_demo_command_in_3d(tmp_path):
    result = run("demo", "--out", tmp_path / "d3", "--dims", "3", "--n", "24", "--size", "16", "--epochs", "1",
                 "-m", "gradcam", "-m", "hirescam")
    assert result.exit_code == 0, result.output
    assert "gradcam" in result.output and "hirescam" in result.output
    assert "Orthogonal slices" in (tmp_path / "d3" / "report.html").read_text()


def test_explain_vit_attention_per_head_and_rollout_options(trained_phantom_model, tmp_path):
    _, phantoms = trained_phantom_model
    image = sorted(p for p in phantoms.glob("*.png") if "mask" not in p.name)[0]
    out = tmp_path / "out"
    result = run("explain", "timm:vit_tiny_patch16_224", "none", image, "--size", "224", "-m", "attention",
                 "--head-fusion", "none", "--block", "-2", "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads(next(out.glob("*_attention.json")).read_text())
    assert [t["name"].split(", ")[1] for t in record["targets"]] == ["head 0", "head 1", "head 2"]  # vit_tiny: 3 heads
    assert np.load(out / record["npy"]).shape == (3, 64, 64)  # back at the image's own size
    bad = run("explain", "timm:vit_tiny_patch16_224", "none", image, "--size", "224", "-m", "rollout",
              "--head-fusion", "median", "--out", tmp_path / "o2")
    assert "median" in bad.output and "mean" in bad.output


def test_a_model_that_fails_on_the_inputs_is_reported_per_file_not_as_a_traceback(trained_phantom_model, tmp_path):
    weights, phantoms = trained_phantom_model
    result = run("explain", "medlens.models:phantom_net", weights, phantoms, "--in-channels", "1", "--size", "4", "--out", tmp_path / "o")
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit), result.output
    skipped = [line for line in result.output.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 6 and all("RuntimeError" in line for line in skipped), result.output


def test_two_layers_side_by_side_with_fusion_none(brain_mri, tmp_path):
    """`-l layer3 -l layer4 --fusion none`: a map per layer (each the API's map for that layer) and
    one figure per input with the layers side by side."""
    from medlens import explain
    from medlens.data.prepare import Preprocessing, prepare_loaded
    from medlens.io.loading import read_image
    from medlens.models import build_model

    images = tmp_path / "in"
    images.mkdir()
    for name in sorted(p.name for p in (brain_mri / "glioma").glob("*.jpg"))[:2]:
        shutil.copy(brain_mri / "glioma" / name, images / name)
    torch.manual_seed(0)
    net = build_model("torchvision:resnet18", num_classes=3, in_channels=3)
    save_weights(net, tmp_path / "w.safetensors")
    out = tmp_path / "out"
    args = ("explain", "torchvision:resnet18", tmp_path / "w.safetensors", images, "-n", "3", "--size", "64",
            "-l", "layer3", "-l", "layer4", "--target", "0", "--out", out)
    assert run(*args[:-2], "--fusion", "none", "--layer", "layer2", "--out", out).exit_code == 0
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "index.json"]
    assert sorted({tuple(r["layers"]) for r in records}) == [("layer2",), ("layer3",), ("layer4",)]
    first = sorted(images.iterdir())[0]
    sheet = Image.open(out / f"{first.stem}_gradcam_layers.png")
    tiles = [Image.open(out / r["targets"][0]["figure"]) for r in records if r["source"].endswith(first.name)]
    assert len(tiles) == 3 and sheet.width == sum(t.width for t in tiles)
    x = prepare_loaded(read_image(first), Preprocessing(channels=3, size=(64, 64))).tensor[None]
    for r in records:
        if r["source"].endswith(first.name) and r["layers"] == ["layer3"]:
            want = explain(net.eval(), x, "gradcam", target=0, layer="layer3").maps[0, 0]
            got = torch.from_numpy(np.load(out / r["npy"]))[0]  # at the input's own size
            want = torch.nn.functional.interpolate(want[None, None], size=got.shape, mode="bilinear")[0, 0]
            assert torch.corrcoef(torch.stack([want.flatten(), got.flatten()]))[0, 1] > 0.99
    assert run(*args[:-8], "-l", "layer4", "--fusion", "none", "--out", tmp_path / "o2").exit_code == 2
    assert run(*args[:-2], "--fusion", "avg", "--out", tmp_path / "o3").exit_code == 2
