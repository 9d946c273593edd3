"""Explain files on disk: read, batch, explain, and write what a person looks at.

This is the library behind ``medlens explain``: inputs (PNG/JPG, DICOM files or series, NIfTI
volumes, folders of them) are read, resized to the model's input size, batched by shape,
explained with one or more methods, and written back at each input's own size and geometry:
overlays (PNG), maps (``.npy``, and NIfTI with the input's affine for volumes), boxes (JSON)
and an ``index.html`` that shows them all. Bad files are reported and skipped.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from medlens.core.boxes import argmax_cell_box, component_regions
from medlens.core.capture import resolve_layer
from medlens.core.engine import Explanation, explain, get_method, options_for
from medlens.core.resample import upsample
from medlens.errors import MedlensError, one_line
from medlens.io.atomic import atomic_path, write_text
from medlens.io.loading import Loaded, iter_inputs, plan_inputs
from medlens.render.overlay import png_bytes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Prepared:
    """One input ready for the model: (C, *S) tensor at model size, plus where it came from."""

    path: Path
    loaded: Loaded
    tensor: Tensor
    display: Tensor  # (C, *S_original) in [0, 1], for drawing
    stem: str = ""  # output file-name stem, unique within the run


@dataclass
class RunSummary:
    written: list[dict[str, Any]] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)
    out_dir: Path | None = None


def model_input_spec(model: nn.Module) -> tuple[int | None, int | None]:
    """(input channels, spatial dims) the model's first convolution expects, or None if unknown."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.in_channels, {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(m)]
    return None, None


def prepare(
    path: Path,
    loaded: Loaded,
    channels: int | None,
    size: Sequence[int] | None,
    normalize: str = "none",
) -> Prepared:
    """Scale to [0, 1], match the model's channels, resize to ``size``, then normalise.

    Args:
        channels: the model's input channels: greyscale is repeated, RGB averaged to grey.
        size: spatial size for the model, e.g. (224, 224); None keeps the image's size.
        normalize: ``none``, ``imagenet`` (mean/std per RGB channel), ``zscore`` (per image), or a
            callable on the (C, *S) tensor in [0, 1] (a model's ``preprocessing``).
    """
    display = loaded.display().float()
    x = display
    if channels is not None and x.shape[0] != channels:
        if x.shape[0] == 1:
            x = x.expand(channels, *x.shape[1:])
        elif channels == 1:
            x = x.mean(0, keepdim=True)
        else:
            raise MedlensError(f"{path}: image has {x.shape[0]} channels; the model takes {channels}")
    if size is not None and tuple(size) != tuple(x.shape[1:]):
        if len(size) != x.dim() - 1:
            raise MedlensError(f"{path}: --size has {len(size)} numbers for a {x.dim() - 1}D image")
        x = upsample(x.unsqueeze(0), size)[0]
    if callable(normalize):  # a model's own preprocessing (medlens.models.preprocessing.Preprocessing)
        x = normalize(x)
    elif normalize == "imagenet":
        if x.shape[0] != 3:
            raise MedlensError("--normalize imagenet needs 3-channel model inputs")
        view = (3,) + (1,) * (x.dim() - 1)
        x = (x - torch.tensor(IMAGENET_MEAN).view(view)) / torch.tensor(IMAGENET_STD).view(view)
    elif normalize == "zscore":
        x = (x - x.mean()) / x.std().clamp_min(1e-6)
    elif normalize != "none":
        raise MedlensError(f"--normalize {normalize!r} not understood: use none, imagenet or zscore")
    return Prepared(path, loaded, x.contiguous(), display)


