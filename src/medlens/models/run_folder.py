"""A model and its preprocessing from one place: a ``medlens train`` run folder, or a spec + weights.

A run folder (``config.yaml`` + ``best.safetensors``, as :func:`medlens.train.run.train` writes it)
*is* a model: :func:`load_model_source` rebuilds the network from the run's config (spec, kwargs,
channels, classes, spatial dims), loads its best weights and returns the training preprocessing
(size, channels, mean/std or per-image z-score, 2D slicing) and class names, so ``medlens explain
runs/NAME``, ``evaluate`` and ``prototype`` need no preprocessing flags. A web server or a notebook
calls the same function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medlens.data.prepare import Preprocessing
from medlens.errors import MedlensError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


@dataclass
class ModelSource:
    """A ready model (eval mode, on its device) and how its inputs are prepared."""

    model: nn.Module
    preprocessing: Preprocessing
    spec: str
    weights: str
    run_folder: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str] | None:
        return self.preprocessing.class_names


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a training ``config.yaml``."""
    p = Path(path)
    return p.is_dir() and (p / "config.yaml").is_file()


def is_weights_file(text: str | Path) -> bool:
    return str(text).lower().endswith(WEIGHT_SUFFIXES) or str(text).lower() in ("none", "-", "random")


def pick_device(device: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def read_run(path: str | Path) -> tuple[dict[str, Any], list[str] | None]:
    """(the run's config as a dict, its class names from metrics.json or the config)."""
    import yaml

    folder = Path(path)
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise MedlensError(f"{folder / 'config.yaml'}: cannot read the run's config ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise MedlensError(f"{folder / 'config.yaml'}: not a training config")
    classes = None
    metrics = folder / "metrics.json"
    if metrics.is_file():
        try:
            classes = json.loads(metrics.read_text()).get("classes")
        except (OSError, ValueError):
            classes = None
    classes = classes or (config.get("data") or {}).get("classes")
    return config, list(classes) if classes else None


def run_preprocessing(config: dict[str, Any], classes: list[str] | None, source: str = "run") -> Preprocessing:
    """The preprocessing of a training config (:mod:`medlens.train.data`: Resize, Normalise, channels)."""
    data = config.get("data") or {}
    task = config.get("task", "classification")
    slices = bool(data.get("slices")) and task == "segmentation"
    dims = 3 if task == "segmentation" and not slices else 2
    size = data.get("image_size") or [96, 96]
    size = tuple(size) * dims if len(size) == 1 else tuple(size)
    mean, std = data.get("mean"), data.get("std")
    return Preprocessing(channels=int(data.get("in_channels", 1)), size=size,
                         normalize="meanstd" if mean is not None and std is not None else "zscore",
                         mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None,
                         dims=dims, class_names=classes, task=task, slice_axis=2 if slices else None, source=source)


def load_run_folder(path: str | Path, weights: str | Path | None = None, device: str = "auto",
                    model_kwargs: dict[str, Any] | None = None) -> ModelSource:
    """Rebuild a run folder's network, load its best weights (or ``weights``) and give its preprocessing.

    Raises:
        MedlensError: one line when the folder lacks its config, its weights or its class count.
    """
    from medlens.models import build_model, load_weights

    folder = Path(path)
    if not is_run_folder(folder):
        raise MedlensError(f"{folder}: not a run folder (no config.yaml)")
    config, classes = read_run(folder)
    mc = config.get("model") or {}
    pre = run_preprocessing(config, classes, source=str(folder / "config.yaml"))
    num_classes = mc.get("num_classes") or (len(classes) if classes else None)
    if not num_classes:
        raise MedlensError(f"{folder}: no class count (metrics.json has no classes and model.num_classes is unset); "
                           "did the training finish?")
    chosen = Path(weights) if weights is not None else folder / "best.safetensors"
    if str(chosen).lower() not in ("none", "-", "random") and not chosen.is_file():
        raise MedlensError(f"{folder}: no weights at {chosen} (the run writes best.safetensors when training ends)")
    spec = mc.get("spec", "torchvision:resnet18")
    kwargs = dict(mc.get("kwargs") or {}) | dict(model_kwargs or {})
    model = build_model(spec, num_classes=int(num_classes), in_channels=pre.channels or 1, spatial_dims=pre.dims or 2, **kwargs)
    if str(chosen).lower() not in ("none", "-", "random"):
        load_weights(model, chosen)
    if pre.class_names is None:
        pre.class_names = [f"class {i}" for i in range(int(num_classes))]
    return ModelSource(model.to(pick_device(device)).eval(), pre, spec, str(chosen), folder, config)


def load_model_source(model: str, weights: str | None = None, num_classes: int = 2, in_channels: int = 3, dims: int = 2,
                      device: str = "auto", model_kwargs: dict[str, Any] | None = None,
                      class_names: list[str] | None = None) -> ModelSource:
    """A run folder, or a bare spec (``torchvision:resnet18``, ``monai:UNet``, ``pkg.module:factory``) + weights.

    For a bare spec the preprocessing holds only the channels and dims; the caller adds size and
    normalisation from its flags (:meth:`Preprocessing.override`).
    """
    if is_run_folder(model):
        return load_run_folder(model, weights, device, model_kwargs)
    if Path(model).is_dir():
        raise MedlensError(f"{model}: a folder without config.yaml is not a run folder (expected a model spec or a run folder)")
    from medlens.models import build_model, load_weights

    net = build_model(model, num_classes=num_classes, in_channels=in_channels, spatial_dims=dims, **(model_kwargs or {}))
    chosen = weights or "none"
    if chosen.lower() not in ("none", "-", "random"):
        load_weights(getattr(net, "hf", net), chosen)  # an hf: model's own modules take plain HF keys
    # channels None: callers read them from the model's first convolution (a factory may ignore in_channels)
    pre = Preprocessing(channels=None, dims=dims, class_names=class_names, source="command line")
    own = getattr(net, "preprocessing", None)  # hf: and bundle: models carry their own preparation
    if own is not None:
        pre = pre.override(channels=own.in_channels, class_names=class_names or (list(own.class_names) if own.class_names else None),
                           size=own.size if own.transform is None else None, source=own.source or model)
        pre = replace(pre, model_transform=own)
    return ModelSource(net.to(pick_device(device)).eval(), pre, model, chosen)
