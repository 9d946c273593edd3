"""``medlens demo``: the whole job on embedded synthetic data, in about a minute on a CPU (``--full``: every method)."""

from __future__ import annotations

from pathlib import Path
import typer

from medlens.cli.app import app
from medlens.cli.explain import fail
from medlens.errors import MedlensError, one_line


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("demo-output"), "--out", "-o", help="output folder"),
    n: int = typer.Option(600, "--n", help="phantoms generated (a fifth are held out)"),
    size: int = typer.Option(64, "--size", help="phantom size in pixels per axis"),
    dims: int = typer.Option(2, "--dims", help="2 for images, 3 for volumes"),
    epochs: int = typer.Option(8, "--epochs", help="training epochs"),
    method: list[str] = typer.Option([], "--method", "-m", help="methods to compare (repeatable); default: 11 representative methods (see --full)"),
    full: bool = typer.Option(False, "--full", help="compare every registered method that applies (a few minutes on a CPU)"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier demo in --out"),
) -> None:
    """Train a small CNN on lesion phantoms, explain it with a representative set of methods (--full: every
    method), and score the maps against the lesions; the table is sorted by energy pointing game, best values starred."""
    from medlens.workflows.demo import DemoConfig, run_demo

    if n < 10 or size < 16 or dims not in (2, 3) or epochs < 1:
        fail("--n must be >= 10, --size >= 16, --dims 2 or 3 and --epochs >= 1")
    if full and method:
        fail("--full compares every method; give either --full or --method, not both")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder")
    from medlens.workflows.explain import prepare_out_dir

    try:
        prepare_out_dir(out, overwrite, what="the demo")
    except MedlensError as error:
        fail(str(error))
    config = DemoConfig(n=n, size=size, dims=dims, epochs=epochs, methods=method or None, full=full,
                        seed=seed, device=device)
    try:
        result = run_demo(out, config, overwrite=overwrite)
    except (MedlensError, RuntimeError) as error:  # RuntimeError: the model itself failed on the input
        fail(one_line(error))
    except OSError as error:
        fail(f"cannot write to {error.filename or out} ({error.strerror or error})")
    from medlens.workflows.explain import MANIFEST

    with open(out / MANIFEST, "a", encoding="utf-8") as handle:  # what --overwrite removes next time
        handle.write("".join(f"{Path(f).name}\n" for f in result.files if Path(f).is_file()))
    _print_results(result, dims, out)


def _print_results(result, dims: int, out: Path) -> None:
    """The results table (rows already sorted, best first), each column's best value bold with an asterisk."""
    from rich.console import Console
    from rich.table import Table

    from medlens.workflows.demo import COLUMNS, HIGHER_IS_BETTER, best_per_column

    headers = {"method": "method", "pointing_game": "PG↑", "energy_pointing_game": "energy PG↑", "auroc": "AUROC↑",
               "deletion_auc": "del AUC↓", "insertion_auc": "ins AUC↑", "sanity_spearman": "rand ρ→0",
               "sanity": "sanity", "ms_per_image": "ms/img↓"}
    table = Table(title=f"held-out accuracy {result.accuracy:.1%}; maps scored against the lesion masks, "
                        "sorted by energy PG; * best per column", title_justify="left")
    for column in COLUMNS:
        table.add_column(headers[column], justify="left" if column in ("method", "sanity") else "right", no_wrap=True)
    best = {c: f"{v:.3g}" for c, v in best_per_column(result.rows).items()}
    for row in result.ranked:
        cells = []
        for c in COLUMNS:
            text = f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c])
            cells.append(f"[bold green]{text}*[/]" if c in HIGHER_IS_BETTER and best.get(c) == text else text)
        table.add_row(*cells)
    console = Console(width=max(Console().width, 110))
    console.print(table)
    for name, reason in sorted(result.skipped.items()):
        console.print(f"[dim]not applicable: {name}: {reason}[/dim]")
    console.print(f"{len(result.rows)} methods, {result.maps_computed:,} maps computed in {result.seconds:.0f} s")
    console.print(f"report: {out / 'report.html'}  (table: {out / 'results.md'})")
    console.print(f"try next: medlens explain medlens.models:phantom_net {out / 'model.safetensors'} {out / 'phantoms'} "
                  f"--in-channels 1 --dims {dims} -m gradcam -m layercam --out {out / 'explain'}")
