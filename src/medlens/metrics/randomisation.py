"""Randomisation checks from Quantus' catalogue beyond parameter randomisation, batched torch.

- :func:`random_logit`: the similarity between the map of the target class and the map of a
  random other class (Sixt et al., ICML 2020; Quantus ``RandomLogit``); lower means the method is
  class-sensitive.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medlens.errors import MedlensError
from medlens.metrics.faithfulness_extra import pearson_rows, spearman_rows

__all__ = ["random_logit", "random_other_classes"]


def random_other_classes(targets: Tensor, num_classes: int, seed: int = 0) -> Tensor:
    """One class per image drawn uniformly among the classes other than its target."""
    targets = torch.as_tensor(targets).long().view(-1)
    if num_classes < 2:
        raise MedlensError("random_logit needs at least two classes")
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randint(0, num_classes - 1, (targets.numel(),), generator=gen).to(targets.device)
    return draw + (draw >= targets).long()  # skip the target


def random_logit(
    explain_fn, x: Tensor, targets: Tensor, maps: Tensor | None = None, num_classes: int | None = None,
    similarity: str = "ssim", seed: int = 0, off_targets: Tensor | None = None,
) -> Tensor:
    """Similarity of e(x, target) and e(x, other) for a random other class per image.

    Args:
        explain_fn: ``(x, targets) -> maps (B, *S)``, e.g. :func:`medlens.metrics.method_explainer`.
        maps: the target maps when already computed (else explained here).
        num_classes: the classes to draw from (needed unless ``off_targets`` is given).
        similarity: ``"ssim"`` (medlens' Gaussian-window SSIM with data range 1; Quantus uses
            skimage's 7x7 uniform window with the pair's range -- a deliberate difference, for 3D),
            ``"pearson"`` or ``"spearman"``.
        off_targets: (B,) the other classes, to share another library's draws.

    Returns:
        (B,) similarity (lower: the explanation depends on the class).
    """
    targets = torch.as_tensor(targets, device=x.device).long().view(-1)
    if off_targets is None:
        if num_classes is None:
            raise MedlensError("random_logit needs num_classes (or off_targets)")
        off_targets = random_other_classes(targets.cpu(), num_classes, seed)
    off_targets = torch.as_tensor(off_targets, device=x.device).long().view(-1)
    if bool((off_targets == targets).any()):
        raise MedlensError("off_targets must differ from the targets")
    a = explain_fn(x, targets) if maps is None else maps.to(x.device)
    b = explain_fn(x, off_targets)
    if similarity == "pearson":
        return pearson_rows(a.flatten(1), b.flatten(1)).float()
    if similarity == "spearman":
        return spearman_rows(a.flatten(1), b.flatten(1)).float()
    if similarity == "ssim":
        from medlens.metrics.sanity import ssim

        return ssim(a, b).float()
    raise MedlensError(f"similarity must be ssim, pearson or spearman; got {similarity!r}")
