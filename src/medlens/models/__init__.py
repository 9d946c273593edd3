"""Models by name and weights loaded safely.

A model spec names where the architecture comes from:

* ``torchvision:resnet50``      torchvision.models.get_model(name, weights=None, ...)
* ``timm:efficientnet_b0``      timm.create_model(name, pretrained=False, ...)
* ``monai:UNet``                any class in monai.networks.nets (UNet, DenseNet121, ViT, ...)
* ``package.module:factory``    import the module and call the factory
* ``hf:<folder>``               a transformers image model saved with save_pretrained (safetensors),
                                with its image processor's preprocessing (:mod:`medlens.models.hf`)
* ``bundle:<folder>``           a MONAI bundle: network_def, models/model.pt|.safetensors and its
                                preprocessing transforms (:mod:`medlens.models.bundle`)

Nothing is ever downloaded: every model is built with random initial weights, and trained
weights come from a local file through :func:`load_weights`, which never unpickles arbitrary
objects (``torch.load(..., weights_only=True)`` or safetensors).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import pickle
import re
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from medlens.errors import MedlensError
from medlens.io.atomic import atomic_path
from medlens.io.loaded import first_line

from medlens.models.phantom import PhantomNet, phantom_net  # noqa: E402

__all__ = ["PhantomNet", "phantom_net", "build_model", "load_weights", "save_weights", "read_state_dict", "parse_spec"]

#: Small defaults for MONAI networks whose constructors need them (a user's kwargs win).
MONAI_DEFAULTS: dict[str, dict[str, Any]] = {
    "UNet": {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 2},
    "BasicUNet": {"features": (16, 16, 32, 64, 128, 16)},
    "AttentionUnet": {"channels": (16, 32, 64, 128), "strides": (2, 2, 2)},
    "ViT": {"img_size": 64, "patch_size": 16, "classification": True},
    "SwinUNETR": {"feature_size": 24},
}
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
_PREFIXES = ("model.", "module.", "net.")
_LIST_LIMIT = 6


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``"source:name"`` into ``(source, name)``; raise a one-line error when malformed."""
    source, sep, name = str(spec).partition(":")
    if not sep or not source or not name:
        raise MedlensError(
            f"model spec {spec!r} is not 'source:name' (e.g. torchvision:resnet50, timm:efficientnet_b0, "
            "monai:UNet or package.module:factory)"
        )
    return source.strip(), name.strip()


