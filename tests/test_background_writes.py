"""Writing beside the model (:class:`medlens.io.background.OrderedWriter`): results in submission
order, errors raised where the caller handles them, and a run whose files are written on the
writer thread equal, file for file and byte for byte, to one that writes inline (real brain MRI)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from medlens.io.background import OrderedWriter
from medlens.workflows.explain import explain_inputs


def test_results_are_delivered_in_submission_order_on_the_calling_thread():
    delivered: list[tuple[int, str]] = []
    caller = threading.current_thread().name
    with OrderedWriter(depth=3) as writer:
        for k in range(10):  # early jobs sleep longest, so they finish last if run out of order
            writer.submit(lambda k=k: (time.sleep(0.002 * (10 - k)), k)[1],
                          lambda k: delivered.append((k, threading.current_thread().name)))
            assert len(delivered) >= k + 1 - 3  # never more than depth pending
    assert [k for k, _ in delivered] == list(range(10))
    assert {name for _, name in delivered} == {caller}


def test_a_failing_job_raises_in_the_caller_and_later_jobs_are_dropped():
    delivered: list[int] = []

    def fail() -> int:
        raise OSError(28, "No space left on device", "/full/disk/file.png")

    with pytest.raises(OSError, match="No space left"):
        with OrderedWriter(depth=8) as writer:
            writer.submit(lambda: 1, delivered.append)
            writer.submit(fail, delivered.append)
            for k in range(2, 6):
                writer.submit(lambda k=k: k, delivered.append)
    assert delivered == [1]


def test_depth_zero_runs_inline():
    names: list[str] = []
    with OrderedWriter(depth=0) as writer:
        writer.submit(lambda: threading.current_thread().name, names.append)
        assert names == [threading.current_thread().name]


def test_background_writes_equal_inline_writes_on_real_brain_mri(brain_mri, grey_resnet, tmp_path):
    files = [sorted((brain_mri / c).glob("*.jpg"))[i] for i in range(2) for c in ("glioma", "pituitary")]
    runs = {}
    for background in (True, False):
        out = tmp_path / f"out-{background}"
        summary = explain_inputs(grey_resnet, files, out, ["gradcam", "saliency"], size=(64, 64), batch_size=3,
                                 progress=False, background_writes=background)
        assert not summary.bad
        runs[background] = (out, summary)
    (out_bg, bg), (out_inline, inline) = runs[True], runs[False]
    assert [r["source"] + r["method"] for r in bg.written] == [r["source"] + r["method"] for r in inline.written]
    names = sorted(p.name for p in out_bg.iterdir())
    assert names == sorted(p.name for p in out_inline.iterdir())
    assert len([n for n in names if n.endswith(".png")]) == 2 * 2 * len(files)  # overlay + titled figure per map
    assert not [n for n in names if n.startswith(".staging")]
    for name in names:
        if name.endswith(".json"):
            a, b = json.loads((out_bg / name).read_text()), json.loads((out_inline / name).read_text())
            assert a == b, name
        elif name != "index.html":
            assert (out_bg / name).read_bytes() == (out_inline / name).read_bytes(), name
