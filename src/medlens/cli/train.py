"""``medlens train CONFIG.yaml [--set key=value ...] [--out DIR] [--resume]``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medlens.cli.app import app
from medlens.errors import MedlensError


@app.command("train")
def train_command(
    config: str = typer.Argument(..., help="A YAML config file, or the name of a shipped one (brain_mri_resnet18)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a value: --set trainer.max_epochs=2 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: the config's `out`, else runs/<name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.ckpt."),
) -> None:
    """Train a classifier or segmenter from a YAML config on PyTorch Lightning."""
    from rich.console import Console
    from rich.table import Table

    from medlens.train import config_path, load_config, train

    console = Console()
    try:
        path = config if Path(config).is_file() or config.endswith((".yaml", ".yml")) else config_path(config)
        loaded = load_config(path, set_ or [])
        run_dir = Path(out or loaded.out or Path("runs") / loaded.name)
        if resume and not (run_dir / "checkpoints" / "last.ckpt").is_file():
            typer.secho(f"--resume: nothing to resume in {run_dir} (no checkpoints/last.ckpt); starting a fresh run",
                        fg=typer.colors.YELLOW, err=True)
            resume = False
        result = train(loaded, out_dir=out, resume=resume)
    except MedlensError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    table = Table(title=f"best model on the validation split ({result.epochs} epochs, {result.seconds:.0f} s)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(result.metrics.items()):
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    console.print(f"best checkpoint: {result.best_checkpoint}\nweights: {result.weights}\nrun folder: {result.out_dir}")
    if "bad_files" in result.files:
        console.print(f"[yellow]unreadable files left out of training: listed in {result.files['bad_files']}[/yellow]")
