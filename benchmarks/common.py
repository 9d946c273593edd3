"""Timing helpers shared by the benchmark scripts: interleaved repetitions, medians, a table."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(contenders: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall time (s) of each callable; rounds alternate between contenders so that
    load on the machine affects all of them alike."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
            sync()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time (s) over ``repeats`` calls of ``fn`` (synchronised) and its last result."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def forward_floor(model: torch.nn.Module, x: torch.Tensor, copies: int, batch_size: int = 64) -> None:
    """The batched-forward floor of a perturbation metric: ``copies`` copies of each image through
    the model, no-grad, in batches of ``batch_size``."""
    stack = x.repeat_interleave(max(1, copies), dim=0)
    with torch.no_grad():
        for i in range(0, stack.shape[0], batch_size):
            model(stack[i : i + batch_size])


def print_table(title: str, times: dict[str, float], baseline: str, notes: dict[str, str] | None = None) -> None:
    """Print each contender's median time and its ratio to ``baseline``, as Markdown."""
    notes = notes or {}
    print(f"\n### {title}\n")
    print(f"| contender | median time (s) | x {baseline} | note |")
    print("|---|---:|---:|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.4f} | {seconds / times[baseline]:.2f} | {notes.get(name, '')} |")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
