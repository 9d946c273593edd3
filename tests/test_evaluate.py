"""The evaluation runner and ``medlens evaluate`` on phantoms and on real brain MRI boxes."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from medlens.workflows.evaluate import bootstrap_ci, evaluate, folder_items, phantom_items
from medlens.errors import MedlensError
from medlens.data.phantoms import make_phantoms


@pytest.fixture(scope="module")
def grey_resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model.eval()


def test_runner_on_phantoms_writes_rows_tables_and_report(grey_resnet, tmp_path):
    phantoms = make_phantoms(5, 32, 2, seed=0)
    items = list(phantom_items(phantoms))
    name, image, label, _mask, box = items[-1]
    items[-1] = (name, image, label, None, None)  # an image without annotation: reported, not scored
    result = evaluate({"a": grey_resnet}, items, ["gradcam", "saliency"], ("localisation", "faithfulness", "complexity"),
                      out_dir=tmp_path, batch_size=2, steps=4, road=False, n_boot=200, progress=False)
    rows = result.rows
    assert len(rows) == 5 * 2 and set(rows["method"]) == {"gradcam", "saliency"}
    assert (rows["target"] == rows["label"]).all()  # target="label" explains the annotated class
    unannotated = rows[rows["image"] == name]
    assert (unannotated["empty_annotation"] == 1).all() and unannotated["pointing_game"].isna().all()
    pg = result.summary.query("method == 'gradcam' and metric == 'pointing_game'").iloc[0]
    assert pg["n"] == 4 and pg["n_nan"] == 1 and pg["ci_low"] <= pg["mean"] <= pg["ci_high"]
    for f in ("rows.csv", "rows.parquet", "summary.csv", "summary.md", "report.html"):
        assert (tmp_path / f).stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "rows.csv")) == 10
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 3  # curves + one gallery per method
    assert "pointing_game" in (tmp_path / "summary.md").read_text()
    assert result.unannotated == [name]
    assert f"1 image(s) without annotation, localisation not scored (NaN): {name}" in (tmp_path / "summary.md").read_text()
    assert "1 image(s) without annotation" in html


def test_runner_on_3d_phantoms(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18(num_classes=2)
    model.stem[0] = torch.nn.Conv3d(1, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False)
    model.eval()
    phantoms = make_phantoms(2, 16, 3, seed=1)
    result = evaluate(model, phantom_items(phantoms), ["gradcam"], ("localisation", "complexity"), batch_size=2,
                      n_boot=50, progress=False)
    assert len(result.rows) == 2 and result.rows["iou@10"].between(0, 1).all()


def test_bootstrap_ci_brackets_the_mean():
    values = torch.tensor([0.0, 1.0] * 50 + [float("nan")])
    mean, lo, hi = bootstrap_ci(values, n_boot=2000)
    assert mean == pytest.approx(0.5) and 0.38 < lo < 0.5 < hi < 0.62
    assert all(math.isnan(v) for v in bootstrap_ci(torch.tensor([float("nan")])))


def test_unknown_metric_group(grey_resnet):
    with pytest.raises(MedlensError, match="unknown metric group"):
        evaluate(grey_resnet, [], ["gradcam"], ("accuracy",))


def test_folder_items_turn_yolo_boxes_into_pixel_boxes(brain_mri):
    from medlens.data.datasets import index_image_folder

    items, classes = index_image_folder(brain_mri)
    chosen = [it for it in items if it.boxes][:2]
    got = list(folder_items(brain_mri, size=64, channels=1, items=chosen))
    for (name, image, label, mask, box), item in zip(got, chosen):
        assert image.shape == (1, 64, 64) and label == item.label
        x0, y0, x1, y1 = item.boxes[0]
        assert box.tolist() == [math.floor(y0 * 64), math.floor(x0 * 64), math.ceil(y1 * 64), math.ceil(x1 * 64)]
        assert mask.shape == (1, 64, 64) and int(mask.sum()) == (box[2] - box[0]) * (box[3] - box[1])


def test_folder_items_read_in_workers_equal_those_read_here_and_a_bad_file_is_reported(brain_mri, tmp_path):
    import shutil

    for c in ("glioma", "pituitary"):  # a small class-folder dataset of real MRI with YOLO boxes
        (tmp_path / "data" / c).mkdir(parents=True)
        for jpg in sorted((brain_mri / c).glob("*.jpg"))[:4]:
            shutil.copy(jpg, tmp_path / "data" / c)
            shutil.copy(jpg.with_suffix(".txt"), tmp_path / "data" / c)
    broken = tmp_path / "data" / "glioma" / "zz_truncated.jpg"
    broken.write_bytes(next((brain_mri / "glioma").glob("*.jpg")).read_bytes()[:300])
    runs = {}
    for workers in (0, 2):
        bad: list = []
        runs[workers] = (list(folder_items(tmp_path / "data", size=48, channels=1, bad=bad, workers=workers)), bad)
    (here, bad_here), (there, bad_there) = runs[0], runs[2]
    assert len(here) == 8 and [b[0] for b in bad_here] == [str(broken)]
    assert bad_there == bad_here
    for a, b in zip(here, there, strict=True):
        assert a[0] == b[0] and a[2] == b[2]
        assert torch.equal(a[1], b[1]) and torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])


def test_cli_on_phantoms(tmp_path):
    from medlens.cli import app

    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "torchvision:resnet18", "phantoms:2:32", "--in-channels", "1",
                                      "-m", "gradcam", "--metric", "localisation", "--metric", "sanity",
                                      "--bootstrap", "100", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "| gradcam |" in result.output and "sanity check" in result.output
    assert (out / "sanity.csv").exists() and (out / "report.html").exists()
    sanity = pd.read_csv(out / "sanity.csv")
    assert set(sanity["mode"]) == {"cascading", "independent"}  # Adebayo et al.'s two randomisations
    assert sanity[["spearman", "ssim"]].notna().all().all()
    layers = sanity.query("mode == 'independent'")["randomised"].tolist()
    assert layers[0] == "conv1" and layers[-1] == "fc"  # one block at a time, input to output
    assert sanity.query("mode == 'cascading'")["randomised"].tolist() == layers[::-1]  # output to input, cumulative
    bad = CliRunner().invoke(app, ["evaluate", "torchvision:resnet18", str(tmp_path / "missing"), "-o", str(out)])
    assert bad.exit_code == 2 and "no such dataset" in bad.output


def gap_cnn(num_classes: int = 2, in_channels: int = 1, spatial_dims: int = 2) -> torch.nn.Module:
    """A small GAP CNN in 2D or 3D, built through the CLI spec ``test_evaluate:gap_cnn``."""
    conv = {2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[spatial_dims]
    pool = {2: torch.nn.AdaptiveAvgPool2d, 3: torch.nn.AdaptiveAvgPool3d}[spatial_dims]
    return torch.nn.Sequential(conv(in_channels, 8, 3, padding=1), torch.nn.ReLU(), conv(8, 8, 3, padding=1), torch.nn.ReLU(),
                               pool(1), torch.nn.Flatten(), torch.nn.Linear(8, num_classes))


def test_cli_on_3d_phantoms_follows_dims(tmp_path):
    """``--dims 3`` makes the phantoms volumes too, so a 3D model gets 3D inputs."""
    from medlens.cli import app

    out = tmp_path / "eval3d"
    result = CliRunner().invoke(app, ["evaluate", "test_evaluate:gap_cnn", "phantoms:2:16", "--dims", "3", "--in-channels", "1",
                                      "-m", "gradcam", "--metric", "localisation", "--bootstrap", "20", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "rows.csv")
    assert len(rows) == 2 and rows["iou@10"].between(0, 1).all()


def test_paper_benchmark_tables_and_maps(tmp_path):
    import numpy as np
    import timm
    from PIL import Image

    from medlens.metrics import pointing_game, topk_box_iou
    from medlens.workflows.protocols.paper_benchmark import run_paper_benchmark

    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((90, 110)) * 255).astype(np.uint8)).save(tmp_path / "img" / f"case{i}.png")
        mask = np.zeros((224, 224), np.uint8)
        mask[30 + 20 * i : 120, 50:160] = 255
        Image.fromarray(mask).save(tmp_path / "mask" / f"case{i}.png")
    torch.manual_seed(0)
    inits = {name: timm.create_model("vit_tiny_patch16_224", num_classes=2, pretrained=False, depth=2) for name in ("scratch", "MAE")}
    tables = run_paper_benchmark({"toy": inits}, {"toy": tmp_path / "img"}, {"toy": tmp_path / "mask"}, tmp_path / "out",
                                 methods=("attention", "saliency"))
    assert set(tables) == {("toy", m) for m in ("pointing_game", "iou@5", "iou@10", "iou@20", "iou@40")}
    table = pd.read_csv(tmp_path / "out" / "toy_iou@10.csv", index_col="method")
    assert list(table.index) == ["attention", "saliency"] and list(table.columns) == ["scratch", "MAE"]
    saved = torch.stack([torch.from_numpy(np.load(tmp_path / "out" / "maps" / "toy" / "MAE" / "attention" / f"case{i}.npy"))
                         for i in range(2)])
    assert saved.shape == (2, 224, 224) and saved.dtype == torch.float32
    masks = torch.zeros(2, 224, 224, dtype=torch.bool)
    masks[0, 30:120, 50:160] = masks[1, 50:120, 50:160] = True
    boxes = torch.tensor([[30, 50, 120, 160], [50, 50, 120, 160]])
    assert table.loc["attention", "MAE"] == pytest.approx(float(topk_box_iou(saved, boxes, (10,)).mean()), abs=1e-4)
    pg = pd.read_csv(tmp_path / "out" / "toy_pointing_game.csv", index_col="method")
    assert pg.loc["attention", "MAE"] == pytest.approx(float(pointing_game(saved, masks).mean()))
