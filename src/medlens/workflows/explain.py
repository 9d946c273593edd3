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
from medlens.data.prepare import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, prepare_loaded  # noqa: F401  (re-exported)
from medlens.core.capture import resolve_layer
from medlens.core.engine import Explanation, explain, get_method, options_for
from medlens.core.resample import upsample
from medlens.errors import MedlensError, one_line
from medlens.io.atomic import atomic_path, write_text
from medlens.io.background import OrderedWriter
from medlens.io.loading import Loaded, iter_inputs, plan_inputs  # noqa: F401  (iter_inputs re-exported)
from medlens.render.overlay import png_bytes

@dataclass
class Prepared:
    """One input ready for the model: (C, *S) tensor at model size, plus where it came from."""

    path: Path
    loaded: Loaded
    tensor: Tensor
    display: Tensor  # (C, *S_original) in [0, 1], for drawing
    stem: str = ""  # output file-name stem, unique within the run
    #: a volume for a 2D model trained on its slices: tensor is (n_slices, C, *size) along this axis
    slice_axis: int | None = None


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
    preprocessing: Preprocessing | None = None,
) -> Prepared:
    """Scale to [0, 1], resize to ``size``, normalise and match the model's channels
    (:func:`medlens.data.prepare.prepare_loaded`, the training pipeline's steps).

    Args:
        channels: the model's input channels: greyscale is repeated, RGB averaged to grey.
        size: spatial size for the model, e.g. (224, 224); None keeps the image's size.
        normalize: ``none``, ``imagenet`` (mean/std per RGB channel) or ``zscore`` (per image).
        preprocessing: a full record (e.g. a run folder's); replaces the three arguments above.
    """
    if preprocessing is None and callable(normalize):  # a model's own preparation (medlens.models.preprocessing)
        preprocessing = Preprocessing(channels=channels, size=tuple(size) if size else None, model_transform=normalize)
    pre = preprocessing or Preprocessing(channels=channels, size=tuple(size) if size else None, normalize=normalize)
    sliced = pre.slice_axis is not None and loaded.image.dim() == 4
    if pre.size is not None and len(pre.size) != loaded.image.dim() - 1 - sliced:
        raise MedlensError(f"{path}: --size has {len(pre.size)} numbers for a {loaded.image.dim() - 1}D image")
    ready = prepare_loaded(loaded, pre, path)
    return Prepared(path, loaded, ready.tensor, ready.display, slice_axis=ready.slice_axis)


def batches_by_shape(items: Iterable[Prepared], batch_size: int) -> Iterable[list[Prepared]]:
    """Group consecutive inputs of the same shape into batches of at most ``batch_size``."""
    batch: list[Prepared] = []
    for item in items:
        if item.slice_axis is not None:  # a sliced volume is a batch of its own slices
            if batch:
                yield batch
                batch = []
            yield [item]
            continue
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


FLAT_NOTE = "flat map: no evidence for this class"


def is_flat(heat: Tensor, raw: Tensor | None = None, eps: float = 1e-6) -> bool:
    """Whether a map carries no evidence: constant (its range below ``eps`` of its scale) or all zeros."""
    for m in (heat, raw):
        if m is None:
            continue
        m = m.float()
        span = float(m.max() - m.min()) if m.numel() else 0.0
        if span <= eps * max(1.0, float(m.abs().max()) if m.numel() else 0.0):
            return True
    return False


def fast_regions(heat: Tensor, fraction: float, limit: int = 10) -> list[dict[str, Any]]:
    """:func:`medlens.core.boxes.component_regions` (top ``fraction``, face connectivity) with
    scipy.ndimage labelling: same boxes, milliseconds on 512x512 maps."""
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - scipy ships with the dependencies
        return component_regions(heat, fraction=fraction)[:limit]
    from medlens.core.boxes import topk_mask

    h = heat.detach().float().cpu()
    mask = topk_mask(h[None], fraction)[0].numpy()
    labels, count = ndimage.label(mask)
    if count == 0:
        return []
    # per-component statistics over the selected pixels only (a few % of the map): ndimage.maximum
    # argsorts the whole map, which cost more than the explanation itself on 512x512 maps
    inside = labels > 0
    ids, values = labels[inside] - 1, h.numpy()[inside]
    areas = np.bincount(ids, minlength=count)
    means = np.bincount(ids, weights=values, minlength=count) / np.maximum(areas, 1)
    peaks = np.full(count, -np.inf)
    np.maximum.at(peaks, ids, values)
    found = ndimage.find_objects(labels)
    regions = []
    for k, sl in enumerate(found):
        box = [s.start for s in sl] + [s.stop for s in sl]
        regions.append({"box": box, "area": int(areas[k]), "peak": float(peaks[k]), "mean": float(means[k])})
    regions.sort(key=lambda r: (-r["peak"], -r["area"]))
    return regions[:limit]


