"""The fused upsample + normalise against F.interpolate followed by min-max normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medlens.core.resample import extreme_rows, interpolation_matrix, upsample_normalised


def reference(raw: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    up = F.interpolate(raw, size=size, mode=mode, align_corners=False).flatten(2)
    lo, hi = up.amin(2, keepdim=True), up.amax(2, keepdim=True)
    return ((up - lo) / (hi - lo)).view(*raw.shape[:2], *size)


@pytest.mark.parametrize(
    "shape_in, size",
    [((7, 7), (224, 224)), ((5, 9), (64, 100)), ((7, 7), (225, 223)), ((10, 10), (5, 7)),
     ((13,), (100,)), ((3, 4, 5), (16, 20, 24)), ((4, 4, 4), (64, 64, 64))],
)
def test_equals_interpolate_then_normalise(shape_in, size):
    torch.manual_seed(0)
    raw = torch.randn(2, 3, *shape_in)
    ours = upsample_normalised(raw, size)
    assert ours.shape == (2, 3, *size) and float(ours.min()) >= 0 and float(ours.max()) <= 1
    torch.testing.assert_close(ours, reference(raw, size), atol=1e-6, rtol=0)


def test_a_sharp_raw_minimum_between_output_points_is_not_clipped():
    raw = torch.zeros(1, 1, 7, 7)
    raw[0, 0, 3, 3] = -10.0  # lower than any interpolated output value
    raw[0, 0, 0, 0] = 1.0
    torch.testing.assert_close(upsample_normalised(raw, (50, 50)), reference(raw, (50, 50)), atol=1e-6, rtol=0)


def test_flat_and_near_flat_maps_become_zeros():
    raw = torch.stack([torch.full((6, 6), 3.0), 5.0 + 1e-9 * torch.randn(6, 6)]).unsqueeze(0)
    out = upsample_normalised(raw, (24, 24))
    assert not bool(out.isnan().any()) and float(out.abs().max()) == 0.0


def test_extreme_rows_hold_the_output_extremes_of_every_cell():
    matrix = interpolation_matrix(7, 100)
    rows = extreme_rows(7, 100)
    assert len(rows) < 20  # about two per input sample, not 100
    torch.manual_seed(1)
    for _ in range(20):
        signal = torch.randn(7)
        full, probed = matrix @ signal, matrix[rows] @ signal
        assert float(full.max()) == pytest.approx(float(probed.max()), abs=1e-6)
        assert float(full.min()) == pytest.approx(float(probed.min()), abs=1e-6)
