"""Hugging Face transformers image models from a local folder: ``hf:<folder>``.

The folder is what ``save_pretrained(folder, safe_serialization=True)`` writes: ``config.json``,
``model.safetensors`` and, usually, ``preprocessor_config.json`` from the image processor.
Nothing is downloaded (``local_files_only=True``) and only safetensors load
(``use_safetensors=True``): a folder with only ``pytorch_model.bin`` (a pickle) is refused.

The model is wrapped in :class:`HFImageModel`, whose ``forward(x)`` returns the logits tensor
(segmentation logits upsampled to the input size, as the image processors' post-processing
does) and which tells medlens what it needs: ``preprocessing`` (size, mean/std, rescale,
class names from ``id2label``), the token layout (class and register tokens, Swin stages),
the default token layer for CAM methods and the classifier head for Chefer's LRP.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.errors import MedlensError
from medlens.io.loaded import first_line
from medlens.models.preprocessing import Preprocessing

_SEGMENTATION_WORDS = ("SemanticSegmentation", "ForSegmentation")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MedlensError("hf: models need the transformers package: pip install 'medlens[hf]'") from None
    return transformers


def _folder(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_dir():
        raise MedlensError(
            f"hf:{name}: no local folder {name!r}; medlens downloads nothing from the Hugging Face hub: "
            "save the model with save_pretrained(folder, safe_serialization=True) and pass that folder"
        )
    if not (path / "config.json").is_file():
        raise MedlensError(f"hf:{name}: the folder has no config.json (write it with save_pretrained)")
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        pickles = sorted(p.name for p in path.glob("*.bin"))
        if pickles:
            raise MedlensError(
                f"hf:{name}: holds only {pickles[0]} (a pickle), which medlens never loads; "
                "convert it with save_pretrained(folder, safe_serialization=True)"
            )
        raise MedlensError(f"hf:{name}: the folder has no model.safetensors")
    return path


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        for key in ("shortest_edge", "longest_edge"):
            if key in value:
                return (int(value[key]), int(value[key]))
    return None


def read_preprocessing(folder: Path, config: Any) -> Preprocessing:
    """The image processor's size and normalisation (``preprocessor_config.json``), class names
    from ``config.id2label``; without a processor file, the config's ``image_size`` only."""
    labels = getattr(config, "id2label", None) or {}
    names = [str(labels[k]) for k in sorted(labels, key=lambda k: int(k))] if labels else None
    channels = getattr(config, "num_channels", None)
    size = _size(getattr(config, "image_size", None))
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return Preprocessing(size=size, in_channels=channels, class_names=names, source=f"hf:{folder} config")
    try:
        proc = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise MedlensError(f"hf:{folder}: preprocessor_config.json is not readable JSON ({first_line(err)})") from None
    if proc.get("do_center_crop") and _size(proc.get("crop_size")) is not None:
        size = _size(proc.get("crop_size"))
    elif proc.get("do_resize", True) and _size(proc.get("size")) is not None:
        size = _size(proc.get("size"))
    mean = std = None
    if proc.get("do_normalize", True) and proc.get("image_mean") is not None and proc.get("image_std") is not None:
        mean = tuple(float(v) for v in _listed(proc["image_mean"]))
        std = tuple(float(v) for v in _listed(proc["image_std"]))
    # medlens images are in [0, 1]: HF's input is 0..255, times rescale_factor when do_rescale
    scale = 255.0 * float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 255.0
    if abs(scale - 1.0) < 1e-6:
        scale = 1.0
    return Preprocessing(size=size, mean=mean, std=std, scale=scale, in_channels=channels, class_names=names, source=f"hf:{folder}")


