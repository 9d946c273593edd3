"""One workflow from training to report: a run folder is a model, one input preparation, readable pictures.

Short REAL runs on ../shared/data (skipped with a reason when the data is absent): a brain MRI
classifier and a hippocampus 3D U-Net are trained for one tiny epoch, then explained and evaluated
from their run folders with no preprocessing flags.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medlens.cli import app
from medlens.data.prepare import Preprocessing, model_tensor, parse_normalize, prepare_loaded
from medlens.errors import MedlensError
from medlens.io.loading import read_image
from medlens.models.run_folder import load_model_source
from medlens.train import config_path, load_config, train

CONFIGS = Path(config_path("brain_mri_resnet18")).parent
DATA = Path(__file__).resolve().parent.parent / ".." / "shared" / "data"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def brain_run(tmp_path_factory) -> Path:
    root = DATA / "brain-tumor-mri"
    if not root.is_dir():
        pytest.skip(f"brain MRI data not found at {root}")
    out = tmp_path_factory.mktemp("brain") / "run"
    overrides = [f"data.root={root}", "data.limit_per_class=10", "data.image_size=32", "data.batch_size=16",
                 "trainer.max_epochs=1", "trainer.progress=none", "trainer.precision=32-true", "trainer.gallery_size=4"]
    train(load_config(CONFIGS / "brain_mri_resnet18.yaml", overrides), out_dir=out, enable_model_summary=False)
    return out


@pytest.fixture(scope="module")
def hippo_run(tmp_path_factory) -> Path:
    root = DATA / "hippocampus"
    if not (root / "imagesTr").is_dir():
        pytest.skip(f"hippocampus data not found at {root}")
    out = tmp_path_factory.mktemp("hippo") / "run"
    overrides = [f"data.root={root}", "data.limit=6", "data.image_size=[16,24,16]", "data.batch_size=4",
                 "trainer.max_epochs=1", "trainer.progress=none", "trainer.precision=32-true"]
    train(load_config(CONFIGS / "hippocampus_unet3d.yaml", overrides), out_dir=out, enable_model_summary=False)
    return out


# ---------------------------------------------------------------------------- a run folder is a model


def test_run_folder_rebuilds_model_and_training_preprocessing(brain_run: Path) -> None:
    source = load_model_source(str(brain_run), device="cpu")
    pre = source.preprocessing
    assert (pre.channels, pre.size, pre.normalize, pre.dims) == (1, (32, 32), "zscore", 2)
    assert pre.class_names == ["glioma", "meningioma", "pituitary"]
    # the model tensor equals the training pipeline's validation sample for the same file
    from medlens.data.datasets import MedicalDataset, Normalise, Resize, index_image_folder

    items, classes = index_image_folder(DATA / "brain-tumor-mri")
    sample = MedicalDataset(items[:1], classes, Resize(32), 1)[0]
    expected = Normalise()(sample)["image"]
    ready = prepare_loaded(read_image(items[0].path), pre)
    assert torch.allclose(ready.tensor, expected, atol=1e-5)


def test_explain_and_evaluate_a_classifier_run_folder_match_its_validation_predictions(brain_run: Path, tmp_path: Path) -> None:
    validation = _rows(brain_run / "validation_samples.csv")[:6]
    files = [row["path"] for row in validation]
    result = _run("explain", brain_run, *files, "--out", tmp_path / "explain", "--device", "cpu")
    assert result.exit_code == 0, result.output
    by_source = {}
    for path in (tmp_path / "explain").glob("*_gradcam.json"):
        record = json.loads(path.read_text())
        by_source[record["source"]] = record
    assert len(by_source) == len(files)
    for row in validation:
        assert float(row["confidence"]) == pytest.approx(float(row[f"p_{row['predicted_class']}"]))
        record = by_source[row["path"]]
        assert record["predicted_name"] == row["predicted_class"], (row, record["probabilities"])
        assert abs(sum(record["probabilities"].values()) - 1) < 1e-4
        target = record["targets"][0]
        assert target["probability"] == pytest.approx(record["probabilities"][target["name"]], abs=1e-6)
        assert (tmp_path / "explain" / target["figure"]).is_file()
    page = (tmp_path / "explain" / "index.html").read_text()
    assert "p = " in page and "_figure.png" in page

    result = _run("evaluate", brain_run, DATA / "brain-tumor-mri", "--split", brain_run / "split.csv", "--part", "val",
                  "--metric", "complexity", "--no-road", "--bootstrap", "10", "--out", tmp_path / "eval", "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "eval" / "rows.csv")
    truth = {f"{Path(r['path']).parent.name}/{Path(r['path']).stem}": int(r["predicted"]) for r in _rows(brain_run / "validation_samples.csv")}
    compared = [(truth[r["image"]], int(float(r["prediction"]))) for r in rows if r["image"] in truth]
    assert compared and all(a == b for a, b in compared)


def test_medlens_run_on_a_classifier_run_folder_matches_its_validation_predictions(brain_run: Path, tmp_path: Path) -> None:
    """``medlens run runs/X files`` with no preprocessing flags: the run's size, channels,
    z-score and class names; the table's predictions equal validation_samples.csv."""
    import pandas as pd

    validation = _rows(brain_run / "validation_samples.csv")[:6]
    out = tmp_path / "scale"
    result = _run("run", brain_run, *[row["path"] for row in validation], "--out", out, "--overlays", "none", "--bootstrap", "10")
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "results").set_index("source")
    for row in validation:
        assert table.loc[row["path"], "prediction_name"] == row["predicted_class"]
        assert max(table.loc[row["path"], "probabilities"]) == pytest.approx(float(row["confidence"]), abs=1e-4)  # csv: 4 decimals
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["preprocessing"]["normalize"] == "zscore" and manifest["config"]["size"] == [32, 32]
    again = _run("run", brain_run, *[row["path"] for row in validation], "--out", out, "--overlays", "none",
                 "--bootstrap", "10", "--resume")
    assert again.exit_code == 0 and "0 part(s) computed" in again.output, again.output
    changed = _run("run", brain_run, *[row["path"] for row in validation], "--out", out, "--overlays", "none",
                   "--bootstrap", "10", "--resume", "--normalize", "imagenet")
    assert changed.exit_code != 0 and "normalize" in changed.output


