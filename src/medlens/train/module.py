"""LightningModules for classification and segmentation, and the "last k blocks" fine-tuning rule.

The network is held as ``self.model`` so a checkpoint's ``state_dict`` keys are ``model.<key>``,
which :func:`medlens.models.load_weights` strips when it reads a ``.ckpt``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.errors import MedlensError
from medlens.train.config import OptimConfig


def block_container(model: nn.Module, share: float = 0.8) -> tuple[str, nn.Module]:
    """The module whose children are the model's "blocks".

    Starting at the model, step into the child that holds at least ``share`` of the current
    module's parameters, for as long as there is one: ``features`` of a torchvision EfficientNet,
    ``encoder.layers`` of a torchvision ViT, ``blocks`` of a timm ViT or EfficientNet, and the
    model itself for a ResNet (``layer4`` holds only about 60-70%).
    """
    name, module = "", model
    while True:
        total = sum(p.numel() for p in module.parameters())
        trunk = [(n, c) for n, c in module.named_children() if sum(p.numel() for p in c.parameters()) >= share * total]
        if not trunk or total == 0:
            return name, module
        name, module = f"{name}.{trunk[0][0]}".lstrip("."), trunk[0][1]


def unfreeze_last(model: nn.Module, k: int | None) -> list[str]:
    """Freeze all parameters except the last ``k`` blocks and the head after them.

    The head is every parameter that comes after the block container in the model (a ViT's final
    norm and ``head``), or the model's last child when the model is its own container (a ResNet's
    ``fc``). ``k=None`` trains everything; ``k=0`` trains only the head. Returns the trainable
    parameter names. Training only ever does this to a model it built itself.
    """
    if k is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    _, container = block_container(model)
    children = [c for c in container.children() if any(True for _ in c.parameters())]
    blocks, head = (children[:-1], children[-1:]) if container is model else (children, [])
    chosen = (blocks[max(0, len(blocks) - k):] if k else []) + head
    trainable = {id(p) for module in chosen for p in module.parameters()}
    inside = {id(p) for p in container.parameters()}
    names, after = [], False
    for name, param in model.named_parameters():
        after |= id(param) in inside
        train = id(param) in trainable or (after and id(param) not in inside)
        param.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise MedlensError(f"model.unfreeze_last={k}: no parameter would train in {type(model).__name__}")
    return names


def build_optimiser(params: list[nn.Parameter], cfg: OptimConfig, max_epochs: int) -> dict[str, Any]:
    """AdamW / Adam (``momentum`` is beta1) / SGD, with an optional per-epoch cosine schedule."""
    name = cfg.name.lower()
    if name == "sgd":
        optimiser = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        optimiser = kind(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    if cfg.scheduler.lower() == "none":
        return {"optimizer": optimiser}
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, max_epochs))
    return {"optimizer": optimiser, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


class _Base(L.LightningModule):
    def __init__(self, model: nn.Module, optim: OptimConfig, max_epochs: int, class_names: list[str]) -> None:
        super().__init__()
        self.model, self.optim, self.max_epochs, self.class_names = model, optim, max_epochs, class_names
        self.save_hyperparameters({"class_names": class_names, "optim": vars(optim), "max_epochs": max_epochs})
        n = len(class_names)
        self.register_buffer("confusion", torch.zeros(n, n, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return build_optimiser(trainable, self.optim, self.max_epochs)

    def on_validation_epoch_start(self) -> None:
        self.confusion.zero_()

    def _count(self, truth: Tensor, predicted: Tensor) -> None:
        """Accumulate a confusion matrix (rows truth, columns prediction) without a host sync."""
        n = self.confusion.shape[0]
        self.confusion += torch.bincount(truth.flatten() * n + predicted.flatten(), minlength=n * n).view(n, n)


class ClassificationModule(_Base):
    """Cross-entropy classifier; logs ``train_loss``, ``val_loss``, ``val_acc`` (epoch means)."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x, y = batch["image"], batch["label"]
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        logits = self.model(x).float()
        predicted = logits.argmax(1)
        self._count(y, predicted)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("val_acc", (predicted == y).float().mean(), on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)


class SegmentationModule(_Base):
    """MONAI U-Net style segmenter trained with Dice + cross-entropy; logs ``val_dice`` (foreground mean).

    Dice is MONAI's ``DiceMetric`` (background excluded, mean over classes present, then images).
    """

    def __init__(self, model: nn.Module, optim: OptimConfig, max_epochs: int, class_names: list[str]) -> None:
        super().__init__(model, optim, max_epochs, class_names)
        from monai.losses import DiceCELoss
        from monai.metrics import DiceMetric

        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x, y = batch["image"], batch["mask"]
        loss = self.loss(self.model(x).float(), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.dice.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, y = batch["image"], batch["mask"]
        logits = self.model(x).float()
        predicted = logits.argmax(1, keepdim=True)
        n = logits.shape[1]
        self._count(y, predicted)
        self.dice(F.one_hot(predicted[:, 0], n).movedim(-1, 1), F.one_hot(y[:, 0], n).movedim(-1, 1))
        self.log("val_loss", self.loss(logits, y), on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        per_class = self.dice.aggregate()
        self.log("val_dice", torch.nan_to_num(per_class, nan=0.0).mean(), prog_bar=True, sync_dist=True)
        for name, value in zip(self.class_names[1:], per_class):
            self.log(f"val_dice_{name}", torch.nan_to_num(value, nan=0.0), sync_dist=True)
