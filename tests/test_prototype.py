"""Class prototypes by activation maximisation on a briefly trained real CNN, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from medlens import MedlensError, hook_count
from medlens.cli.app import app
from medlens.methods.prototype import class_prototype, total_variation
from medlens.models import save_weights

SIZE = 16


def tiny_cnn(num_classes: int = 2, in_channels: int = 1, spatial_dims: int = 2, size: int = SIZE) -> nn.Module:
    """Factory used through the CLI spec ``test_prototype:tiny_cnn``. A flatten + linear head
    (not global pooling) so that where the evidence lies can decide the class."""
    conv, bn = {2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}[spatial_dims]
    return nn.Sequential(conv(in_channels, 8, 3, padding=1), bn(8), nn.ReLU(inplace=True), conv(8, 4, 3, stride=2, padding=1),
                         nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * (size // 2) ** spatial_dims, num_classes))


def blobs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: a bright square in the top-left quadrant; class 1: in the bottom-right one."""
    labels = torch.arange(n) % 2
    x = 0.1 * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    for i, label in enumerate(labels.tolist()):
        r, c = torch.randint(0, 4, (2,), generator=generator).tolist()
        top = r if label == 0 else SIZE // 2 + r
        left = c if label == 0 else SIZE // 2 + c
        x[i, 0, top : top + 4, left : left + 4] += 1.0
    return x, labels


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = blobs(64, generator)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(30):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    test_x, test_y = blobs(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    assert accuracy >= 0.9, f"the tiny CNN only reached {accuracy:.2f}"
    return model, x, y


def quadrant_contrast(image: torch.Tensor) -> float:
    """Mean of the bottom-right quadrant minus the top-left one."""
    half = SIZE // 2
    return float(image[..., half:, half:].mean() - image[..., :half, :half].mean())


def test_prototypes_from_zeros_show_each_class_evidence(trained) -> None:
    model, x, y = trained
    means = torch.stack([x[y == k].mean(0) for k in (0, 1)])
    result = class_prototype(model, [0, 1], shape=(1, SIZE, SIZE), class_mean=means, lam=0.5, steps=40, lr=0.05, tv=0.05, jitter=1)
    assert result.images.shape == (2, 1, SIZE, SIZE)
    assert bool((result.probabilities > 0.9).all())
    assert float(result.losses[-1]) < float(result.losses[0])
    assert quadrant_contrast(result.images[0]) < 0 < quadrant_contrast(result.images[1])


def test_a_class_0_image_is_turned_into_class_1(trained) -> None:
    model, x, y = trained
    start = x[y == 0][0]
    target_mean = x[y == 1].mean(0)
    with torch.no_grad():
        assert int(model(start[None]).argmax()) == 0
    pulled = class_prototype(model, 1, init=start, class_mean=target_mean, lam=5.0, steps=30, lr=0.05)
    free = class_prototype(model, 1, init=start, steps=30, lr=0.05)
    with torch.no_grad():
        assert int(model(pulled.images).argmax()) == 1 and int(model(free.images).argmax()) == 1
    distance = {name: float((r.images[0] - target_mean).pow(2).mean()) for name, r in (("pulled", pulled), ("free", free))}
    assert distance["pulled"] < distance["free"]  # the lambda * MSE term keeps it near the class mean


def test_the_model_is_frozen_without_touching_it(trained) -> None:
    model, _, _ = trained
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    class_prototype(model, [1], shape=(1, SIZE, SIZE), steps=5)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags and all(flags)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN statistics too
    assert hook_count(model) == 0
    model.eval()


def test_3d_prototype_and_total_variation() -> None:
    torch.manual_seed(0)
    model = tiny_cnn(3, spatial_dims=3, size=8).eval()
    result = class_prototype(model, [2, 0], shape=(1, 8, 8, 8), steps=5, tv=0.1, jitter=2, value_range=(0.0, 1.0))
    assert result.images.shape == (2, 1, 8, 8, 8) and float(result.images.min()) >= 0 and float(result.images.max()) <= 1
    ramp = torch.arange(4.0).view(1, 1, 4, 1).expand(1, 1, 4, 4)
    assert float(total_variation(ramp)[0]) == 12.0  # 3 unit steps in each of 4 columns


def test_bad_prototype_requests_say_why(trained) -> None:
    model, _, _ = trained
    with pytest.raises(MedlensError, match="out of range"):
        class_prototype(model, 5, shape=(1, SIZE, SIZE), steps=1)
    with pytest.raises(MedlensError, match="needs the input shape"):
        class_prototype(model, 0)
    with pytest.raises(MedlensError, match="init image has shape"):
        class_prototype(model, 0, init=torch.zeros(3, 1, SIZE, SIZE), steps=1)


def test_cli_writes_prototypes(trained, tmp_path) -> None:
    from PIL import Image

    model, x, y = trained
    weights = save_weights(model, tmp_path / "tiny.safetensors")
    examples = tmp_path / "class1"
    examples.mkdir()
    for i, img in enumerate(x[y == 1][:4]):
        Image.fromarray((img[0].clamp(0, 1).numpy() * 255).astype(np.uint8)).save(examples / f"{i}.png")
    out = tmp_path / "proto"
    result = CliRunner().invoke(app, ["prototype", "test_prototype:tiny_cnn", str(weights), "--class", "1", "--class", "0",
                                      "--size", f"{SIZE},{SIZE}", "--mean-images", str(examples), "--steps", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = np.load(out.with_suffix(".npy"))
    assert saved.shape == (2, 1, SIZE, SIZE)
    for k in (1, 0):  # named by class, not by position; titled; drawn at a readable size
        png = Image.open(tmp_path / f"proto_class{k}.png")
        assert min(png.size) >= 256 and f"class {k}" in png.text["Title"] and "test_prototype:tiny_cnn" in png.text["Title"]
    assert not (tmp_path / "proto_0.png").exists()
    assert "class 1: model probability" in result.output
    bad = CliRunner().invoke(app, ["prototype", "test_prototype:tiny_cnn", str(weights), "--class", "7", "--size", f"{SIZE},{SIZE}", "--out", str(out)])
    assert bad.exit_code == 2 and "out of range" in bad.output
    one = CliRunner().invoke(app, ["prototype", "test_prototype:tiny_cnn", str(weights), "-c", "0", "--size", str(SIZE),
                                   "--steps", "2", "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output  # one number: that size on every axis of a 2D model
    assert np.load(tmp_path / "one.npy").shape == (1, 1, SIZE, SIZE)
    clash = CliRunner().invoke(app, ["prototype", "test_prototype:tiny_cnn", str(weights), "-c", "0", "--size", f"{SIZE},{SIZE}",
                                     "--dims", "3", "--out", str(tmp_path / "clash")])
    assert clash.exit_code == 2 and "--dims is 3" in clash.output


def test_cli_names_prototype_files_by_class_name_and_pulls_to_class_means(trained, tmp_path) -> None:
    from PIL import Image

    model, x, y = trained
    weights = save_weights(model, tmp_path / "tiny.safetensors")
    for k, name in enumerate(("top left", "bottom/right")):
        folder = tmp_path / "data" / name.replace("/", "-")
        folder.mkdir(parents=True)
        for i, img in enumerate(x[y == k][:4]):
            Image.fromarray((img[0].clamp(0, 1).numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "data" / "top left").rename(tmp_path / "data" / "0")  # a class folder may be named by its index
    (tmp_path / "data" / "bottom-right").rename(tmp_path / "data" / "bottom right")
    out = tmp_path / "proto"
    args = ["prototype", "test_prototype:tiny_cnn", str(weights), "--class-names", "top left,bottom right", "-c", "bottom right",
            "-c", "0", "--size", f"{SIZE},{SIZE}", "--class-means", str(tmp_path / "data"), "--lambda", "5", "--steps", "30", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("proto*")) == ["proto.npy", "proto_bottom-right.png", "proto_top-left.png"]
    png = Image.open(tmp_path / "proto_bottom-right.png")
    assert min(png.size) >= 256 and "prototype of bottom right (class 1" in png.text["Title"]
    pixels = np.asarray(png.convert("L"))
    assert len(np.unique(pixels)) > 20  # the prototype's grey levels and a colourbar's ramp, not a blank image
    saved = np.load(out.with_suffix(".npy"))
    means = [x[y == k][:4].clamp(0, 1).mean(0) for k in (0, 1)]  # what the PNGs in each class folder average to
    gap = [[float((torch.from_numpy(saved[i]) - m).pow(2).mean()) for m in means] for i in (0, 1)]
    assert gap[0][1] < gap[0][0] and gap[1][0] < gap[1][1]  # each pulled to its own class's mean, in the order asked
    bad = CliRunner().invoke(app, args[:4] + ["only one"] + args[5:])
    assert bad.exit_code == 2 and "--class-names gives 1 names" in bad.output


def test_prototype_file_names_never_collide() -> None:
    from medlens.workflows.prototype import class_file_names

    assert class_file_names([2, 0, 2], ["c/d", "x", "a b"]) == ["a-b", "c-d", "a-b-2"]  # asked twice
    assert class_file_names([0, 1], ["a b", "a/b"]) == ["a-b", "a-b-2"]  # two names, one file name
    assert class_file_names([3, 1], None) == ["class3", "class1"]
