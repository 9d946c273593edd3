"""Sanity checks for saliency maps (Adebayo et al., NeurIPS 2018): model parameter randomisation.

If an explanation is to say something about the *model*, destroying the model's parameters must
change it. Cascading randomisation re-initialises the model's blocks from the output towards the
input, cumulatively; independent randomisation re-initialises one block at a time. After each
step the maps are recomputed for the same images and targets and compared with the original
maps by Spearman rank correlation and SSIM, per image. Everything runs on a deep copy: the
user's model is never touched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from medlens.core.engine import explain
from medlens.errors import MedlensError
from medlens.metrics.faithfulness import gaussian_filter
from medlens.metrics.ranks import tie_ranks

__all__ = ["SanityResult", "model_randomisation", "randomisation_units", "spearman", "ssim"]


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of paired maps (B, *S) -> (B,), ties given average ranks.

    A constant map has no ranking: two constant maps correlate 1 (nothing changed), a constant
    and a non-constant map 0.
    """
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    ranks = []
    for f in (fa, fb):
        below, at_most = tie_ranks(f)
        ranks.append((below + at_most).double() / 2)
    ra, rb = (r - r.mean(dim=1, keepdim=True) for r in ranks)
    va, vb = (ra * ra).sum(dim=1), (rb * rb).sum(dim=1)
    rho = (ra * rb).sum(dim=1) / (va * vb).sqrt().clamp_min(1e-300)
    flat_a, flat_b = va == 0, vb == 0
    rho = torch.where(flat_a & flat_b, torch.ones_like(rho), torch.where(flat_a | flat_b, torch.zeros_like(rho), rho))
    return rho.float()


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al., IEEE TIP 2004) of paired maps (B, *S) -> (B,), 2D or 3D.

    Gaussian window (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, population
    covariances, mean over the pixels at least one window radius from the border: the same as
    ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)``.
    """
    x, y = a[:, None].double(), b[:, None].double()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(t: Tensor) -> Tensor:
        return gaussian_filter(t, sigma, truncate=3.5)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = int(3.5 * sigma + 0.5)
    crop = s[(slice(None), 0, *(slice(pad, n - pad) for n in s.shape[2:]))]
    if crop.numel() == 0:
        raise MedlensError(f"maps of shape {tuple(a.shape[1:])} are too small for SSIM's {2 * pad + 1}-pixel window")
    return crop.flatten(1).mean(dim=1).float()


def randomisation_units(model: nn.Module) -> list[str]:
    """The blocks randomised one step at a time, input to output: the model's children, with
    ``Sequential``/``ModuleList`` containers opened one level (ResNet: conv1, bn1, layer1.0, ...,
    fc; ViT: patch_embed, blocks.0, ..., head); only blocks that hold parameters."""
    units: list[str] = []
    for name, child in model.named_children():
        parts = list(child.named_children()) if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1 else [("", child)]
        for sub, module in parts:
            if any(True for _ in module.parameters()):
                units.append(f"{name}.{sub}" if sub else name)
    if any(True for _ in model.parameters(recurse=False)):
        units.insert(0, "")  # the model's own parameters (e.g. a ViT's cls token and position embedding)
    return units


def _randomise(module: nn.Module, own_only: bool = False) -> None:
    """Re-initialise the parameters of ``module`` with each layer's own initialiser
    (``reset_parameters``), or N(0, 0.02) for parameters of modules without one.
    ``own_only``: just the module's direct parameters (the model's own tokens/embeddings)."""
    for sub in [module] if own_only else module.modules():
        if not own_only and callable(getattr(sub, "reset_parameters", None)):
            sub.reset_parameters()
            continue
        for p in sub.parameters(recurse=False):
            torch.nn.init.normal_(p, std=0.02)


@dataclass
class SanityResult:
    """Outcome of a parameter-randomisation test.

    Attributes:
        mode: ``"cascading"`` or ``"independent"``.
        steps: the block randomised at each step (cascading: all blocks up to and including it,
            from the output down).
        spearman: (L, B) rank correlation of each step's maps with the original maps.
        ssim: (L, B) SSIM of the same pairs.
        flagged: True when the maps do not change (see ``reason``): the method does not depend
            on the model's parameters and fails the sanity check.
        reason: one line explaining the flag.
        maps: (L, B, *S) randomised maps (kept for drawing) and ``original`` (B, *S).
    """

    mode: str
    steps: list[str]
    spearman: Tensor
    ssim: Tensor
    flagged: bool
    reason: str
    original: Tensor
    maps: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One row per step: step, block, mean and per-image values of both similarities."""
        return [
            {"mode": self.mode, "step": i, "randomised": name, "spearman": float(self.spearman[i].mean()),
             "ssim": float(self.ssim[i].mean())}
            for i, name in enumerate(self.steps)
        ]


def model_randomisation(
    model: nn.Module,
    x: Tensor,
    method: str = "gradcam",
    target: Any = "pred",
    layer: str | Sequence[str] | None = None,
    mode: str = "cascading",
    units: Sequence[str] | None = None,
    seed: int = 0,
    threshold: float = 0.5,
    **options: Any,
) -> SanityResult:
    """Adebayo et al.'s model parameter randomisation test, on a deep copy of ``model``.

    Args:
        model: the trained model (left untouched: a deep copy is randomised).
        x: (B, C, *S) images.
        method, layer, options: passed to :func:`medlens.explain`.
        target: what to explain; resolved once on the original model and then kept fixed.
        mode: ``"cascading"`` (output to input, cumulative) or ``"independent"`` (one block at a time).
        units: blocks to randomise (dotted names, input to output); default :func:`randomisation_units`.
        seed: seed for the re-initialisation (the global RNG state is restored afterwards).
        threshold: the method is flagged when the mean Spearman correlation with the original maps
            stays above this after the whole model is randomised (cascading) or after every block
            is randomised in turn (independent, mean over blocks).

    Returns:
        :class:`SanityResult`.
    """
    if mode not in ("cascading", "independent"):
        raise MedlensError(f"mode must be 'cascading' or 'independent'; got {mode!r}")
    original = explain(model, x, method, target=target, layer=layer, **options)
    targets = original.targets
    base = original.maps[:, 0]
    twin = copy.deepcopy(model)
    names = list(units) if units is not None else randomisation_units(twin)
    modules = dict(twin.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise MedlensError(f"cannot randomise {unknown[0]!r}: no such module in the model")
    order = names[::-1] if mode == "cascading" else names
    saved = {k: v.clone() for k, v in twin.state_dict().items()} if mode == "independent" else None
    rhos, ssims, maps = [], [], []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name in order:
            _randomise(modules[name], own_only=name == "")
            new = explain(twin, x, method, target=targets, layer=layer, **options).maps[:, 0]
            rhos.append(spearman(base, new))
            ssims.append(ssim(base, new))
            maps.append(new)
            if saved is not None:
                twin.load_state_dict(saved)
    rho = torch.stack(rhos)
    final = float(rho[-1].mean()) if mode == "cascading" else float(rho.mean())
    flagged = final > threshold
    where = "after randomising the whole model" if mode == "cascading" else "on average over single-block randomisations"
    reason = (f"maps barely change {where} (mean Spearman {final:.2f} > {threshold}): "
              "the method does not reflect the model's parameters") if flagged else \
             f"maps change {where} (mean Spearman {final:.2f} <= {threshold})"
    return SanityResult(mode, order, rho, torch.stack(ssims), flagged, reason, base, torch.stack(maps),
                        {"method": method, "targets": targets})
