"""MONAI bundles from a local folder: ``bundle:<folder>``.

A bundle folder holds ``configs/inference.json`` (or ``.yaml``/``.yml``) and
``models/model.safetensors`` or ``models/model.pt``. The network is built from the config's
``network_def`` with :class:`monai.bundle.ConfigParser`; its weights are read safely by
:func:`medlens.models.read_state_dict` (``torch.load(..., weights_only=True)`` or safetensors;
TorchScript ``model.ts`` files are not loaded). The config's ``preprocessing`` transforms become
the model's :class:`~medlens.models.preprocessing.Preprocessing`: medlens reads the files itself,
so loader transforms (``LoadImage(d)``, ``EnsureChannelFirst(d)``) are left out and the rest runs
on each (C, *S) image.

A bundle config is code (``$`` expressions are Python, evaluated by MONAI), like a
``package.module:factory`` spec: explain bundles you trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from medlens.errors import MedlensError
from medlens.io.loaded import first_line
from medlens.models.preprocessing import Preprocessing

_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
_WEIGHT_NAMES = ("model.safetensors", "model.pt", "model.pth")
_LOADERS = ("LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd", "AddChannel", "AddChanneld")


def bundle_files(folder: str | Path) -> tuple[Path, Path]:
    """(inference config, weights file) of a bundle folder; one-line errors when missing."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise MedlensError(f"bundle:{folder}: no such folder (medlens downloads no bundles; pass an unpacked bundle folder)")
    config = next((root / "configs" / n for n in _CONFIG_NAMES if (root / "configs" / n).is_file()), None)
    if config is None:
        raise MedlensError(f"bundle:{folder}: no configs/inference.json or configs/inference.yaml")
    weights = next((root / "models" / n for n in _WEIGHT_NAMES if (root / "models" / n).is_file()), None)
    if weights is None:
        found = "only models/model.ts (TorchScript, not loaded)" if (root / "models" / "model.ts").is_file() else "nothing"
        raise MedlensError(f"bundle:{folder}: models/ holds {found}; medlens needs models/model.safetensors or models/model.pt")
    return config, weights


def _parser(root: Path, config: Path) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config(str(config))
        meta = root / "configs" / "metadata.json"
        if meta.is_file():
            parser.read_meta(str(meta))
    except (OSError, ValueError) as err:
        raise MedlensError(f"bundle:{root}: {config.name} is not readable ({first_line(err)})") from None
    parser["bundle_root"] = str(root)
    return parser


def _parsed(parser: Any, key: str, root: Path) -> Any:
    try:
        return parser.get_parsed_content(key, instantiate=True)
    except Exception as err:  # MONAI raises anything a config's expressions raise
        raise MedlensError(f"bundle:{root}: cannot build {key!r} from the config ({type(err).__name__}: {first_line(err)[:200]})") from None


def bundle_transform(compose: Any) -> Callable[[Tensor], Tensor]:
    """A function on one (C, *S) tensor from a bundle's ``preprocessing`` Compose (loaders dropped)."""
    from monai.transforms import Compose, MapTransform

    steps = list(getattr(compose, "transforms", [compose]))
    kept = [t for t in steps if type(t).__name__ not in _LOADERS]
    keys = sorted({k for t in kept if isinstance(t, MapTransform) for k in t.keys}) or ["image"]
    dict_based = any(isinstance(t, MapTransform) for t in kept)
    chain = Compose(kept)

    def apply(x: Tensor) -> Tensor:
        if dict_based:
            if len(keys) != 1:
                # label/mask keys of training-style chains: only the image is read here
                keys_image = [k for k in keys if "image" in k or "img" in k] or keys[:1]
                data = {k: x for k in keys_image}
                out = chain(data)[keys_image[0]]
            else:
                out = chain({keys[0]: x})[keys[0]]
        else:
            out = chain(x)
        out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
        return out.float().contiguous()

    return apply


def _load(net: nn.Module, weights: Path) -> None:
    """Load the bundle's weights strictly. :func:`read_state_dict` strips a ``model.`` prefix
    shared by all keys (Lightning, DataParallel); networks whose own keys all start with it
    (MONAI's UNet) get it back."""
    from medlens.models import read_state_dict, weight_mismatch

    state = read_state_dict(weights)
    expected = list(net.state_dict())
    for prefix in ("model.", "module.", "net."):
        if expected and all(k.startswith(prefix) for k in expected) and not all(k.startswith(prefix) for k in state):
            state = {prefix + k: v for k, v in state.items()}
            break
    missing, unexpected, shapes = weight_mismatch(net, state)
    if missing or unexpected or shapes:
        from medlens.models import _listing

        parts = [_listing(label, names) for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if names]
        raise MedlensError(f"bundle weights {weights} do not fit {type(net).__name__}: " + "; ".join(parts))
    net.load_state_dict(state)


def load_bundle(name: str, num_classes: int | None = None, in_channels: int | None = None, spatial_dims: int = 2, **kwargs: Any) -> nn.Module:
    """Build ``bundle:<folder>`` (see the module docstring) in eval mode; the network gets a
    ``preprocessing`` attribute when the config has a ``preprocessing`` entry. The bundle decides
    classes, channels and dims: ``num_classes``/``in_channels``/``spatial_dims`` are ignored;
    ``kwargs`` override config entries (e.g. ``network_def#channels``)."""
    config, weights = bundle_files(name)
    root = config.parents[1]
    parser = _parser(root, config)
    for key, value in kwargs.items():
        parser[key] = value
    if "network_def" not in parser:
        raise MedlensError(f"bundle:{name}: {config.name} has no network_def")
    net = _parsed(parser, "network_def", root)
    if not isinstance(net, nn.Module):
        raise MedlensError(f"bundle:{name}: network_def built a {type(net).__name__}, not a torch nn.Module")
    _load(net, weights)
    prep = Preprocessing(source=f"bundle:{name}")
    if "preprocessing" in parser:
        prep.transform = bundle_transform(_parsed(parser, "preprocessing", root))
    names = parser.get("_meta_#network_data_format#outputs#pred#channel_def", None)
    if isinstance(names, dict):
        prep.class_names = [str(names[k]) for k in sorted(names, key=lambda k: int(k))]
    net.preprocessing = prep
    net.bundle_root = str(root)
    return net.eval()
