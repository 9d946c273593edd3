"""SS-CAM and IS-CAM: medlens against TorchCAM 0.5 (``torchcam.methods.SSCAM`` / ``ISCAM``) in
the same run, on a 1-channel torchvision ResNet-18 (seeded random weights) and a real brain MRI
slice when ../shared/data is there (else a seeded random image).

Both methods cost what their masked forward passes cost (channels x samples per image), so each
time is printed as ratios:
- ``/ floor``: against pushing the same number of inputs through the model in the same batch
  size and nothing else (one clean pass included),
- ``torchcam / medlens``: how many times faster medlens is than TorchCAM.
The maps are compared too (Pearson r; same seed for SS-CAM's noise).

Times are process CPU seconds (robust to other jobs on a shared machine).

Run:  .venv/bin/python benchmarks/bench_cam_extra.py [--size 112] [--layer layer2] [--samples 4] [--batch-size 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

import medlens
from common import cpu_forward_floor, cpu_timed as timed, pearson

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brain-tumor-mri"


def image(size: int) -> tuple[torch.Tensor, str]:
    files = sorted((DATA / "glioma").glob("*.jpg"))
    if not files:
        torch.manual_seed(0)
        return torch.randn(1, 1, size, size), "seeded random image (no ../shared/data)"
    from PIL import Image

    arr = np.asarray(Image.open(files[0]).convert("L").resize((size, size)), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr)[None, None] - 0.5) / 0.25, f"brain MRI {files[0].name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--layer", default="layer2")
    parser.add_argument("--samples", type=int, default=4, help="num_samples of both methods")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torchcam.methods as tc

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    model.eval()
    x, source = image(args.size)
    with torch.no_grad():
        acts = {}
        handle = dict(model.named_modules())[args.layer].register_forward_hook(lambda _m, _i, o: acts.setdefault("a", o))
        target = int(model(x).argmax())
        handle.remove()
    channels = acts["a"].shape[1]
    n_inputs = channels * args.samples
    floor = cpu_forward_floor(model, x, n_inputs, args.batch_size, clean_pass=True)
    print(f"\n### SS-CAM / IS-CAM, ResNet-18 {args.size}px {args.layer} ({channels} channels), {source}, "
          f"{args.samples} samples, batch {args.batch_size}, {args.threads} thread(s), CPU s\n")
    print(f"forward-pass floor: {n_inputs} masked inputs + 1 clean = {floor:.2f} s\n")
    print("| method | medlens (s) | / floor | torchcam (s) | / floor | torchcam / medlens | r |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, cls in (("sscam", tc.SSCAM), ("iscam", tc.ISCAM)):
        def ours() -> torch.Tensor:
            seed = {"seed": 3} if name == "sscam" else {}
            return medlens.explain(model, x, name, target=target, layer=args.layer, num_samples=args.samples,
                                   batch_size=args.batch_size, **seed).raw[0, 0]

        def theirs() -> torch.Tensor:
            with cls(model, args.layer, batch_size=args.batch_size, num_samples=args.samples, input_shape=tuple(x.shape[1:])) as ext:
                scores = model(x)
                torch.manual_seed(3)
                return ext(class_idx=target, scores=scores)[0][0]

        t_ours, m_ours = timed(ours, args.repeats)
        t_ref, m_ref = timed(theirs, args.repeats)
        print(f"| {name} | {t_ours:.2f} | {t_ours / floor:.2f} | {t_ref:.2f} | {t_ref / floor:.2f} | {t_ref / t_ours:.2f} | {pearson(m_ours, m_ref):.4f} |")


if __name__ == "__main__":
    main()

