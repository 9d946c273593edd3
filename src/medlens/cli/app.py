"""The Typer application every command module registers on."""

import typer

app = typer.Typer(
    name="medlens",
    help="See what a medical imaging model looks at, and measure whether that picture can be trusted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
