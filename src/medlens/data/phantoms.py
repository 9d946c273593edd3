"""Synthetic medical-looking phantoms whose ground truth is known: where the lesion is, and what
decides the class.

Each phantom is a 2D slice or a 3D volume with a body outline (an ellipse / ellipsoid with a
brighter skin rim and two darker lobes), textured tissue (smoothed noise under a smooth bias
field), and one lesion whose *appearance* decides the label:

====  =============  ===================================================
 0    ``round``      a round, uniformly bright lesion
 1    ``elongated``  a bright lesion about 3.5x longer than wide, random orientation
 2    ``ring``       a round lesion with a bright rim and a dark core (only with ``n_classes=3``)
====  =============  ===================================================

Optional distractors are a much fainter lesion of a *different* class's appearance, far from the
real one, plus thin vessels; a model that looks at them is looking at the wrong thing. An optional
spurious marker is a bright letter-like block in a corner whose position agrees with the label in
``spurious_correlation`` of the images (the shortcut a model can learn instead of the lesion).

Everything is generated in batched torch ops on ``device``, deterministically for a given
(n, size, dims, seed, options).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medlens.core.boxes import box_around
from medlens.errors import MedlensError
from medlens.io.atomic import atomic_path, write_bytes, write_text

CLASS_NAMES = ("round", "elongated", "ring")
LESION_CONTRAST = 0.36
DISTRACTOR_CONTRAST = 0.3 * LESION_CONTRAST  # "far weaker" than the real lesion
MAX_VOXELS_PER_CHUNK = 2**23  # bounds the memory of one generation chunk

__all__ = ["CLASS_NAMES", "PhantomSet", "make_phantoms", "read_phantoms", "write_phantoms"]


@dataclass
class PhantomSet:
    """A batch of phantoms and their ground truth.

    Attributes:
        images: (N, 1, *S) float in [0, 1].
        labels: (N,) long class indices.
        masks: (N, 1, *S) bool lesion masks.
        boxes: (N, 2 * dims) long boxes around the lesion masks (lo..., hi... exclusive).
        class_names: name of each class.
        distractor_boxes: (N, 2 * dims) long box of the faint distractor lesion, -1 where none.
        marker_boxes: (N, 2 * dims) long box of the spurious marker, -1 where none.
        marker_agrees: (N,) bool, True where the marker's corner is the label's corner.
        bodies: (N, 1, *S) bool body outlines (the lesion always lies inside).
        names: a file stem per phantom.
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    boxes: Tensor
    class_names: tuple[str, ...]
    distractor_boxes: Tensor | None = None
    marker_boxes: Tensor | None = None
    marker_agrees: Tensor | None = None
    bodies: Tensor | None = None
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dims(self) -> int:
        return self.images.dim() - 2

    def subset(self, index: Tensor | Sequence[int] | slice) -> "PhantomSet":
        """The phantoms at ``index`` (a slice, index list or bool/long tensor)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, device=self.labels.device)
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        kept = list(range(len(self)))[index] if isinstance(index, slice) else index.tolist()
        return replace(
            self, images=self.images[index], labels=self.labels[index], masks=self.masks[index],
            boxes=self.boxes[index], distractor_boxes=pick(self.distractor_boxes),
            marker_boxes=pick(self.marker_boxes), marker_agrees=pick(self.marker_agrees), bodies=pick(self.bodies),
            names=[self.names[i] for i in kept] if self.names else [],
        )

    def to(self, device: str | torch.device) -> "PhantomSet":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self, images=self.images.to(device), labels=self.labels.to(device), masks=self.masks.to(device),
            boxes=self.boxes.to(device), distractor_boxes=move(self.distractor_boxes),
            marker_boxes=move(self.marker_boxes), marker_agrees=move(self.marker_agrees), bodies=move(self.bodies),
        )


def _grid(size: int, dims: int, device: torch.device) -> Tensor:
    """(dims, *S) pixel-centre coordinates in [-1, 1], axis order (z,) y, x."""
    axis = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    return torch.stack(torch.meshgrid(*([axis] * dims), indexing="ij"))


def _expand(t: Tensor, dims: int) -> Tensor:
    """(N, k) -> (N, k, 1, ..., 1) so it broadcasts against (N, k, *S)."""
    return t.view(*t.shape, *([1] * dims))


def _length(vectors: Tensor) -> Tensor:
    """(N, dims, *S) -> (N, *S) Euclidean length (a sum over dim 1 is much faster than norm there)."""
    return (vectors * vectors).sum(1).sqrt()


def _smooth_noise(n: int, size: int, dims: int, cells: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """(n, 1, *S) smooth noise with roughly unit spread: random cells upsampled (bicubic / trilinear)."""
    coarse = torch.randn(n, 1, *([cells] * dims), generator=gen, device=device)
    mode = "bicubic" if dims == 2 else "trilinear"
    return F.interpolate(coarse, size=(size,) * dims, mode=mode, align_corners=False)


def _random_directions(n: int, dims: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """(n, dims) unit vectors, uniform on the sphere."""
    d = torch.randn(n, dims, generator=gen, device=device)
    return d / d.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _lesion(
    kind: Tensor, centre: Tensor, scale: Tensor, direction: Tensor, coords: Tensor, size: int
) -> tuple[Tensor, Tensor]:
    """Intensity profile in [0, 1] and mask of one lesion per image, N-D.

    Args:
        kind: (N,) class index deciding the appearance (0 round, 1 elongated, 2 ring).
        centre: (N, dims) centre in [-1, 1] coordinates.
        scale: (N,) size factor (about 1).
        direction: (N, dims) unit long axis (used by the elongated kind).
        coords: (dims, *S) grid.

    Returns:
        (N, *S) float profile and (N, *S) bool mask (the whole lesion, core included).
    """
    dims = coords.shape[0]
    rel = coords[None] - _expand(centre, dims)  # (N, dims, *S)
    along = (rel * _expand(direction, dims)).sum(1)
    dist2 = (rel * rel).sum(1)
    across2 = (dist2 - along * along).clamp_min(0)
    radius = torch.where(kind == 2, 0.2, 0.155) * scale  # ring lesions are a little larger
    long_axis, short_axis = 0.3 * scale, 0.085 * scale
    rho_round = dist2.sqrt() / _expand(radius, dims)
    rho_long = (along**2 / _expand(long_axis, dims) ** 2
                + across2 / _expand(short_axis, dims) ** 2).sqrt()
    kind_s = _expand(kind, dims)
    rho = torch.where(kind_s == 1, rho_long, rho_round)
    # soft edge about one pixel wide: rho's unit is the lesion radius, converted to pixels
    edge_px = _expand(torch.where(kind == 1, short_axis, radius) * size / 2, dims)
    profile = torch.sigmoid((1 - rho) * edge_px * 2.0)
    core = torch.sigmoid((0.55 - rho) * edge_px * 2.0)
    profile = torch.where(kind_s == 2, profile - 0.85 * core, profile)
    return profile, rho < 1


def _vessels(n: int, coords: Tensor, size: int, gen: torch.Generator, count: int = 3) -> Tensor:
    """(n, *S) thin bright tubes along random lines (vessels), each of unit peak intensity."""
    dims = coords.shape[0]
    device = coords.device
    out = torch.zeros(n, *coords.shape[1:], device=device)
    for _ in range(count):  # a handful of lines; the loop is over vessels, not images
        point = (torch.rand(n, dims, generator=gen, device=device) - 0.5) * 0.9
        direction = _random_directions(n, dims, gen, device)
        rel = coords[None] - _expand(point, dims)
        along = (rel * _expand(direction, dims)).sum(1)
        across = ((rel * rel).sum(1) - along**2).clamp_min(0).sqrt()
        width = _expand(0.012 + 0.012 * torch.rand(n, generator=gen, device=device), dims)
        out = torch.maximum(out, torch.exp(-((across / width) ** 2)) * torch.sigmoid(size / 8 * (0.9 - along.abs())))
    return out


def _marker(
    corner: Tensor, size: int, dims: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """An "L"-shaped letter block in one of the image corners.

    Args:
        corner: (N,) corner index: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.

    Returns:
        (N, *S) bool marker pixels and (N, 2 * dims) long marker boxes.
    """
    n = corner.shape[0]
    g = max(5, round(0.16 * size))
    margin = max(1, round(0.04 * size))
    stroke = max(1, g // 3)
    glyph = torch.zeros(g, g, dtype=torch.bool, device=device)
    glyph[:, :stroke] = True
    glyph[-stroke:, :] = True
    top = torch.where(corner >= 2, size - margin - g, margin)
    left = torch.where(corner % 2 == 1, size - margin - g, margin)
    pix = torch.arange(size, device=device)
    row = pix[None, :] - top[:, None]  # (N, size)
    col = pix[None, :] - left[:, None]
    inside_r, inside_c = (row >= 0) & (row < g), (col >= 0) & (col < g)
    block = glyph[row.clamp(0, g - 1)[:, :, None], col.clamp(0, g - 1)[:, None, :]]  # (N, H, W)
    block = block & inside_r[:, :, None] & inside_c[:, None, :]
    lo, hi = [top, left], [top + g, left + g]
    if dims == 3:  # extrude the letter through the middle third of the volume
        depth = torch.zeros(size, dtype=torch.bool, device=device)
        z0, z1 = size // 3, size - size // 3
        depth[z0:z1] = True
        block = block[:, None] & depth[None, :, None, None]
        lo, hi = [torch.full_like(top, z0)] + lo, [torch.full_like(top, z1)] + hi
    boxes = torch.stack(lo + hi, dim=1).long()
    return block.view(n, *([size] * dims)), boxes


def _generate_chunk(
    labels: Tensor, size: int, dims: int, n_classes: int, distractors: bool, marker_corner: Tensor | None,
    gen: torch.Generator,
) -> dict[str, Tensor]:
    n, device = labels.shape[0], labels.device
    coords = _grid(size, dims, device)
    u = lambda *shape: torch.rand(*shape, generator=gen, device=device)  # noqa: E731

    # body: an ellipse / ellipsoid with a soft edge, a bright skin rim and two darker lobes
    body_centre = (u(n, dims) - 0.5) * 0.08
    body_axes = 0.74 + 0.14 * u(n, dims)
    rel = (coords[None] - _expand(body_centre, dims)) / _expand(body_axes, dims)
    rho_body = _length(rel)
    body = torch.sigmoid((1 - rho_body) * size / 3)
    rim = torch.exp(-(((rho_body - 0.96) / 0.035) ** 2))
    lobe_axes = torch.tensor([0.5] * (dims - 1) + [0.24], device=device)
    lobes = torch.zeros_like(rho_body)
    for side in (-1.0, 1.0):
        offset = torch.zeros(dims, device=device)
        offset[-1] = side * 0.42
        rho_lobe = _length((rel - _expand(offset[None], dims)) / _expand(lobe_axes[None], dims))
        lobes = torch.maximum(lobes, torch.sigmoid((1 - rho_lobe) * size / 6))

    texture = 0.6 * _smooth_noise(n, size, dims, max(4, size // 6), gen, device)[:, 0]
    texture = texture + 0.4 * _smooth_noise(n, size, dims, max(8, size // 2), gen, device)[:, 0]
    bias = 1 + 0.12 * _smooth_noise(n, size, dims, 3, gen, device)[:, 0]
    tissue = (0.42 + 0.05 * texture - 0.16 * lobes) * bias
    image = body * tissue + 0.22 * rim * body

    # the lesion: inside the body (its centre at most 0.5 of the way to the body edge)
    radial = _random_directions(n, dims, gen, device) * (0.5 * u(n, 1) ** (1 / dims))
    centre = body_centre + radial * body_axes
    scale = 0.85 + 0.3 * u(n)
    profile, mask = _lesion(labels, centre, scale, _random_directions(n, dims, gen, device), coords, size)
    lesion_texture = 1 + 0.12 * _smooth_noise(n, size, dims, max(4, size // 4), gen, device)[:, 0]
    image = image + LESION_CONTRAST * profile * lesion_texture

    out = {"mask": mask, "body": rho_body < 1}
    if distractors:
        other = (labels + 1 + (u(n) * (n_classes - 1)).long().clamp_max(n_classes - 2)) % n_classes
        spread = _random_directions(n * 8, dims, gen, device).view(n, 8, dims) * 0.5 * u(n, 8, 1) ** (1 / dims)
        candidates = body_centre[:, None] + spread * body_axes[:, None]
        gap = (candidates - centre[:, None]).norm(dim=2)
        far = gap > 0.5
        pick = torch.where(far.any(1), far.float().argmax(1), gap.argmax(1))
        d_centre = candidates[torch.arange(n, device=device), pick]
        d_profile, d_mask = _lesion(other, d_centre, 0.85 + 0.3 * u(n), _random_directions(n, dims, gen, device),
                                    coords, size)
        vessels = _vessels(n, coords, size, gen)
        image = image + DISTRACTOR_CONTRAST * d_profile * (~mask) + 0.1 * vessels * body
        out["distractor_boxes"] = box_around(d_mask & ~mask)

    image = image + 0.015 * torch.randn(image.shape, generator=gen, device=device)  # acquisition noise
    if marker_corner is not None:
        block, out["marker_boxes"] = _marker(marker_corner, size, dims, device)
        image = torch.where(block, torch.full_like(image, 0.95), image)
    out["image"] = image.clamp(0, 1)
    return out


def make_phantoms(
    n: int,
    size: int = 64,
    dims: int = 2,
    seed: int = 0,
    n_classes: int = 2,
    distractors: bool = True,
    spurious_marker: bool = False,
    spurious_correlation: float = 0.9,
    device: str | torch.device = "cpu",
) -> PhantomSet:
    """Generate ``n`` phantoms with lesion masks and boxes.

    Args:
        n: number of phantoms; labels are exactly balanced (``n // n_classes`` each, the remainder
            to the first classes) and shuffled.
        size: side length in pixels (images are size^2 or size^3).
        dims: 2 for (N, 1, H, W) slices, 3 for (N, 1, D, H, W) volumes.
        seed: random seed; the same arguments give the same phantoms.
        n_classes: 2 (round vs elongated) or 3 (+ ring).
        distractors: add a faint lesion of another class's appearance and thin vessels.
        spurious_marker: add an "L" block in a corner; the corner is the label's corner
            (0 top-left, 1 top-right, 2 bottom-left) in ``spurious_correlation`` of the images and
            another class's corner otherwise.
        spurious_correlation: how often the marker agrees with the label, in [0, 1].
        device: where to generate.

    Returns:
        :class:`PhantomSet`.
    """
    if dims not in (2, 3):
        raise MedlensError(f"dims must be 2 or 3; got {dims}")
    if n_classes not in (2, 3):
        raise MedlensError(f"n_classes must be 2 or 3; got {n_classes}")
    if n < 1 or size < 16:
        raise MedlensError(f"need n >= 1 and size >= 16; got n={n}, size={size}")
    if not 0.0 <= spurious_correlation <= 1.0:
        raise MedlensError(f"spurious_correlation must be in [0, 1]; got {spurious_correlation}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = (torch.arange(n, device=device) % n_classes)[torch.randperm(n, generator=gen, device=device)]

    marker_corner = agrees = None
    if spurious_marker:
        agrees = torch.rand(n, generator=gen, device=device) < spurious_correlation
        shift = 1 + (torch.rand(n, generator=gen, device=device) * (n_classes - 1)).long().clamp_max(n_classes - 2)
        marker_corner = torch.where(agrees, labels, (labels + shift) % n_classes)

    chunk = max(1, MAX_VOXELS_PER_CHUNK // size**dims)
    parts = [
        _generate_chunk(labels[i:i + chunk], size, dims, n_classes, distractors,
                        None if marker_corner is None else marker_corner[i:i + chunk], gen)
        for i in range(0, n, chunk)
    ]
    cat = lambda key: torch.cat([p[key] for p in parts]) if key in parts[0] else None  # noqa: E731
    masks = cat("mask")
    return PhantomSet(
        images=cat("image")[:, None].contiguous(), labels=labels, masks=masks[:, None].contiguous(),
        boxes=box_around(masks), class_names=CLASS_NAMES[:n_classes], distractor_boxes=cat("distractor_boxes"),
        marker_boxes=cat("marker_boxes"), marker_agrees=agrees, bodies=cat("body")[:, None].contiguous(), names=[f"phantom_{i:04d}" for i in range(n)],
    )


def _png_bytes(array) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_phantoms(out_dir: str | Path, phantoms: PhantomSet, fmt: str = "png", overwrite: bool = True) -> Path:
    """Write each phantom beside its lesion mask and box, plus ``labels.csv``.

    Files per phantom ``<name>``: ``<name>.png`` (8-bit greyscale) or ``<name>.nii.gz`` (float32),
    ``<name>_mask.png`` (0/255) or ``<name>_mask.nii.gz`` (uint8 0/1), and ``<name>_box.json``.
    NIfTI arrays keep the tensor's axis order ((D, H, W) for volumes) with an identity affine, so a
    loader that reads the array as-is sees the same voxels the boxes refer to. 3D phantoms need
    ``fmt="nifti"``. Every file is written atomically.

    Returns:
        the path of ``labels.csv``.
    """
    if fmt not in ("png", "nifti"):
        raise MedlensError(f"fmt must be 'png' or 'nifti'; got {fmt!r}")
    if fmt == "png" and phantoms.dims == 3:
        raise MedlensError("3D phantoms cannot be written as PNG; use fmt='nifti'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = phantoms.images[:, 0].float().cpu().numpy()
    masks = phantoms.masks[:, 0].cpu().numpy()
    boxes = phantoms.boxes.cpu().tolist()
    labels = phantoms.labels.cpu().tolist()
    names = phantoms.names or [f"phantom_{i:04d}" for i in range(len(phantoms))]
    rows = []
    for i, name in enumerate(names):
        if fmt == "png":
            image_file, mask_file = f"{name}.png", f"{name}_mask.png"
            write_bytes(out_dir / image_file, _png_bytes((images[i] * 255).round().astype("uint8")), overwrite)
            write_bytes(out_dir / mask_file, _png_bytes(masks[i].astype("uint8") * 255), overwrite)
        else:
            import nibabel as nib
            import numpy as np

            image_file, mask_file = f"{name}.nii.gz", f"{name}_mask.nii.gz"
            for file, array in ((image_file, images[i].astype(np.float32)), (mask_file, masks[i].astype(np.uint8))):
                with atomic_path(out_dir / file, overwrite) as tmp:
                    nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp))
        box_doc = {
            "image": image_file, "mask": mask_file, "label": labels[i], "class_name": phantoms.class_names[labels[i]],
            "box": boxes[i], "convention": "lo inclusive, hi exclusive, array axis order ((y, x) or (z, y, x))",
            "image_size": list(images[i].shape),
        }
        if phantoms.marker_boxes is not None:
            box_doc["marker_box"] = phantoms.marker_boxes[i].tolist()
        write_text(out_dir / f"{name}_box.json", json.dumps(box_doc, indent=1), overwrite)
        rows.append([image_file, mask_file, f"{name}_box.json", labels[i], phantoms.class_names[labels[i]]])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["image", "mask", "box", "label", "class_name"])
    writer.writerows(rows)
    return write_text(out_dir / "labels.csv", text.getvalue(), overwrite)


def read_phantoms(folder: str | Path) -> PhantomSet:
    """Read a folder written by :func:`write_phantoms` back into a :class:`PhantomSet`
    (images quantised to 8 bits when they were written as PNG)."""
    import numpy as np

    folder = Path(folder)
    table = folder / "labels.csv"
    if not table.is_file():
        raise MedlensError(f"{folder}: no labels.csv; not a phantom folder written by medlens")
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise MedlensError(f"{table} lists no phantoms")

    def load(file: str) -> np.ndarray:
        path = folder / file
        if file.endswith(".png"):
            from PIL import Image

            return np.asarray(Image.open(path)).astype(np.float32) / 255.0
        import nibabel as nib

        return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)

    images = torch.from_numpy(np.stack([load(r["image"]) for r in rows]))[:, None]
    masks = torch.from_numpy(np.stack([load(r["mask"]) for r in rows]) > 0)[:, None]
    boxes = torch.tensor([json.loads((folder / r["box"]).read_text())["box"] for r in rows], dtype=torch.long)
    names_by_label = {int(r["label"]): r["class_name"] for r in rows}
    class_names = tuple(names_by_label.get(k, CLASS_NAMES[k]) for k in range(max(names_by_label) + 1))
    return PhantomSet(
        images=images, labels=torch.tensor([int(r["label"]) for r in rows]), masks=masks, boxes=boxes,
        class_names=class_names, names=[Path(r["image"]).name.split(".")[0] for r in rows],
    )
