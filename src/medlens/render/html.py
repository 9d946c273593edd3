"""Self-contained HTML pages: images embedded as data URIs, CSS inline, no external assets.

Used by ``medlens explain`` (index.html) and ``medlens demo`` (report.html). Every piece of text
passed in as a caption, cell or title is HTML-escaped; only ``sections`` bodies are raw HTML.
"""

from __future__ import annotations

import base64
import html
import numbers
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["CSS", "figure_html", "gallery_html", "html_page", "png_data_uri", "table_html"]

CSS = """
:root { --ink: #1f2933; --muted: #52606d; --line: #d9e2ec; --panel: #f5f7fa; --accent: #0b6e99; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #ffffff; }
header { padding: 20px 32px 12px; border-bottom: 1px solid var(--line); background: var(--panel); }
header h1 { margin: 0; font-size: 22px; font-weight: 600; }
header p { margin: 4px 0 0; color: var(--muted); }
main { padding: 8px 32px 32px; max-width: 1400px; }
section { margin-top: 24px; }
h2 { font-size: 18px; font-weight: 600; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--accent); }
h3 { font-size: 15px; margin: 16px 0 6px; }
p.note, .note { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { padding: 6px 12px; border-bottom: 1px solid var(--line); text-align: left; }
th { background: var(--panel); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #e3f4ea; }
tr:hover td { background: #fbfcfd; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 8px 0; }
figure img { max-width: 100%; height: auto; image-rendering: auto; }
figure.card { width: 260px; margin: 0; padding: 8px; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figure.card img { width: 100%; image-rendering: pixelated; border-radius: 3px; }
figure.wide img { border: 1px solid var(--line); border-radius: 4px; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 4px; word-wrap: break-word; }
code { background: var(--panel); padding: 1px 4px; border-radius: 3px; font-size: 13px; }
footer { padding: 12px 32px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); }
"""


def png_data_uri(image: Any, dpi: int = 110) -> str:
    """A ``data:image/png;base64,...`` URI for a uint8 (H, W[, 3]) array, PNG bytes, or a matplotlib Figure."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, np.ndarray):
        from medlens.render.overlay import png_bytes

        data = png_bytes(image)
    else:
        from matplotlib.figure import Figure

        if not isinstance(image, Figure):
            from medlens.errors import MedlensError

            raise MedlensError(f"png_data_uri takes a uint8 array, PNG bytes or a Figure; got {type(image).__name__}")
        from medlens.render.panels import figure_png

        data = figure_png(image, dpi)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _cell(value: Any, number_format: str) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{html.escape('' if value is None else str(value))}</td>"
    if isinstance(value, numbers.Number):
        return f'<td class="num">{html.escape(number_format.format(value))}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _format(value: Any, number_format: str) -> str:
    return ("{}" if isinstance(value, numbers.Integral) else number_format).format(value)


def _best_cell(value: Any, number_format: str) -> str:
    return f'<td class="num best"><b>{html.escape(_format(value, number_format))}*</b></td>'


def table_html(
    rows: Sequence[Sequence[Any] | Mapping[str, Any]],
    columns: Sequence[str],
    number_format: str = "{:.3g}",
    caption: str | None = None,
    best: Mapping[str, Any] | None = None,
) -> str:
    """An HTML table; rows are sequences in column order or mappings keyed by column name.
    Numbers are right-aligned and formatted with ``number_format`` (integers stay integers).
    ``best``: column -> its best value; cells that show that value are bold with an asterisk
    (``<td class="num best"><b>0.91*</b></td>``)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    marks = {columns.index(c): _format(v, number_format) for c, v in (best or {}).items() if c in columns}
    for row in rows:
        values = [row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
        cells = "".join(
            _best_cell(v, number_format) if j in marks and isinstance(v, numbers.Number) and _format(v, number_format) == marks[j]
            else _cell(v, "{}" if isinstance(v, numbers.Integral) else number_format) for j, v in enumerate(values))
        body.append(f"<tr>{cells}</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure_html(uri: str, caption: str | None = None, alt: str | None = None, wide: bool = False) -> str:
    """An image with a caption; ``wide`` for full-width figures, otherwise a gallery card."""
    cls = "wide" if wide else "card"
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure class="{cls}"><img src="{html.escape(uri)}" alt="{html.escape(alt or caption or "")}">{cap}</figure>'


def gallery_html(items: Sequence[tuple[str, str] | Mapping[str, str]]) -> str:
    """A wrapping grid of cards; items are (uri, caption) pairs or {"uri", "caption"} mappings."""
    cards = []
    for item in items:
        uri, caption = (item["uri"], item.get("caption")) if isinstance(item, Mapping) else item
        cards.append(figure_html(uri, caption))
    return f'<div class="gallery">{"".join(cards)}</div>'


def html_page(
    title: str,
    sections: Sequence[tuple[str, str] | str],
    subtitle: str | None = None,
    footer: str = "Generated by medlens. Maps show where the model's score is sensitive, not a diagnosis.",
) -> str:
    """A complete, self-contained HTML page.

    Args:
        title: page title (escaped).
        sections: (heading, body HTML) pairs, or raw HTML strings placed as they are.
        subtitle: a line under the title (escaped).
        footer: a closing line (escaped).
    """
    parts = []
    for section in sections:
        if isinstance(section, str):
            parts.append(f"<section>{section}</section>")
        else:
            heading, body = section
            parts.append(f"<section><h2>{html.escape(heading)}</h2>{body}</section>")
    sub = f"<p>{html.escape(subtitle)}</p>" if subtitle else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
        f"<body><header><h1>{html.escape(title)}</h1>{sub}</header>\n<main>{''.join(parts)}</main>\n"
        f"<footer>{html.escape(footer)}</footer></body></html>\n"
    )