BOX_COLOUR, TRUTH_COLOUR = "#00ff00", "#ff00ff"


def annotated_boxes(path: Path, spatial: Sequence[int]) -> list[list[int]]:
    """YOLO boxes written beside a 2D image (``N.jpg`` + ``N.txt``), as [y0, x0, y1, x1] pixels; [] if none."""
    txt = path.with_suffix(".txt")
    if len(spatial) != 2 or not txt.is_file():
        return []
    from medlens.data.datasets import read_yolo_boxes

    try:
        _, boxes = read_yolo_boxes(txt)
    except (MedlensError, OSError, ValueError):
        return []
    h, w = spatial
    return [[int(y0 * h), int(x0 * w), max(int(y1 * h), int(y0 * h) + 1), max(int(x1 * w), int(x0 * w) + 1)] for x0, y0, x1, y1 in boxes]


def draw(display: Tensor, heat: Tensor, cmap: str, alpha: float, boxes: Sequence[Sequence[int]] = (),
         orientation: str | None = None, truth: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """The overlay a person looks at: a 2D image with its map (numbered boxes, annotated boxes in
    magenta), or three orthogonal slices of a volume through the map's peak."""
    from medlens import render

    if heat.dim() == 2:
        rgb = render.overlay(display, heat, cmap=cmap, alpha=alpha)
        if truth:
            rgb = render.draw_boxes(rgb, list(truth), colors=[TRUTH_COLOUR] * len(truth))
        if boxes:
            rgb = render.draw_boxes(rgb, list(boxes), colors=[BOX_COLOUR] * len(boxes), labels=[str(n + 1) for n in range(len(boxes))])
        return rgb
    return render.orthogonal_views(display, heat, cmap=cmap, alpha=alpha, orientation=orientation)


def titled_overlay(rgb: np.ndarray, title: str, subtitle: str, cmap: str, flat: bool = False,
                   box_legend: str | None = None, outline_legend: str | None = None) -> bytes:
    """The overlay as a readable picture: title (file, method, layer), class and probability, a
    relevance colourbar, the legends of boxes and outlines, and a note when the map is flat
    (:func:`medlens.render.titled.titled_picture`)."""
    from medlens.render.titled import titled_picture

    legend = [(label, colour) for label, colour in ((box_legend, BOX_COLOUR), (outline_legend, TRUTH_COLOUR)) if label]
    return titled_picture(rgb, title, subtitle, cmap, note=FLAT_NOTE if flat else None, legend=legend)


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
    preprocessing: Preprocessing | None = None,
    region: Any = None,
    boxes: str = "components",
    titles: bool = True,
    layers_apart: bool = False,
    workers: int = 0,
    background_writes: bool = True,
) -> RunSummary:
    """Explain every input and write overlays, maps, boxes and ``index.html`` to ``out_dir``.

    Args:
        preprocessing: how inputs become model tensors (a run folder's record); default from
            ``size``, ``normalize`` and the model's first convolution.
        region: segmentation only: ``"pred"`` (each explained class's predicted mask), a path to a
            mask file, a box ``((lo...), (hi...))`` in input pixels, or a (*S) mask tensor.
        boxes: ``components`` (boxes around the top ``box_fraction`` of each map) or ``none``.
        titles: overlays as titled pictures with a colourbar (False: the bare overlay pixels).
        layers_apart: with several ``layer`` s, one map per layer instead of one fused map, and a
            figure per input and method with the layers side by side (``--fusion none``).
        workers: processes that read and prepare the inputs ahead of the model (a torch
            DataLoader, inputs kept in order; 0: read them in this process). The outputs are
            the same for any number.
        background_writes: encode and write each batch's files on a thread while the model
            explains the next batch (:class:`medlens.io.background.OrderedWriter`; results in
            input order either way). False: write them before the next batch starts.

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
    if boxes not in ("components", "none"):
        raise MedlensError(f"--boxes {boxes!r}: use components or none")
    if workers < 0:
        raise MedlensError(f"--workers {workers}: must be 0 or more")
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
    if preprocessing is None:
        preprocessing = Preprocessing(channels=channels, size=tuple(size) if size else None, normalize=normalize)
    elif preprocessing.channels is None:
        preprocessing = preprocessing.override(channels=channels)
    if class_names is None and preprocessing.class_names:
        class_names = list(preprocessing.class_names)
    summary = RunSummary(out_dir=out)
    taken: set[str] = set()
    settings = {"cmap": cmap, "alpha": alpha, "box_fraction": box_fraction, "boxes": boxes, "titles": titles}

    def prepared() -> Iterable[Prepared]:
        for path, item, error in prepared_inputs(plan, policy, max_pixels, preprocessing, workers):
            if item is None:
                summary.bad.append((path, error))
                bar.update(1)
                continue
            item.stem = safe_stem(path, taken)
            yield item

    from tqdm import tqdm

    plan = plan_inputs(inputs, exclude=[out])  # folders expanded once: the total here, the reading below
    bar = tqdm(total=len(plan), desc="explaining", unit="input", disable=not progress)
    per_item = region is not None
    def write_job(item: Prepared, result: Explanation, i: int, label: str, seg: Tensor | None, extra: dict[str, Any]):
        def job() -> tuple[Prepared, str, dict[str, Any] | None, str | None]:
            try:
                return item, label, _write_one(out, item, result, i, label, class_names, settings, seg, extra, dicom), None
            except MedlensError as error:  # drawing or writing this input failed: none of its files stay
                return item, label, None, str(error)
        return job

    def written(apart: dict[str, list[dict[str, Any]]]):
        def on_done(done: tuple[Prepared, str, dict[str, Any] | None, str | None]) -> None:
            item, label, record, error = done
            if record is None:
                summary.bad.append((item.path, f"{label}: {error}"))
                return
            summary.written.append(record)
            apart.setdefault(item.stem, []).append(record)
        return on_done

    try:
        with OrderedWriter(depth=16 if background_writes else 0) as writer:
            for batch in batches_by_shape(prepared(), 1 if per_item else batch_size):
                for method in methods:
                    opts = options_for(method, method_options or {}, methods)
                    apart: dict[str, list[dict[str, Any]]] = {}
                    for unit_layer, label in _layer_units(method, layer, layers_apart):
                        for group, result, extra, output in _explained(model, batch, device, method, target, unit_layer, opts, summary, region):
                            for i, item in enumerate(group):
                                seg = None if output is None else output[i : i + 1]
                                writer.submit(write_job(item, result, i, label, seg, extra), written(apart))
                    if layers_apart and titles:
                        writer.drain()  # the per-layer figures of this batch are read back below
                        for stem, records in apart.items():
                            _side_by_side(out, f"{stem}_{method.replace('+', 'p')}_layers.png", records)
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


class PreparedInputs(torch.utils.data.Dataset):
    """The plan's inputs read and prepared, one per index: ``(path, Prepared, None)``, or
    ``(path, None, reason)`` for an input that cannot be read or prepared."""

    def __init__(self, plan: Sequence[tuple[Path, MedlensError | None]], policy: Any, max_pixels: int | None,
                 preprocessing: Preprocessing) -> None:
        self.plan, self.policy, self.max_pixels, self.preprocessing = list(plan), policy, max_pixels, preprocessing

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> tuple[Path, Prepared | None, str | None]:
        path, problem = self.plan[index]
        if problem is not None:
            return path, None, str(problem)
        try:
            from medlens.io.loading import read_image

            loaded = read_image(path, policy=self.policy, max_pixels=self.max_pixels)
            return path, prepare(path, loaded, None, None, preprocessing=self.preprocessing), None
        except MedlensError as error:
            return path, None, str(error)


def _as_is(item: Any) -> Any:
    return item


def prepared_inputs(plan, policy, max_pixels, preprocessing: Preprocessing, workers: int = 0,
                    prefetch: int = 4) -> Iterable[tuple[Path, Prepared | None, str | None]]:
    """:class:`PreparedInputs` in plan order, read in ``workers`` DataLoader processes (at most
    ``prefetch`` inputs ahead per worker) or, with 0, here as they are asked for."""
    if workers < 0:
        raise MedlensError(f"--workers {workers}: must be 0 or more")
    data = PreparedInputs(plan, policy, max_pixels, preprocessing)
    if workers == 0 or len(data) <= 1:
        return (data[i] for i in range(len(data)))
    return iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=min(workers, len(data)),
                                            collate_fn=_as_is, prefetch_factor=prefetch))


def _explained(model, batch, device, method, target, layer, options, summary, region=None):
    """(inputs, Explanation, extra JSON fields, segmentation output or None) for ``batch``; when the
    batch fails, each input is tried on its own so only the inputs that fail themselves are reported."""
    groups = [batch]
    while groups:
        group = groups.pop(0)
        if group[0].slice_axis is not None:
            try:
                result, extra, output = _explain_slices(model, group[0], device, method, target, layer, options, region)
            except (MedlensError, RuntimeError) as error:
                summary.bad.append((group[0].path, f"{method}: {one_line(error)}"))
                continue
            yield group, result, extra, output
            continue
        x = torch.stack([p.tensor for p in group]).to(device)
        try:
            if region is not None:
                result, extra = _explain_with_region(model, x, group[0], method, target, layer, region, options)
            else:
                result, extra = explain(model, x, method, target=target, layer=layer, **options), {}
            output = _segmentation_output(model, x) if result.task == "segmentation" else None
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
        yield group, result, extra, output


def _layer_units(method: str, layer: Any, apart: bool) -> list[tuple[Any, str]]:
    """(layer argument, output label) per explanation to run: one fused unit, or one per layer."""
    if not apart or isinstance(layer, str) or not layer or len(layer) < 2:
        return [(layer, method)]
    return [(name, f"{method}@{name}") for name in layer]


def _side_by_side(out: Path, name: str, records: Sequence[dict[str, Any]]) -> None:
    """One picture of an input's per-layer figures: a column per layer, a row per target."""
    from PIL import Image

    rows = []
    for k in range(len(records[0]["targets"])):
        tiles = [Image.open(out / (r["targets"][k].get("figure") or r["targets"][k]["png"])).convert("RGB") for r in records]
        height = max(t.height for t in tiles)
        row = Image.new("RGB", (sum(t.width for t in tiles), height), "white")
        x = 0
        for tile in tiles:
            row.paste(tile, (x, 0))
            x += tile.width
        rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    with atomic_path(out / name) as tmp:
        sheet.save(tmp, format="PNG")
    _note_outputs(out, [name])