def batches_by_shape(items: Iterable[Prepared], batch_size: int) -> Iterable[list[Prepared]]:
    """Group consecutive inputs of the same shape into batches of at most ``batch_size``."""
    batch: list[Prepared] = []
    for item in items:
        if batch and (len(batch) == batch_size or batch[0].tensor.shape != item.tensor.shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


MAX_STEM = 120  # characters of an input's name kept in its output names; longer names end in a stable hash
MANIFEST = ".medlens-outputs"  # the files a run wrote, one per line: --overwrite removes exactly these


def safe_stem(path: Path, taken: set[str]) -> str:
    """A file-name stem for ``path`` that no other input of this run has."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "input"
    if len(stem) > MAX_STEM:  # keep every output name (stem + method + class + suffix) under 255 bytes
        stem = f"{stem[:MAX_STEM - 9]}-{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    candidate, n = stem, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}_{n}"
    taken.add(candidate)
    return candidate


def draw(display: Tensor, heat: Tensor, cmap: str, alpha: float, boxes: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """The overlay a person looks at: a 2D image with its map, or three orthogonal slices of
    a volume through the map's peak."""
    from medlens import render

    if heat.dim() == 2:
        rgb = render.overlay(display, heat, cmap=cmap, alpha=alpha)
        return render.draw_boxes(rgb, list(boxes)) if boxes else rgb
    return render.orthogonal_views(display, heat, cmap=cmap, alpha=alpha)


def explain_inputs(
    model: nn.Module,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    methods: Sequence[str] = ("gradcam",),
    target: Any = "pred",
    layer: str | Sequence[str] | None = None,
    size: Sequence[int] | None = None,
    normalize: str = "none",
    batch_size: int = 8,
    class_names: Sequence[str] | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    box_fraction: float = 0.05,
    overwrite: bool = False,
    policy: Any = None,
    method_options: dict[str, Any] | None = None,
    progress: bool = True,
    dicom_out: Sequence[str] = (),
    threshold: float | None = None,
    max_pixels: int | None = None,
) -> RunSummary:
    """Explain every input and write overlays, maps, boxes and ``index.html`` to ``out_dir``.

    Returns:
        A :class:`RunSummary` listing what was written and the bad inputs (path, reason).
        ``dicom_out`` (any of pm, seg, sr, sc) also writes DICOM objects per DICOM input
        (:mod:`medlens.io.dicom_out`); ``threshold`` then picks the boxed and segmented region.

    Each input's files (maps, NIfTI, overlays, JSON) are staged in a hidden folder inside
    ``out_dir`` and moved in only when all are written, so a failure leaves none of them. A
    batch the model fails on is retried one input at a time, so one bad input never costs the
    others. A destination that cannot be written (read-only, full) stops the run with one
    line naming the path and how many inputs were completed.
    """
    dicom = dicom_options(inputs, dicom_out, threshold)
    for method in methods:  # argument errors stop the run before any file is read
        get_method(method, **options_for(method, method_options or {}, methods))
    for name in [layer] if isinstance(layer, str) else list(layer or []):
        resolve_layer(model, name)
    out = Path(out_dir)
    for raw in inputs:  # the output folder is never read as input
        if Path(raw).exists() and _inside(Path(raw), out):
            raise MedlensError(f"input {raw} lies in --out {out}; choose an output folder outside the inputs")
    prepare_out_dir(out, overwrite)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    channels, _ = model_input_spec(model)
    summary = RunSummary(out_dir=out)
    taken: set[str] = set()

    def prepared() -> Iterable[Prepared]:
        for path, loaded in iter_inputs(inputs, policy=policy, plan=plan, max_pixels=max_pixels):
            if isinstance(loaded, MedlensError):
                summary.bad.append((path, str(loaded)))
                bar.update(1)
                continue
            try:
                item = prepare(path, loaded, channels, size, normalize)
            except MedlensError as error:
                summary.bad.append((path, str(error)))
                bar.update(1)
                continue
            item.stem = safe_stem(path, taken)
            yield item

    from tqdm import tqdm

    plan = plan_inputs(inputs, exclude=[out])  # folders expanded once: the total here, the reading below
    bar = tqdm(total=len(plan), desc="explaining", unit="input", disable=not progress)
    try:
        for batch in batches_by_shape(prepared(), batch_size):
            for method in methods:
                for group, result in _explained(model, batch, device, method, target, layer,
                                                options_for(method, method_options or {}, methods), summary):
                    for i, item in enumerate(group):
                        try:
                            record = _write_one(out, item, result, i, method, class_names, cmap, alpha, box_fraction, dicom)
                        except MedlensError as error:  # drawing or writing this input failed: none of its files stay
                            summary.bad.append((item.path, f"{method}: {error}"))
                            continue
                        summary.written.append(record)
                        _note_outputs(out, record)
            bar.update(len(batch))
        bar.close()
        _write_index(out, summary)
        if summary.bad:
            from medlens.io.report import write_bad_files

            write_bad_files(out / "bad_files.csv", [(p, r) for p, r in summary.bad])
    except OSError as error:  # the destination itself failed (full disk, read-only, removed)
        bar.close()
        done = len({r["source"] for r in summary.written})
        where = error.filename or out
        raise MedlensError(f"cannot write to {where} ({error.strerror or error}); stopped after {done} complete "
                           f"input(s), each listed in {out / MANIFEST}") from None
    return summary


def _explained(model, batch, device, method, target, layer, method_options, summary):
    """(inputs, Explanation) for ``batch``; when the batch fails, each input is tried on its own so
    only the inputs that fail themselves are reported."""
    groups = [batch]
    while groups:
        group = groups.pop(0)
        x = torch.stack([p.tensor for p in group]).to(device)
        try:
            result = explain(model, x, method, target=target, layer=layer, **(method_options or {}))
        except (MedlensError, RuntimeError) as error:  # RuntimeError: the model itself failed on these inputs
            if len(group) > 1:
                groups = [[p] for p in group] + groups
            else:
                summary.bad.append((group[0].path, f"{method}: {one_line(error)}"))
            continue
        if not bool(torch.isfinite(result.maps).all()):
            if len(group) > 1:
                groups = [[p] for p in group] + groups
            else:
                summary.bad.append((group[0].path, f"{method}: the map holds NaN/Inf although the input is finite; "
                                    "check the model's weights"))
            continue
        yield group, result


def _inside(path: Path, folder: Path) -> bool:
    try:
        path, folder = path.resolve(), folder.resolve()
    except OSError:
        return False
    return path == folder or folder in path.parents


def prepare_out_dir(out: Path, overwrite: bool, what: str = "results") -> None:
    """Check ``--out`` before anything is read: a folder (made if missing), writable, empty unless
    ``overwrite``; with ``overwrite`` the files an earlier medlens run listed there are removed
    first, so no old result stays beside the new ones. One-line MedlensError otherwise."""
    if out.exists() and not out.is_dir():
        raise MedlensError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MedlensError(f"--out {out} is not empty; pass --overwrite to replace {what} there, or choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medlens-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise MedlensError(f"--out {out}: cannot write there ({error.strerror or error})") from None
    if overwrite:
        clear_previous(out)


def clear_previous(out: Path) -> None:
    """Remove what an earlier run listed in ``out/.medlens-outputs`` (and its staging leftovers); nothing else."""
    manifest = out / MANIFEST
    names = manifest.read_text(encoding="utf-8").splitlines() if manifest.is_file() else []
    for name in [*names, "index.html", "bad_files.csv"]:
        target = out / name
        if name and "/" not in name and name not in (".", "..") and target.is_file() and (names or name != "index.html"):
            target.unlink()
    for stale in out.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if manifest.is_file():
        manifest.unlink()


def _note_outputs(out: Path, record: dict[str, Any]) -> None:
    names = [record["json"], record["npy"], *([record["nifti"]] if "nifti" in record else []), *(t["png"] for t in record["targets"])]
    dicom = record.get("dicom") or {}
    for kind in ("pm", "seg", "sr", "sc"):
        value = dicom.get(kind) or []
        names += [value] if isinstance(value, str) else list(value)
    with open(out / MANIFEST, "a", encoding="utf-8") as handle:
        handle.write("".join(f"{n}\n" for n in [*names, "index.html", "bad_files.csv"]))


def _write_one(
    out: Path, item: Prepared, result: Explanation, i: int, method: str,
    class_names: Sequence[str] | None, cmap: str, alpha: float, box_fraction: float, dicom: dict[str, Any] | None = None,
) -> dict[str, Any]:
    stem = f"{item.stem}_{method.replace('+', 'p')}"
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{stem[:40]}.", dir=out))
    try:
        record = _write_unit(staging, stem, item, result, i, method, class_names, cmap, alpha, box_fraction, dicom)
        names = sorted(p.name for p in staging.iterdir())
        for name in names:  # everything is written: move the unit in (renames within one folder)
            os.replace(staging / name, out / name)
    except OSError:
        raise
    except (MedlensError, RuntimeError, ValueError, TypeError, IndexError) as error:
        raise MedlensError(f"{item.path}: could not write its results ({one_line(error)}); none kept") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _write_unit(
    out: Path, stem: str, item: Prepared, result: Explanation, i: int, method: str,
    class_names: Sequence[str] | None, cmap: str, alpha: float, box_fraction: float, dicom: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spatial = tuple(item.display.shape[1:])
    maps = upsample(result.maps[i : i + 1], spatial)[0].clamp(0, 1)  # (K, *S) at the input's own size
    name_of = (lambda c: class_names[c]) if class_names else (lambda c: f"class {c}")
    record: dict[str, Any] = {
        "source": str(item.path), "method": method, "layers": result.layers, "auto_layer": result.info.get("auto_layer"),
        "predicted": int(result.predictions[i]), "predicted_name": name_of(int(result.predictions[i])),
        "targets": [], "npy": f"{stem}.npy",
    }
    with atomic_path(out / f"{stem}.npy") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, maps.cpu().numpy().astype(np.float32))
    if item.loaded.is_3d:
        from medlens.io.nifti import write_nifti

        write_nifti(out / f"{stem}.nii.gz", maps.cpu(), item.loaded.meta)
        record["nifti"] = f"{stem}.nii.gz"
    classes = result.targets[i].tolist()
    per_head = maps.shape[0] != len(classes)  # raw attention with head_fusion="none": one map per head
    for k in range(maps.shape[0]):
        cls = classes[min(k, len(classes) - 1)]
        heat = maps[k]
        regions = component_regions(heat, threshold=dicom["threshold"]) if dicom and dicom["threshold"] is not None \
            else component_regions(heat, fraction=box_fraction)
        cell = argmax_cell_box(result.raw[i, k], spatial) if result.raw.dim() == result.maps.dim() else None
        boxes = [r["box"] for r in regions]
        png = f"{stem}_c{cls}" + (f"_head{k}" if per_head else "") + ".png"
        with atomic_path(out / png) as tmp:
            tmp.write_bytes(png_bytes(draw(item.display.cpu(), heat.cpu(), cmap, alpha, boxes[:3])))
        record["targets"].append({
            "class": cls, "name": name_of(cls) + (f", head {k}" if per_head else ""),
            "score": float(result.scores[i, min(k, len(classes) - 1)]), "png": png,
            "boxes": [{"box": [int(v) for v in r["box"]], "peak": float(r.get("peak", 0.0))} for r in regions],
            "argmax_cell_box": [int(v) for v in cell] if cell is not None else None,
        })
    if dicom and dicom["kinds"]:
        from medlens.io.dicom_out import write_for_record

        record["dicom"] = write_for_record(out, item.loaded.meta, maps.cpu(), record, result, i, dicom["kinds"],
                                           dicom["threshold"], box_fraction, class_names)
    record["json"] = f"{stem}.json"
    write_text(out / f"{stem}.json", json.dumps(record, indent=2))
    return record


def dicom_options(inputs: Sequence[str | Path], kinds: Sequence[str], threshold: float | None):
    """``--dicom-out`` checked before anything runs (known object types, DICOM inputs only) and ``--threshold``."""
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise MedlensError(f"--threshold {threshold} must be in [0, 1] (maps are normalised)")
    if not kinds:
        return None if threshold is None else {"kinds": (), "threshold": threshold}
    from medlens.io.dicom_out import check_dicom_inputs, parse_kinds

    chosen = parse_kinds(list(kinds))
    check_dicom_inputs(plan_inputs(inputs))
    return {"kinds": chosen, "threshold": threshold}


def _write_index(out: Path, summary: RunSummary) -> None:
    """A page that shows every overlay, with the prediction, the score and the files."""
    from medlens.render.html import html_page

    cards = []
    for rec in summary.written:
        for t in rec["targets"]:
            cards.append(
                f'<figure class="card"><img src="{html.escape(t["png"])}" alt="{html.escape(rec["source"])}">'
                f"<figcaption><b>{html.escape(Path(rec['source']).name)}</b><br>{html.escape(rec['method'])}: "
                f"{html.escape(t['name'])} (score {t['score']:.3g}); predicted {html.escape(rec['predicted_name'])}<br>"
                f'<a href="{html.escape(rec["npy"])}">map .npy</a>'
                + (f' · <a href="{html.escape(rec["nifti"])}">NIfTI</a>' if "nifti" in rec else "")
                + "</figcaption></figure>"
            )
    bad = "".join(f"<li><code>{html.escape(str(p))}</code>: {html.escape(r)}</li>" for p, r in summary.bad)
    sections = [("Explanations", f'<div class="gallery">{"".join(cards) or "<p>Nothing was explained.</p>"}</div>')]
    if bad:
        sections.append(("Inputs that were skipped", f"<ul>{bad}</ul>"))
    write_text(out / "index.html", html_page("medlens explain", sections))
