"""``medlens methods``: every method with its options, defaults and reference, read from the
methods' constructor signatures and docstrings (nothing here is written by hand)."""

from __future__ import annotations

from typing import Optional

import typer

from medlens.cli.app import app


def method_rows(name: Optional[str] = None) -> list[dict[str, object]]:
    """One row per registered method (and per wrapper flag): name, family, options
    [(name, type, default)], and the reference (first paragraph of its docstring)."""
    from medlens.core.engine import METHODS, WRAPPERS, AttentionMethod, InputMethod, LayerMethod, method_class
    from medlens.core.options import first_paragraph, signature_text

    classes = [method_class(name)] if name else [METHODS[n] for n in sorted(METHODS)]
    rows = []
    for cls in classes:
        family = "layer" if issubclass(cls, LayerMethod) else "input" if issubclass(cls, InputMethod) else "attention" if issubclass(cls, AttentionMethod) else "other"
        rows.append({"name": cls.name, "family": family, "options": signature_text(cls), "reference": first_paragraph(cls)})
    if not name:
        for flag, cls in sorted(WRAPPERS.items()):
            options = [o for o in signature_text(cls) if o[0] != "method"]
            rows.append({"name": f"{flag}=true", "family": "wrapper", "options": options, "reference": first_paragraph(cls)})
    return rows


@app.command("methods")
def methods_command(
    name: Optional[str] = typer.Argument(None, help="one method to describe; default: all"),
) -> None:
    """List the explanation methods with their options (--option key=value), defaults and references."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from medlens.cli.explain import fail
    from medlens.errors import MedlensError

    try:
        rows = method_rows(name)
    except MedlensError as error:
        fail(str(error))
    table = Table(title="medlens methods (options: --option key=value, or explain(..., key=value))", show_lines=True)
    for column in ("method", "family", "options (type = default)", "reference"):
        table.add_column(column, overflow="fold")
    for row in rows:
        options = "\n".join(f"{o} ({t}) = {d}" for o, t, d in row["options"]) or "-"
        table.add_row(str(row["name"]), str(row["family"]), escape(options), escape(str(row["reference"])))
    Console(width=max(Console().width, 140)).print(table)