SLICE_CHUNK = 16


def _explain_slices(model, item, device, method, target, layer, options, region, chunk: int = SLICE_CHUNK):
    """Explain a volume with a 2D model trained on its slices (:attr:`Preprocessing.slice_axis`).

    The targets are chosen once for the volume (its slices' pooled scores, averaged), every slice is
    explained for them in batches of ``chunk``, and the raw maps are stacked back into a volume and
    normalised over the whole volume, so slices keep their relative strength.

    Returns:
        (Explanation with (1, K, *S) maps, extra JSON fields, (1, N, *S) segmentation output or None).
    """
    from medlens.core.resample import normalise, upsample
    from medlens.core.targets import pool_scores, resolve_targets

    if region is not None and str(region) != "pred":
        raise MedlensError("a model trained on slices takes --region pred or no region, not a mask or a box")
    axis, slices = item.slice_axis, item.tensor
    with torch.no_grad():
        outputs = torch.cat([_segmentation_output(model, slices[s : s + chunk].to(device)) for s in range(0, len(slices), chunk)])
    segmentation = outputs.dim() == slices.dim()
    pooled = pool_scores(outputs, slices) if segmentation else outputs
    classes = resolve_targets(target, pooled.mean(0, keepdim=True))[0]
    predicted = outputs.argmax(1) if segmentation else None
    used: dict[int, str] = {}
    columns = []  # per target class: (Z, 1, *plane) raw maps upsampled to the slice size, and the Explanation parts
    for cls in classes.tolist() if region is not None else [classes.tolist()]:
        parts = []
        for s in range(0, len(slices), chunk):
            x = slices[s : s + chunk].to(device)
            mask = None
            if region is not None:
                mask = predicted[s : s + chunk] == cls
                mask[~mask.flatten(1).any(1)] = True  # slices without the class pool over the whole slice
            targets = torch.tensor([cls] if region is not None else cls, device=device).expand(len(x), -1)
            parts.append(explain(model, x, method, target=targets, layer=layer, region=mask, **options))
        if region is not None:
            count = int((predicted == cls).sum())
            used[int(cls)] = f"predicted mask ({count} voxels)" if count else "whole slices (class not predicted)"
        columns.append(parts)
    first = columns[0][0]
    plane = tuple(slices.shape[2:])
    raw = torch.cat([torch.cat([upsample(p.raw, plane) for p in parts]) for parts in columns], 1)  # (Z, K, *plane)
    raw_volume = raw.movedim(0, 1 + axis).unsqueeze(0)  # (1, K, *S)
    scores = torch.cat([torch.cat([p.scores for p in parts]) for parts in columns], 1).mean(0, keepdim=True)
    result = Explanation(normalise(raw_volume), raw_volume, classes[None].to(device), scores, pooled.mean(0, keepdim=True),
                         first.method, first.layers, "segmentation" if segmentation else first.task,
                         {**first.info, "slice_axis": axis, "slices": len(slices)})
    extra: dict[str, Any] = {"sliced": {"axis": "XYZ"[axis], "slices": len(slices)}}
    if region is not None:
        extra |= {"region": "pred", "region_per_class": used}
    output = outputs.movedim(0, 1 + axis).unsqueeze(0) if segmentation else None
    return result, extra, output


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


