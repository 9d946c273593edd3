"""``medlens serve`` in a real browser: Playwright (sync API) drives headless Debian chromium
against a real uvicorn server on loopback, with real scans and a tiny real model."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_path

CHROMIUM = os.environ.get("MEDLENS_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).exists():
    pytest.skip(f"chromium not found at {CHROMIUM} (install Debian's chromium or set MEDLENS_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

from PIL import Image  # noqa: E402

from medlens.serve import create_app, served_model  # noqa: E402
from medlens.serve.background import background_server  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    data = tmp_path_factory.mktemp("browser") / "data"
    (data / "hippocampus").mkdir(parents=True)
    shutil.copy(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz"), data / "hippocampus" / "hippocampus_001.nii.gz")
    shutil.copy(shared_path("hippocampus", "labelsTr", "hippocampus_001.nii.gz"), data / "hippocampus" / "hippocampus_001_label.nii.gz")
    torch.manual_seed(0)
    models = [
        served_model("medlens.models:phantom_net", dims=2, size=(128, 128), name="phantom-2d", class_names=["normal", "finding"]),
        served_model("medlens.models:phantom_net", dims=3, name="phantom-3d", class_names=["background", "hippocampus"]),
    ]
    with background_server(create_app(models, data_dir=data)) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    try:
        with sync_api.sync_playwright() as p:
            instance = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            yield instance
            instance.close()
    except sync_api.Error as error:  # chromium present but unable to start here
        pytest.skip(f"chromium could not be started: {str(error).splitlines()[0]}")


@pytest.fixture
def page(browser, url):
    # bypass_csp: Playwright evaluates its wait predicates with eval, which the page's CSP forbids
    page = browser.new_page(viewport={"width": 1400, "height": 820}, bypass_csp=True)
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#method option').length > 3")
    yield page
    page.close()


def act(page, action) -> None:
    """Run ``action`` and wait until the page has drawn its result (or failed with a message)."""
    before = int(page.evaluate("window.medlens.renders"))
    action()
    page.wait_for_function(
        f"(window.medlens.renders > {before} && document.body.dataset.busy === '0') || document.querySelector('#status.error')",
        timeout=60_000,
    )
    assert not page.locator("#status.error").count(), page.locator("#status").inner_text()


def pixels(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(np.int16)


def test_dicom_upload_then_switching_method_changes_the_overlay(page):
    act(page, lambda: page.set_input_files("#upload", str(shared_path("chest-xray-dicom", "test1.dcm"))))
    assert "1024 × 1024" in page.locator("#image-info").inner_text()
    page.select_option("#method", "gradcam")
    act(page, lambda: page.click("#explain"))
    assert page.locator(".panel").count() == 1
    assert "%" in page.locator(".pred-prob").inner_text() and page.locator(".pred-name").inner_text() in ("normal", "finding")
    canvas = page.locator("canvas.view-canvas").first
    gradcam = pixels(canvas)
    page.select_option("#method", "saliency")
    act(page, lambda: page.click("#explain"))
    saliency = pixels(page.locator("canvas.view-canvas").first)
    h, w = min(gradcam.shape[0], saliency.shape[0]), min(gradcam.shape[1], saliency.shape[1])
    gradcam, saliency = gradcam[:h, :w], saliency[:h, :w]
    assert np.abs(gradcam - saliency).mean() > 2, "the overlay did not change with the method"
    # opacity 0 shows the bare scan: the overlay is really drawn over it
    page.uncheck("#show-boxes")
    page.evaluate("document.getElementById('opacity').value = 0; document.getElementById('opacity').dispatchEvent(new Event('input'))")
    bare = pixels(page.locator("canvas.view-canvas").first)[:h, :w][4:-4, 4:-4]
    assert np.abs(bare - saliency[4:-4, 4:-4]).mean() > 2
    assert np.abs(bare[..., 0] - bare[..., 2]).max() <= 2  # greyscale once the map is hidden


def test_volume_scrolls_with_wheel_and_arrow_keys(page):
    page.select_option("#data-file", "hippocampus/hippocampus_001.nii.gz")
    act(page, lambda: page.click("#open-data"))
    assert page.locator("#model").input_value() == "phantom-3d"  # the model that takes volumes is chosen
    act(page, lambda: page.click("#explain"))
    assert page.locator("canvas.view-canvas").count() == 3
    axial = page.locator("canvas.view-canvas[data-axis='0']").first
    label = page.locator("#slice-0")
    start_text, start = label.inner_text(), pixels(axial)
    axial.hover()
    for _ in range(4):
        page.mouse.wheel(0, 120)
    page.wait_for_function(f"document.getElementById('slice-0').textContent !== {start_text!r}")
    scrolled_text, scrolled = label.inner_text(), pixels(axial)
    assert int(scrolled_text.split()[1].split("/")[0]) == int(start_text.split()[1].split("/")[0]) + 4
    assert np.abs(scrolled - start).mean() > 1, "scrolling did not change the slice shown"
    coronal_before = page.locator("#slice-1").inner_text()
    page.locator("canvas.view-canvas[data-axis='1']").first.hover()
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    after = page.locator("#slice-1").inner_text()
    assert int(after.split()[1].split("/")[0]) == int(coronal_before.split()[1].split("/")[0]) - 2
    assert page.locator("#slice-0").inner_text() == scrolled_text  # the other views keep their slice


def test_two_methods_side_by_side(page, tmp_path):
    page.select_option("#data-file", "hippocampus/hippocampus_001.nii.gz")
    act(page, lambda: page.click("#open-data"))
    page.select_option("#method", "gradcam")
    page.select_option("#method2", "saliency")
    page.locator("details summary").click()
    page.select_option("#mask-file", "hippocampus/hippocampus_001_label.nii.gz")
    act(page, lambda: page.click("#explain"))
    panels = page.locator(".panel")
    assert panels.count() == 2
    assert [panels.nth(i).get_attribute("data-method") for i in range(2)] == ["gradcam", "saliency"]
    first = pixels(panels.nth(0).locator("canvas[data-axis='0']"))
    second = pixels(panels.nth(1).locator("canvas[data-axis='0']"))
    h, w = min(first.shape[0], second.shape[0]), min(first.shape[1], second.shape[1])  # sub-pixel layout
    assert np.abs(first[:h, :w] - second[:h, :w]).mean() > 2
    assert panels.nth(0).locator("table.metrics td").count() >= 4  # scores against the mask
    assert panels.nth(0).locator(".downloads a").count() == 3  # NPY, PNG, NIfTI
    target = os.environ.get("MEDLENS_VIEWER_PNG")
    if target:
        save_screenshot(page, Path(target))


def save_screenshot(page, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0); const t = document.getElementById('threshold'); t.value = 0.2; t.dispatchEvent(new Event('input'))")
    image = Image.open(io.BytesIO(page.screenshot(full_page=False))).convert("RGB")
    image.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)


def test_page_works_under_its_csp_with_a_token(browser, tmp_path):
    """No CSP bypass here: the page runs with its own Content-Security-Policy and sends the
    bearer token from the URL fragment; waits use selectors only (no eval)."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz"), data / "volume.nii.gz")
    model = served_model("medlens.models:phantom_net", dims=3, name="phantom-3d")
    with background_server(create_app(model, data_dir=data, token="tok")) as base:
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(base + "/#token=tok")
        page.wait_for_selector("#data-file option[value='volume.nii.gz']", state="attached")
        page.select_option("#data-file", "volume.nii.gz")
        page.click("#open-data")
        page.wait_for_selector("canvas.view-canvas[data-axis='2']")
        page.click("#explain")
        page.wait_for_selector(".panel[data-method='gradcam'] .pred-prob", timeout=60_000)
        assert "%" in page.locator(".pred-prob").inner_text()
        assert not errors, errors
        page.close()
