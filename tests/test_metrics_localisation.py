"""Localisation metrics on hand-built maps with known answers, 2D and 3D, against Quantus and sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medlens.core.boxes import box_around, topk_mask
from medlens.errors import MedlensError
from medlens.metrics import (
    auroc, average_precision, boxes_to_masks, dice, empty_annotations, energy_pointing_game, entropy, gini,
    localisation_metrics, mask_iou, pointing_game, relevance_mass, relevance_rank_accuracy, topk_box_iou,
)
from medlens.metrics import localisation as loc
from medlens.metrics.localisation import box_iou


def box_case(dims: int = 2, size: int = 32, batch: int = 3):
    lo, hi = [6] * dims, [14] * dims
    boxes = torch.tensor([lo + hi] * batch)
    return boxes, boxes_to_masks(boxes, (size,) * dims)


@pytest.mark.parametrize("dims", [2, 3])
def test_peak_inside_and_outside_the_box(dims):
    boxes, masks = box_case(dims)
    maps = torch.zeros(masks.shape)
    maps[(0,) + (10,) * dims] = 1.0  # peak inside
    maps[(1,) + (20,) * dims] = 1.0  # peak outside
    maps[(2,) + (14,) * dims] = 1.0  # one pixel outside the box: a hit only with tolerance
    assert pointing_game(maps, masks).tolist() == [1.0, 0.0, 0.0]
    assert pointing_game(maps, masks, tolerance=1).tolist() == [1.0, 0.0, 1.0]
    assert energy_pointing_game(maps, masks).tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("dims", [2, 3])
def test_map_equal_to_mask_scores_perfectly(dims):
    boxes, masks = box_case(dims)
    maps = masks.float()
    for values in (energy_pointing_game(maps, masks), relevance_mass(maps, masks), auroc(maps, masks),
                   average_precision(maps, masks), relevance_rank_accuracy(maps, masks),
                   mask_iou(maps, masks)[:, 0], dice(maps, masks)[:, 0]):
        assert torch.allclose(values, torch.ones(3))
    # top-k below the box's share, ties included, selects exactly the box
    share = 100 * 8**dims / 32**dims
    iou = topk_box_iou(maps, boxes, (share / 2, share))
    assert torch.allclose(iou, torch.ones_like(iou))


def test_random_map_is_near_chance():
    gen = torch.Generator().manual_seed(0)
    boxes, masks = box_case(2, size=64, batch=16)
    maps = torch.rand(masks.shape, generator=gen)
    share = masks.float().mean()
    assert abs(float(auroc(maps, masks).mean()) - 0.5) < 0.02
    assert abs(float(average_precision(maps, masks).mean()) - share) < 0.01
    assert abs(float(energy_pointing_game(maps, masks).mean()) - share) < 0.01
    assert abs(float(relevance_rank_accuracy(maps, masks).mean()) - share) < 0.03


def test_empty_annotations_are_reported_not_scored():
    boxes, masks = box_case(2)
    masks[1] = False
    maps = torch.rand(masks.shape)
    cols = localisation_metrics(maps, masks)
    assert empty_annotations(masks).tolist() == [False, True, False]
    assert cols["empty_annotation"].tolist() == [0.0, 1.0, 0.0]
    for name, values in cols.items():
        if name != "empty_annotation":
            assert math.isnan(values[1]) and not math.isnan(values[0]), name
    empty_box = boxes.clone()
    empty_box[2, 2:] = empty_box[2, :2]
    assert torch.isnan(topk_box_iou(maps, empty_box)[2]).all()


@pytest.mark.parametrize("dims", [2, 3])
def test_a_constant_map_points_nowhere_and_puts_no_mass_inside(dims):
    """An all-zero (or constant) map has no maximum to point with: a miss, not a hit, and no NaN
    that would read as an empty annotation; the fraction rule gives the annotation's share."""
    shape = (2, *([8] * dims))
    masks = torch.zeros(shape, dtype=torch.bool)
    masks[(slice(None), *([slice(2, 4)] * dims))] = True
    share = 2**dims / 8**dims
    for maps in (torch.zeros(shape), torch.full(shape, 0.3)):
        for ties in ("any", "all", "first"):
            assert pointing_game(maps, masks, ties=ties).tolist() == [0.0, 0.0], ties
        assert pointing_game(maps, masks, ties="fraction").tolist() == pytest.approx([share, share])
    cols = localisation_metrics(torch.zeros(shape), masks)
    assert cols["relevance_mass"].tolist() == [0.0, 0.0] and cols["energy_pointing_game"].tolist() == [0.0, 0.0]
    peaked = torch.zeros(shape)
    peaked[(slice(None), *([3] * dims))] = 1.0
    assert pointing_game(peaked, masks).tolist() == [1.0, 1.0]


