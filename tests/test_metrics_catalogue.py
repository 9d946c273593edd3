"""Quantus' catalogue on medlens maps: each metric against Quantus on the same real MRI images,
model, maps and perturbation choices; 3D runs on a small phantom volume network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medlens
from medlens.metrics import faithfulness_extra as fx

from conftest import QuantusReplay as _Replay, grey_mri_slices, predicted_classes, smooth_tie_free_maps

SIZE = 32


@pytest.fixture(scope="module")
def mri():
    """Three real brain MRI slices (one per class), greyscale, resized to SIZE x SIZE."""
    return grey_mri_slices(1, SIZE)[0]


@pytest.fixture(scope="module")
def maps(mri):
    return smooth_tie_free_maps(mri)


@pytest.fixture(scope="module")
def targets(grey_resnet, mri):
    return predicted_classes(grey_resnet, mri)


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


# ---------------------------------------------------------------- map-only, axiomatic, randomisation, robustness

from medlens.metrics import axiomatic, map_metrics, randomisation, robustness  # noqa: E402
from medlens.metrics.complexity import method_explainer  # noqa: E402


@pytest.fixture(scope="module")
def masks():
    m = torch.zeros(3, SIZE, SIZE, dtype=torch.bool)
    m[0, 4:20, 6:18] = True
    m[1, 10:30, 0:12] = True
    m[2, 0:8, 0:32] = True
    return m


def test_map_metrics_equal_quantus(maps, masks, mri):
    quantus = pytest.importorskip("quantus")
    signed = maps - 0.3  # some negative relevance
    common = dict(normalise=False, abs=False, disable_warnings=True)
    kw = dict(model=None, x_batch=mri.numpy(), y_batch=np.zeros(3, dtype=int), a_batch=signed[:, None].numpy(),
              s_batch=masks[:, None].numpy().astype(float))
    q = quantus.EffectiveComplexity(eps=0.05, **common)(**{k: v for k, v in kw.items() if k != "s_batch"})
    np.testing.assert_array_equal(map_metrics.effective_complexity(signed, eps=0.05, absolute=False).numpy(), q)
    for k in (10, 100):
        q = quantus.TopKIntersection(k=k, **common)(**kw)
        np.testing.assert_allclose(map_metrics.top_k_intersection(signed, masks, k=k).numpy(), q, atol=1e-6)
    for weighted in (False, True):
        for positive in (False, True):
            q = quantus.AttributionLocalisation(weighted=weighted, positive_attributions=positive, **common)(**kw)
            ours = map_metrics.attribution_localisation(signed, masks, weighted=weighted, positive=positive)
            np.testing.assert_allclose(ours.numpy(), q, atol=1e-5)
    assert torch.isnan(map_metrics.top_k_intersection(maps[:1], torch.zeros(1, SIZE, SIZE), k=5)).all()


def test_completeness_gap_of_integrated_gradients(grey_resnet, mri, targets):
    expl = medlens.explain(grey_resnet, mri, "integrated-gradients", target=targets.view(-1, 1))
    raw = expl.raw[:, 0] if expl.raw.dim() == mri.dim() else expl.raw
    gap = axiomatic.completeness(grey_resnet, mri, raw.sum(1) if raw.dim() == mri.dim() else raw, targets, baseline=0.0)
    with torch.no_grad():
        delta = grey_resnet(mri).gather(1, targets[:, None])[:, 0] - grey_resnet(torch.zeros_like(mri)).gather(1, targets[:, None])[:, 0]
    assert gap.shape == (3,) and torch.isfinite(gap).all()
    assert (gap < 0.05 * delta.abs().clamp_min(1)).all()  # IG is complete up to its Riemann error


def test_non_sensitivity_equals_quantus(grey_resnet, mri, maps, targets):
    quantus = pytest.importorskip("quantus")
    small = torch.nn.functional.avg_pool2d(mri, 4)  # 8 x 8: one forward per pixel in Quantus
    a = torch.nn.functional.avg_pool2d(maps[:, None], 4)[:, 0]
    a = torch.where(a < a.median(), torch.zeros_like(a), a)  # half the pixels unattributed
    ours = axiomatic.non_sensitivity(grey_resnet, small, a, targets, eps=1e-3, baseline=0.0)
    metric = quantus.NonSensitivity(eps=1e-3, features_in_step=1, perturb_baseline=0.0, normalise=False, abs=False,
                                    disable_warnings=True)
    np.testing.assert_array_equal(ours.numpy(), quantus_call(metric, grey_resnet, small, targets, a))


def _explainer(model):
    fn = method_explainer(model, "saliency")

    def quantus_explain(model, inputs, targets, **kwargs):
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        return fn(x, torch.as_tensor(np.asarray(targets)).long())[:, None].detach().numpy()

    return fn, quantus_explain


def test_random_logit_equals_quantus(grey_resnet, mri, targets):
    quantus = pytest.importorskip("quantus")
    fn, qfn = _explainer(grey_resnet)
    metric = quantus.RandomLogit(num_classes=3, seed=5, similarity_func=quantus.similarity_func.correlation_pearson,
                                 normalise=False, abs=False, disable_warnings=True)
    a = fn(mri, targets)
    theirs = np.asarray(metric(model=grey_resnet, x_batch=mri.numpy(), y_batch=targets.numpy(), a_batch=a[:, None].numpy(),
                               explain_func=qfn, device="cpu"))
    np.random.seed(5)  # Quantus' draw, replayed
    draw = np.random.randint(0, 2, 3)
    off = torch.tensor([[c for c in range(3) if c != int(t)][d] for t, d in zip(targets, draw)])
    ours = randomisation.random_logit(fn, mri, targets, maps=a, off_targets=off, similarity="pearson")
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)
    drawn = randomisation.random_other_classes(targets, 3, seed=1)
    assert (drawn != targets).all() and ((drawn >= 0) & (drawn < 3)).all()
    assert torch.isfinite(randomisation.random_logit(fn, mri, targets, num_classes=3)).all()


@pytest.mark.parametrize("name", ["avg", "lipschitz", "ris", "ros"])
def test_robustness_equals_quantus_on_shared_noise(grey_resnet, mri, targets, name):
    quantus = pytest.importorskip("quantus")
    fn, qfn = _explainer(grey_resnet)
    n = 4
    gen = torch.Generator().manual_seed(2)
    if name == "avg":
        noise = (torch.rand(n, *mri.shape, generator=gen) * 2 - 1) * 0.1
        ours = robustness.avg_sensitivity(fn, mri, targets, noise=noise)
        metric = quantus.AvgSensitivity(nr_samples=n, perturb_func=_Replay(noise), normalise=False, abs=False,
                                        disable_warnings=True)
    elif name in ("ris", "ros"):
        noise = (torch.rand(n, *mri.shape, generator=gen) * 2 - 1) * 0.05
        if name == "ris":
            ours = robustness.relative_input_stability(fn, mri, targets, noise=noise, nan_when_changed=False)
            metric = quantus.RelativeInputStability(nr_samples=n, perturb_func=_Replay(noise),
                                                    return_nan_when_prediction_changes=False, normalise=False,
                                                    abs=False, disable_warnings=True)
        else:
            ours = robustness.relative_output_stability(fn, grey_resnet, mri, targets, noise=noise, nan_when_changed=False)
            metric = quantus.RelativeOutputStability(nr_samples=n, perturb_func=_Replay(noise),
                                                     return_nan_when_prediction_changes=False, normalise=False,
                                                     abs=False, disable_warnings=True)
    else:
        noise = torch.randn(n, *mri.shape, generator=gen) * 0.1
        ours = robustness.local_lipschitz_estimate(fn, mri, targets, noise=noise)
        metric = quantus.LocalLipschitzEstimate(nr_samples=n, perturb_func=_Replay(noise), normalise=False, abs=False,
                                                disable_warnings=True)
    a = fn(mri, targets)
    theirs = np.asarray(metric(model=grey_resnet, x_batch=mri.numpy(), y_batch=targets.numpy(), a_batch=a[:, None].numpy(),
                               explain_func=qfn, device="cpu"))
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-4)


# ---------------------------------------------------------------- 3D and the runner

from medlens.workflows.catalogue import CATALOGUE  # noqa: E402


def phantom_3d():
    from medlens.models import build_model

    torch.manual_seed(0)
    return build_model("medlens.models:phantom_net", num_classes=2, in_channels=1, spatial_dims=3).eval()


def test_every_catalogue_metric_runs_in_3d():
    from medlens.workflows.catalogue import catalogue_columns

    model = phantom_3d()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 12, 12, 12, generator=gen)
    masks = torch.zeros(2, 12, 12, 12, dtype=torch.bool)
    masks[:, 3:9, 3:9, 3:9] = True
    expl = medlens.explain(model, x, "saliency")
    cols = catalogue_columns(["catalogue"], model, x, expl.maps[:, 0], expl.raw, expl.targets[:, 0], masks, "saliency",
                             steps=8, batch_size=16)
    assert set(cols) == set(CATALOGUE)
    for name, values in cols.items():
        assert values.shape == (2,), name
        if name not in ("faithfulness_estimate", "monotonicity_nguyen", "faithfulness_correlation",
                        "relative_input_stability", "relative_output_stability"):  # NaN: every sample changed class
            assert torch.isfinite(values).all(), name  # correlations may be NaN on a flat random net
    assert ((cols["top_k_intersection"] >= 0) & (cols["top_k_intersection"] <= 1)).all()


def test_catalogue_through_evaluate_and_cli(tmp_path):
    from typer.testing import CliRunner

    from medlens.cli import app

    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "medlens.models:phantom_net", "phantoms:3:24", "--in-channels", "1",
                                      "-m", "saliency", "--metric", "faithfulness_estimate", "--metric",
                                      "top_k_intersection", "--metric", "avg_sensitivity", "--bootstrap", "50",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    import pandas as pd

    summary = pd.read_csv(out / "summary.csv")
    got = set(summary["metric"])
    assert {"faithfulness_estimate", "top_k_intersection", "avg_sensitivity"} <= got
    row = summary.set_index("metric").loc["top_k_intersection"]
    assert row["ci_low"] <= row["mean"] <= row["ci_high"]


def test_region_perturbation_and_selectivity_equal_quantus(grey_resnet, mri, maps, targets):
    quantus = pytest.importorskip("quantus")
    ours = fx.region_perturbation(grey_resnet, mri, maps, targets, patch_size=8, regions=6)
    metric = quantus.RegionPerturbation(patch_size=8, regions_evaluation=6, perturb_baseline="black", normalise=False,
                                        abs=False, disable_warnings=True)
    np.testing.assert_allclose(ours.numpy(), quantus_call(metric, grey_resnet, mri, targets, maps), atol=1e-5)
    curve, auc = fx.selectivity(grey_resnet, mri, maps, targets, patch_size=8)
    metric = quantus.Selectivity(patch_size=8, perturb_baseline="black", normalise=False, abs=False, disable_warnings=True)
    theirs = quantus_call(metric, grey_resnet, mri, targets, maps)
    np.testing.assert_allclose(curve.numpy(), theirs, atol=1e-5)
    # Quantus' get_auc_score calls np.trapz (gone in NumPy 2): its calculate_auc is the trapezoid rule, unit spacing
    np.testing.assert_allclose(auc.numpy(), np.trapezoid(theirs, dx=1, axis=1), rtol=1e-4)
    vol = fx.region_perturbation(phantom_3d(), torch.rand(2, 1, 12, 12, 12), torch.rand(2, 12, 12, 12), patch_size=4,
                                 regions=5)
    assert vol.shape == (2, 5) and torch.isfinite(vol).all()
