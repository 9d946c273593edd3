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


CPU_CLOCK = time.process_time  # CPU seconds of this process: robust to other jobs on a shared machine


def cpu_timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """Median CPU time of ``repeats`` calls of ``fn``, and its last result."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        start = CPU_CLOCK()
        out = fn()
        times.append(CPU_CLOCK() - start)
    return statistics.median(times), out


def cpu_forward_floor(model: torch.nn.Module, x: torch.Tensor, n_inputs: int, batch_size: int, clean_pass: bool = False) -> float:
    """CPU time of ``n_inputs`` copies of ``x`` through the model in chunks of ``batch_size``,
    no-grad, nothing else (plus one pass of ``x`` itself with ``clean_pass``)."""
    with torch.no_grad():
        start = CPU_CLOCK()
        if clean_pass:
            model(x)
        for begin in range(0, n_inputs, batch_size):
            model(x.expand(min(batch_size, n_inputs - begin), *x.shape[1:]).contiguous())
        return CPU_CLOCK() - start


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def grey_resnet18(num_classes: int = 3) -> torch.nn.Module:
    """A seeded random torchvision ResNet-18 for 1-channel scans, in eval mode."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model.eval()