def _listed(value: Any) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class HFImageModel(nn.Module):
    """A transformers image model as medlens sees it: ``forward(x) -> logits`` (B, classes) or
    (B, classes, H, W) at the input size.

    Attributes:
        hf: the transformers model (unchanged; ``hf.config`` is its config).
        preprocessing: :class:`~medlens.models.preprocessing.Preprocessing`.
        task: ``classification`` or ``segmentation``.
        default_token_layer_name: the layer CAM methods use by default (last block's first norm),
            or None for convolutional models (ResNet, ConvNeXt), where medlens picks the last
            spatial layer.
    """

    def __init__(self, hf: nn.Module, preprocessing: Preprocessing | None = None, task: str = "classification") -> None:
        super().__init__()
        self.hf = hf
        self.preprocessing = preprocessing or Preprocessing()
        self.task = task
        config = hf.config
        self._image_size = _size(getattr(config, "image_size", None))
        try:
            params = inspect.signature(hf.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            params = {}
        self._interpolates = "interpolate_pos_encoding" in params
        self.default_token_layer_name = self._token_layer()

    # -- what medlens reads -------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def patch_size(self) -> tuple[int, int] | None:  # read by medlens.core.tokens.patch_size
        return _size(getattr(self.hf.config, "patch_size", None))

    @property
    def cls_token(self) -> Tensor | None:  # read by medlens.core.tokens.has_class_token
        for name, param in self.hf.named_parameters():
            if name.endswith("embeddings.cls_token"):
                return param
        return None

    def _is_hierarchical(self) -> bool:
        config = self.hf.config
        return getattr(config, "depths", None) is not None and getattr(config, "embed_dim", None) is not None

    def token_grid(self, n_tokens: int, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
        """(grid, number of extra tokens) of a (B, n_tokens, C) layer output for an input of size ``spatial``.

        ViT-like: the patch grid, extra tokens (class, distillation, registers) first. Swin-like:
        the stage whose (padded, halved per stage) grid has ``n_tokens`` cells, no extra tokens.
        """
        patch = self.patch_size
        if patch is None:  # e.g. SegFormer's overlapping patch embeddings: the stride whose grid fits
            for stride in (1, 2, 4, 8, 16, 32, 64):
                for grid in (tuple(math.ceil(s / stride) for s in spatial), tuple(s // stride for s in spatial)):
                    if math.prod(grid) == n_tokens:
                        return grid, 0
            raise MedlensError(f"cannot tell the grid of a {n_tokens}-token layer of {type(self.hf).__name__} for a {spatial} input")
        if self._is_hierarchical():
            grid = tuple(math.ceil(s / p) for s, p in zip(spatial, patch))
            for _ in range(len(self.hf.config.depths) + 1):
                if math.prod(grid) == n_tokens:
                    return grid, 0
                grid = tuple(math.ceil(g / 2) for g in grid)
            raise MedlensError(f"a layer with {n_tokens} tokens matches no stage of {type(self.hf).__name__} for a {spatial} input")
        grid = tuple(s // p for s, p in zip(spatial, patch))
        extra = n_tokens - math.prod(grid)
        if extra < 0:
            raise MedlensError(f"layer has {n_tokens} tokens, fewer than the {math.prod(grid)} patches of a {grid} grid")
        return grid, extra

    def _token_layer(self) -> str | None:
        from medlens.core.hf_attention import is_hf_projection_attention

        last = None
        modules = dict(self.hf.named_modules())
        for name, module in modules.items():
            if is_hf_projection_attention(module) and "." in name:
                last = name
        if last is None:
            return None
        block_name = last.rsplit(".", 1)[0]
        block = modules[block_name]
        for norm in ("layernorm_before", "norm1"):
            if isinstance(getattr(block, norm, None), nn.Module):
                return f"hf.{block_name}.{norm}"
        return None

    def medlens_head_paths(self) -> list[tuple[float, Any, list[nn.Linear]]] | None:
        """Classifier head of a class-token model for Chefer's LRP (read by ``HeadCapture``)."""
        hf = self.hf
        cls, dist = getattr(hf, "cls_classifier", None), getattr(hf, "distillation_classifier", None)
        if isinstance(cls, nn.Linear) and isinstance(dist, nn.Linear):
            return [(0.5, 0, [cls]), (0.5, 1, [dist])]
        head = getattr(hf, "classifier", None)
        if isinstance(head, nn.Linear) and getattr(hf.config, "model_type", "") in ("vit", "deit", "vit_msn"):
            return [(1.0, 0, [head])]
        if isinstance(head, nn.Module):
            raise MedlensError(f"chefer supports transformers ViT/DeiT heads on the class token; {type(hf).__name__} pools otherwise")
        return None

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        kwargs = {}
        if self._interpolates and self._image_size is not None and tuple(x.shape[-2:]) != self._image_size:
            kwargs["interpolate_pos_encoding"] = True
        out = self.hf(pixel_values=x, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        if self.task == "segmentation" and logits.dim() == 4 and tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):
            logits = F.interpolate(logits, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return logits


def load_hf(name: str, num_classes: int | None = None, in_channels: int | None = None, spatial_dims: int = 2, **kwargs: Any) -> HFImageModel:
    """Load ``hf:<folder>`` (see the module docstring). The folder's config decides the classes and
    channels; ``num_classes``/``in_channels`` are ignored. ``kwargs`` go to ``from_pretrained``
    (e.g. ``attn_implementation="eager"``); ``task="segmentation"`` forces the segmentation head."""
    path = _folder(name)
    transformers = _transformers()
    for key in ("local_files_only", "use_safetensors", "trust_remote_code"):
        if kwargs.pop(key, None) not in (None, True if key != "trust_remote_code" else False):
            raise MedlensError(f"hf:{name}: {key} cannot be changed (local safetensors only, no remote code)")
    task = kwargs.pop("task", None)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise MedlensError(f"hf:{name}: cannot read config.json ({first_line(err)})") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if task is None:
        task = "segmentation" if any(w in a for a in architectures for w in _SEGMENTATION_WORDS) else "classification"
    auto = transformers.AutoModelForSemanticSegmentation if task == "segmentation" else transformers.AutoModelForImageClassification
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar in medlens' output
    try:
        hf = auto.from_pretrained(str(path), local_files_only=True, use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise MedlensError(f"hf:{name}: cannot load the {task} model ({first_line(err)[:200]})") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    hf.eval()
    return HFImageModel(hf, read_preprocessing(path, config), task).eval()