def _note_outputs(out: Path, names: Sequence[str]) -> None:
    """List one input's files in ``out/.medlens-outputs``, so ``--overwrite`` removes exactly them later."""
    with open(out / MANIFEST, "a", encoding="utf-8") as handle:
        handle.write("".join(f"{n}\n" for n in [*names, "index.html", "bad_files.csv"]))


@torch.no_grad()
def _segmentation_output(model: nn.Module, x: Tensor) -> Tensor:
    from medlens.core.targets import model_output

    return model_output(model(x)).float()


def _region_mask(region: Any, item: Prepared, spatial: Sequence[int]) -> Any:
    """A fixed region (mask file, box in input pixels, mask tensor) at the model tensor's size."""
    if isinstance(region, (str, Path)) and str(region) != "pred":
        from medlens.io.loading import read_image

        mask = read_image(Path(region)).image[:1].float()
        if tuple(mask.shape[1:]) != tuple(item.loaded.spatial_shape):
            raise MedlensError(f"--region {region}: mask shape {tuple(mask.shape[1:])} differs from the input's {item.loaded.spatial_shape}")
        mask = (mask > 0).float()
        return torch.nn.functional.interpolate(mask[None], size=tuple(spatial), mode="nearest")[0, 0]
    if isinstance(region, Tensor):
        return region
    lower, upper = region  # a box in the input's own pixels -> model pixels
    scale = [t / s for t, s in zip(spatial, item.loaded.spatial_shape)]
    return ([int(v * f) for v, f in zip(lower, scale)], [max(int(v * f), int(l * f) + 1) for v, l, f in zip(upper, lower, scale)])


