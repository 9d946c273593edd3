"""The evaluation runner behind ``medlens evaluate``: models x methods x metrics over a dataset.

Data is any iterable of ``(name, image (C, *S), label or None, mask (1, *S) or None, box or None)``
(boxes ``lo..., hi...`` in pixels, hi exclusive), so the synthetic phantoms
(:func:`phantom_items`), folder datasets and Decathlon volumes (:func:`folder_items`) and
in-memory lists all work. Items are streamed in batches of equal shape; every image gives one
row per (model, method) with every metric column; aggregates carry bootstrap 95% confidence
intervals. Outputs: ``rows.csv`` (+ ``rows.parquet``), ``summary.csv``, ``summary.md``,
``sanity.csv`` (cascading and independent randomisation, if asked) and ``report.html`` with mean deletion/insertion curves and per-method
galleries of the best and worst cases (images embedded).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.core.boxes import pixel_boxes
from medlens.core.engine import explain, options_for
from medlens.errors import MedlensError, one_line
from medlens.io.atomic import atomic_path, write_text
from medlens.metrics.complexity import entropy, gini, max_sensitivity, method_explainer
from medlens.metrics.faithfulness import faithfulness_metrics
from medlens.metrics.localisation import boxes_to_masks, localisation_metrics
from medlens.metrics.sanity import model_randomisation
from medlens.workflows.catalogue import CATALOGUE, CATALOGUE_MORE, LOWER_IS_BETTER as _CATALOGUE_LOWER, catalogue_columns

__all__ = ["EvalResult", "bootstrap_ci", "evaluate", "folder_items", "phantom_items", "summarise"]

Item = tuple[str, Tensor, "int | None", "Tensor | None", "Tensor | None"]
METRIC_GROUPS = ("localisation", "faithfulness", "complexity", "robustness", "sanity", "catalogue", *CATALOGUE,
                 "catalogue_more", *CATALOGUE_MORE)
#: the column a gallery ranks by, per metric group present (first match wins)
GALLERY_KEYS = ("energy_pointing_game", "iou@10", "deletion_auc", "gini")
#: columns where lower is better (for "best" in galleries and summaries)
LOWER_IS_BETTER = {"deletion_auc", "road_morf_auc", "average_drop", "entropy", "max_sensitivity", *_CATALOGUE_LOWER}


@dataclass
class EvalResult:
    """What :func:`evaluate` produced.

    Attributes:
        rows: one row per (model, method, image): identifiers and every metric column (pandas).
        summary: one row per (model, method, metric): mean, 95% CI, n scored, n empty (pandas).
        curves: (model, method) -> {"deletion"/"insertion": (fractions (T,), mean scores (T,))}.
        sanity: sanity-check rows (pandas) or None.
        files: paths written.
    """

    rows: Any
    summary: Any
    curves: dict
    sanity: Any = None
    files: list[Path] = field(default_factory=list)

    def table(self, metrics: Sequence[str] | None = None) -> str:
        """The summary as a Markdown table: methods as rows, metrics as columns, mean [95% CI]."""
        return markdown_table(self.summary, metrics)

    @property
    def unannotated(self) -> list[str]:
        """Images without any annotation (empty mask and box): localisation is NaN for them, not scored."""
        if "empty_annotation" not in self.rows:
            return []
        return list(dict.fromkeys(self.rows.loc[self.rows["empty_annotation"] == 1, "image"]))

    def empty_note(self) -> str:
        """One line reporting the images whose annotation is empty (or '' if none)."""
        names = self.unannotated
        if not names:
            return ""
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        return f"{len(names)} image(s) without annotation, localisation not scored (NaN): {shown}"


# ---------------------------------------------------------------- data


def phantom_items(phantoms: Any) -> Iterator[Item]:
    """Items from a :class:`medlens.data.phantoms.PhantomSet` (images, labels, masks and boxes)."""
    names = phantoms.names or [f"phantom_{i:04d}" for i in range(len(phantoms.labels))]
    for i, name in enumerate(names):
        yield name, phantoms.images[i], int(phantoms.labels[i]), phantoms.masks[i], phantoms.boxes[i]


def folder_items(source: str | Path, size: int | Sequence[int] | None = None, channels: int | None = None,
                 classes: Sequence[str] | None = None, items: Sequence[Any] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 bad: list[tuple[str, str]] | None = None, preprocessing: Any = None, workers: int = 0) -> Iterator[Item]:
    """Items from a folder dataset (:mod:`medlens.data.datasets`): class folders with YOLO boxes,
    image+mask folders, Decathlon, or a CSV. Boxes (normalised x0, y0, x1, y1) become pixel boxes
    and a mask (their union) after resizing to ``size``; a Decathlon label becomes a foreground mask.
    ``items`` restricts to a subset of the index (e.g. a held-out split). An item that cannot be
    read (a truncated file, a bad mask) is left out and, when ``bad`` is a list, appended to it as
    (path, reason); the others are still yielded. ``preprocessing`` (a
    :class:`medlens.data.prepare.Preprocessing`, e.g. a run folder's) replaces size, channels, mean
    and std: images are then prepared exactly as in training (``none`` normalisation is honoured).
    ``workers`` > 0 reads and prepares the items in that many DataLoader processes (in order)."""
    from medlens.data.datasets import MedicalDataset, eval_transforms, index_source

    index, names, _task = index_source(source, classes, bad=bad)
    dataset_items = list(items) if items is not None else index
    probe_set = MedicalDataset(dataset_items, names, channels=channels)
    probe = None
    for i in range(len(dataset_items)):
        try:
            probe = probe_set.read(i)
            break
        except MedlensError:
            continue
    if probe is None:
        probe = probe_set.read(0)  # every item is bad: the first one's reason stops the run
    ndim = probe["image"].dim() - 1
    if isinstance(size, Sequence) and len(size) == 1:  # "--size 112" means 112 on every axis
        size = int(size[0])
    transform = eval_transforms(size, ndim, mean, std) if size is not None else None
    if preprocessing is not None:
        from medlens.data.datasets import Compose, Normalise, Resize

        # training order (medlens.train.data): resize, match channels, then normalise
        transform = Compose([Resize(preprocessing.size)] if preprocessing.size is not None else [])
        channels = preprocessing.channels if preprocessing.channels is not None else channels
        normalise = Normalise(*preprocessing.mean_std()) if preprocessing.normalize != "none" else None
    dataset = _FolderItems(MedicalDataset(dataset_items, names, transform=transform, channels=channels),
                           normalise if preprocessing is not None else None, ndim)
    if workers > 0 and len(dataset) > 1:
        samples = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(workers, len(dataset)),
                                                   collate_fn=_as_is, prefetch_factor=4))
    else:
        samples = (dataset[i] for i in range(len(dataset)))
    for sample in samples:
        if isinstance(sample, _BadItem):  # one bad item never stops the evaluation
            if bad is not None:
                bad.append((sample.path, sample.reason))
            continue
        yield sample


@dataclass
class _BadItem:
    path: str
    reason: str


def _as_is(item: Any) -> Any:
    return item


class _FolderItems(torch.utils.data.Dataset):
    """Folder items read, transformed and annotated, one per index: an :data:`Item`, or a
    :class:`_BadItem` for one that cannot be read (so a DataLoader worker never raises)."""

    def __init__(self, dataset: Any, normalise: Any, ndim: int) -> None:
        self.dataset, self.normalise, self.ndim = dataset, normalise, ndim

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Item | _BadItem:
        try:
            sample = self.dataset[i]
            if self.normalise is not None:
                sample = self.normalise(sample)
        except (MedlensError, RuntimeError, OSError) as error:
            return _BadItem(str(self.dataset.items[i].path), one_line(error))
        image = sample["image"].float()
        spatial = tuple(image.shape[1:])
        label = int(sample["label"]) if int(sample["label"]) >= 0 else None
        mask = (sample["mask"] > 0) if "mask" in sample else None
        box = None
        if len(sample["boxes"]) and self.ndim == 2:
            pix = pixel_boxes(sample["boxes"], spatial)  # (N, 4) x0, y0, x1, y1 normalised -> pixels
            union = boxes_to_masks(pix, spatial).any(dim=0)
            mask = union[None] if mask is None else mask
            box = torch.cat([pix[:, :2].amin(0), pix[:, 2:].amax(0)])
        return Path(sample["path"]).parent.name + "/" + Path(sample["path"]).stem, image, label, mask, box


def _batches(data: Iterable[Item], batch_size: int) -> Iterator[list[Item]]:
    """Consecutive items of equal shape, at most ``batch_size`` at a time."""
    batch: list[Item] = []
    for item in data:
        if len(item) != 5:
            raise MedlensError("each data item must be (name, image, label, mask, box)")
        if batch and (item[1].shape != batch[0][1].shape or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _annotations(batch: list[Item], spatial: tuple[int, ...], device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """Stacked masks (B, *S) and boxes (B, 2 nd); a missing annotation becomes an empty one."""
    nd = len(spatial)
    has_mask = any(it[3] is not None for it in batch)
    has_box = any(it[4] is not None for it in batch)
    masks = boxes = None
    if has_mask:
        masks = torch.stack([torch.zeros(spatial, dtype=torch.bool) if it[3] is None else
                             torch.as_tensor(it[3]).reshape(spatial).bool() for it in batch]).to(device)
    if has_box:
        boxes = torch.stack([torch.zeros(2 * nd, dtype=torch.long) if it[4] is None else
                             torch.as_tensor(it[4]).long().reshape(2 * nd) for it in batch]).to(device)
    return masks, boxes


# ---------------------------------------------------------------- statistics


def bootstrap_ci(values: Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap CI of the non-NaN ``values`` (1-D); resampled in chunks of
    replicates (bounded memory), equal to a one-shot draw (see :mod:`medlens.metrics.bootstrap`)."""
    from medlens.metrics.bootstrap import bootstrap_ci as chunked

    return chunked(values, n_boot, level, seed)


def summarise(rows: Any, n_boot: int = 1000, seed: int = 0) -> Any:
    """Aggregate per-image rows into (model, method, metric, mean, ci_low, ci_high, n, n_empty)."""
    import pandas as pd

    ids = {"model", "method", "image", "label", "target", "prediction", "empty_annotation"}
    metrics = [c for c in rows.columns if c not in ids and pd.api.types.is_numeric_dtype(rows[c])]
    out = []
    for (model, method), group in rows.groupby(["model", "method"], sort=False):
        for metric in metrics:
            values = torch.tensor(group[metric].to_numpy(dtype="float64"))
            mean, lo, hi = bootstrap_ci(values, n_boot, seed=seed)
            out.append({"model": model, "method": method, "metric": metric, "mean": mean, "ci_low": lo, "ci_high": hi,
                        "n": int((~torch.isnan(values)).sum()), "n_nan": int(torch.isnan(values).sum())})
    return pd.DataFrame(out)


def markdown_table(summary: Any, metrics: Sequence[str] | None = None) -> str:
    """Methods (and models) as rows, metrics as columns, ``mean [lo, hi]`` cells."""
    if summary is None or len(summary) == 0:
        return "(no results)"
    metrics = list(metrics) if metrics is not None else list(dict.fromkeys(summary["metric"]))
    multi_model = summary["model"].nunique() > 1
    head = (["model"] if multi_model else []) + ["method"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (model, method), group in summary.groupby(["model", "method"], sort=False):
        cells = {r.metric: f"{r.mean:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]" for r in group.itertuples()}
        row = ([model] if multi_model else []) + [method] + [cells.get(m, "") for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- running


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _thumbnail(image: Tensor, heat: Tensor, size: int = 96, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """A small 2D view (image channel-mean, map, mask) for galleries; 3D: the slice through the map's peak."""
    img = image.float().mean(dim=0)
    mask = mask.reshape(img.shape) if mask is not None else None
    if img.dim() == 3:
        z = int(heat.flatten().argmax()) // (heat.shape[1] * heat.shape[2])
        img, heat = img[z], heat[z]
        mask = mask[z] if mask is not None else None
    scale = size / max(img.shape)
    if scale < 1:
        new = [max(1, int(s * scale)) for s in img.shape]
        img = F.interpolate(img[None, None], size=new, mode="bilinear", align_corners=False)[0, 0]
        heat = F.interpolate(heat[None, None].float(), size=new, mode="bilinear", align_corners=False)[0, 0]
        if mask is not None:
            mask = F.interpolate(mask[None, None].float(), size=new, mode="nearest")[0, 0] > 0
    return img.cpu(), heat.cpu(), mask.cpu() if mask is not None else None


class _Gallery:
    """Keeps the k best and k worst cases of one (model, method) by a metric, as thumbnails."""

    def __init__(self, k: int) -> None:
        self.k, self.cases = k, []

    def offer(self, values: Tensor, names: list[str], images: Tensor, maps: Tensor, masks: Tensor | None = None) -> None:
        if self.k <= 0:
            return
        for i, v in enumerate(values.tolist()):
            if not math.isnan(v):
                self.cases.append((v, names[i], *_thumbnail(images[i], maps[i], mask=masks[i] if masks is not None else None)))
        self.cases.sort(key=lambda c: c[0])
        if len(self.cases) > 2 * self.k:
            self.cases = self.cases[: self.k] + self.cases[-self.k :]


def evaluate(
    models: nn.Module | Mapping[str, nn.Module],
    data: Iterable[Item],
    methods: Sequence[str] = ("gradcam",),
    metrics: Sequence[str] = ("localisation", "faithfulness", "complexity"),
    out_dir: str | Path | None = None,
    batch_size: int = 8,
    target: str = "label",
    layer: str | None = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    steps: int = 20,
    baseline: str = "zero",
    road: bool = True,
    n_boot: int = 1000,
    gallery: int = 4,
    progress: bool = True,
    sanity_images: int = 4,
    sanity_modes: Sequence[str] = ("cascading", "independent"),
    seed: int = 0,
) -> EvalResult:
    """Evaluate explanation methods on annotated images.

    Args:
        models: a model or {name: model}; each on its own device, inputs are moved there.
        data: iterable of (name, image (C, *S), label, mask (1, *S) or None, box (2 nd,) or None).
        methods: registered method names.
        metrics: groups from ``localisation`` (needs masks or boxes), ``faithfulness`` (deletion,
            insertion, ROAD, confidence), ``complexity`` (Gini, entropy), ``robustness``
            (max-sensitivity, 5 noisy copies per image) and ``sanity`` (parameter randomisation
            in each of ``sanity_modes``, Spearman and SSIM per step, on the first ``sanity_images`` images);
            ``catalogue`` (or any of its names, :data:`medlens.workflows.catalogue.CATALOGUE`): Quantus'
            catalogue -- faithfulness correlation/estimate, monotonicity, complexity, top-k, completeness, ...
        out_dir: where to write the tables and report; None writes nothing.
        target: ``"label"`` (the annotated class, the prediction where an item has no label) or ``"pred"``.
        layer, method_options: passed to :func:`medlens.explain` (options per method name).
        steps, baseline, road: deletion/insertion steps and baseline; whether to run ROAD.
        n_boot: bootstrap resamples for the 95% CIs.
        gallery: best and worst cases kept per method for the report.

    Returns:
        :class:`EvalResult`.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    unknown = [m for m in metrics if m not in METRIC_GROUPS]
    if unknown:
        raise MedlensError(f"unknown metric group {unknown[0]!r}; choose from {', '.join(METRIC_GROUPS)}")
    if isinstance(models, nn.Module):
        models = {"model": models}
    method_options = dict(method_options or {})
    rows: list[dict[str, Any]] = []
    curve_sums: dict[tuple[str, str, str], list] = {}
    galleries: dict[tuple[str, str], _Gallery] = {}
    sanity_rows: list[dict[str, Any]] = []
    sanity_batch: list[Item] = []
    bar = tqdm(desc="evaluate", unit="img", disable=not progress)
    for batch in _batches(data, batch_size):
        if "sanity" in metrics and len(sanity_batch) < sanity_images:
            sanity_batch += batch[: sanity_images - len(sanity_batch)]
        names = [it[0] for it in batch]
        labels = [it[2] for it in batch]
        for model_name, model in models.items():
            device = _device_of(model)
            x = torch.stack([torch.as_tensor(it[1]).float() for it in batch]).to(device)
            masks, boxes = _annotations(batch, tuple(x.shape[2:]), device)
            for method in methods:
                opts = options_for(method, method_options.get(method, {}), methods)
                probe_target = "pred" if target == "pred" or any(l is None for l in labels) else torch.tensor(labels, device=device)
                expl = explain(model, x, method, target=probe_target, layer=layer, **opts)
                maps, targets = expl.maps[:, 0], expl.targets[:, 0]
                cols: dict[str, Tensor] = {}
                if "localisation" in metrics:
                    if masks is None and boxes is None:  # no annotation in this batch: flagged, left NaN
                        cols["empty_annotation"] = torch.ones(x.shape[0])
                    else:
                        cols.update(localisation_metrics(maps, masks, boxes))
                if "faithfulness" in metrics:
                    faith, curves = faithfulness_metrics(model, x, maps, targets, steps=steps, baseline=baseline,
                                                         batch_size=max(batch_size * 4, 32), with_road=road)
                    cols.update(faith)
                    for kind in ("deletion", "insertion"):
                        acc = curve_sums.setdefault((model_name, method, kind), [curves[kind].fractions.cpu(), 0.0, 0])
                        acc[1] = acc[1] + curves[kind].scores.sum(0).cpu()
                        acc[2] += curves[kind].scores.shape[0]
                if "complexity" in metrics:
                    cols["gini"], cols["entropy"] = gini(maps), entropy(maps)
                if "robustness" in metrics:
                    fn = method_explainer(model, method, layer=layer, **opts)
                    cols["max_sensitivity"] = max_sensitivity(fn, x, targets, n_samples=5, batch_size=max(batch_size, 8), seed=seed)
                if any(m in ("catalogue", "catalogue_more", *CATALOGUE, *CATALOGUE_MORE) for m in metrics):
                    cat_masks = masks if masks is not None or boxes is None else boxes_to_masks(boxes, tuple(x.shape[2:]))
                    cols.update(catalogue_columns(metrics, model, x, maps, expl.raw, targets, cat_masks, method, layer,
                                                  opts, steps=steps, batch_size=max(batch_size * 4, 32), seed=seed))
                host = {k: v.detach().float().cpu().tolist() for k, v in cols.items()}
                preds = expl.predictions.cpu().tolist()
                for i, name in enumerate(names):
                    row = {"model": model_name, "method": method, "image": name, "label": labels[i],
                           "target": int(targets[i]), "prediction": preds[i]}
                    row.update({k: v[i] for k, v in host.items()})
                    rows.append(row)
                key = next((k for k in GALLERY_KEYS if k in cols), None)
                if key is not None:
                    outlined = masks if masks is not None or boxes is None else boxes_to_masks(boxes, tuple(x.shape[2:]))
                    galleries.setdefault((model_name, method), _Gallery(gallery)).offer(
                        cols[key].detach().cpu() * (-1 if key in LOWER_IS_BETTER else 1), names, x.cpu(), maps.detach().cpu(),
                        outlined.cpu() if outlined is not None else None)
                    galleries[(model_name, method)].key = key
        bar.update(len(batch))
    bar.close()
    if not rows:
        raise MedlensError("evaluate: the dataset gave no items")
    if sanity_batch:
        sanity_rows = _run_sanity(models, sanity_batch, methods, layer, method_options, target, sanity_modes)
    table = pd.DataFrame(rows)
    summary = summarise(table, n_boot, seed)
    curves = {(m, meth, kind): (acc[0], acc[1] / acc[2]) for (m, meth, kind), acc in curve_sums.items()}
    result = EvalResult(table, summary, curves, pd.DataFrame(sanity_rows) if sanity_rows else None)
    if out_dir is not None:
        result.files = write_outputs(result, Path(out_dir), galleries)
    return result


def _run_sanity(models: Mapping[str, nn.Module], batch: list[Item], methods: Sequence[str], layer: str | None,
                method_options: Mapping[str, Mapping[str, Any]], target: str,
                modes: Sequence[str] = ("cascading", "independent")) -> list[dict[str, Any]]:
    out = []
    for model_name, model in models.items():
        x = torch.stack([torch.as_tensor(it[1]).float() for it in batch]).to(_device_of(model))
        labels = [it[2] for it in batch]
        tgt = "pred" if target == "pred" or any(l is None for l in labels) else torch.tensor(labels, device=x.device)
        for method in methods:
            for mode in modes:
                res = model_randomisation(model, x, method, target=tgt, layer=layer, mode=mode, **options_for(method, method_options.get(method, {}), methods))
                for row in res.rows():
                    out.append({"model": model_name, "method": method, **row, "flagged": res.flagged})
    return out


# ---------------------------------------------------------------- outputs


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _curves_png(curves: dict) -> str | None:
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for (model, method, k), (fr, mean) in curves.items():
            if k == kind:
                ax.plot(fr.numpy(), mean.numpy(), label=f"{method}" if len({c[0] for c in curves}) == 1 else f"{model}/{method}")
        ax.set_title(f"{kind} (most relevant first)")
        ax.set_xlabel("fraction of pixels " + ("removed" if kind == "deletion" else "revealed"))
        ax.set_ylabel("target probability")
        ax.legend(fontsize=7)
    return _png(fig)


def _gallery_png(gallery: _Gallery, title: str, cmap: str = "jet") -> str | None:
    """Best and worst cases over their maps in ``cmap``; the annotation (mask, or the boxes as a mask) is
    outlined in a colour that contrasts with ``cmap`` (:func:`medlens.render.overlay.outline_colours`)."""
    if not gallery.cases:
        return None
    from medlens.render.overlay import overlay
    from medlens.render.panels import show

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = gallery.cases[::-1][: gallery.k]
    worst = gallery.cases[: gallery.k]
    cols = max(len(best), len(worst))
    fig, axes = plt.subplots(2, cols, figsize=(2.1 * cols, 4.6), squeeze=False)
    sign = -1 if getattr(gallery, "key", "") in LOWER_IS_BETTER else 1
    for r, (label, cases) in enumerate((("best", best), ("worst", worst))):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(cases):
                value, name, img, heat, mask = cases[c]
                shown = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)  # display range, never clipped
                rgb = overlay(shown, heat.clamp(0, 1), cmap=cmap, alpha=0.45)
                show(ax, rgb, f"{label}: {name[-18:]}\n{getattr(gallery, 'key', '')}={sign * value:.2f}", mask, cmap, 0.45, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def write_outputs(result: EvalResult, out: Path, galleries: Mapping[tuple[str, str], _Gallery] | None = None) -> list[Path]:
    """Write rows (CSV, Parquet), summary (CSV, Markdown), sanity (CSV) and report.html atomically."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for name, frame in (("rows", result.rows), ("summary", result.summary), ("sanity", result.sanity)):
        if frame is None:
            continue
        with atomic_path(out / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)
        files.append(out / f"{name}.csv")
    try:
        with atomic_path(out / "rows.parquet") as tmp:
            result.rows.to_parquet(tmp, index=False)
        files.append(out / "rows.parquet")
    except ImportError:  # pyarrow missing: the CSV has the same rows
        pass
    note = result.empty_note()
    files.append(write_text(out / "summary.md", result.table() + ("\n\n" + note if note else "") + "\n"))
    files.append(write_text(out / "report.html", _report_html(result, galleries or {})))
    return files


def _report_html(result: EvalResult, galleries: Mapping[tuple[str, str], _Gallery]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>medlens evaluate</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}th{background:#eee}</style></head><body>",
             "<h1>medlens evaluate</h1>",
             f"<p>{result.rows['image'].nunique()} images, methods: {html.escape(', '.join(result.rows['method'].unique()))}. "
             "Cells: mean [bootstrap 95% CI]; NaN rows (images without annotation) are counted in n_nan, not scored.</p>"]
    if result.empty_note():
        parts.append(f"<p><b>{html.escape(result.empty_note())}</b></p>")
    summary = result.summary
    wide = summary.assign(cell=[f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in zip(summary["mean"], summary["ci_low"], summary["ci_high"])])
    pivot = wide.pivot_table(index=["model", "method"], columns="metric", values="cell", aggfunc="first", sort=False)
    parts.append("<h2>Summary</h2>" + pivot.to_html(escape=True))
    curves = _curves_png(result.curves)
    if curves:
        parts.append(f"<h2>Deletion and insertion curves</h2><img src='data:image/png;base64,{curves}'>")
    if result.sanity is not None:
        parts.append("<h2>Sanity check (model parameter randomisation)</h2>" + result.sanity.to_html(index=False, float_format=lambda v: f"{v:.3f}"))
    if galleries:
        parts.append("<h2>Best and worst cases</h2>")
        for (model, method), gallery in galleries.items():
            png = _gallery_png(gallery, f"{model} / {method}")
            if png:
                parts.append(f"<h3>{html.escape(model)} / {html.escape(method)}</h3><img src='data:image/png;base64,{png}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