def build_model(spec: str, num_classes: int = 2, in_channels: int = 3, spatial_dims: int = 2, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised model from a spec string; nothing is downloaded.

    Args:
        spec: ``torchvision:NAME``, ``timm:NAME``, ``monai:CLASS`` or ``package.module:factory``;
            ``hf:FOLDER`` and ``bundle:FOLDER`` load a saved transformers model / MONAI bundle with
            its own weights and ``preprocessing`` (classes, channels and dims come from the folder).
        num_classes: outputs of the classifier head (``out_channels`` for segmentation networks).
        in_channels: input channels; torchvision models get their first convolution rebuilt
            when this differs from 3 (the model is ours, freshly built, so that is safe).
        spatial_dims: 2 or 3, for MONAI networks and factories that take it.
        **kwargs: passed on to the constructor (``channels``/``strides`` for ``monai:UNet``,
            ``img_size`` for ViTs, ...).

    Returns:
        nn.Module with random initial weights.
    """
    source, name = parse_spec(spec)
    if source.lower() in ("hf", "bundle"):  # folders holding their own weights and preprocessing
        if source.lower() == "hf":
            from medlens.models.hf import load_hf as load
        else:
            from medlens.models.bundle import load_bundle as load
        return load(name, num_classes=num_classes, in_channels=in_channels, spatial_dims=spatial_dims, **kwargs)
    builders: dict[str, Callable[..., nn.Module]] = {"torchvision": _torchvision, "timm": _timm, "monai": _monai}
    builder = builders.get(source.lower(), None)
    if builder is None:
        return _factory(source, name, num_classes, in_channels, spatial_dims, kwargs)
    return builder(name, num_classes, in_channels, spatial_dims, kwargs)


def _unknown(kind: str, name: str, choices: list[str]) -> MedlensError:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return MedlensError(f"unknown {kind} model {name!r}{hint}")


def _refuse_download(kwargs: dict[str, Any]) -> None:
    for key in ("pretrained", "weights"):
        if kwargs.pop(key, None) not in (None, False):
            raise MedlensError(
                f"model argument {key!r}: medlens never downloads weights; build the model and pass a local "
                "weights file instead"
            )


def _torchvision(name: str, num_classes: int, in_channels: int, spatial_dims: int, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    _refuse_download(kwargs)
    if name.lower() not in torchvision.models.list_models():
        raise _unknown("torchvision", name, torchvision.models.list_models())
    try:
        model = torchvision.models.get_model(name.lower(), weights=None, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise MedlensError(f"torchvision:{name}: {err}") from None
    if in_channels != 3:
        _adapt_first_conv(model, in_channels, name)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    """Rebuild the first 3-channel convolution of a model we just built for ``in_channels`` inputs."""
    for path, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            new = nn.Conv2d(
                in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups if conv.groups == 1 else in_channels, conv.bias is not None, conv.padding_mode,
            )
            parent_name, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return
    raise MedlensError(f"torchvision:{name}: found no 3-channel first convolution to adapt to {in_channels} channels")


def _timm(name: str, num_classes: int, in_channels: int, spatial_dims: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    _refuse_download(kwargs)
    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models())
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except TypeError as err:
        raise MedlensError(f"timm:{name}: {err}") from None


def _monai(name: str, num_classes: int, in_channels: int, spatial_dims: int, kwargs: dict[str, Any]) -> nn.Module:
    import monai.networks.nets as nets

    cls = getattr(nets, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        choices = [n for n in dir(nets) if inspect.isclass(getattr(nets, n)) and issubclass(getattr(nets, n), nn.Module)]
        raise _unknown("monai", name, choices)
    params = inspect.signature(cls.__init__).parameters
    given = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": num_classes, "num_classes": num_classes}
    args = {k: v for k, v in given.items() if k in params}
    args.update({k: v for k, v in MONAI_DEFAULTS.get(name, {}).items() if k in params})
    args.update(kwargs)
    if name == "ViT" and isinstance(args.get("img_size"), int):
        args["img_size"] = (args["img_size"],) * spatial_dims
        args["patch_size"] = (args["patch_size"],) * spatial_dims if isinstance(args.get("patch_size"), int) else args["patch_size"]
    try:
        return cls(**args)
    except ImportError as err:
        raise MedlensError(f"monai:{name} needs an optional package that is not installed ({first_line(err)})") from None
    except (TypeError, ValueError, AssertionError) as err:
        raise MedlensError(f"monai:{name}: {first_line(err)}") from None


def _import_here(module_name: str):
    """Import ``module_name``, also from the current working folder (``pkg.module:factory`` of a project)."""
    import sys

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        here = str(Path.cwd())
        if err.name is None or not module_name.startswith(err.name) or here in sys.path:
            raise
        sys.path.append(here)
        importlib.invalidate_caches()
        return importlib.import_module(module_name)


def _factory(module_name: str, attr: str, num_classes: int, in_channels: int, spatial_dims: int, kwargs: dict[str, Any]) -> nn.Module:
    try:
        module = _import_here(module_name)
    except ImportError as err:
        raise MedlensError(f"model spec {module_name}:{attr}: cannot import {module_name!r} ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise MedlensError(f"model spec {module_name}:{attr}: {module_name!r} has no callable {attr!r}")
    args = dict(kwargs)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # num_classes also goes through **kwargs (torchvision factories); the others only when named.
    for key, value in {"num_classes": num_classes, "in_channels": in_channels, "spatial_dims": spatial_dims}.items():
        if key not in args and (key in params or (takes_any and key == "num_classes")):
            args[key] = value
    if not takes_any:
        unknown = [k for k in args if k not in params]
        if unknown and params:
            raise MedlensError(f"model spec {module_name}:{attr}: unexpected argument(s) {', '.join(unknown)}")
    model = factory(**args)
    if not isinstance(model, nn.Module):
        raise MedlensError(f"model spec {module_name}:{attr}: returned {type(model).__name__}, not a torch nn.Module")
    return model


# --------------------------------------------------------------------------------------------- weights


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.pth``/``.pt``/``.ckpt`` (safely) or ``.safetensors``.

    Lightning checkpoints are unwrapped (``state_dict``) and the ``model.`` prefix a
    LightningModule adds is removed; so is DataParallel's ``module.``.

    Raises:
        MedlensError: the file is missing, unreadable, holds arbitrary Python objects, or holds no tensors.
    """
    path = Path(path)
    if path.is_dir():
        raise MedlensError(f"weights file {path} is a folder, not a weights file")
    if not path.exists():
        raise MedlensError(f"weights file {path} not found")
    if not path.is_file():
        raise MedlensError(f"weights file {path} is not a regular file (FIFO, device or socket); not opened")
    if path.stat().st_size == 0:
        raise MedlensError(f"weights file {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        _check_safetensors_header(path)
        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as err:
            raise MedlensError(f"weights file {path}: not a readable safetensors file ({first_line(err)})") from None
    _check_torch_container(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path) and _head(path, 1) != b"\x80":
            raise MedlensError(f"weights file {path}: not a readable torch file (neither a zip archive nor a pickle: random or foreign bytes)") from None
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(err))
        what = f"it pickles {found.group(1)}" if found else "it holds Python objects that are not plain tensors"
        raise MedlensError(f"weights file {path}: refused to unpickle, {what} (only tensors load, weights_only=True)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise MedlensError(f"weights file {path}: not a readable torch file ({first_line(err)[:160]})") from None
    return _unwrap(content, path)


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(n)


def _check_torch_container(path: Path) -> None:
    """A zip-format torch file: the archive is complete and every member's CRC matches (bit flips)."""
    head = _head(path, 4)
    if head != b"PK\x03\x04":
        return  # legacy pickle format: torch.load's own checks apply
    if not zipfile.is_zipfile(path):
        raise MedlensError(f"weights file {path}: not a readable torch file (truncated: a zip archive without its directory, the file was cut short)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as err:
        raise MedlensError(f"weights file {path}: not a readable torch file (corrupt zip archive: {first_line(err)})") from None
    if bad is not None:
        raise MedlensError(f"weights file {path}: not a readable torch file (corrupt: member {bad} fails its CRC check, damaged bytes)")


def _check_safetensors_header(path: Path) -> None:
    """The 8-byte header length and the tensors' offsets against the file's size."""
    size = path.stat().st_size
    head = _head(path, 8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if length < 2 or 8 + length > size:
        raise MedlensError(f"weights file {path}: not a readable safetensors file (truncated or foreign bytes: header "
                           f"length {length} for a file of {size} bytes)")
    try:
        with open(path, "rb") as handle:
            handle.seek(8)
            header = json.loads(handle.read(length))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise MedlensError(f"weights file {path}: not a readable safetensors file (corrupt header: not the expected JSON)") from None
    if ends and 8 + length + max(ends) != size:
        raise MedlensError(f"weights file {path}: not a readable safetensors file (truncated or padded: its header "
                           f"describes {8 + length + max(ends)} bytes, the file has {size})")


def check_finite_weights(state: Mapping[str, Tensor], path: str | Path) -> None:
    """Refuse weights holding NaN or Inf (a diverged training run), naming the first such tensor."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise MedlensError(f"weights file {path}: tensor {key} holds NaN or Inf values (a diverged or damaged "
                               "model); refused")


def _unwrap(content: Any, path: Path) -> dict[str, Tensor]:
    lightning = isinstance(content, Mapping) and "pytorch-lightning_version" in content
    if isinstance(content, Mapping):
        for key in _CHECKPOINT_KEYS:
            if isinstance(content.get(key), Mapping):
                content = content[key]
                break
    if not isinstance(content, Mapping) or not content:
        raise MedlensError(f"weights file {path}: holds {type(content).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in content.items() if isinstance(v, Tensor)}
    if not tensors:
        raise MedlensError(f"weights file {path}: holds no tensors")
    if lightning and any(k.startswith("model.") for k in tensors):
        # A LightningModule holds the network as ``self.model`` beside losses and metrics.
        tensors = {k: v for k, v in tensors.items() if k.startswith("model.")}
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _listing(label: str, names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    more = f" (+{len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else ""
    return f"{label} {len(names)}: {shown}{more}"


def weight_mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """Return (missing keys, unexpected keys, "key model-shape vs file-shape") between model and ``state``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(expected[k].shape)} vs {tuple(state[k].shape)}"
        for k in expected
        if k in state and expected[k].shape != state[k].shape
    ]
    return missing, unexpected, shapes


def load_weights(model: nn.Module, path: str | Path, strict: bool = True, skip_mismatched: bool = False) -> nn.Module:
    """Load weights from ``path`` into ``model`` in place and return it.

    Args:
        model: the architecture the weights belong to (e.g. from :func:`build_model`).
        path: ``.pth``, ``.pt``, ``.ckpt`` (Lightning) or ``.safetensors``.
        strict: when True, any missing or unexpected key is an error.
        skip_mismatched: leave out tensors whose shape differs (a pre-trained 1000-class head
            loaded into a 2-class model) with a warning naming them, instead of failing.

    Raises:
        MedlensError: one line naming the file and listing missing/unexpected keys and shape
        mismatches; also when no tensor of the file fits the model at all.
    """
    state = read_state_dict(path)
    check_finite_weights(state, path)
    missing, unexpected, shapes = weight_mismatch(model, state)
    if skip_mismatched and shapes:
        skipped = [entry.split(" ")[0] for entry in shapes]
        warnings.warn(f"weights file {path}: left out {_listing('shape mismatch', shapes)}", stacklevel=2)
        state = {k: v for k, v in state.items() if k not in skipped}
        missing, shapes = missing + skipped, []
    fits = len(state) - len(unexpected)
    if shapes or fits == 0 or (strict and (missing or unexpected)):
        parts = [_listing(label, names) for label, names in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if names]
        raise MedlensError(f"weights file {path} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return model


def save_weights(model: nn.Module | Mapping[str, Tensor], path: str | Path) -> Path:
    """Write a model's weights atomically: safetensors by default, a plain tensor dict for ``.pth``/``.pt``."""
    path = Path(path)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    # Cloning breaks shared storage (tied weights), which safetensors refuses to write.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        if path.suffix in (".pth", ".pt"):
            torch.save(tensors, tmp)
        else:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp))
    return path