def _explain_with_region(model, x, item, method, target, layer, region, options) -> tuple[Explanation, dict[str, Any]]:
    """Explain one input of a segmentation model over a region; ``pred`` uses each class's own predicted mask."""
    from medlens.core.targets import resolve_targets

    if str(region) != "pred":
        return explain(model, x, method, target=target, layer=layer, region=_region_mask(region, item, x.shape[2:]), **options), {"region": str(region)}
    logits = _segmentation_output(model, x)
    if logits.dim() != x.dim():
        raise MedlensError("--region pred needs a segmentation model (one output map per class)")
    predicted = logits.argmax(1)[0]
    classes = resolve_targets(target, logits.mean(dim=tuple(range(2, logits.dim()))))[0].tolist()
    parts, used = [], {}
    for cls in classes:
        mask = predicted == cls
        whole = not bool(mask.any())
        parts.append(explain(model, x, method, target=[cls], layer=layer, region=None if whole else mask, **options))
        used[int(cls)] = "whole image (class not predicted)" if whole else f"predicted mask ({int(mask.sum())} voxels)"
    first = parts[0]
    merged = Explanation(torch.cat([p.maps for p in parts], 1), torch.cat([p.raw for p in parts], 1),
                         torch.cat([p.targets for p in parts], 1), torch.cat([p.scores for p in parts], 1),
                         first.logits, first.method, first.layers, first.task, first.info)
    return merged, {"region": "pred", "region_per_class": used}


