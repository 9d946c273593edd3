"""The attention-maps paper's outputs (Chung et al.) from a :class:`BenchmarkResult`: tables, figure, page.

Written atomically into one folder:

- ``rows.csv``: one row per (model, method, image) with the pointing game and IoU@5/10/20/40;
- ``summary.csv``: per (model, method, metric) the mean, the bootstrap 95% CI (``ci_low``,
  ``ci_high``), ``n`` images scored and ``n_nan`` (images without annotation);
- ``paper_table.csv`` / ``paper_table.md``: the paper's table, one row per model x method, a
  column per metric with its CI columns (``iou@10``, ``iou@10_ci_low``, ``iou@10_ci_high``) in the
  CSV and ``mean [low, high]`` cells in the Markdown;
- ``figure_<model>.png``: examples (rows) x methods (columns), the annotation box outlined, one
  colourbar (:func:`medlens.render.panels.method_grid`);
- ``report.html``: the tables and figures in one self-contained page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from medlens.io.atomic import atomic_path, write_bytes, write_text
from medlens.workflows.protocols.paper_benchmark import BenchmarkResult

__all__ = ["FIGURE_SIDE", "paper_table", "write_benchmark"]

FIGURE_SIDE = 160  # pixels per panel side in the figure (maps are upsampled, masks resampled nearest)


def _label(metric: str) -> str:
    return "pointing game" if metric == "pointing_game" else metric.replace("iou@", "IoU@") + "%"


def paper_table(result: BenchmarkResult) -> Any:
    """(models x methods) rows; per metric its mean and ``_ci_low``/``_ci_high`` columns, and ``n``."""
    import pandas as pd

    records = []
    for (model, method), group in result.summary.groupby(["model", "method"], sort=False):
        record: dict[str, Any] = {"model": model, "method": method, "n": int(group["n"].max())}
        for _, row in group.iterrows():
            record[row["metric"]] = row["mean"]
            record[f"{row['metric']}_ci_low"] = row["ci_low"]
            record[f"{row['metric']}_ci_high"] = row["ci_high"]
        records.append(record)
    return pd.DataFrame(records)


def _cells(table: Any, metrics: Sequence[str]) -> list[list[Any]]:
    rows = []
    for _, row in table.iterrows():
        cells = [row["model"], row["method"], int(row["n"])]
        cells += [f"{row[m]:.3f} [{row[m + '_ci_low']:.3f}, {row[m + '_ci_high']:.3f}]" for m in metrics]
        rows.append(cells)
    return rows


def _markdown(table: Any, metrics: Sequence[str], result: BenchmarkResult) -> str:
    head = ["model", "method", "n", *(_label(m) for m in metrics)]
    lines = [f"# Paper benchmark: pointing game and IoU@k (mean [95% bootstrap CI, {result.n_boot} resamples, seed {result.seed}])",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in _cells(table, metrics)]
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _figure(result: BenchmarkResult, model: str, cmap: str) -> bytes | None:
    """PNG of the examples x methods grid of ``model``, or None without examples."""
    from medlens.render.panels import figure_png, method_grid

    data, maps = result.data[model], result.example_maps.get(model)
    if not maps or not data.displays:
        return None
    shown = sorted(data.displays)
    side = (FIGURE_SIDE, FIGURE_SIDE)
    images = torch.stack([F.interpolate(data.displays[i][None, :3].float(), size=side, mode="bilinear", antialias=True,
                                        align_corners=False)[0].clamp(0, 1) for i in shown])
    masks = F.interpolate(data.masks[shown][:, None].float(), size=side, mode="nearest")[:, 0] > 0
    titles = [data.names[i] for i in shown]
    fig = method_grid(images, {method: maps[method] for method in result.methods if method in maps}, titles, masks,
                      cmap=cmap, title=f"{model}: maps per method (annotation box outlined)")
    return figure_png(fig)


def write_benchmark(result: BenchmarkResult, out: str | Path, cmap: str = "jet", subtitle: str = "",
                    notes: Sequence[str] = ()) -> list[Path]:
    """Write the files listed in the module docstring into ``out``; returns their paths."""
    from medlens.render.html import figure_html, html_page, png_data_uri, table_html

    out = Path(out)
    metrics = [m for m in result.summary["metric"].drop_duplicates()]
    table = paper_table(result)
    files: list[Path] = []
    for name, frame in (("rows.csv", result.rows), ("summary.csv", result.summary), ("paper_table.csv", table)):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
        files.append(out / name)
    files.append(write_text(out / "paper_table.md", _markdown(table, metrics, result)))
    figures = []
    for model in result.models:
        png = _figure(result, model, cmap)
        if png is not None:
            files.append(write_bytes(out / f"figure_{_slug(model)}.png", png))
            figures.append(figure_html(png_data_uri(png), f"{model}: examples (rows) x methods (columns)", wide=True))
    head = ["model", "method", "n", *(_label(m) for m in metrics)]
    sections = [("Pointing game and IoU@k, mean [95% bootstrap CI]",
                 table_html(_cells(table, metrics), head) +
                 '<p class="note">Pointing game: the map\'s maximum inside the annotation (Zhang et al., 2016). '
                 "IoU@k: one box around the top k% of the map's pixels against the annotation's box (Chung et al.). "
                 f"CIs: percentile bootstrap over images, {result.n_boot} resamples, seed {result.seed}. "
                 "Files: paper_table.csv/.md, summary.csv, rows.csv.</p>")]
    if figures:
        sections.append(("Examples x methods", "".join(figures)))
    if notes:
        sections.append(("Notes", "".join(f'<p class="note">{_escape(n)}</p>' for n in notes)))
    page = html_page("Paper benchmark: pointing game and IoU@5/10/20/40", sections, subtitle=subtitle or None)
    files.append(write_text(out / "report.html", page))
    return files


def _escape(text: str) -> str:
    import html

    return html.escape(text)
