"""Train the models medlens explains: ``train(config)`` on PyTorch Lightning, configs as YAML."""

from medlens.train.config import TrainConfig, load_config
from medlens.train.run import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_config", "train", "config_path"]


def config_path(name: str) -> str:
    """The path of a config shipped with medlens (``brain_mri_resnet18`` or ``.../file.yaml``)."""
    from importlib.resources import files

    from medlens.errors import MedlensError

    shipped = files("medlens") / "configs"
    candidate = shipped / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not candidate.is_file():
        known = sorted(p.name[:-5] for p in shipped.iterdir() if p.name.endswith(".yaml"))
        raise MedlensError(f"no shipped config {name!r}; known: {', '.join(known)}")
    return str(candidate)
