"""Faithfulness metrics on real torchvision models: curve end points, agreement with Quantus'
PixelFlipping and ROAD, the imputation against Quantus' sparse solve, 3D volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import medlens
from medlens.errors import MedlensError
from medlens.metrics import confidence_change, noisy_linear_imputation, perturbation_curve, road


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(3, 1, 28, 28, generator=gen)


def distinct_maps(x: torch.Tensor) -> torch.Tensor:
    """A smooth map without ties (so every library orders the pixels the same way)."""
    gen = torch.Generator().manual_seed(3)
    return torch.nn.functional.avg_pool2d(x, 5, 1, 2)[:, 0] + 1e-4 * torch.rand(x.shape[0], *x.shape[2:], generator=gen)


def test_deletion_and_insertion_end_points(grey_resnet, images):
    maps = medlens.explain(grey_resnet, images, "gradcam", layer="layer3").maps
    probs = grey_resnet(images).softmax(1).detach()
    targets = probs.argmax(1)
    blank = grey_resnet(torch.zeros_like(images)).softmax(1).detach()
    deletion = perturbation_curve(grey_resnet, images, maps, steps=7, baseline="zero")
    insertion = perturbation_curve(grey_resnet, images, maps, mode="insertion", steps=7, baseline="zero")
    idx = torch.arange(3)
    torch.testing.assert_close(deletion.scores[:, 0], probs[idx, targets], atol=1e-5, rtol=0)
    torch.testing.assert_close(deletion.scores[:, -1], blank[idx, targets], atol=1e-5, rtol=0)
    torch.testing.assert_close(insertion.scores[:, 0], blank[idx, targets], atol=1e-5, rtol=0)
    torch.testing.assert_close(insertion.scores[:, -1], probs[idx, targets], atol=1e-5, rtol=0)
    assert deletion.scores.shape == (3, 8) and deletion.fractions[-1] == 1
    assert torch.allclose(deletion.auc, torch.trapezoid(deletion.scores, deletion.fractions, dim=1), atol=1e-6)


def test_steps_that_do_not_depend_on_the_map_run_no_forward_of_their_own(grey_resnet, images):
    """8 deletion steps on 3 images: 7 perturbed inputs per image plus one all-zero input for the
    batch (and the clean prediction, or none when its logits are passed), same curve either way."""
    rows: list[int] = []
    handle = grey_resnet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        maps = distinct_maps(images)
        predicted = perturbation_curve(grey_resnet, images, maps, steps=8, batch_size=64)
        assert sum(rows) == 3 + 3 * 7 + 1, rows
        rows.clear()
        with torch.no_grad():
            logits = grey_resnet(images)
        rows.clear()
        given = perturbation_curve(grey_resnet, images, maps, logits.argmax(1), steps=8, clean_logits=logits)
        assert sum(rows) == 3 * 7 + 1, rows
        rows.clear()
        per_image = perturbation_curve(grey_resnet, images, maps, steps=8, baseline="min")  # not constant: scored per image
        assert sum(rows) == 3 + 3 * 8, rows
    finally:
        handle.remove()
    torch.testing.assert_close(given.scores, predicted.scores, atol=1e-6, rtol=0)
    assert per_image.scores.shape == (3, 9)
    with pytest.raises(MedlensError, match="clean_logits have shape"):
        perturbation_curve(grey_resnet, images, maps, steps=8, clean_logits=logits[:2])


def test_pixel_flipping_equals_quantus(grey_resnet, images):
    quantus = pytest.importorskip("quantus")
    maps = distinct_maps(images)
    targets = grey_resnet(images).argmax(1)
    steps = 7
    ours = perturbation_curve(grey_resnet, images, maps, targets, steps=steps, baseline="min")
    metric = quantus.PixelFlipping(features_in_step=28 * 28 // steps, perturb_baseline="black", normalise=False,
                                   abs=False, disable_warnings=True)
    theirs = np.asarray(metric(model=grey_resnet, x_batch=images.numpy(), y_batch=targets.numpy(),
                               a_batch=maps[:, None].numpy(), device="cpu"))
    np.testing.assert_allclose(ours.scores[:, 1:].numpy(), theirs, atol=1e-5)


def test_road_equals_quantus(grey_resnet, images):
    quantus = pytest.importorskip("quantus")
    maps = distinct_maps(images)
    targets = grey_resnet(images).argmax(1)
    percentages = [10, 40, 70]
    ours = road(grey_resnet, images, maps, targets, percentages, noise=0.0, tol=1e-6)
    metric = quantus.ROAD(percentages=percentages, noise=0.0, normalise=False, abs=False, disable_warnings=True)
    theirs = metric(model=grey_resnet, x_batch=images.numpy(), y_batch=targets.numpy(), a_batch=maps[:, None].numpy(),
                    device="cpu")  # {percentage: share of images whose prediction is kept}
    assert ours.kept.shape == (3, 3)
    np.testing.assert_allclose(ours.kept.float().mean(0).numpy(), [theirs[p] for p in percentages])


def test_imputation_matches_quantus_sparse_solve():
    pytest.importorskip("quantus")
    from quantus.functions.perturb_func import noisy_linear_imputation as quantus_imputation

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 2, 24, 20, generator=gen, dtype=torch.float64)
    removed = torch.rand(1, 1, 24, 20, generator=gen) < 0.5  # scattered holes, touching borders too
    ours = noisy_linear_imputation(image, removed, noise=0.0, tol=1e-8)
    theirs = quantus_imputation(image[0].numpy(), np.flatnonzero(removed.numpy().ravel()), noise=0.0)
    np.testing.assert_allclose(ours[0].numpy(), theirs, atol=1e-6)


def test_imputation_reproduces_a_linear_ramp_in_3d():
    z, y, x = torch.meshgrid(*(torch.arange(12.0, dtype=torch.float64),) * 3, indexing="ij")
    ramp = (0.3 * z - 0.2 * y + 0.1 * x)[None, None]
    removed = torch.zeros(1, 1, 12, 12, 12, dtype=torch.bool)
    removed[..., 3:9, 2:8, 4:10] = True
    filled = noisy_linear_imputation(ramp, removed, noise=0.0, tol=1e-10, max_iter=500)
    assert torch.allclose(filled, ramp, atol=1e-6)
    noisy = noisy_linear_imputation(ramp, removed, noise=0.05, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy[~removed.expand_as(noisy)], ramp[~removed.expand_as(ramp)])
    assert 0.02 < float((noisy - ramp)[removed].std()) < 0.08


def test_3d_curves_and_road_on_a_video_resnet():
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18(num_classes=2).eval()
    x = torch.rand(2, 3, 4, 16, 16)
    maps = medlens.explain(model, x, "gradcam", layer="layer2").maps
    deletion = perturbation_curve(model, x, maps, steps=3, baseline="blur", score="logit")
    logits = model(x).detach()
    torch.testing.assert_close(deletion.scores[:, 0], logits.gather(1, logits.argmax(1, keepdim=True))[:, 0], atol=1e-4, rtol=0)
    curve = road(model, x, maps, percentages=(20, 60), order="lerf")
    assert curve.scores.shape == (2, 2) and torch.isfinite(curve.scores).all()


def test_confidence_change_closed_forms(grey_resnet, images):
    ones = torch.ones(3, 28, 28)
    same = confidence_change(grey_resnet, images, ones)
    assert torch.allclose(same["average_drop"], torch.zeros(3), atol=1e-6)
    assert same["increase_in_confidence"].sum() == 0
    probs = grey_resnet(images).softmax(1).detach()
    blank = grey_resnet(torch.zeros_like(images)).softmax(1).detach()
    t = probs.argmax(1)
    expected = ((probs[range(3), t] - blank[range(3), t]).clamp_min(0) / probs[range(3), t])
    torch.testing.assert_close(confidence_change(grey_resnet, images, torch.zeros(3, 28, 28))["average_drop"], expected)


def test_bad_arguments(grey_resnet, images):
    with pytest.raises(MedlensError, match="maps have shape"):
        perturbation_curve(grey_resnet, images, torch.rand(3, 14, 14))
    with pytest.raises(MedlensError, match="order"):
        perturbation_curve(grey_resnet, images, torch.rand(3, 28, 28), order="random")
    with pytest.raises(MedlensError, match="baseline"):
        perturbation_curve(grey_resnet, images, torch.rand(3, 28, 28), baseline="noise")


@pytest.mark.parametrize("dims", [2, 3])
def test_curves_with_a_region_per_image_on_a_unet(dims):
    """A segmentation network pooled over one (B, 1, *S) region per image: every curve and the
    confidence change of the batch equal those of the images scored one at a time."""
    from monai.networks.nets import UNet

    torch.manual_seed(dims)
    unet = UNet(spatial_dims=dims, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    size = 12 if dims == 2 else 8
    x = torch.rand(2, 1, *([size] * dims))
    region = torch.zeros(2, 1, *([size] * dims))
    region[(0, 0, *([slice(0, 5)] * dims))] = 1
    region[(1, 0, *([slice(size - 4, size)] * dims))] = 1
    maps = torch.rand(2, *([size] * dims))
    runs = {
        "deletion": lambda xs, ms, r: perturbation_curve(unet, xs, ms, 1, steps=4, baseline="mean", score="logit", region=r, batch_size=3).scores,
        "road": lambda xs, ms, r: road(unet, xs, ms, 1, percentages=(30, 70), score="logit", region=r, batch_size=3, seed=None, noise=0, tol=1e-6).scores,  # tight solve: the batch stops its CG jointly
        "drop": lambda xs, ms, r: confidence_change(unet, xs, ms, 1, region=r)["average_drop"],
    }
    for name, run in runs.items():
        batched = run(x, maps, region)
        alone = torch.cat([run(x[b : b + 1], maps[b : b + 1], region[b : b + 1]) for b in range(2)])
        torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5, msg=name)
