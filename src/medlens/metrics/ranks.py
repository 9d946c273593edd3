"""Rank helpers shared by the metrics (no dependency on any other metric module)."""

from __future__ import annotations

import torch
from torch import Tensor


def tie_ranks(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Each value's count of strictly smaller / smaller-or-equal values in its row.

    Args:
        flat: (B, N) values.
    Returns:
        (below, at_most): both (B, N) int64 counts.
    """
    ordered = flat.sort(dim=1).values
    below = torch.searchsorted(ordered, flat, right=False)
    at_most = torch.searchsorted(ordered, flat, right=True)
    return below, at_most
