"""`medlens train`: configs, the fine-tuning rule, and short REAL Lightning runs on real data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import pytest
import torch
from typer.testing import CliRunner

from medlens.cli import app

from medlens.errors import MedlensError
from medlens.models import build_model, load_weights, read_state_dict
from medlens.train import config_path, load_config, train
from medlens.train.data import MedlensDataModule
from medlens.train.module import unfreeze_last

CONFIGS = Path(config_path("brain_mri_resnet18")).parent
PAPER_ROWS = [f"{d}_vit_b16_{i}" for d in ("cp_child", "duke", "kvasir", "mura") for i in ("scratch", "supervised", "dino", "mae")]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _epoch_values(metrics_csv: Path, column: str) -> dict[int, float]:
    return {int(r["epoch"]): float(r[column]) for r in _rows(metrics_csv) if r.get(column)}


# ------------------------------------------------------------------------------------ configs


def test_every_shipped_config_loads_and_paper_rows_match_the_table() -> None:
    shipped = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert set(PAPER_ROWS) | {"brain_mri_resnet18", "hippocampus_unet3d"} <= shipped
    configs = {name: load_config(CONFIGS / f"{name}.yaml") for name in shipped}
    for name in PAPER_ROWS:
        config = configs[name]
        assert config.model.spec == "timm:vit_base_patch16_224" and config.model.num_classes == 2
        assert (config.model.init_weights is None) == name.endswith("scratch")
        assert config.trainer.monitor == "val_loss" and config.optim.scheduler == "cosine"
    # spot checks of three table rows (Chung et al. 2025, attention_maps README)
    duke_random = configs["duke_vit_b16_scratch"]
    assert (duke_random.optim.name, duke_random.optim.lr, duke_random.optim.momentum, duke_random.trainer.max_epochs) == ("sgd", 0.1, 0.3, 200)
    cp_mae = configs["cp_child_vit_b16_mae"]
    assert (cp_mae.optim.name, cp_mae.optim.lr, cp_mae.optim.weight_decay, cp_mae.data.batch_size) == ("adam", 1e-5, 1e-4, 64)
    kvasir_dino = configs["kvasir_vit_b16_dino"]
    assert (kvasir_dino.optim.lr, kvasir_dino.data.batch_size, kvasir_dino.trainer.max_epochs) == (0.0012, 32, 25)


def test_overrides_and_one_line_config_errors(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "brain_mri_resnet18.yaml", ["trainer.max_epochs=3", "data.image_size=48", "optim.name=sgd"])
    assert (config.trainer.max_epochs, config.data.image_size, config.optim.name) == (3, [48, 48], "sgd")
    cases = {
        "unknown key trainer.max_epoch; did you mean trainer.max_epochs?": ["trainer.max_epoch=2"],
        "trainer.max_epochs must be int, got 'two'": ["trainer.max_epochs=two"],
        "optim.name is 'rmsprop'; expected one of adamw, adam, sgd": ["optim.name=rmsprop"],
        "data.val_fraction must be between 0 and 1": ["data.val_fraction=1.5"],
        "expected key=value": ["trainer.max_epochs"],
    }
    for message, overrides in cases.items():
        with pytest.raises(MedlensError, match=message.replace("?", r"\?").replace("(", r"\(")) as info:
            load_config(CONFIGS / "brain_mri_resnet18.yaml", overrides)
        assert "brain_mri_resnet18.yaml" in str(info.value) or "--set" in str(info.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [1, 2\n")
    with pytest.raises(MedlensError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    with pytest.raises(MedlensError, match="missing.yaml not found"):
        load_config(tmp_path / "missing.yaml")


def test_unfreeze_last_blocks_on_real_backbones() -> None:
    resnet = build_model("torchvision:resnet18", num_classes=3)
    names = unfreeze_last(resnet, 2)
    assert {n.split(".")[0] for n in names} == {"layer3", "layer4", "fc"}
    assert not resnet.conv1.weight.requires_grad and resnet.layer3[0].conv1.weight.requires_grad
    vit = build_model("timm:vit_tiny_patch16_224", num_classes=2, img_size=32)
    names = unfreeze_last(vit, 1)
    assert {".".join(n.split(".")[:2]) if n.startswith("blocks") else n.split(".")[0] for n in names} == {"blocks.11", "norm", "head"}
    assert unfreeze_last(vit, 0) == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert len(unfreeze_last(vit, None)) == len(list(vit.parameters()))


# ------------------------------------------------------------------------------------ real training


def test_brain_mri_classifier_trains_writes_reports_and_reloads(brain_mri: Path, tmp_path: Path) -> None:
    overrides = [f"data.root={brain_mri}", "data.limit_per_class=40", "data.image_size=64", "data.batch_size=32",
                 "trainer.max_epochs=2", "trainer.progress=none", "trainer.log_every_n_steps=1"]
    config = load_config(CONFIGS / "brain_mri_resnet18.yaml", overrides)
    result = train(config, out_dir=tmp_path / "run", enable_model_summary=False)
    out = result.out_dir

    losses = _epoch_values(out / "logs" / "metrics.csv", "train_loss_epoch")
    assert sorted(losses) == [0, 1] and losses[1] < losses[0]
    for name in ("split.csv", "validation_samples.csv", "confusion_matrix.csv", "confusion_matrix.png",
                 "misclassified.png", "best.safetensors", "metrics.json", "config.yaml"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "checkpoints" / "last.ckpt").is_file() and result.best_checkpoint.is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))

    samples = _rows(out / "validation_samples.csv")
    split_val = [r["path"] for r in _rows(out / "split.csv") if r["split"] == "val"]
    assert [r["path"] for r in samples] == split_val and len(samples) == 24
    assert {r["class"] for r in samples} == {"glioma", "meningioma", "pituitary"}
    confusion = [[int(v) for v in list(r.values())[1:]] for r in _rows(out / "confusion_matrix.csv")]
    assert sum(map(sum, confusion)) == len(samples)

    # The best checkpoint, reloaded through load_weights, gives the validation accuracy logged for its epoch.
    best_epoch = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["epoch"]
    logged = _epoch_values(out / "logs" / "metrics.csv", "val_acc")[best_epoch]
    model = load_weights(build_model("torchvision:resnet18", num_classes=3, in_channels=1), result.best_checkpoint).eval()
    data = MedlensDataModule(config.data, "classification", out)
    data.setup()
    correct = 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in json.loads((out / "metrics.json").read_text())["precision"]):
                correct += int((model(batch["image"]).argmax(1) == batch["label"]).sum())
    assert correct / len(samples) == pytest.approx(logged, abs=1e-6)
    assert result.metrics["val_acc"] == pytest.approx(logged, abs=1e-6)
    assert read_state_dict(result.weights).keys() == model.state_dict().keys()


def test_hippocampus_unet3d_logs_dice_and_resumes(hippocampus: Path, tmp_path: Path) -> None:
    overrides = [f"data.root={hippocampus}", "data.limit=10", "data.image_size=[16,24,16]", "data.batch_size=4",
                 "trainer.max_epochs=1", "trainer.progress=none", "trainer.log_every_n_steps=1",
                 "model.kwargs={channels: [4, 8, 16], strides: [2, 2], num_res_units: 1}"]
    first = train(load_config(CONFIGS / "hippocampus_unet3d.yaml", overrides), out_dir=tmp_path / "run", enable_model_summary=False)
    assert first.epochs == 1 and 0.0 <= first.metrics["val_dice"] <= 1.0
    assert {"val_dice_Anterior", "val_dice_Posterior"} <= set(first.metrics)
    split = (tmp_path / "run" / "split.csv").read_text()
    before = torch.load(first.last_checkpoint, map_location="cpu", weights_only=True)

    # The second epoch goes through the command line: medlens train CONFIG --set ... --out DIR --resume
    args = ["train", str(CONFIGS / "hippocampus_unet3d.yaml"), "--out", str(tmp_path / "run"), "--resume"]
    for item in [*overrides, "trainer.max_epochs=2", "data.limit=4"]:
        args += ["--set", item]
    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    assert "val_dice" in outcome.output and "best checkpoint" in outcome.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 2
    after = torch.load(first.last_checkpoint, map_location="cpu", weights_only=True)
    assert after["global_step"] == 2 * before["global_step"] > 0  # the step counter went on, not restarted
    assert (tmp_path / "run" / "split.csv").read_text() == split  # the resumed run kept its split
    dice = _epoch_values(tmp_path / "run" / "logs" / "metrics.csv", "val_dice")
    assert sorted(dice) == [0, 1] and all(0.0 <= v <= 1.0 for v in dice.values())  # epoch 0 kept, epoch 1 added
    voxels = [[int(v) for v in list(r.values())[1:]] for r in _rows(tmp_path / "run" / "confusion_matrix.csv")]
    assert sum(map(sum, voxels)) == 2 * 16 * 24 * 16  # two validation volumes at the training size


def test_resume_without_checkpoint_is_a_one_line_error(hippocampus: Path, tmp_path: Path) -> None:
    config = load_config(CONFIGS / "hippocampus_unet3d.yaml", [f"data.root={hippocampus}", "data.limit=4"])
    with pytest.raises(MedlensError, match="--resume: no checkpoint to resume from"):
        train(config, out_dir=tmp_path / "fresh", resume=True)
    assert not (tmp_path / "fresh").exists()


def test_cli_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(app, ["train", str(tmp_path / "absent.yaml")])
    assert outcome.exit_code == 2 and "absent.yaml not found" in outcome.output
    outcome = CliRunner().invoke(app, ["train", "no_such_shipped_config"])
    assert outcome.exit_code == 2 and "no shipped config 'no_such_shipped_config'; known:" in outcome.output


def test_initial_weights_from_a_local_file_and_last_block_fine_tuning(tmp_path: Path) -> None:
    from medlens.models import save_weights
    from medlens.train.run import build_network

    backbone = build_model("torchvision:resnet18", num_classes=1000, in_channels=1)  # an "ImageNet-style" file
    save_weights(backbone, tmp_path / "backbone.safetensors")
    config = load_config(CONFIGS / "brain_mri_resnet18.yaml", [f"model.init_weights={tmp_path / 'backbone.safetensors'}",
                                                               "model.unfreeze_last=1"])
    with pytest.warns(UserWarning, match=r"left out shape mismatch 2: fc.weight \(3, 512\) vs \(1000, 512\), fc.bias"):
        model = build_network(config, num_classes=3)
    assert torch.equal(model.conv1.weight, backbone.conv1.weight) and model.fc.out_features == 3
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}
    with pytest.raises(MedlensError, match="does not fit"):
        load_weights(build_model("monai:UNet", spatial_dims=2), tmp_path / "backbone.safetensors", strict=False)


def test_hippocampus_unet2d_on_axial_slices(hippocampus: Path, tmp_path: Path) -> None:
    overrides = [f"data.root={hippocampus}", "data.slices=true", "data.image_size=[32,48]", "data.limit=6",
                 "data.batch_size=16", "trainer.max_epochs=1", "trainer.progress=none",
                 "model.kwargs={channels: [4, 8, 16], strides: [2, 2], num_res_units: 1}"]
    result = train(load_config(CONFIGS / "hippocampus_unet3d.yaml", overrides), out_dir=tmp_path / "run", enable_model_summary=False)
    assert 0.0 <= result.metrics["val_dice"] <= 1.0
    kernels = [t for k, t in read_state_dict(result.weights).items() if k.endswith("conv.weight")]
    assert kernels and all(t.dim() == 4 for t in kernels)  # a 2D U-Net
    voxels = sum(int(v) for r in _rows(tmp_path / "run" / "confusion_matrix.csv") for v in list(r.values())[1:])
    depths = sum(nib.as_closest_canonical(nib.load(r["path"])).shape[2] for r in _rows(tmp_path / "run" / "validation_samples.csv"))
    assert voxels == 32 * 48 * depths  # every axial slice of every validation volume, at 32x48


def test_auto_precision_uses_bf16_on_cpu_only_where_it_is_native() -> None:
    from medlens.train.run import cpu_has_fast_bf16, pick_precision

    assert pick_precision("32-true", "cpu") == "32-true" and pick_precision("bf16-mixed", "cpu") == "bf16-mixed"
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert cpu_has_fast_bf16() is bool(native)
    # emulated bf16 (an AVX2-only CPU) trains many times slower than float32, so auto keeps float32 there
    assert pick_precision("auto", "cpu") == ("bf16-mixed" if native else "32-true")


def test_mixed_precision_run_on_hippocampus_slices(hippocampus: Path, tmp_path: Path) -> None:
    overrides = [f"data.root={hippocampus}", "data.slices=true", "data.image_size=[32,48]", "data.limit=5",
                 "data.batch_size=32", "trainer.max_epochs=1", "trainer.progress=none", "trainer.precision=bf16-mixed",
                 "model.kwargs={channels: [4, 8], strides: [2], num_res_units: 0}"]
    result = train(load_config(CONFIGS / "hippocampus_unet3d.yaml", overrides), out_dir=tmp_path / "run", enable_model_summary=False)
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["precision"] == "bf16-mixed" and 0.0 <= result.metrics["val_dice"] <= 1.0
    assert all(t.dtype == torch.float32 for t in read_state_dict(result.weights).values())  # bf16 compute, fp32 weights


def test_run_interrupted_mid_epoch_resumes_from_its_last_checkpoint(hippocampus: Path, tmp_path: Path) -> None:
    import lightning as L

    class PowerCut(L.Callback):
        """Stops the run with an error in the middle of the second epoch, as a crash or a kill would."""

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                raise RuntimeError("power cut")

    overrides = [f"data.root={hippocampus}", "data.limit=10", "data.image_size=[16,24,16]", "data.batch_size=2",
                 "trainer.max_epochs=3", "trainer.progress=none", "trainer.log_every_n_steps=1",
                 "model.kwargs={channels: [4, 8], strides: [2], num_res_units: 0}"]
    config = load_config(CONFIGS / "hippocampus_unet3d.yaml", overrides)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="power cut"):
        train(config, out_dir=run, enable_model_summary=False, callbacks=[PowerCut()])
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 4  # 8 training volumes in batches of 2: one epoch
    result = train(config, out_dir=run, resume=True, enable_model_summary=False)
    assert result.epochs == 3 and 0.0 <= result.metrics["val_dice"] <= 1.0
    final = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert final["global_step"] == 3 * 4  # epochs 1 and 2 redone from the checkpoint, epoch 0 not repeated
    rows = [r for r in _rows(run / "logs" / "metrics.csv") if r.get("val_dice")]
    assert sorted(int(r["epoch"]) for r in rows) == [0, 1, 2]  # one validation row per epoch, none lost or doubled


def test_unreadable_files_are_left_out_reported_and_the_rest_trains(brain_mri: Path, hippocampus: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for folder, source in (("glioma", "glioma"), ("pituitary", "pituitary")):
        (data / folder).mkdir(parents=True)
        for image in sorted((brain_mri / source).glob("*.jpg"))[:6]:
            (data / folder / image.name).symlink_to(image)
    truncated = data / "pituitary" / "zz_truncated.jpg"
    truncated.write_bytes(next((brain_mri / "pituitary").glob("*.jpg")).read_bytes()[:3000])
    (data / "glioma" / "zz_fake.png").write_text("not a picture\n")
    overrides = [f"data.root={data}", "data.image_size=32", "data.batch_size=4", "data.val_fraction=0.5",
                 "data.num_workers=1", "trainer.max_epochs=1", "trainer.progress=none"]
    with pytest.warns(UserWarning, match=r"2 unreadable file\(s\) left out of training"):
        result = train(load_config(CONFIGS / "brain_mri_resnet18.yaml", overrides), out_dir=tmp_path / "run", enable_model_summary=False)
    reasons = {Path(r["path"]).name: r["reason"] for r in _rows(tmp_path / "run" / "bad_files.csv")}
    assert set(reasons) == {"zz_truncated.jpg", "zz_fake.png"} and "truncated" in reasons["zz_truncated.jpg"]
    validated = [Path(r["path"]).name for r in _rows(tmp_path / "run" / "validation_samples.csv")]
    split_val = [Path(r["path"]).name for r in _rows(tmp_path / "run" / "split.csv") if r["split"] == "val"]
    assert set(reasons) & set(split_val) and validated == [n for n in split_val if n not in reasons]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["bad_files"] == 2
    assert 0.0 <= result.metrics["val_acc"] <= 1.0

    # volumes (read whole for 2D slices) follow the same rule
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / "task" / folder).mkdir(parents=True)
        for case in ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"):
            (tmp_path / "task" / folder / f"{case}.nii.gz").symlink_to(hippocampus / folder / f"{case}.nii.gz")
    cases = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006")
    manifest = {"labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
                "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]}
    (tmp_path / "task" / "dataset.json").write_text(json.dumps(manifest))
    (tmp_path / "task" / "imagesTr" / "hippocampus_003.nii.gz").unlink()
    (tmp_path / "task" / "imagesTr" / "hippocampus_003.nii.gz").write_bytes((hippocampus / "imagesTr" / "hippocampus_003.nii.gz").read_bytes()[:500])
    config = load_config(CONFIGS / "hippocampus_unet3d.yaml", [f"data.root={tmp_path / 'task'}", "data.slices=true",
                                                                "data.image_size=[32,48]", "data.val_fraction=0.5", "data.limit=null"])
    module = MedlensDataModule(config.data, "segmentation", tmp_path / "slices")
    module.setup("fit")
    assert [Path(p).name for p, _ in module.bad_files] == ["hippocampus_003.nii.gz"]
    assert "corrupt or truncated NIfTI" in module.bad_files[0][1]
    assert len(module.train_items) + len(module.val_items) == 3
    assert module.train_set[0]["image"].shape == (1, 32, 48)
