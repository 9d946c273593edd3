"""Training configuration: YAML files read into dataclasses, checked with one-line errors.

A config has five sections (every key optional except ``data.root``)::

    name: brain_mri_resnet18
    task: classification            # or segmentation
    data:  {kind: image_folder, root: ../shared/data/brain-tumor-mri, image_size: 64, ...}
    model: {spec: "torchvision:resnet18", in_channels: 1, unfreeze_last: null, init_weights: null}
    optim: {name: adamw, lr: 0.001, weight_decay: 0.0001, scheduler: cosine}
    trainer: {max_epochs: 5, precision: auto, monitor: val_acc, patience: 5}

``--set trainer.max_epochs=2`` style overrides are applied before the checks, and relative
paths in the file are resolved against the config file's folder first, then the working folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from medlens.errors import MedlensError

TASKS = ("classification", "segmentation")
DATA_KINDS = ("image_folder", "decathlon")
OPTIMISERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "none")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


@dataclass
class DataConfig:
    """Where the images are and how they are split and shaped.

    ``image_folder``: ``root/<class>/*.jpg|png|tif`` (YOLO ``.txt`` boxes beside them are ignored
    for training). ``decathlon``: ``root/dataset.json`` or ``root/imagesTr`` + ``root/labelsTr``.
    """

    root: str = ""
    kind: str = "image_folder"
    classes: list[str] | None = None
    image_size: list[int] = field(default_factory=lambda: [96, 96])
    in_channels: int = 1
    mean: list[float] | None = None
    std: list[float] | None = None
    val_fraction: float = 0.2
    seed: int = 0
    limit_per_class: int | None = None
    limit: int | None = None
    batch_size: int = 16
    num_workers: int = 0
    augment: bool = True
    slices: bool = False
    split_file: str | None = None


@dataclass
class ModelConfig:
    """The network: a :func:`medlens.models.build_model` spec, its arguments and initial weights.

    ``init_weights`` is a local file (never a download); with ``init_strict: false`` keys the model
    lacks, keys the file lacks and tensors of another shape (a 1000-class head) are left out.
    ``unfreeze_last``: null trains everything, 0 only the head, k the last k blocks and the head.
    """

    spec: str = "torchvision:resnet18"
    num_classes: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    init_weights: str | None = None
    init_strict: bool = False
    unfreeze_last: int | None = None


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "cosine"


@dataclass
class TrainerConfig:
    """Passed to ``lightning.Trainer`` (accelerator/devices/strategy go through unchanged)."""

    max_epochs: int = 10
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    precision: str = "auto"
    monitor: str | None = None
    patience: int = 5
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    log_every_n_steps: int = 10
    seed: int = 0
    progress: str = "rich"
    gallery_size: int = 16


@dataclass
class TrainConfig:
    name: str = "run"
    task: str = "classification"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def monitor(self) -> str:
        """The metric that picks the best checkpoint (``val_acc`` or ``val_dice`` unless set)."""
        return self.trainer.monitor or ("val_acc" if self.task == "classification" else "val_dice")


def load_config(path: str | Path | dict[str, Any], overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a YAML config (or a dict), apply ``key.sub=value`` overrides and check every value.

    Raises:
        MedlensError: one line naming the file and the key that is wrong.
    """
    where = "config"
    base: Path | None = None
    if isinstance(path, dict):
        raw = dict(path)
    else:
        path = Path(path)
        where, base = str(path), path.parent
        if not path.is_file():
            raise MedlensError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise MedlensError(f"config file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise MedlensError(f"config file {path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item, where)
    config = _build(TrainConfig, raw, where, "")
    config.source = None if base is None else str(path)
    _check(config, where)
    _resolve_paths(config, base)
    return config


def _apply_override(raw: dict[str, Any], item: str, where: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise MedlensError(f"--set {item!r}: expected key=value, e.g. trainer.max_epochs=2")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise MedlensError(f"{where}: --set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise MedlensError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(fields)}"
            raise MedlensError(f"{where}: unknown key {prefix}{key}{hint}")
        values[key] = _coerce(hints[key], value, where, f"{prefix}{key}")
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, where, f"{key}.")
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if value is None:
        if optional or hint is Any:
            return None
        raise MedlensError(f"{where}: {key} must not be empty")
    target = args[0] if optional and len(args) == 1 else hint
    origin = typing.get_origin(target)
    try:
        if target is Any:
            return value
        if target is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if target in (int, float):
            if isinstance(value, bool) or (target is int and isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return target(value)
        if target is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
        if origin is list:
            (item,) = typing.get_args(target)
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_coerce(item, v, where, key) for v in items]
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    name = getattr(target, "__name__", str(target))
    raise MedlensError(f"{where}: {key} must be {name}, got {value!r}")


def _one_of(value: str, choices: tuple[str, ...], where: str, key: str) -> None:
    if value not in choices:
        raise MedlensError(f"{where}: {key} is {value!r}; expected one of {', '.join(choices)}")


def _check(config: TrainConfig, where: str) -> None:
    _one_of(config.task, TASKS, where, "task")
    _one_of(config.data.kind, DATA_KINDS, where, "data.kind")
    _one_of(config.optim.name.lower(), OPTIMISERS, where, "optim.name")
    _one_of(config.optim.scheduler.lower(), SCHEDULERS, where, "optim.scheduler")
    _one_of(str(config.trainer.precision), PRECISIONS, where, "trainer.precision")
    _one_of(config.trainer.progress, ("rich", "tqdm", "none"), where, "trainer.progress")
    if not config.data.root:
        raise MedlensError(f"{where}: data.root is required (the folder holding the images)")
    if not 0.0 < config.data.val_fraction < 1.0:
        raise MedlensError(f"{where}: data.val_fraction must be between 0 and 1, got {config.data.val_fraction}")
    if len(config.data.image_size) not in (1, 2, 3) or min(config.data.image_size) < 8:
        raise MedlensError(f"{where}: data.image_size must be 1-3 sizes of at least 8 pixels, got {config.data.image_size}")
    volumes = config.task == "segmentation" and not config.data.slices
    if len(config.data.image_size) == 1:
        config.data.image_size = config.data.image_size * (3 if volumes else 2)
    if len(config.data.image_size) != (3 if volumes else 2):
        raise MedlensError(f"{where}: data.image_size needs {3 if volumes else 2} sizes here, got {config.data.image_size}")
    for key in ("batch_size", "in_channels"):
        if getattr(config.data, key) < 1:
            raise MedlensError(f"{where}: data.{key} must be at least 1")
    if (config.data.mean is None) != (config.data.std is None) or (
        config.data.mean is not None and len(config.data.mean) != len(config.data.std or [])
    ):
        raise MedlensError(f"{where}: data.mean and data.std go together, one value per channel (or neither: z-score per image)")
    if config.optim.lr <= 0:
        raise MedlensError(f"{where}: optim.lr must be positive, got {config.optim.lr}")
    if config.trainer.max_epochs < 1:
        raise MedlensError(f"{where}: trainer.max_epochs must be at least 1")
    if config.model.unfreeze_last is not None and config.model.unfreeze_last < 0:
        raise MedlensError(f"{where}: model.unfreeze_last must be 0 (head only), a positive count, or null (all)")
    if config.task == "segmentation" and config.data.kind != "decathlon":
        raise MedlensError(f"{where}: segmentation needs data.kind decathlon (images with label volumes)")


def _resolve_paths(config: TrainConfig, base: Path | None) -> None:
    def resolve(value: str | None) -> str | None:
        if value is None or Path(value).is_absolute():
            return value
        beside = base / value if base is not None else None
        return str((beside if beside is not None and beside.exists() else Path(value)).resolve())

    config.data.root = resolve(config.data.root) or ""
    config.data.split_file = resolve(config.data.split_file)
    config.model.init_weights = resolve(config.model.init_weights)
