"""``medlens paper-benchmark`` on real brain MRI (class folders + YOLO boxes, or images + masks)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

SIZE = 64
METHODS = ("gradcam", "saliency")
METRICS = ("pointing_game", "iou@5", "iou@10", "iou@20", "iou@40")
RANDOM = "resnet18 (random, seed 0)"


def _box_mask(txt: Path, side: int = SIZE) -> np.ndarray:
    """The YOLO boxes of ``txt`` rasterised at side x side (edges floored/ceiled), computed here with numpy."""
    mask = np.zeros((side, side), bool)
    for line in txt.read_text().split("\n"):
        if line.strip():
            _, xc, yc, w, h = (float(v) for v in line.split())
            x0, y0, x1, y1 = max(xc - w / 2, 0), max(yc - h / 2, 0), min(xc + w / 2, 1), min(yc + h / 2, 1)
            mask[math.floor(y0 * side):math.ceil(y1 * side), math.floor(x0 * side):math.ceil(x1 * side)] = True
    return mask


@pytest.fixture(scope="module")
def bench(tmp_path_factory, request):
    """Two images per class as class folders with YOLO files (links to the real data) plus a
    broken image; the same images flat with their boxes as 128x128 mask PNGs plus one without a
    mask; a weights file of a second resnet18; the CLI run twice with --seed 0."""
    from PIL import Image

    from conftest import shared_path
    from medlens.cli import app
    from medlens.models import build_model

    data = shared_path("brain-tumor-mri")
    root = tmp_path_factory.mktemp("paperbench")
    yolo, flat, masks = root / "yolo", root / "flat", root / "masks"
    flat.mkdir()
    masks.mkdir()
    for cls in ("glioma", "meningioma", "pituitary"):
        (yolo / cls).mkdir(parents=True)
        for image in sorted((data / cls).glob("*.jpg"))[:2]:
            (yolo / cls / image.name).symlink_to(image.resolve())
            (yolo / cls / f"{image.stem}.txt").symlink_to(image.with_suffix(".txt").resolve())
            (flat / f"{cls}_{image.name}").symlink_to(image.resolve())
            big = np.kron(_box_mask(image.with_suffix(".txt")), np.ones((2, 2), bool))  # 128x128: resampled nearest
            Image.fromarray(big.astype(np.uint8) * 255).save(masks / f"{cls}_{image.stem}.png")
    (yolo / "glioma" / "broken.jpg").write_bytes(b"not a jpeg")
    (flat / "unmasked.jpg").symlink_to(sorted((data / "glioma").glob("*.jpg"))[0].resolve())
    torch.manual_seed(5)
    weights = root / "trained.pth"
    torch.save(build_model("torchvision:resnet18", num_classes=3).state_dict(), weights)

    def run(out: Path, *extra: str, source: Path = yolo):
        args = ["paper-benchmark", str(source), "--model", "torchvision:resnet18", "--model", f"torchvision:resnet18={weights}",
                "--init", "random", "-n", "3", "--size", str(SIZE), "--bootstrap", "200", "-o", str(out), *extra]
        for m in METHODS:
            args += ["-m", m]
        return CliRunner().invoke(app, args)

    first, second = run(root / "out1", "--seed", "0", "--examples", "3"), run(root / "out2", "--seed", "0", "--examples", "0")
    return {"root": root, "yolo": yolo, "flat": flat, "masks": masks, "run": run, "results": (first, second)}


def test_tables_have_ci_columns_and_values_in_unit_interval(bench):
    for result in bench["results"]:
        assert result.exit_code == 0, result.output
    out = bench["root"] / "out1"
    table = pd.read_csv(out / "paper_table.csv")
    assert list(zip(table["model"], table["method"])) == [(m, k) for m in (RANDOM, "trained") for k in METHODS]
    assert (table["n"] == 6).all()  # the broken image is skipped, not scored
    for metric in METRICS:
        values = table[[metric, f"{metric}_ci_low", f"{metric}_ci_high"]].to_numpy()
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
        assert (values[:, 1] <= values[:, 0] + 1e-12).all() and (values[:, 0] <= values[:, 2] + 1e-12).all()
    rows = pd.read_csv(out / "rows.csv")
    assert len(rows) == 2 * 2 * 6 and rows[list(METRICS)].stack().between(0, 1).all()
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary.columns) >= {"model", "method", "metric", "mean", "ci_low", "ci_high", "n", "n_nan"}
    markdown = (out / "paper_table.md").read_text()
    assert "| model | method | n | pointing game | IoU@5% | IoU@10% | IoU@20% | IoU@40% |" in markdown
    bad = pd.read_csv(out / "bad_files.csv")
    assert list(bad["path"]) == [str(bench["yolo"] / "glioma" / "broken.jpg")]
    assert "broken.jpg" in bench["results"][0].output  # reported on the console too


def test_same_seed_gives_identical_tables_and_another_seed_differs(bench):
    one, two = bench["root"] / "out1", bench["root"] / "out2"
    for name in ("paper_table.csv", "summary.csv", "rows.csv", "paper_table.md"):  # out2 ran without the figure
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    result = bench["run"](bench["root"] / "seed1", "--seed", "1", "--limit", "3", "--examples", "0")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(bench["root"] / "seed1" / "rows.csv")
    assert sorted(rows.loc[rows["method"] == "gradcam"].groupby("model")["label"].apply(sorted).iloc[0]) == ["glioma", "meningioma", "pituitary"]
    assert set(rows["model"]) == {"resnet18 (random, seed 1)", "trained"}
    seed0 = pd.read_csv(one / "rows.csv").set_index(["model", "method", "image"])
    random0 = seed0.loc[RANDOM].reindex(rows.loc[rows["model"].str.startswith("resnet18")].set_index(["method", "image"]).index)
    random1 = rows.loc[rows["model"].str.startswith("resnet18")].set_index(["method", "image"])
    assert not np.allclose(random0[list(METRICS)].to_numpy(), random1[list(METRICS)].to_numpy())  # another random network


def test_pointing_game_and_iou_match_the_api(bench):
    """Pointing game and IoU@10 of saliency recomputed through medlens.explain, with numpy boxes."""
    import medlens
    from medlens.data.prepare import Preprocessing, prepare_loaded
    from medlens.io import read_image
    from medlens.metrics import pointing_game
    from medlens.models import build_model

    images = [p for cls in ("glioma", "meningioma", "pituitary") for p in sorted((bench["yolo"] / cls).glob("*.jpg")) if p.name != "broken.jpg"]
    pre = Preprocessing(channels=3, size=(SIZE, SIZE))
    x = torch.stack([prepare_loaded(read_image(p), pre, p).tensor for p in images])
    masks = np.stack([_box_mask(p.with_suffix(".txt")) for p in images])
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", num_classes=3).eval()
    maps = medlens.explain(model, x, "saliency", target="pred").maps[:, 0]
    expected_pg = float(pointing_game(maps, torch.from_numpy(masks)).mean())
    table = pd.read_csv(bench["root"] / "out1" / "paper_table.csv").set_index(["model", "method"])
    assert table.loc[(RANDOM, "saliency"), "pointing_game"] == pytest.approx(expected_pg, abs=1e-6)
    ious = []
    for heat, mask in zip(maps.numpy(), masks):
        kth = np.sort(heat.ravel())[::-1][math.ceil(0.10 * heat.size) - 1]
        ys, xs = np.nonzero(heat >= kth)
        my, mx = np.nonzero(mask)
        inter = max(0, min(ys.max(), my.max()) + 1 - max(ys.min(), my.min())) * max(0, min(xs.max(), mx.max()) + 1 - max(xs.min(), mx.min()))
        union = (np.ptp(ys) + 1) * (np.ptp(xs) + 1) + (np.ptp(my) + 1) * (np.ptp(mx) + 1) - inter
        ious.append(inter / union)
    rows = pd.read_csv(bench["root"] / "out1" / "rows.csv")
    got = rows.loc[(rows["model"] == RANDOM) & (rows["method"] == "saliency"), "iou@10"].to_numpy()
    np.testing.assert_allclose(got, ious, atol=1e-6)


def test_mask_folder_gives_the_same_numbers_as_yolo(bench):
    out = bench["root"] / "masks_out"
    result = bench["run"](out, "--seed", "0", "--examples", "0", "--masks", str(bench["masks"]), source=bench["flat"])
    assert result.exit_code == 0, result.output
    yolo = pd.read_csv(bench["root"] / "out1" / "rows.csv")
    yolo["image"] = yolo["image"].str.replace("/", "_")
    from_masks = pd.read_csv(out / "rows.csv")
    merged = yolo.merge(from_masks, on=["model", "method", "image"], suffixes=("_yolo", "_mask"))
    assert len(merged) == len(yolo) == len(from_masks) == 24
    for metric in METRICS:
        np.testing.assert_array_equal(merged[f"{metric}_yolo"], merged[f"{metric}_mask"])
    a, b = pd.read_csv(bench["root"] / "out1" / "summary.csv"), pd.read_csv(out / "summary.csv")
    np.testing.assert_allclose(a[["mean", "ci_low", "ci_high"]], b[["mean", "ci_low", "ci_high"]], atol=1e-12)
    assert list(pd.read_csv(out / "bad_files.csv")["path"]) == [str(bench["flat"] / "unmasked.jpg")]


def test_figure_and_html_written(bench):
    from PIL import Image

    out = bench["root"] / "out1"
    figures = sorted(out.glob("figure_*.png"))
    assert [f.name for f in figures] == ["figure_resnet18_random_seed_0.png", "figure_trained.png"]
    # method_grid's layout: 3 example rows x (image + 2 methods) columns + colourbar: about square,
    # each cell at least 150 px
    width, height = Image.open(figures[0]).size
    assert width >= 4 * 150 and height >= 3 * 150 and 0.7 < height / width < 1.1
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "IoU@40%" in page and "pointing game" in page
    assert page.count("<tr>") == 1 + 4 and RANDOM in page


def test_argument_errors_exit_2_before_reading(bench, tmp_path):
    from medlens.cli import app

    yolo = str(bench["yolo"])
    base = ["paper-benchmark", yolo, "-o", str(tmp_path / "never"), "-n", "3"]
    cases = {
        "--limit": [*base, "--model", "torchvision:resnet18", "--init", "random", "--limit", "0"],
        "--method": [*base, "--model", "torchvision:resnet18", "--init", "random", "-m", "gradcamm"],
        "--model": [*base, "--model", "torchvision:resnet18"],
        "--size": [*base, "--model", "torchvision:resnet18", "--init", "random", "--size", "0"],
        "--init": [*base, "--model", "torchvision:resnet18", "--init", "pretrained"],
        "--normalize": [*base, "--model", "torchvision:resnet18", "--init", "random", "--normalize", "minmax"],
        "--masks": [*base, "--model", "torchvision:resnet18", "--init", "random", "--masks", str(tmp_path / "nope")],
    }
    for flag, args in cases.items():
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (flag, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and flag in lines[0], (flag, result.output)
    assert not (tmp_path / "never").exists()
    again = bench["run"](bench["root"] / "out1", "--seed", "0", "--examples", "0")  # refuses to overwrite an earlier benchmark
    assert again.exit_code == 2 and "--overwrite" in again.output