def _find_label(path: Path) -> Path | None:
    """A Decathlon-style ground truth beside an input (``imagesTr/x.nii.gz`` -> ``labelsTr/x.nii.gz``)."""
    if path.parent.name.startswith("images"):
        candidate = path.parent.parent / path.parent.name.replace("images", "labels", 1) / path.name
        if candidate.is_file() and not candidate.name.startswith("."):
            return candidate
    return None


def _write_segmentation(out: Path, stem: str, item: Prepared, seg: Tensor, names: Sequence[str], record: dict[str, Any]) -> None:
    """Prediction at the input's size (NIfTI for volumes), per-class voxel counts, Dice against a label found
    beside the input, and an image | label | prediction panel with one colour per class."""
    spatial = tuple(item.display.shape[1:])
    logits = upsample(seg.cpu(), spatial)[0]
    probs = logits.softmax(0)
    predicted = probs.argmax(0)
    counts = torch.bincount(predicted.flatten(), minlength=logits.shape[0]).tolist()
    summary: dict[str, Any] = {"voxels": {names[c]: int(n) for c, n in enumerate(counts)},
                               "classes_present": [names[c] for c, n in enumerate(counts) if n and c > 0]}
    label = None
    found = _find_label(item.path)
    if found is not None:
        from medlens.io.loading import read_image

        try:
            label = read_image(found).image[0].round().long()
            if tuple(label.shape) != spatial:
                label = None
        except MedlensError:
            label = None
    if label is not None:
        summary["label"] = str(found)
        dice = {}
        for c in range(1, logits.shape[0]):
            a, b = predicted == c, label == c
            total = int(a.sum() + b.sum())
            dice[names[c]] = round(2 * int((a & b).sum()) / total, 4) if total else None
        summary["dice"] = dice
    if item.loaded.is_3d:
        from medlens.io.nifti import write_nifti

        write_nifti(out / f"{stem}_prediction.nii.gz", predicted[None].float(), item.loaded.meta)
        record["prediction_nifti"] = f"{stem}_prediction.nii.gz"
    panel = f"{stem}_segmentation.png"
    with atomic_path(out / panel) as tmp:
        tmp.write_bytes(segmentation_panel(item.display.cpu(), label, predicted, names, item.path.name,
                                           item.loaded.meta.get("orientation")))
    record["segmentation_png"] = panel
    record["prediction"] = summary


def segmentation_panel(display: Tensor, label: Tensor | None, predicted: Tensor, names: Sequence[str], title: str,
                       orientation: str | None = None) -> bytes:
    """image | label | prediction (one colour per class, a legend); a volume at its foreground centre, axial plane."""
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    from medlens.render.panels import figure_png, new_figure

    def plane(v: Tensor) -> Tensor:
        if v.dim() == 2:
            return v
        if orientation and str(orientation).upper() == "RAS":  # axial: fixes Z, anterior up, right on the left
            return v[..., z].transpose(-1, -2).flip(-1, -2)
        return v[z]

    image = display.mean(0)
    if image.dim() == 3:
        fg = (predicted > 0) | (label > 0) if label is not None else predicted > 0
        axis = 2 if orientation and str(orientation).upper() == "RAS" else 0
        other = tuple(d for d in range(3) if d != axis)
        per = fg.float().sum(other)
        z = int(per.argmax()) if bool(per.any()) else image.shape[axis] // 2
    colours = colormaps["tab10"].colors
    def paint(mask: Tensor) -> np.ndarray:
        grey = plane(image).numpy()
        rgb = np.stack([grey] * 3, -1) * 0.8
        m = plane(mask).numpy()
        for c in range(1, len(names)):
            rgb[m == c] = 0.45 * rgb[m == c] + 0.55 * np.array(colours[(c - 1) % 10])
        return rgb.clip(0, 1)
    panels = [("image", np.stack([plane(image).numpy()] * 3, -1).clip(0, 1))]
    if label is not None:
        panels.append(("label", paint(label)))
    panels.append(("prediction", paint(predicted)))
    fig = new_figure(2.6 * len(panels) + 0.4, 3.1)
    axes = fig.subplots(1, len(panels))
    for ax, (name, rgb) in zip(np.atleast_1d(axes), panels):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(handles=[Patch(color=colours[(c - 1) % 10], label=names[c]) for c in range(1, len(names))],
               loc="outside lower center", ncol=max(1, len(names) - 1), fontsize=8)
    fig.suptitle(title + (f" (axial slice {z})" if image.dim() == 3 else ""), fontsize=9)
    return figure_png(fig, dpi=100)


