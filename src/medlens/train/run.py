"""``train(config) -> TrainResult``: one Lightning run and the files a reviewer looks at afterwards.

The run folder holds::

    config.yaml                   the config as run (after --set overrides)
    split.csv                     the deterministic train/val split (read back on --resume)
    checkpoints/best-*.ckpt       best by the monitored metric; checkpoints/last.ckpt to resume
    best.safetensors              the best weights, loadable with medlens.models.load_weights
    logs/metrics.csv, tb/         CSV and TensorBoard logs
    validation_samples.csv        each validation file with its label and the best model's prediction
    bad_files.csv                 files that could not be read, left out of training (only when there are some)
    confusion_matrix.csv/.png     rows truth, columns prediction (voxels for segmentation)
    misclassified.png             a gallery of wrongly classified validation images (classification)
    metrics.json                  the best model's validation metrics and the run's timings
"""

from __future__ import annotations

import csv
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import Tensor, nn

from medlens.errors import MedlensError
from medlens.io.atomic import atomic_path, write_text
from medlens.models import build_model, load_weights, save_weights
from medlens.train.config import TrainConfig, load_config
from medlens.train.data import MedlensDataModule
from medlens.train.module import ClassificationModule, SegmentationModule, unfreeze_last


@dataclass
class TrainResult:
    """What a run produced: paths, the best model's validation metrics, and timings."""

    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    weights: Path
    metrics: dict[str, float]
    epochs: int
    seconds: float
    classes: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 or AMX on x86, BF16 on Arm).

    Without it a bf16 autocast still *works* on CPU but is emulated: a ResNet-18 training step is
    about 15x slower than in float32 on an AVX2-only machine, so ``auto`` must not pick it there.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def pick_precision(requested: str, accelerator: str) -> str:
    """``auto``: 16-mixed on CUDA, bf16-mixed on a CPU with native bf16 (see :func:`cpu_has_fast_bf16`), else 32-true."""
    if requested != "auto":
        return requested
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def build_network(config: TrainConfig, num_classes: int) -> nn.Module:
    """The model of a config, with its initial weights (local file) and its frozen blocks."""
    mc, dc = config.model, config.data
    spatial = 3 if config.task == "segmentation" and not dc.slices else 2
    model = build_model(mc.spec, num_classes=mc.num_classes or num_classes, in_channels=dc.in_channels, spatial_dims=spatial, **mc.kwargs)
    if mc.init_weights:
        # Not strict: a pre-trained backbone file has no head for our classes (or another-size one).
        load_weights(model, mc.init_weights, strict=mc.init_strict, skip_mismatched=not mc.init_strict)
    unfreeze_last(model, mc.unfreeze_last)
    return model


def check_checkpoint(path: Path) -> None:
    """Refuse, in one line, a checkpoint that is truncated, damaged or pickles code, before Lightning unpickles it."""
    import pickle

    import torch

    from medlens.models import _check_torch_container

    if path.stat().st_size == 0:
        raise MedlensError(f"--resume: checkpoint {path} is empty (0 bytes); delete it to start afresh")
    try:
        _check_torch_container(path)
        torch.load(path, map_location="cpu", weights_only=True)
    except MedlensError as error:
        raise MedlensError(f"--resume: {str(error).replace('weights file', 'checkpoint', 1)}") from None
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"it pickles {found.group(1)}" if found else "not a torch checkpoint"
        raise MedlensError(f"--resume: checkpoint {path} refused ({what}); delete it to start afresh") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise MedlensError(f"--resume: checkpoint {path} is corrupt or truncated ({reason})") from None


