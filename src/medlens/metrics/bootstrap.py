"""Bootstrap confidence intervals in bounded memory.

:func:`bootstrap_ci` draws the same ``n_boot x n`` resampling indices as the one-shot version
(``torch.randint(0, n, (n_boot, n))`` from a generator seeded with ``seed``), but in chunks of
replicates, keeping only each replicate's mean. Torch's CPU generator fills a tensor in order, so
drawing ``(c, n)`` blocks one after the other gives the same indices as one ``(n_boot, n)`` draw:
the result equals the one-shot bootstrap for the same seed, while memory is ``chunk x n`` indices
instead of ``n_boot x n``. ``method="bca"`` uses :func:`scipy.stats.bootstrap` (bias-corrected
and accelerated), batched the same way; its intervals differ from the percentile ones by design.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medlens.errors import MedlensError

#: at most this many resampled indices are held at once (8M int64 = 64 MiB)
MAX_INDICES = 1 << 23


def _chunk(n: int, chunk: int | None) -> int:
    return max(1, chunk if chunk is not None else MAX_INDICES // max(n, 1))


def bootstrap_means(values: Tensor, n_boot: int = 1000, seed: int = 0, chunk: int | None = None) -> Tensor:
    """(n_boot,) means of resamples of the 1-D ``values``, drawn ``chunk`` replicates at a time."""
    v = values.double()
    n = v.numel()
    gen = torch.Generator().manual_seed(seed)
    step = _chunk(n, chunk)
    means = torch.empty(n_boot, dtype=torch.float64)
    for start in range(0, n_boot, step):
        rows = min(step, n_boot - start)
        means[start : start + rows] = v[torch.randint(0, n, (rows, n), generator=gen)].mean(dim=1)
    return means


def bootstrap_ci(values: Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 method: str = "percentile", chunk: int | None = None) -> tuple[float, float, float]:
    """Mean and bootstrap CI of the non-NaN ``values`` (1-D).

    Args:
        method: ``percentile`` (equal to the one-shot torch bootstrap for the same seed) or ``bca``
            (scipy.stats.bootstrap, BCa; needs at least 2 distinct values, else the interval
            collapses to the mean).
        chunk: replicates drawn at a time (default: as many as fit in :data:`MAX_INDICES`).
    """
    values = torch.as_tensor(values)
    v = values[~torch.isnan(values)].double()
    if v.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if method == "percentile":
        means = bootstrap_means(v, n_boot, seed, chunk)
        lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=means.dtype))
        return mean, float(lo), float(hi)
    if method == "bca":
        import numpy as np
        from scipy import stats

        data = v.numpy()
        if np.ptp(data) == 0:
            return mean, mean, mean
        res = stats.bootstrap((data,), np.mean, n_resamples=n_boot, confidence_level=level, method="BCa",
                              batch=_chunk(v.numel(), chunk), random_state=np.random.default_rng(seed))
        lo, hi = res.confidence_interval
        return mean, float(lo) if not math.isnan(lo) else mean, float(hi) if not math.isnan(hi) else mean
    raise MedlensError(f"bootstrap method must be 'percentile' or 'bca'; got {method!r}")


def summarise_table(rows, group_by=("method",), metrics=None, n_boot: int = 1000, seed: int = 0,
                    method: str = "percentile", level: float = 0.95):
    """Per group and metric: mean, CI, n and n_nan, from a pandas table (e.g. the Parquet results)."""
    import pandas as pd

    metrics = list(metrics) if metrics is not None else [c for c in rows.columns if pd.api.types.is_float_dtype(rows[c])]
    out = []
    for key, group in rows.groupby(list(group_by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            values = torch.tensor(group[metric].to_numpy(dtype="float64"))
            mean, lo, hi = bootstrap_ci(values, n_boot, level, seed, method)
            out.append({**dict(zip(group_by, key)), "metric": metric, "mean": mean, "ci_low": lo, "ci_high": hi,
                        "n": int((~torch.isnan(values)).sum()), "n_nan": int(torch.isnan(values).sum())})
    return pd.DataFrame(out)
