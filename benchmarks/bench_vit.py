"""Vision Transformer explanations on timm ``vit_base_patch16_224`` (random init), in one run:
medlens attention rollout and Chefer transformer attribution as ratios of a plain forward pass,
and ViT Grad-CAM (last block's norm1) against pytorch-grad-cam's GradCAM with a reshape transform.

``medlens.explain`` hands the forward pass to the attention method (one pass, its own hooks), so
the ``explain`` rows should match the ``vit_relevance`` rows (the method alone) up to the
upsampling and normalisation of the maps.

Run: .venv/bin/python benchmarks/bench_vit.py [--batch 8] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse

import timm
import torch

from common import device, print_table, time_interleaved
from medlens import explain
from medlens.methods.vit import vit_relevance


def reshape_tokens(t: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ViT reshape transform: drop the class token, (B, 196, C) -> (B, C, 14, 14)."""
    return t[:, 1:].reshape(t.shape[0], 14, 14, t.shape[2]).permute(0, 3, 1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    dev = device()
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", num_classes=1000).eval().to(dev)
    x = torch.randn(args.batch, 3, 224, 224, device=dev)
    targets = list(range(args.batch))
    layer = "blocks.11.norm1"
    pgc = GradCAM(model=model, target_layers=[model.blocks[11].norm1], reshape_transform=reshape_tokens)

    def forward() -> object:
        with torch.no_grad():
            return model(x)

    contenders = {
        "forward (no grad)": forward,
        "medlens rollout (vit_relevance)": lambda: vit_relevance(model, x, "rollout", targets=targets),
        "medlens rollout (explain)": lambda: explain(model, x, "rollout", target=targets).maps,
        "medlens chefer (vit_relevance)": lambda: vit_relevance(model, x, "chefer", targets=targets),
        "medlens chefer (explain)": lambda: explain(model, x, "chefer", target=targets).maps,
        "medlens gradcam norm1 (explain)": lambda: explain(model, x, "gradcam", target=targets, layer=layer).maps,
        "pytorch-grad-cam 1.5.7 GradCAM + reshape": lambda: pgc(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets]),
    }
    times = time_interleaved(contenders, repeats=args.repeats)
    speedup = times["pytorch-grad-cam 1.5.7 GradCAM + reshape"] / times["medlens gradcam norm1 (explain)"]
    fused = model.blocks[0].attn.fused_attn
    print(f"device: {dev}, threads: {torch.get_num_threads()}, vit_base_patch16_224 (fused_attn={fused}), batch {args.batch} at 224x224")
    print_table(
        "ViT explanations, vit_base_patch16_224",
        times,
        "forward (no grad)",
        {
            "medlens rollout (vit_relevance)": "target <= 1.2x",
            "medlens chefer (vit_relevance)": "target <= 3x",
            "medlens gradcam norm1 (explain)": f"{speedup:.1f}x faster than pytorch-grad-cam",
        },
    )


if __name__ == "__main__":
    main()