def train(config: TrainConfig | str | Path, out_dir: str | Path | None = None, resume: bool = False, **trainer_kwargs: Any) -> TrainResult:
    """Train the model a config describes and write the run folder.

    Args:
        config: a :class:`TrainConfig` or a YAML path.
        out_dir: the run folder (default: ``config.out`` or ``runs/<name>``).
        resume: continue from ``checkpoints/last.ckpt`` when it exists (same split, epoch counter goes on).
        **trainer_kwargs: extra ``lightning.Trainer`` arguments (e.g. ``enable_model_summary=False``);
            ``callbacks`` are added to the run's own (checkpoints, early stopping, logs).

    Returns:
        TrainResult with the best checkpoint and the best model's validation metrics.
    """
    config = load_config(config) if not isinstance(config, TrainConfig) else config
    out = Path(out_dir or config.out or Path("runs") / config.name)
    last = out / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise MedlensError(f"--resume: no checkpoint to resume from at {last}")
    if resume:
        check_checkpoint(last)
    out.mkdir(parents=True, exist_ok=True)
    tc = config.trainer
    L.seed_everything(tc.seed, workers=True, verbose=False)
    started = time.perf_counter()

    data = MedlensDataModule(config.data, config.task, out).prepare()
    # the model and its initial weights are checked before any image is read (a wrong path fails in seconds)
    model = build_network(config, len(data.classes))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if config.model.init_weights is None and total and trainable < 0.5 * total:
        warnings.warn(f"{total - trainable:,} of {total:,} parameters are frozen (model.unfreeze_last={config.model.unfreeze_last}) "
                      "but keep their random initialisation (model.init_weights is unset): set init_weights or unfreeze_last: null",
                      stacklevel=2)
    data.setup("fit")  # reads every item once; unreadable files are left out and reported
    report = None
    if data.bad_files:
        from medlens.io.report import write_bad_files

        report = write_bad_files(out / "bad_files.csv", data.bad_files)
        warnings.warn(f"{len(data.bad_files)} unreadable file(s) left out of training, listed in {report}: "
                      f"{data.bad_files[0][1]}", stacklevel=2)
    classes = data.classes
    config_out = config.to_dict() | {"out": str(out)}
    write_text(out / "config.yaml", yaml.safe_dump(config_out, sort_keys=False))
    kind = ClassificationModule if config.task == "classification" else SegmentationModule
    module = kind(model, config.optim, tc.max_epochs, classes)

    trainer = _trainer(config, out, **trainer_kwargs)
    metrics_csv = out / "logs" / "metrics.csv"
    earlier_logs = _read_rows(metrics_csv) if resume else []
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume else None)
    if earlier_logs:
        _merge_logs(metrics_csv, earlier_logs)

    checkpoint = trainer.checkpoint_callback
    best = Path(checkpoint.best_model_path) if checkpoint and checkpoint.best_model_path else last
    load_weights(module.model, best)
    weights = save_weights(module.model, out / "best.safetensors")
    # Re-validate the best weights without logging, so the run's logs keep one row per epoch.
    checker = L.Trainer(accelerator=tc.accelerator, devices=1, precision=trainer.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = {k: float(v) for k, v in checker.validate(module, datamodule=data, verbose=False)[0].items()}
    files = write_reports(module, data, out, precision=trainer.precision, gallery_size=tc.gallery_size)
    if report is not None:
        files["bad_files"] = report
    seconds = time.perf_counter() - started
    summary = {"metrics": metrics, "epochs": trainer.current_epoch, "seconds": round(seconds, 1), "best_checkpoint": str(best),
               "monitor": config.monitor, "precision": str(trainer.precision), "classes": classes,
               "bad_files": len(data.bad_files)}
    write_text(out / "metrics.json", json.dumps(summary, indent=2))
    return TrainResult(out, best, last, weights, metrics, trainer.current_epoch, seconds, classes, files)


def _trainer(config: TrainConfig, out: Path, **overrides: Any) -> L.Trainer:
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    tc = config.trainer
    monitor = config.monitor
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=out / "checkpoints", filename=f"best-{{epoch}}-{{{monitor}:.4f}}", monitor=monitor,
                        mode="min" if monitor.endswith("loss") else "max", save_last=True, save_top_k=1),
        EarlyStopping(monitor="val_loss", mode="min", patience=tc.patience),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if tc.progress == "rich":
        callbacks.append(RichProgressBar(leave=True))
    elif tc.progress == "tqdm":
        callbacks.append(TQDMProgressBar())
    args: dict[str, Any] = dict(
        max_epochs=tc.max_epochs, accelerator=tc.accelerator, devices=tc.devices, strategy=tc.strategy,
        precision=pick_precision(str(tc.precision), tc.accelerator), callbacks=callbacks,
        logger=[CSVLogger(out, name="logs", version=""), TensorBoardLogger(out, name="tb", version="")],
        log_every_n_steps=tc.log_every_n_steps, enable_progress_bar=tc.progress != "none",
        default_root_dir=out, num_sanity_val_steps=0,
    )
    for key in ("limit_train_batches", "limit_val_batches"):
        if getattr(tc, key) is not None:
            args[key] = getattr(tc, key)
    callbacks.extend(overrides.pop("callbacks", None) or [])  # a caller's callbacks join ours, never replace them
    args.update(overrides)
    return L.Trainer(**args)


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _merge_logs(path: Path, earlier: list[dict[str, str]]) -> None:
    """Put back the rows of the epochs before a resume, which Lightning's CSVLogger overwrote."""
    later = _read_rows(path)
    epochs = [int(r["epoch"]) for r in later if r.get("epoch")]
    steps = [int(r["step"]) for r in later if r.get("step")]
    start_epoch, start_step = min(epochs, default=1 << 30), min(steps, default=1 << 30)
    kept = [r for r in earlier if (int(r["epoch"]) < start_epoch if r.get("epoch") else int(r.get("step") or 0) < start_step)]
    columns = list(dict.fromkeys([*(later[0].keys() if later else []), *(earlier[0].keys() if earlier else [])]))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, restval="")
        writer.writeheader()
        writer.writerows(kept + later)


