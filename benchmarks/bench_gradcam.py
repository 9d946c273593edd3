"""Grad-CAM on a ResNet-50 (last conv block), batch 8 at 224x224: medlens vs pytorch-grad-cam
and Captum's LayerGradCam (+ upsample), each as a ratio of a plain forward pass, in one run.
Also: all 1000 class maps for one image vs one class map (the engine proves ResNet-50's
GAP -> Linear head and takes the 1000 gradients in closed form; the generic autograd path is
timed too, on the same maps, by explaining the logits through a head it cannot prove).

Run: .venv/bin/python benchmarks/bench_gradcam.py [--batch 8] [--size 224] [--repeats 5] [--quick] [--all-classes-only]
"""

from __future__ import annotations

import argparse

import torch
import torchvision

from common import device, print_table, time_interleaved
from medlens import explain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="batch 2, 2 repeats")
    parser.add_argument("--all-classes-only", action="store_true", help="only the 1 vs 1000 class maps table")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 2, 2

    import pytorch_grad_cam
    from captum.attr import LayerAttribution, LayerGradCam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    dev = device()
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(dev)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    targets = list(range(args.batch))
    if args.all_classes_only:
        all_classes(model, x[:1], args.repeats)
        return
    pgc = pytorch_grad_cam.GradCAM(model=model, target_layers=[model.layer4])
    captum = LayerGradCam(model, model.layer4)

    def forward() -> object:
        with torch.no_grad():
            return model(x)

    def ours() -> object:
        return explain(model, x, "gradcam", target=targets, layer="layer4").maps

    def reference_pgc() -> object:
        return pgc(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])

    def reference_captum() -> object:
        attr = captum.attribute(x, target=targets, relu_attributions=True)
        return LayerAttribution.interpolate(attr, (args.size, args.size), interpolate_mode="bilinear")

    times = time_interleaved(
        {"forward (no grad)": forward, "medlens gradcam": ours, "pytorch-grad-cam 1.5.7": reference_pgc, "captum LayerGradCam + upsample": reference_captum},
        repeats=args.repeats,
    )
    ratio = times["pytorch-grad-cam 1.5.7"] / times["medlens gradcam"]
    print(f"device: {dev}, threads: {torch.get_num_threads()}, resnet50, batch {args.batch} at {args.size}x{args.size}")
    print_table("Grad-CAM, ResNet-50 layer4", times, "forward (no grad)", {"medlens gradcam": f"{ratio:.1f}x faster than pytorch-grad-cam"})

    all_classes(model, x[:1], args.repeats)
    pgc.__exit__(None, None, None)


class Unprovable(torch.nn.Module):
    """ResNet-50 whose logits pass through ``x + 0 * x.relu()``: the same scores, but a head
    the engine cannot prove is GAP -> Linear, so the generic (vmapped autograd) path runs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out + 0 * out.relu()


def all_classes(model: torch.nn.Module, one: torch.Tensor, repeats: int) -> None:
    generic = Unprovable(model).eval()
    closed = explain(model, one, "gradcam", target="all", layer="layer4")
    assert closed.info.get("closed_form_gradients"), "the closed form did not apply"
    check = explain(generic, one, "gradcam", target="all", layer="model.layer4")
    err = float((closed.maps - check.maps).abs().max())
    many = time_interleaved(
        {
            "forward, 1 image": lambda: forward_one(model, one),
            "medlens gradcam, 1 class": lambda: explain(model, one, "gradcam", target=0, layer="layer4").maps,
            "medlens gradcam, all 1000 classes": lambda: explain(model, one, "gradcam", target="all", layer="layer4").maps,
            "generic path, all 1000 classes": lambda: explain(generic, one, "gradcam", target="all", layer="model.layer4").maps,
        },
        repeats=repeats,
    )
    ratio = many["medlens gradcam, all 1000 classes"] / many["medlens gradcam, 1 class"]
    print_table("Grad-CAM, one image, 1 vs 1000 class maps", many, "medlens gradcam, 1 class",
                {"medlens gradcam, all 1000 classes": f"{ratio:.2f}x one class map; max |closed - generic| = {err:.1e}"})


def forward_one(model: torch.nn.Module, x: torch.Tensor) -> object:
    with torch.no_grad():
        return model(x)


if __name__ == "__main__":
    main()