def _write_one(
    out: Path, item: Prepared, result: Explanation, i: int, method: str,
    class_names: Sequence[str] | None, settings: dict[str, Any], seg: Tensor | None = None, extra: dict[str, Any] | None = None,
    dicom: dict[str, Any] | None = None,
) -> dict[str, Any]:
    stem = f"{item.stem}_{re.sub(r'[^A-Za-z0-9_-]+', '-', method.replace('+', 'p'))}"
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{stem[:40]}.", dir=out))
    try:
        record = _write_unit(staging, stem, item, result, i, method, class_names, settings, seg, extra, dicom)
        names = sorted(p.name for p in staging.iterdir())
        for name in names:  # everything is written: move the unit in (renames within one folder)
            os.replace(staging / name, out / name)
        _note_outputs(out, names)
    except OSError:
        raise
    except (MedlensError, RuntimeError, ValueError, TypeError, IndexError) as error:
        raise MedlensError(f"{item.path}: could not write its results ({one_line(error)}); none kept") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _write_unit(
    out: Path, stem: str, item: Prepared, result: Explanation, i: int, method: str,
    class_names: Sequence[str] | None, settings: dict[str, Any], seg: Tensor | None = None,
    extra: dict[str, Any] | None = None, dicom: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cmap, alpha, box_fraction = settings["cmap"], settings["alpha"], settings["box_fraction"]
    spatial = tuple(item.display.shape[1:])
    maps = upsample(result.maps[i : i + 1], spatial)[0].clamp(0, 1)  # (K, *S) at the input's own size
    n_out = result.logits.shape[1]
    names = list(class_names) if class_names and len(class_names) >= n_out else [f"class {c}" for c in range(n_out)]
    name_of = lambda c: names[c] if 0 <= c < len(names) else f"class {c}"  # noqa: E731
    probabilities = result.logits[i].float().softmax(0)
    segmentation = result.task == "segmentation"
    predicted = int(result.predictions[i])
    if segmentation and seg is not None:  # the largest predicted foreground class, not the mean-logit winner
        counts = torch.bincount(seg[0].argmax(0).flatten(), minlength=n_out)
        predicted = int(counts[1:].argmax()) + 1 if n_out > 1 and bool(counts[1:].any()) else 0
    record: dict[str, Any] = {
        "source": str(item.path), "method": method, "layers": result.layers, "auto_layer": result.info.get("auto_layer"),
        "task": result.task, "predicted": predicted, "predicted_name": name_of(predicted),
        "probabilities": {name_of(c): round(float(p), 6) for c, p in enumerate(probabilities.tolist())} if not segmentation else None,
        "targets": [], "npy": f"{stem}.npy",
    }
    record.update(extra or {})
    with atomic_path(out / f"{stem}.npy") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, maps.cpu().numpy().astype(np.float32))
    if item.loaded.is_3d:
        from medlens.io.nifti import write_nifti

        write_nifti(out / f"{stem}.nii.gz", maps.cpu(), item.loaded.meta)
        record["nifti"] = f"{stem}.nii.gz"
    if segmentation and seg is not None:
        _write_segmentation(out, stem, item, seg, names, record)
    classes = result.targets[i].tolist()
    per_head = maps.shape[0] != len(classes)  # raw attention with head_fusion="none": one map per head
    orientation = item.loaded.meta.get("orientation") if item.loaded.is_3d else None
    truth = annotated_boxes(item.path, spatial)
    if truth:
        record["annotated_boxes"] = truth
    layer_text = ", ".join(result.layers) if result.layers else "input"
    for k in range(maps.shape[0]):
        cls = classes[min(k, len(classes) - 1)]
        heat = maps[k]
        raw = result.raw[i, k] if result.raw.dim() == result.maps.dim() else None
        flat = is_flat(heat, raw)
        if flat or settings["boxes"] == "none":
            regions = []
        elif dicom and dicom["threshold"] is not None:
            regions = component_regions(heat, threshold=dicom["threshold"])
        else:
            regions = fast_regions(heat, box_fraction)
        cell = argmax_cell_box(raw, spatial) if raw is not None and not flat and settings["boxes"] != "none" else None
        boxes = [r["box"] for r in regions]
        png = f"{stem}_c{cls}" + (f"_head{k}" if per_head else "") + ".png"
        target_name = name_of(cls) + (f", head {k}" if per_head else "")
        rgb = draw(item.display.cpu(), heat.cpu(), cmap, alpha, boxes[:3] if heat.dim() == 2 else (), orientation, truth)
        with atomic_path(out / png) as tmp:  # the overlay at the input's own size (pixels only)
            tmp.write_bytes(png_bytes(rgb))
        figure = None
        if settings["titles"]:  # the picture a person reads: title, class, probability, colourbar, legend
            prob = "" if segmentation else f", p = {float(probabilities[cls]):.3f}"
            what = (f"{target_name}{prob}; predicted {name_of(predicted)}"
                    + (f", p = {float(probabilities[predicted]):.3f}" if not segmentation else ""))
            where = (extra or {}).get("region_per_class", {}).get(int(cls)) or (extra or {}).get("region")
            if segmentation:
                what += f"; region: {where or 'whole image'}"
            legend = f"1-3: strongest regions (top {box_fraction:.0%})" if boxes and heat.dim() == 2 else None
            figure = png[:-4] + "_figure.png"
            data = titled_overlay(rgb, f"{item.path.name} | {method} | {layer_text}", what, cmap, flat, legend,
                                  "annotated box" if truth else None)
            with atomic_path(out / figure) as tmp:
                tmp.write_bytes(data)
        record["targets"].append({
            "class": cls, "name": target_name,
            "score": float(result.scores[i, min(k, len(classes) - 1)]),
            "probability": None if segmentation else round(float(probabilities[cls]), 6),
            "flat": flat, "png": png, "figure": figure,
            "boxes": [{"box": [int(v) for v in r["box"]], "peak": float(r.get("peak", 0.0))} for r in regions],
            "argmax_cell_box": [int(v) for v in cell] if cell is not None else None,
        })
        if item.loaded.is_3d:
            from medlens.io.nifti import write_nifti

            name = f"{stem}_c{cls}" + (f"_head{k}" if per_head else "") + ".nii.gz"
            write_nifti(out / name, heat[None].cpu(), item.loaded.meta)
            record["targets"][-1]["nifti"] = name
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
                f'<figure class="card"><img src="{html.escape(t.get("figure") or t["png"])}" alt="{html.escape(rec["source"])}">'
                f"<figcaption><b>{html.escape(Path(rec['source']).name)}</b><br>{html.escape(rec['method'])}: "
                f"{html.escape(t['name'])} ("
                + (f"p = {t['probability']:.3f}" if t.get("probability") is not None else f"score {t['score']:.3g}")
                + (", flat map" if t.get("flat") else "")
                + f"); predicted {html.escape(rec['predicted_name'])}<br>"
                f'<a href="{html.escape(rec["npy"])}">map .npy</a>'
                + (f' · <a href="{html.escape(rec["nifti"])}">NIfTI</a>' if "nifti" in rec else "")
                + "</figcaption></figure>"
            )
    reasons: dict[str, list[str]] = {}
    for p, r in summary.bad:  # each skipped file once, with every reason it was skipped for
        reasons.setdefault(str(p), [])
        if r not in reasons[str(p)]:
            reasons[str(p)].append(r)
    bad = "".join(f"<li><code>{html.escape(p)}</code>: {html.escape('; '.join(r))}</li>" for p, r in reasons.items())
    sections = [("Explanations", f'<div class="gallery">{"".join(cards) or "<p>Nothing was explained.</p>"}</div>')]
    if bad:
        sections.append(("Inputs that were skipped", f"<ul>{bad}</ul>"))
    write_text(out / "index.html", html_page("medlens explain", sections))