# -------------------------------------------------------------------------------------------- reports


@torch.no_grad()
def predict_validation(module: L.LightningModule, data: MedlensDataModule, precision: Any = None,
                       probabilities: list | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Best-model predictions on the validation split: truth and predicted ((N,) or (N,1,*S)), images (N,*S).

    ``probabilities``: a list that receives the (N, classes) softmax of a classifier's logits."""
    model = module.model.eval()
    device = next(model.parameters()).device
    data.setup("validate")
    key = "label" if data.task == "classification" else "mask"
    truth, predicted, images = [], [], []
    # the same autocast as the validation loop of that precision, so the predictions match its val_acc
    dtype = torch.bfloat16 if "bf16" in str(precision) else torch.float16
    mixed = str(precision).endswith("-mixed") and (dtype == torch.bfloat16 or device.type == "cuda")
    for batch in data.val_dataloader():
        with torch.autocast(device.type, dtype=dtype, enabled=mixed):
            logits = model(batch["image"].to(device)).float()
        predicted.append(logits.argmax(1, keepdim=key == "mask").cpu())
        if probabilities is not None and key == "label":
            probabilities.append(logits.softmax(1).cpu())
        truth.append(batch[key])
        images.append(batch["image"][:, 0])
    return torch.cat(truth), torch.cat(predicted), torch.cat(images)


def write_reports(module: L.LightningModule, data: MedlensDataModule, out: Path, precision: Any = None, gallery_size: int = 16) -> dict[str, Path]:
    """Write validation_samples.csv, the confusion matrix (CSV, PNG) and the misclassified gallery."""
    scores: list[Tensor] = []
    truth, predicted, images = predict_validation(module, data, precision, scores)
    classes = data.classes
    n = len(classes)
    confusion = torch.bincount(truth.flatten() * n + predicted.flatten().long(), minlength=n * n).view(n, n)
    files = {"validation_samples": out / "validation_samples.csv", "confusion_csv": out / "confusion_matrix.csv",
             "confusion_png": out / "confusion_matrix.png"}
    segmentation = truth.dim() > 1
    with atomic_path(files["validation_samples"]) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if segmentation:
            dice = case_dice(truth, predicted, n, getattr(data.val_set, "index", None), len(data.val_items))
            writer.writerow(["path", "mask", "patient", *[f"dice_{c}" for c in classes[1:]]])
            writer.writerows([item.path, item.mask, item.patient or "", *["" if d is None else f"{d:.4f}" for d in row]]
                             for item, row in zip(data.val_items, dice))
        else:
            probs = torch.cat(scores) if scores else None
            writer.writerow(["path", "label", "class", "predicted", "predicted_class", "confidence", *[f"p_{c}" for c in classes]])
            for i, (item, p) in enumerate(zip(data.val_items, predicted.tolist())):
                extra = [f"{float(v):.4f}" for v in probs[i]] if probs is not None else [""] * n
                confidence = f"{float(probs[i, p]):.4f}" if probs is not None else ""
                writer.writerow([item.path, item.label, classes[item.label], p, classes[p], confidence, *extra])
    with atomic_path(files["confusion_csv"]) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["truth \\ predicted", *classes])
        writer.writerows([classes[i], *row] for i, row in enumerate(confusion.tolist()))
    plot_confusion(confusion, classes, files["confusion_png"])
    if not segmentation:
        files["misclassified"] = out / "misclassified.png"
        plot_misclassified(images, truth, predicted, data, files["misclassified"], gallery_size, torch.cat(scores) if scores else None)
    return files