def test_segmentation_run_folder_explained_with_predicted_regions(hippo_run: Path, tmp_path: Path) -> None:
    samples = _rows(hippo_run / "validation_samples.csv")
    assert {"dice_Anterior", "dice_Posterior"} <= set(samples[0])  # per-case, per-class Dice
    assert all(r["dice_Anterior"] == "" or 0 <= float(r["dice_Anterior"]) <= 1 for r in samples)
    volume = Path(samples[0]["path"])
    out = tmp_path / "out"
    result = _run("explain", hippo_run, volume, "--target", "all", "--region", "pred", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(next(out.glob("*_gradcam.json")).read_text())
    source = nib.load(str(volume))
    assert record["task"] == "segmentation" and [t["name"] for t in record["targets"]] == ["background", "Anterior", "Posterior"]
    for target in record["targets"]:
        written = nib.load(str(out / target["nifti"]))
        assert written.shape[:3] == source.shape[:3]
        assert np.allclose(written.affine, source.affine)
    summary = record["prediction"]
    assert sum(summary["voxels"].values()) == int(np.prod(source.shape[:3]))
    assert "dice" in summary and summary["label"].endswith(volume.name)  # labelsTr found beside imagesTr
    assert record["region"] == "pred" and set(record["region_per_class"]) == {"0", "1", "2"}  # JSON keys
    assert (out / record["segmentation_png"]).is_file() and (out / record["prediction_nifti"]).is_file()
    assert nib.load(str(out / record["prediction_nifti"])).shape[:3] == source.shape[:3]


def test_slice_trained_unet_explains_a_volume_slice_by_slice(tmp_path: Path) -> None:
    """A 2D U-Net trained on axial slices explains a whole volume from its run folder: each slice is
    prepared as in training, explained, and the maps are stacked back into the source geometry."""
    root = DATA / "hippocampus"
    if not (root / "imagesTr").is_dir():
        pytest.skip(f"hippocampus data not found at {root}")
    run = tmp_path / "run"
    overrides = [f"data.root={root}", "data.slices=true", "data.image_size=[32,48]", "data.limit=5", "data.batch_size=32",
                 "trainer.max_epochs=1", "trainer.progress=none", "trainer.precision=32-true",
                 "model.kwargs={channels: [4, 8], strides: [2], num_res_units: 0}"]
    train(load_config(CONFIGS / "hippocampus_unet3d.yaml", overrides), out_dir=run, enable_model_summary=False)
    volume = Path(_rows(run / "validation_samples.csv")[0]["path"])
    out = tmp_path / "out"
    result = _run("explain", run, volume, "--target", "1,2", "--region", "pred", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(next(out.glob("*_gradcam.json")).read_text())
    source = nib.load(str(volume))
    assert record["sliced"] == {"axis": "Z", "slices": source.shape[2]}
    assert record["task"] == "segmentation" and [t["name"] for t in record["targets"]] == ["Anterior", "Posterior"]
    written = nib.load(str(out / record["targets"][0]["nifti"]))
    assert written.shape[:3] == source.shape[:3] and np.allclose(written.affine, source.affine)
    prediction = nib.load(str(out / record["prediction_nifti"]))
    assert prediction.shape[:3] == source.shape[:3]
    # the stacked prediction is the model's own per-slice prediction, slice by slice
    pre = load_model_source(str(run), device="cpu")
    ready = prepare_loaded(read_image(volume), pre.preprocessing)
    assert ready.slice_axis == 2 and ready.tensor.shape == (source.shape[2], 1, 32, 48)
    with torch.no_grad():
        logits = pre.model(ready.tensor)  # (Z, N, 32, 48)
    upsampled = torch.nn.functional.interpolate(logits.movedim(0, 3)[None], size=source.shape[:3], mode="trilinear")
    agree = (upsampled[0].argmax(0).numpy() == np.asarray(prediction.dataobj)).mean()
    assert agree > 0.98, agree


# ---------------------------------------------------------------------------- the bugs of issue 9


def test_display_image_is_not_the_clipped_model_tensor() -> None:
    path = next((DATA / "brain-tumor-mri" / "glioma").glob("*.jpg"), None)
    if path is None:
        pytest.skip("brain MRI data not found")
    loaded = read_image(path)
    ready = prepare_loaded(loaded, Preprocessing(channels=3, size=(64, 64), normalize="zscore"))
    assert ready.tensor.shape == (3, 64, 64) and float(ready.tensor.min()) < 0  # model units
    assert ready.display.shape[1:] == loaded.image.shape[1:]  # own size
    assert torch.equal(ready.display, loaded.display())  # original intensities in [0, 1]
    assert len(torch.unique((ready.display * 255).round())) > 32  # grey levels, not near-binary


def test_normalize_choices_parse_the_same_everywhere() -> None:
    assert parse_normalize(None) == {}
    assert parse_normalize("imagenet") == {"normalize": "imagenet"}
    assert parse_normalize("mean=0.5/std=0.25") == {"normalize": "meanstd", "mean": (0.5,), "std": (0.25,)}
    with pytest.raises(MedlensError):
        parse_normalize("minmax")
    x = torch.rand(1, 8, 8)
    assert torch.allclose(model_tensor(x, Preprocessing(normalize="meanstd", mean=(0.5,), std=(0.25,))), (x - 0.5) / 0.25)


def test_ras_planes_are_named_from_the_anatomy_and_drawn_radiologically() -> None:
    from medlens.render.views3d import orthogonal_views

    nx, ny, nz = 12, 16, 20  # (X, Y, Z) = (R, A, S)
    x = torch.arange(nx).view(nx, 1, 1).float().expand(nx, ny, nz)
    y = torch.arange(ny).view(1, ny, 1).float().expand(nx, ny, nz)
    z = torch.arange(nz).view(1, 1, nz).float().expand(nx, ny, nz)
    heat = torch.zeros(nx, ny, nz)
    heat[6, 8, 10] = 1
    for coordinate, panel, brighter in ((y, 0, "top"), (x, 0, "left"), (z, 1, "top"), (z, 2, "top"), (y, 2, "left")):
        volume = (coordinate / coordinate.max())[None]
        rgb = orthogonal_views(volume, heat, alpha=0.0, min_height=1, gap=2, orientation="RAS").astype(float)
        widths = [nx, nx, ny]
        left = sum(widths[:panel]) + 2 * panel
        heights = [ny, nz, nz]
        tile = rgb[: heights[panel], left:left + widths[panel], 0]
        if brighter == "top":  # anterior (axial) / superior (coronal, sagittal) up
            assert tile[1].mean() > tile[-2].mean(), (panel, "top")
        else:  # the patient's right (axial) / anterior (sagittal) on the viewer's left
            assert tile[:, 1].mean() > tile[:, -2].mean(), (panel, "left")
    fig_titles = [ax.get_title() for ax in __import__("medlens.render.views3d", fromlist=["x"]).orthogonal_figure(
        (z / z.max())[None], heat, orientation="RAS").axes[:3]]
    assert fig_titles == ["Axial (z = 10)", "Coronal (y = 8)", "Sagittal (x = 6)"]


def test_flat_maps_get_no_boxes_and_say_so(tmp_path: Path) -> None:
    from medlens.models import build_model
    from medlens.workflows.explain import explain_inputs, is_flat

    assert is_flat(torch.zeros(8, 8)) and not is_flat(torch.rand(8, 8))
    path = next((DATA / "brain-tumor-mri" / "glioma").glob("*.jpg"), None)
    if path is None:
        pytest.skip("brain MRI data not found")
    model = build_model("medlens.models:phantom_net", num_classes=2, in_channels=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every gradient is zero: Grad-CAM has no evidence
    summary = explain_inputs(model, [path], tmp_path / "out", size=(64, 64), progress=False)
    target = summary.written[0]["targets"][0]
    assert target["flat"] is True and target["boxes"] == [] and target["argmax_cell_box"] is None
    assert (tmp_path / "out" / target["figure"]).is_file()


def test_evaluate_limit_is_stratified_seeded_and_positive() -> None:
    from medlens.cli.evaluate import stratified_subset
    from medlens.data.datasets import Item

    items = [Item(path=f"{c}/{i}.jpg", label=c) for c in (0, 1, 2) for i in range(20)]
    picked = stratified_subset(items, 12, seed=0)
    assert [sum(1 for it in picked if it.label == c) for c in (0, 1, 2)] == [4, 4, 4]
    assert picked == stratified_subset(items, 12, seed=0) and picked != stratified_subset(items, 12, seed=1)
    with pytest.raises(MedlensError):
        stratified_subset(items, 0, seed=0)
    result = CliRunner().invoke(app, ["evaluate", "medlens.models:phantom_net", "phantoms:4", "--limit", "0"])
    assert result.exit_code != 0 and "--limit 0" in result.output


def test_explanation_panels_draw_the_display_image_not_the_clipped_model_input() -> None:
    from medlens import explain
    from medlens.models import build_model
    from medlens.render.panels import explanation_panels, figure_rgb

    torch.manual_seed(0)
    display = torch.linspace(0, 1, 64 * 64).view(1, 1, 64, 64)  # a smooth ramp: 4096 grey levels
    x = (display - display.mean()) / display.std()  # z-scored model input
    model = build_model("medlens.models:phantom_net", num_classes=2, in_channels=1).eval()
    exp = explain(model, x, "gradcam")
    for kwargs in ({"display": display}, {}):  # given, and the fallback that rescales instead of clipping
        fig = explanation_panels(x, exp, 0, **kwargs)
        image = fig.axes[0].get_images()[0].get_array()
        grey = np.asarray(image, dtype=float)
        grey = grey[..., 0] if grey.ndim == 3 else grey
        assert len(np.unique(np.round(grey, 3))) > 50, kwargs  # not near-binary
        figure_rgb(fig)


def test_layers_lists_full_names_kernels_trainable_and_mult_adds() -> None:
    result = CliRunner().invoke(app, ["layers", "torchvision:resnet18", "--size", "32", "--in-channels", "1"])
    assert result.exit_code == 0, result.output
    assert "layer2.0.downsample.0" in result.output and "3x3 / 1x1" in result.output
    assert "mult-adds" in result.output and "trainable" in result.output and "frozen" in result.output


def test_factory_specs_import_from_the_working_folder(tmp_path: Path, monkeypatch) -> None:
    import sys

    from medlens.models import build_model

    (tmp_path / "wf_local_models.py").write_text(
        "import torch\n\ndef tiny(num_classes=2, in_channels=1, width=4):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, width, 3), torch.nn.AdaptiveAvgPool2d(1),"
        " torch.nn.Flatten(), torch.nn.Linear(width, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    model = build_model("wf_local_models:tiny", num_classes=3, in_channels=1, width=6)
    assert model[0].out_channels == 6 and model[-1].out_features == 3
