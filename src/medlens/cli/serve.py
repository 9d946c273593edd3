"""``medlens serve``: the interactive viewer in the browser."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medlens.cli.app import app
from medlens.cli.explain import fail, parse_size
from medlens.errors import MedlensError, one_line

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


@app.command("serve")
def serve_command(
    model: list[str] = typer.Option(["medlens.models:phantom_net"], "--model", help="model spec or a `medlens train` run folder; repeat for several"),
    weights: list[str] = typer.Option([], "--weights", help="weights file per --model (.pt/.pth/.ckpt/.safetensors, loaded safely) or 'none'"),
    data: Optional[Path] = typer.Option(None, "--data", help="folder whose files the page may open (nothing outside it is read)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but loopback needs --token"),
    port: int = typer.Option(8000, "--port"),
    token: Optional[str] = typer.Option(None, "--token", envvar="MEDLENS_TOKEN", help="bearer token required on the API"),
    max_upload: str = typer.Option("512MB", "--max-upload", help="largest upload, e.g. 512MB"),
    num_classes: int = typer.Option(2, "--num-classes", "-n", help="classes of the model"),
    in_channels: int = typer.Option(1, "--in-channels", help="input channels of the model"),
    dims: list[int] = typer.Option([2], "--dims", help="2 for images, 3 for volumes; one per --model or one for all"),
    size: list[str] = typer.Option([], "--size", help="model input size (224 or 224,224 or 32,48,32); one per --model or one for all"),
    normalize: str = typer.Option("none", "--normalize", help="none, imagenet or zscore"),
    class_names: Optional[str] = typer.Option(None, "--class-names", help="comma-separated class names"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1"),
) -> None:
    """Serve an interactive viewer: open a scan, explain it, compare methods, download the maps."""
    if not is_loopback(host) and not token:
        fail(f"--host {host} is not loopback: anyone on the network could use the server; give --token (or bind 127.0.0.1)")
    from medlens.serve.app import create_app, parse_bytes, served_model

    def pick(values: list, i: int, default=None):
        if not values:
            return default
        return values[i] if i < len(values) else values[-1]

    try:
        limit = parse_bytes(max_upload)
        served = []
        taken: set[str] = set()
        for i, spec in enumerate(model):
            d = int(pick(dims, i, 2))
            size_tuple = parse_size(pick(size, i))
            if size_tuple is not None and len(size_tuple) == 1:
                size_tuple = size_tuple * d
            entry = served_model(
                spec, pick(weights, i) if i < len(weights) else None, num_classes=num_classes, in_channels=in_channels,
                dims=len(size_tuple) if size_tuple else d, size=size_tuple, normalize=normalize,
                class_names=class_names.split(",") if class_names else None, device=device,
            )
            if entry.name in taken:
                entry.name = f"{entry.name} ({entry.dims}D #{i + 1})"
            taken.add(entry.name)
            served.append(entry)
        application = create_app(served, data_dir=data, token=token, max_upload=limit)
    except (MedlensError, RuntimeError, OSError) as error:
        fail(one_line(error))
    import uvicorn

    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    typer.echo(f"medlens serve: http://{shown}:{port}/" + (" (API needs Authorization: Bearer <token>; open /#token=<token>)" if token else ""))
    uvicorn.run(application, host=host.strip("[]"), port=port, log_level="warning")
