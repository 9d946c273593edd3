"""Everything a person looks at: overlays, boxes, panels, 3D views and self-contained HTML."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)  # figures are written to files, never shown

from medlens.render.html import figure_html, gallery_html, html_page, png_data_uri, table_html  # noqa: E402
from medlens.render.overlay import (  # noqa: E402
    colorize, colormap_lut, draw_boxes, draw_outline, grey_to_rgb, outline, outline_colours, overlay, overlay_tensor,
    png_bytes, save_png, to_uint8,
)
from medlens.render.panels import (  # noqa: E402
    class_panels, explanation_panels, figure_png, figure_rgb, gallery, method_grid, save_figure,
)
from medlens.render.views3d import (  # noqa: E402
    orthogonal_figure, orthogonal_views, peak_point, slice_strip, slice_strip_figure,
)

__all__ = [
    "class_panels", "colorize", "colormap_lut", "draw_boxes", "draw_outline", "explanation_panels", "figure_html", "figure_png",
    "figure_rgb", "gallery", "gallery_html", "grey_to_rgb", "html_page", "method_grid", "orthogonal_figure",
    "orthogonal_views", "outline", "outline_colours", "overlay", "overlay_tensor", "peak_point", "png_bytes", "png_data_uri",
    "save_figure", "save_png", "slice_strip", "slice_strip_figure", "table_html", "to_uint8",
]
