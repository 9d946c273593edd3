"""The rest of Quantus' catalogue on medlens maps: each metric against Quantus 0.6 on the same real
brain MRI slices (64 x 64), the same seeded ResNet-18, maps and perturbations (shared noise, shared
seeds); 3D on a small volume network; the runner through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medlens
from medlens.metrics import axiomatic, mprt, stability
from medlens.metrics import faithfulness_more as fm
from medlens.metrics import mosaics as fo
from medlens.metrics.complexity import method_explainer

from conftest import QuantusReplay as Replay, grey_mri_slices, predicted_classes, shared_path, smooth_tie_free_maps

SIZE = 64
quantus = pytest.importorskip("quantus")
COMMON = dict(normalise=False, abs=False, disable_warnings=True)


@pytest.fixture(scope="module")
def mri():
    """Six real brain MRI slices (two per class), greyscale, SIZE x SIZE, and their classes."""
    return grey_mri_slices(2, SIZE)


@pytest.fixture(scope="module")
def x(mri):
    return mri[0][[0, 4]].contiguous()  # a glioma and a pituitary slice


@pytest.fixture(scope="module")
def maps(x):
    return smooth_tie_free_maps(x)


@pytest.fixture(scope="module")
def targets(grey_resnet, x):
    return predicted_classes(grey_resnet, x)


def raw_saliency(model, x, targets):
    """|d f_t / d x| (medlens saliency, unnormalised): captum's Saliency, Quantus' "Saliency"."""
    return medlens.explain(model, x, "saliency", target=targets.view(-1, 1)).raw[:, 0]


def quantus_explainer(fn):
    """A Quantus explain_func over ``fn(model, x, targets)``."""
    def explain(model, inputs, targets, **kwargs):
        xt = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        return fn(model, xt, torch.as_tensor(np.asarray(targets)).long())[:, None].detach().numpy()
    return explain


def run(metric, model, x, y, a=None, **kw):
    return np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(),
                             a_batch=None if a is None else a[:, None].numpy(), device="cpu", **kw), dtype=np.float64)


def test_infidelity_equals_quantus(grey_resnet, x, maps, targets):
    ours = fm.infidelity(grey_resnet, x, maps, targets, patch_sizes=(16, 32), baseline="min")
    metric = quantus.Infidelity(perturb_patch_sizes=[16, 32], n_perturb_samples=1, perturb_baseline="black", **COMMON)
    theirs = run(metric, grey_resnet, x, targets, maps)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-4)
    odd = fm.infidelity(grey_resnet, x[:1, :, :60, :60], maps[:1, :60, :60], targets[:1], patch_sizes=(32,))
    assert odd.shape == (1,) and torch.isfinite(odd).all()  # partial border patches (Quantus cannot)


def test_irof_equals_quantus_per_image(grey_resnet, x, maps, targets, monkeypatch):
    import functools

    import quantus.helpers.utils as qutils

    x, maps, targets = x[:2], maps[:2], targets[:2]
    segments = fm.slic_segments(x, n_segments=12)
    ours, curve = fm.irof(grey_resnet, x, maps, targets, segments=segments, baseline="min", return_curve=True)
    # the oracle's environment: Quantus' calculate_auc calls np.trapz (gone in NumPy 2), and its SLIC has no
    # n_segments option (default 100 superpixels, 100 single-image forwards each): both set here
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    monkeypatch.setattr(qutils, "slic", functools.partial(qutils.slic, n_segments=12))
    metric = quantus.IROF(perturb_baseline="black", return_aggregate=False, **COMMON)
    theirs = run(metric, grey_resnet, x, targets, maps, softmax=True, batch_size=1)  # one image per batch: no padding
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-4)
    k = [len(torch.unique(s)) for s in segments]
    assert all(torch.isfinite(curve[i, : k[i]]).all() and torch.isnan(curve[i, k[i]:]).all() for i in range(2))


def test_sufficiency_and_consistency_equal_quantus(grey_resnet, mri):
    images, _ = mri
    with torch.no_grad():
        preds = grey_resnet(images).argmax(1)
    a = raw_saliency(grey_resnet, images, preds)
    a = torch.nn.functional.avg_pool2d(a[:, None], 8)  # blocky maps: some close pairs
    a = torch.nn.functional.interpolate(a, scale_factor=8, mode="nearest")[:, 0]
    for threshold in (0.3, 0.6, 0.9):
        metric = quantus.Sufficiency(threshold=threshold, **COMMON)
        theirs = run(metric, grey_resnet, images, preds, a)
        np.testing.assert_allclose(fm.sufficiency(a, preds, threshold).numpy(), theirs, atol=1e-6)
    signed = a - a.flatten(1).median(dim=1).values[:, None, None]
    signed[[0, 1, 3], 0, :5] = torch.tensor([1.0, -1, 1, 1, -1])  # three maps share their first five signs
    metric = quantus.Consistency(**COMMON)
    theirs = run(metric, grey_resnet, images, preds, signed)
    ours = stability.consistency(signed, preds)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-6)
    assert ours[2] == 0 or (stability.discretise(signed)[2] == stability.discretise(signed)).all(1).sum() > 1


def test_continuity_equals_quantus(grey_resnet, x, targets):
    fn = lambda xx, tt: raw_saliency(grey_resnet, xx, tt)  # noqa: E731
    ours = stability.continuity(fn, x, targets, n_steps=6, baseline="min")
    metric = quantus.Continuity(nr_steps=6, **COMMON)
    theirs = run(metric, grey_resnet, x, targets, explain_func=quantus_explainer(raw_saliency))
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-4)
    moved, shifts = stability.translations(x, 6)
    assert int(shifts[0]) == -SIZE + (2 * SIZE + 1) // 6
    torch.testing.assert_close(moved[:, 0, :, :, : SIZE + int(shifts[0])], x[:, :, :, -int(shifts[0]):])


def test_relative_representation_stability_equals_quantus(grey_resnet, x, targets):
    fn = lambda xx, tt: raw_saliency(grey_resnet, xx, tt)  # noqa: E731
    gen = torch.Generator().manual_seed(4)
    noise = (torch.rand(3, *x.shape, generator=gen) * 2 - 1) * 0.05
    ours = stability.relative_representation_stability(fn, grey_resnet, x, targets, ["layer4.1"], noise=noise,
                                                       nan_when_changed=False)
    metric = quantus.RelativeRepresentationStability(nr_samples=3, layer_names=["layer4.1"], perturb_func=Replay(noise),
                                                     return_nan_when_prediction_changes=False, **COMMON)
    theirs = run(metric, grey_resnet, x, targets, fn(x, targets), explain_func=quantus_explainer(raw_saliency))
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-4)


def test_smooth_mprt_equals_quantus_under_shared_draws(grey_resnet, x, targets):
    n = 2
    np.random.seed(11)  # Quantus draws np.random.randn per noisy copy: reference, original check, then the last layer
    draws = torch.from_numpy(np.random.randn(3, n - 1, *x.shape))
    ours = mprt.smooth_mprt(raw_saliency, grey_resnet, x, targets, n_samples=n, noise=draws, seed=42, last_only=True)
    metric = quantus.SmoothMPRT(nr_samples=n, seed=42, layer_order="bottom_up", skip_layers=True, disable_warnings=True)
    np.random.seed(11)
    scores = metric(model=grey_resnet, x_batch=x.numpy(), y_batch=targets.numpy(), a_batch=None, device="cpu",
                    explain_func=quantus.explain, explain_func_kwargs={"method": "Saliency"})
    assert list(scores) == ["original", *ours.layers] == ["original", "fc"]
    theirs = np.array([scores[k] for k in scores])
    np.testing.assert_allclose(torch.cat([ours.original[None], ours.similarity]).numpy(), theirs, atol=1e-4)
    np.testing.assert_allclose(ours.average.numpy(), theirs.mean(axis=0), atol=1e-4)  # Quantus' average keeps "original"
    assert float(ours.last.mean()) < float(ours.original.mean())  # randomising the model changes saliency


def test_efficient_mprt_equals_quantus(grey_resnet, x, targets):
    ours = mprt.efficient_mprt(raw_saliency, grey_resnet, x, targets, seed=42)
    metric = quantus.EfficientMPRT(seed=42, disable_warnings=True)
    theirs = run(metric, grey_resnet, x, targets, explain_func=quantus_explainer(raw_saliency))
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-4)
    from scipy.stats import entropy

    vals = np.random.default_rng(0).normal(size=(2, 500))
    ref = [entropy(np.histogram(v, bins=100)[0]) for v in vals]
    np.testing.assert_allclose(mprt.discrete_entropy(torch.from_numpy(vals)).numpy(), ref, atol=1e-12)


def test_focus_on_brain_mri_mosaics_equals_quantus(grey_resnet, mri):
    images, labels = mri
    mos = fo.make_mosaics(images, labels, n_mosaics=4, seed=2)
    assert mos.images.shape == (4, 1, 2 * SIZE, 2 * SIZE) and (mos.quadrants.sum(1) == 2).all()
    for m in range(4):  # each tile is the image it names, and target tiles hold the target class
        tiles = [mos.images[m, :, :SIZE, :SIZE], mos.images[m, :, :SIZE, SIZE:], mos.images[m, :, SIZE:, :SIZE],
                 mos.images[m, :, SIZE:, SIZE:]]
        for k, tile in enumerate(tiles):
            torch.testing.assert_close(tile, images[mos.sources[m, k]])
        assert ((labels[mos.sources[m]] == mos.targets[m]) == mos.quadrants[m]).all()
    a = medlens.explain(grey_resnet, mos.images, "gradcam", target=mos.targets.view(-1, 1), layer="layer3").maps[:, 0]
    metric = quantus.Focus(**COMMON)
    theirs = run(metric, grey_resnet, mos.images, mos.targets, a, custom_batch=mos.quadrants.int().tolist())
    np.testing.assert_allclose(fo.focus(a, mos.quadrants).numpy(), theirs, atol=1e-6)
    half = fo.make_mosaics(images, labels, n_mosaics=2, seed=2, downsample=True)
    assert half.images.shape == (2, 1, SIZE, SIZE)


def test_input_invariance_equals_quantus_bias_shift(x, targets):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=True)  # Quantus shifts the first layer's bias
    model.eval()
    ixg = lambda m, xx, tt: medlens.explain(m, xx, "input-x-gradient", target=tt.view(-1, 1)).raw[:, 0]  # noqa: E731
    for fn in (raw_saliency, ixg):
        ours, diff = axiomatic.input_invariance(fn, model, x, targets, shift=-1.0, mode="bias", return_diff=True)
        metric = quantus.InputInvariance(input_shift=-1, **COMMON)
        theirs = run(metric, model, x, targets, fn(model, x, targets), explain_func=quantus_explainer(fn))
        np.testing.assert_array_equal(ours.numpy(), theirs.astype(float))
    # exact compensation (Kindermans et al.): gradients are invariant, input x gradient is not
    assert (axiomatic.input_invariance(raw_saliency, model, x, targets) == 1).all()
    assert (axiomatic.input_invariance(ixg, model, x, targets) == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(axiomatic.shifted_model(model, -1.0, x)(x - 1.0), model(x), atol=1e-4, rtol=1e-4)


def test_bad_inputs_say_what_is_wrong(grey_resnet, x, maps, targets):
    from medlens.errors import MedlensError

    with pytest.raises(MedlensError, match="segments"):
        fm.irof(grey_resnet, x, maps, targets, segments=torch.zeros(3, 8, 8, dtype=torch.long))
    with pytest.raises(MedlensError, match="at least two"):
        fm.sufficiency(maps[:1], targets[:1])
    with pytest.raises(MedlensError, match="first layer with a bias"):
        axiomatic.input_invariance(raw_saliency, grey_resnet, x, targets, mode="bias")
    with pytest.raises(MedlensError, match="two images"):
        fo.make_mosaics(x, torch.tensor([0, 1]))
    with pytest.raises(MedlensError, match="noise has shape"):
        mprt.smooth_mprt(raw_saliency, grey_resnet, x, targets, n_samples=2, noise=torch.zeros(1, 1, 1), last_only=True)


# ---------------------------------------------------------------- 3D and the runner


def test_every_new_metric_runs_in_3d():
    from medlens.models import build_model
    from medlens.workflows.catalogue import CATALOGUE_MORE, catalogue_columns

    torch.manual_seed(0)
    model = build_model("medlens.models:phantom_net", num_classes=2, in_channels=1, spatial_dims=3).eval()
    gen = torch.Generator().manual_seed(0)
    vol = torch.rand(4, 1, 12, 12, 12, generator=gen)
    expl = medlens.explain(model, vol, "saliency")
    targets = torch.tensor([0, 1, 0, 1])  # two classes, so the Focus mosaics exist
    cols = catalogue_columns(["catalogue_more"], model, vol, expl.maps[:, 0], expl.raw, targets, None, "saliency",
                             steps=8, batch_size=16)
    assert set(cols) == set(CATALOGUE_MORE)
    for name, values in cols.items():
        assert values.shape == (4,), name
        if name != "relative_representation_stability":  # NaN where every noisy copy changed class
            assert torch.isfinite(values).all(), name
    assert ((cols["focus"] >= 0) & (cols["focus"] <= 1)).all()
    mos = fo.make_mosaics(vol, targets, seed=0)
    assert mos.images.shape == (4, 1, 12, 24, 24)
    assert fo.focus(medlens.explain(model, mos.images, "saliency", target=mos.targets.view(-1, 1)).maps[:, 0],
                    mos.quadrants).shape == (4,)


def test_new_metrics_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from medlens.cli import app

    root = shared_path("brain-tumor-mri")
    out = tmp_path / "eval"
    names = ["focus", "sufficiency", "irof", "efficient_mprt", "input_invariance"]
    args = ["evaluate", "medlens.models:phantom_net", str(root), "--in-channels", "1", "-n", "3", "--size", "32", "--limit", "6",
            "-m", "saliency", "--batch-size", "6", "--bootstrap", "50", "-o", str(out)]
    for name in names:
        args += ["--metric", name]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    import pandas as pd

    summary = pd.read_csv(out / "summary.csv").set_index("metric")
    assert set(names) <= set(summary.index)
    for name in names:
        row = summary.loc[name]
        assert {"mean", "ci_low", "ci_high", "n"} <= set(row.index)
        if row["n"] > 0:
            assert row["ci_low"] <= row["mean"] <= row["ci_high"], name
    assert summary.loc["irof", "n"] == 6
