"""Quantus' catalogue on medlens maps: each metric against Quantus on the same real MRI images,
model, maps and perturbation choices; 3D runs on a small phantom volume network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import medlens
from medlens.metrics import faithfulness_extra as fx

from conftest import shared_path

SIZE = 32


@pytest.fixture(scope="module")
def grey_resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model.eval()


@pytest.fixture(scope="module")
def mri():
    """Three real brain MRI slices (one per class), greyscale, resized to SIZE x SIZE."""
    from PIL import Image

    root = shared_path("brain-tumor-mri")
    out = []
    for cls in ("glioma", "meningioma", "pituitary"):
        path = sorted((root / cls).glob("*.jpg"))[0]
        img = torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)
        out.append(torch.nn.functional.interpolate(img[None, None], size=(SIZE, SIZE), mode="bilinear",
                                                   align_corners=False)[0])
    return torch.stack(out)


@pytest.fixture(scope="module")
def maps(mri):
    """A smooth map without ties (every library orders the pixels the same way)."""
    gen = torch.Generator().manual_seed(3)
    return torch.nn.functional.avg_pool2d(mri, 5, 1, 2)[:, 0] + 1e-4 * torch.rand(mri.shape[0], SIZE, SIZE, generator=gen)


@pytest.fixture(scope="module")
def targets(grey_resnet, mri):
    with torch.no_grad():
        return grey_resnet(mri).argmax(1)


def quantus_call(metric, model, x, y, a, **kw):
    return np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a[:, None].numpy(),
                             device="cpu", **kw), dtype=np.float64)


def test_faithfulness_correlation_equals_quantus(grey_resnet, mri, maps, targets):
    quantus = pytest.importorskip("quantus")
    runs, k, n = 12, 40, SIZE * SIZE
    np.random.seed(7)  # Quantus draws, run by run, one np.random.choice per image
    draws = np.stack([np.stack([np.random.choice(n, k, replace=False) for _ in range(3)]) for _ in range(runs)], 1)
    ours = fx.faithfulness_correlation(grey_resnet, mri, maps, targets, subsets=torch.from_numpy(draws), baseline=0.0)
    metric = quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=k, perturb_baseline=0.0, normalise=False,
                                             abs=False, return_aggregate=False, disable_warnings=True)
    np.random.seed(7)
    theirs = quantus_call(metric, grey_resnet, mri, targets, maps)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-4)
    seeded = fx.faithfulness_correlation(grey_resnet, mri, maps, targets, n_runs=runs, subset_size=k, seed=1)
    assert seeded.shape == (3,) and torch.isfinite(seeded).all()


def test_faithfulness_estimate_equals_quantus(grey_resnet, mri, maps, targets):
    quantus = pytest.importorskip("quantus")
    step = 64
    ours = fx.faithfulness_estimate(grey_resnet, mri, maps, targets, features_in_step=step, baseline="min")
    metric = quantus.FaithfulnessEstimate(features_in_step=step, perturb_baseline="black", normalise=False,
                                          abs=False, disable_warnings=True)
    np.testing.assert_allclose(ours.numpy(), quantus_call(metric, grey_resnet, mri, targets, maps), atol=1e-4)


def test_monotonicity_nguyen_equals_quantus(grey_resnet, mri, maps, targets):
    quantus = pytest.importorskip("quantus")
    step = 64
    ours = fx.monotonicity_nguyen(grey_resnet, mri, maps, targets, features_in_step=step, baseline=0.0)
    metric = quantus.MonotonicityCorrelation(features_in_step=step, nr_samples=1, perturb_baseline=0.0,
                                             normalise=False, abs=False, disable_warnings=True)
    np.testing.assert_allclose(ours.numpy(), quantus_call(metric, grey_resnet, mri, targets, maps), atol=1e-4)


def test_monotonicity_arya_reveals_the_input(grey_resnet, mri, maps, targets):
    step = 128
    mono, curve = fx.monotonicity_arya(grey_resnet, mri, maps, targets, features_in_step=step, baseline=0.0,
                                       return_curve=True)
    # reference loop: reveal least relevant first into a black image
    order = maps.flatten(1).argsort(dim=1, stable=True)
    for i in range(3):
        canvas = torch.zeros(SIZE * SIZE)
        ref = []
        for s in range(0, SIZE * SIZE, step):
            idx = order[i, s : s + step]
            canvas[idx] = mri[i, 0].flatten()[idx]
            with torch.no_grad():
                ref.append(grey_resnet(canvas.view(1, 1, SIZE, SIZE)).softmax(1)[0, targets[i]])
        torch.testing.assert_close(curve[i], torch.stack(ref), atol=1e-5, rtol=0)
        assert mono[i] == float(bool((torch.stack(ref).diff() >= 0).all()))
    torch.testing.assert_close(curve[:, -1], grey_resnet(mri).softmax(1).detach()[torch.arange(3), targets], atol=1e-5, rtol=0)


def test_rank_helpers_match_scipy():
    from scipy.stats import pearsonr, spearmanr

    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 30, generator=gen, dtype=torch.float64), torch.rand(4, 30, generator=gen, dtype=torch.float64)
    a[:, :5] = 0.5  # ties
    for i in range(4):
        assert abs(float(fx.pearson_rows(a, b)[i]) - pearsonr(a[i], b[i])[0]) < 1e-10
        assert abs(float(fx.spearman_rows(a, b)[i]) - spearmanr(a[i], b[i])[0]) < 1e-10