def test_pointing_game_tie_rules():
    _, masks = box_case(2, batch=1)
    maps = torch.zeros(masks.shape)
    maps[0, 8, 8] = maps[0, 30, 30] = maps[0, 31, 31] = 1.0  # three maxima, one inside
    assert pointing_game(maps, masks, ties="any").item() == 1.0
    assert pointing_game(maps, masks, ties="all").item() == 0.0
    assert pointing_game(maps, masks, ties="fraction").item() == pytest.approx(1 / 3)
    assert pointing_game(maps, masks, ties="first").item() == 1.0  # (8, 8) comes first in raster order
    with pytest.raises(MedlensError, match="ties"):
        pointing_game(maps, masks, ties="random")


def test_topk_box_ties_on_a_patch_repeated_map():
    """The paper's attention maps repeat each 16x16 patch value: top-k with ties included keeps
    whole patches (one box around all of them), exact keeps exactly k pixels."""
    patches = torch.zeros(4, 4)
    patches[0, 0], patches[3, 3] = 1.0, 0.9  # two separated top patches
    maps = patches.repeat_interleave(16, 0).repeat_interleave(16, 1)[None]  # (1, 64, 64)
    annotation = torch.tensor([[0, 0, 16, 16]])
    # 5% of 4096 = 205 pixels < one 256-pixel patch: only the top patch, IoU 1
    assert topk_box_iou(maps, annotation, (5,)).item() == pytest.approx(1.0)
    # 10% = 410 px reaches into the second patch: one box spans both components, (16*16)/(64*64)
    assert topk_box_iou(maps, annotation, (10,)).item() == pytest.approx(256 / 4096)
    # 20%: the k-th value is 0, so "include" selects every pixel: the box is the whole image
    assert topk_box_iou(maps, annotation, (20,), ties="include").item() == pytest.approx(256 / 4096)
    # exact: 205 pixels of the top patch -> a box inside the annotation
    exact = topk_box_iou(maps, annotation, (5,), ties="exact").item()
    assert 0 < exact <= 1


def test_3d_topk_box_iou_on_a_cube():
    boxes, masks = box_case(3, size=20, batch=2)
    maps = masks.float() + 0.01 * torch.rand(masks.shape)  # box values highest, no ties
    n_box = 8**3
    percent = 100 * n_box / 20**3
    iou = topk_box_iou(maps, boxes, (percent,), ties="exact")
    assert torch.allclose(iou, torch.ones_like(iou))