def case_dice(truth: Tensor, predicted: Tensor, n: int, slice_index: list | None, cases: int) -> list[list[float | None]]:
    """Per validation case, the Dice of each foreground class (None where neither truth nor prediction has it).

    ``slice_index``: for a 2D model on volume slices, the (volume, slice) of each prediction, so the
    slices of one case are pooled."""
    owner = [v for v, _ in slice_index] if slice_index is not None and len(slice_index) == len(truth) else list(range(len(truth)))
    inter = torch.zeros(cases, n)
    total = torch.zeros(cases, n)
    for i, case in enumerate(owner):
        t, p = truth[i].flatten(), predicted[i].flatten().long()
        for c in range(1, n):
            a, b = t == c, p == c
            inter[case, c] += float((a & b).sum())
            total[case, c] += float(a.sum() + b.sum())
    return [[(2 * float(inter[k, c]) / float(total[k, c])) if total[k, c] > 0 else None for c in range(1, n)] for k in range(cases)]


def plot_confusion(confusion: Tensor, classes: list[str], path: Path) -> None:
    """The confusion matrix as a labelled heatmap, counts in the cells, accuracy in the title."""
    from medlens.render.panels import new_figure, save_figure

    n = len(classes)
    fig = new_figure(1.2 * n + 2, 1.2 * n + 1.5)
    ax = fig.add_subplot()
    ax.imshow(confusion.numpy(), cmap="Blues")
    for index, value in enumerate(confusion.flatten().tolist()):
        ax.text(index % n, index // n, str(value), ha="center", va="center",
                color="white" if value > 0.6 * float(confusion.max()) else "black")
    ax.set_xticks(range(n), classes, rotation=30, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(f"accuracy {confusion.diag().sum() / confusion.sum().clamp_min(1):.3f}")
    save_figure(fig, path, dpi=100)


def plot_misclassified(images: Tensor, truth: Tensor, predicted: Tensor, data: MedlensDataModule, path: Path, limit: int,
                       probabilities: Tensor | None = None) -> None:
    """Up to ``limit`` wrongly classified validation images, titled with file, truth and prediction;
    with ``probabilities`` (N, classes) the most confident mistakes come first, each with p(pred) and p(true)."""
    from medlens.render.panels import new_figure, save_figure

    wrong = (truth != predicted).nonzero().flatten().tolist()
    if probabilities is not None:
        wrong.sort(key=lambda i: -float(probabilities[i, int(predicted[i])]))
    wrong = wrong[:limit]
    cols = max(1, min(4, len(wrong)))
    rows = max(1, -(-len(wrong) // cols))
    fig = new_figure(2.6 * cols, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i].float().numpy(), cmap="gray")
        name = Path(data.val_items[i].path)
        odds = (f" p={float(probabilities[i, int(predicted[i])]):.2f}", f" p={float(probabilities[i, int(truth[i])]):.2f}") if probabilities is not None else ("", "")
        ax.set_title(f"{name.parent.name}/{name.name}\ntrue {data.classes[int(truth[i])]}{odds[1]} | pred {data.classes[int(predicted[i])]}{odds[0]}", fontsize=7)
    if not wrong:
        axes[0, 0].text(0.5, 0.5, "no misclassified validation images", ha="center", va="center")
    save_figure(fig, path, dpi=100)
