"""End to end on real data: train a 3-class brain tumour classifier briefly on CPU, then run
``medlens evaluate`` on held-out images with their tumour boxes, and the paper's benchmark protocol.

    .venv/bin/python benchmarks/brain_mri_evaluate.py [--train-per-class 200] [--test-per-class 20]

Data: ../shared/data/brain-tumor-mri/{glioma,meningioma,pituitary}/N.jpg with YOLO boxes N.txt.
Outputs go to out/brain_mri/ (ignored by git): weights, split.csv, the evaluate report
(summary.md, report.html, rows.csv) and the paper-protocol tables.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brain-tumor-mri"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--methods", default="gradcam,gradcam++,hirescam,layercam,xgradcam,saliency")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "brain_mri")
    parser.add_argument("--road", action="store_true", help="also run ROAD (slow on a busy CPU)")
    parser.add_argument("--paper-only", action="store_true", help="only run the paper protocol (needs --reuse weights)")
    parser.add_argument("--reuse", action="store_true", help="load the weights of a previous run instead of training")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from medlens.data.datasets import MedicalDataset, eval_transforms, index_image_folder, write_split
    from medlens.models import build_model, load_weights, save_weights

    items, classes = index_image_folder(DATA)
    rng = random.Random(0)
    train, test = [], []
    for label in range(len(classes)):
        group = [it for it in items if it.label == label and it.boxes]
        rng.shuffle(group)
        test += group[: args.test_per_class]
        train += group[args.test_per_class : args.test_per_class + args.train_per_class]
    args.out.mkdir(parents=True, exist_ok=True)
    write_split(args.out / "split.csv", {"train": train, "test": test})

    data = MedicalDataset(train, classes, transform=eval_transforms(args.size), channels=1)
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    y = torch.tensor([it.label for it in train])
    model = build_model("torchvision:resnet18", num_classes=3, in_channels=1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=max(1, args.epochs * ((len(y) + 31) // 32)))
    start = time.time()
    weights = args.out / "brain_resnet18.safetensors"
    if args.reuse and weights.exists():
        load_weights(model, weights)
        args.epochs = 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y))
        for i in range(0, len(y), 32):
            idx = order[i : i + 32]
            batch = x[idx]
            if torch.rand(()) < 0.5:
                batch = batch.flip(-1)
            loss = F.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    test_data = MedicalDataset(test, classes, transform=eval_transforms(args.size), channels=1)
    xt = torch.stack([test_data[i]["image"] for i in range(len(test_data))])
    yt = torch.tensor([it.label for it in test])
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    print(f"held-out accuracy: {accuracy:.3f} on {len(yt)} images ({classes})", flush=True)
    if args.epochs:
        save_weights(model, weights)

    run_paper_protocol(args, weights, test)
    if args.paper_only:
        return
    command = [str(ROOT / ".venv" / "bin" / "medlens"), "evaluate"]
    command += ["torchvision:resnet18", str(DATA), "--weights", str(weights), "--num-classes", "3", "--in-channels", "1",
                "--size", str(args.size), "--split", str(args.out / "split.csv"), "--part", "test",
                "--steps", "10", "--metric", "localisation", "--metric", "faithfulness", "--metric", "complexity",
                "--metric", "sanity", "--out", str(args.out / "evaluate"), "--batch-size", "20"]
    if not args.road:
        command.append("--no-road")
    for method in args.methods.split(","):
        command += ["--method", method]
    start = time.time()
    subprocess.run(command, check=True)
    print(f"medlens evaluate took {time.time() - start:.0f} s", flush=True)


def run_paper_protocol(args: argparse.Namespace, weights: Path, test: list) -> None:
    """The paper's benchmark protocol on the held-out images: image links and 224x224 box masks
    named like the images, checkpoints {trained, untrained}, methods as rows."""
    import numpy as np
    from PIL import Image

    from medlens.workflows.protocols.paper_benchmark import run_paper_benchmark

    img_dir, mask_dir = args.out / "paper" / "images", args.out / "paper" / "masks"
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for item in test:
        src = Path(item.path)
        name = f"{src.parent.name}_{src.stem}"
        link = img_dir / f"{name}{src.suffix}"
        if not link.exists():
            link.symlink_to(src)  # never copy the data
        mask = np.zeros((224, 224), np.uint8)
        for x0, y0, x1, y1 in item.boxes:
            mask[int(y0 * 224) : int(np.ceil(y1 * 224)), int(x0 * 224) : int(np.ceil(x1 * 224))] = 255
        Image.fromarray(mask).save(mask_dir / f"{name}.png")
    start = time.time()
    tables = run_paper_benchmark({"brain-mri": {"trained": weights, "untrained": "none"}}, {"brain-mri": img_dir},
                                 {"brain-mri": mask_dir}, args.out / "paper" / "results",
                                 methods=("gradcam", "layercam", "saliency"), model_spec="torchvision:resnet18",
                                 num_classes=3, in_channels=1, mean=None, std=None)
    print(f"paper protocol took {time.time() - start:.0f} s")
    for (dataset, metric), table in tables.items():
        print(f"\n{dataset} {metric} (methods x initialisations)\n{table.round(3).to_string()}")


if __name__ == "__main__":
    main()