def test_agrees_with_quantus_and_sklearn():
    quantus = pytest.importorskip("quantus")
    from sklearn.metrics import average_precision_score, roc_auc_score

    gen = torch.Generator().manual_seed(1)
    masks = torch.zeros(6, 1, 28, 28, dtype=torch.bool)
    masks[:, :, 4:14, 9:20] = True
    maps = torch.rand(6, 1, 28, 28, generator=gen) + 0.5 * masks * torch.rand(6, 1, 1, 1, generator=gen)
    maps[0, 0, 5:7, 10:12] = maps.max() + 1  # a tied maximum (4 pixels), inside
    x = torch.rand(6, 1, 28, 28)
    y = np.zeros(6, dtype=int)
    kw = dict(disable_warnings=True, display_progressbar=False)
    args = dict(model=None, x_batch=x.numpy(), y_batch=y, a_batch=maps.numpy(), s_batch=masks.numpy().astype(float))
    pairs = [
        (quantus.PointingGame(**kw), pointing_game(maps, masks)),
        (quantus.RelevanceMassAccuracy(**kw), relevance_mass(maps, masks)),
        (quantus.RelevanceRankAccuracy(**kw), relevance_rank_accuracy(maps, masks)),
        (quantus.AUC(**kw), auroc(maps, masks)),
    ]
    for metric, ours in pairs:
        theirs = np.asarray(metric(**args), dtype=float)
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5, err_msg=type(metric).__name__)
    sk_auc = [roc_auc_score(masks[i].flatten(), maps[i].flatten()) for i in range(6)]
    sk_ap = [average_precision_score(masks[i].flatten(), maps[i].flatten()) for i in range(6)]
    np.testing.assert_allclose(auroc(maps, masks).numpy(), sk_auc, atol=1e-6)
    np.testing.assert_allclose(average_precision(maps, masks).numpy(), sk_ap, atol=1e-5)
    # complexity: Quantus adds 1e-7 to |a| in Sparseness; entropy is identical
    sparse = np.asarray(quantus.Sparseness(normalise=False, **kw)(**{**args, "s_batch": None}))
    comp = np.asarray(quantus.Complexity(normalise=False, **kw)(**{**args, "s_batch": None}))
    np.testing.assert_allclose(gini(maps).numpy(), sparse, atol=1e-4)
    np.testing.assert_allclose(entropy(maps).numpy(), comp, atol=1e-4)


def test_gini_and_entropy_closed_forms():
    n = 100
    one_hot = torch.zeros(1, 10, 10)
    one_hot[0, 3, 3] = 1
    flat = torch.ones(1, 10, 10)
    assert gini(one_hot).item() == pytest.approx((n - 1) / n)
    assert gini(flat).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy(flat).item() == pytest.approx(math.log(n), rel=1e-5)
    assert entropy(one_hot).item() == pytest.approx(0.0)


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(MedlensError, match="masks have shape"):
        pointing_game(torch.rand(2, 8, 8), torch.ones(2, 9, 9))
    with pytest.raises(MedlensError, match="boxes must have shape"):
        topk_box_iou(torch.rand(2, 8, 8), torch.zeros(2, 6))
    with pytest.raises(MedlensError, match="masks or boxes"):
        localisation_metrics(torch.rand(2, 8, 8))


def tie_heavy_case(seed: int = 3, batch: int = 10, size: int = 24):
    """Quantised maps (long runs of ties), a constant and a signed-zero map, masks of every kind
    (empty, full, scattered)."""
    gen = torch.Generator().manual_seed(seed)
    maps = (torch.rand(batch, size, size, generator=gen) * 6).floor() / 5 - 0.4
    maps[0] = 0.0
    maps[1, : size // 2] = -0.0
    maps[2] = torch.rand(size // 4, size // 4, generator=gen).repeat_interleave(4, 0).repeat_interleave(4, 1)
    masks = torch.rand(batch, size, size, generator=gen) > 0.6
    masks[3] = False
    masks[4] = True
    masks[5] = False
    masks[5, 2:9, 3:12] = True
    return maps, masks


def test_ranking_metrics_equal_sklearn_and_a_stable_sort_on_tied_maps():
    from sklearn.metrics import average_precision_score, roc_auc_score

    maps, masks = tie_heavy_case()
    for dtype in (torch.float32, torch.float16, torch.float64):
        m = maps.to(dtype)
        ours_auc, ours_ap, ours_rank = auroc(m, masks), average_precision(m, masks), relevance_rank_accuracy(m, masks)
        for i in range(m.shape[0]):
            y, s = masks[i].flatten().numpy(), m[i].flatten().float().numpy()
            if not y.any():
                assert math.isnan(ours_auc[i]) and math.isnan(ours_ap[i]) and math.isnan(ours_rank[i])
                continue
            assert float(ours_ap[i]) == pytest.approx(average_precision_score(y, s), abs=1e-6)
            if y.all():
                assert math.isnan(ours_auc[i])
            else:
                assert float(ours_auc[i]) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
            k = int(y.sum())
            top = m[i].flatten().argsort(descending=True, stable=True)[:k]  # ties by raster order
            assert float(ours_rank[i]) == pytest.approx(float(masks[i].flatten()[top].float().mean()))


def test_average_precision_ranks_minus_infinity_lowest():
    """A positive pixel at -inf is simply the lowest-ranked one (the former searchsorted
    formulation counted it as >= nothing and gave it precision 1)."""
    maps = torch.tensor([[[float("-inf"), 0.2], [0.5, 0.1]]])
    masks = torch.tensor([[[True, False], [True, False]]])
    finite = maps.clone()
    finite[0, 0, 0] = -1.0
    assert average_precision(maps, masks).item() == average_precision(finite, masks).item() == pytest.approx(0.75)
    assert auroc(maps, masks).item() == auroc(finite, masks).item()


def test_chunks_numpy_and_torch_sorts_give_identical_results(monkeypatch):
    """The batch is computed in chunks of maps, and the ranking sort runs in numpy on the CPU:
    neither may change a single bit of any result."""
    maps, masks = tie_heavy_case(batch=11)
    gen = torch.Generator().manual_seed(5)
    smooth = torch.rand(7, 4, 9, 10, generator=gen)  # 3D, almost no ties
    smooth_masks = torch.rand(7, 4, 9, 10, generator=gen) > 0.5

    def everything():
        out = {}
        for name, (m, g) in {"tied": (maps, masks), "3d": (smooth, smooth_masks)}.items():
            boxes = box_around(g)
            cols = localisation_metrics(m, g, boxes, percentages=(1, 5, 20, 40, 100), thresholds=(0.0, 0.3), tolerance=1)
            out.update({f"{name}/{k}": v for k, v in cols.items()})
            for fn in (pointing_game, energy_pointing_game, relevance_mass, auroc, average_precision,
                       relevance_rank_accuracy, mask_iou, dice):
                out[f"{name}/{fn.__name__}"] = fn(m, g)
            out[f"{name}/topk"] = topk_box_iou(m, boxes, (3, 30))
        return out

    def same(a, b):
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))

    monkeypatch.setattr(loc, "_CHUNK_ELEMENTS", 1 << 40)  # one chunk
    whole = everything()
    monkeypatch.setattr(loc, "_CHUNK_ELEMENTS", 1)  # chunks of 2-3 maps
    assert loc._chunks(11, 100) == [slice(0, 2), slice(2, 4), slice(4, 7), slice(7, 9), slice(9, 11)]
    chunked = everything()
    monkeypatch.setattr(loc, "_NUMPY_SORT", False)
    torch_sorted = everything()
    for key, value in whole.items():
        assert same(value, chunked[key]), key
        assert same(value, torch_sorted[key]), key


@pytest.mark.parametrize("dims", [2, 3])
def test_topk_box_iou_include_equals_the_box_around_the_topk_mask(dims):
    """The include rule's box comes from per-axis maxima; it must be the box of topk_mask's pixels,
    NaN maps included (NaN is the largest value for topk)."""
    gen = torch.Generator().manual_seed(dims)
    shape = (6,) + (12,) * dims
    maps = (torch.rand(shape, generator=gen) * 4).floor()  # ties
    maps[1] = torch.rand(shape[1:], generator=gen)
    maps[2].view(-1)[7] = float("nan")
    maps[3] = float("nan")
    boxes = torch.tensor([[2] * dims + [9] * dims] * 6)
    percentages = (0.5, 5, 10, 20, 40, 100)
    ours = topk_box_iou(maps, boxes, percentages)
    for j, p in enumerate(percentages):
        expected = box_iou(box_around(topk_mask(maps, p / 100)), boxes)
        torch.testing.assert_close(ours[:, j], expected, equal_nan=True)
    # with the sort of the ranking metrics (localisation_metrics), the same boxes
    masks = torch.zeros(shape, dtype=torch.bool)
    masks[(slice(None),) + (slice(2, 9),) * dims] = True
    cols = localisation_metrics(maps, masks, boxes, percentages=percentages)
    for j, p in enumerate(percentages):
        torch.testing.assert_close(cols[f"iou@{p:g}"], ours[:, j], equal_nan=True)
