"""Smoothing usable with any CAM method.

- Test-time augmentation (:class:`AugSmooth`, or ``explain(..., aug_smooth=True)``): the method runs on flipped and
  intensity-scaled copies of the input, each map is flipped back, and the maps are averaged
  (the ``aug_smooth`` of pytorch-grad-cam, which uses horizontal flips x scales 0.9/1/1.1).
- Eigen-smoothing (option ``eigen_smooth=True`` of the weighted CAMs): the map is the first
  principal component of the weighted activations w_c A_c instead of their sum (Muhammad &
  Yeasin, EigenCAM, IJCNN 2020), with a deterministic sign.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from medlens.core.capture import preserved_modes
from medlens.core.maps import agreeing_sign, principal_component  # noqa: F401  (re-exported)
from medlens.core.engine import Explanation, Method, MethodWrapper, explain, get_method, register_wrapper
from medlens.core.resample import normalise
from medlens.errors import MedlensError
from medlens.core.targets import Region, TargetSpec, pool_scores, region_weights, resolve_targets


def _original_targets(model: nn.Module, x: Tensor, target: TargetSpec, region: Region) -> Tensor:
    """(B, K) classes resolved on the un-augmented images, so every copy explains the same class."""
    if isinstance(target, Tensor) and target.dim() == 2 and target.shape[0] == x.shape[0]:
        return target
    with preserved_modes(model), torch.no_grad():
        return resolve_targets(target, pool_scores(model(x), x, region))


@register_wrapper("aug_smooth")
class AugSmooth(MethodWrapper):
    """Test-time augmentation smoothing around any method (pytorch-grad-cam's ``aug_smooth``;
    the wrapper pattern of Captum's NoiseTunnel).

    The A = len(flips) * len(scales) augmented copies (flip of the last spatial axis, i.e.
    left-right, times an intensity factor) are explained in one batched engine call with the
    classes of the original images; each map is flipped back and the normalised maps averaged.
    ``explain(model, x, "gradcam", aug_smooth=True)`` is ``explain(model, x, AugSmooth(method="gradcam"))``.

    Options:
        method: the wrapped method (name or built Method).
        aug_flips: flip settings of the copies (default no flip and a left-right flip).
        aug_scales: intensity factors of the copies (default 0.9, 1.0, 1.1).
    """

    name = "aug-smooth"
    aug_flips: tuple[bool, ...] = (False, True)
    aug_scales: tuple[float, ...] = (0.9, 1.0, 1.1)

    def validate(self) -> None:
        super().validate()
        self.aug_flips = tuple(bool(f) for f in self.aug_flips)
        self.aug_scales = tuple(float(s) for s in self.aug_scales)
        if not self.aug_flips or not self.aug_scales:
            raise MedlensError("aug_smooth needs at least one flip setting and one intensity scale")

    def explain(self, model: nn.Module, x: Tensor, target: TargetSpec, layer: str | Sequence[str] | None, region: Region) -> Explanation:
        """Returns an Explanation whose ``maps`` (B, K, *S) are the renormalised average, ``raw``
        the average before renormalisation (at input resolution), ``scores``/``logits`` those of
        the original images, and ``info["augmentations"]`` the number of copies."""
        augmentations = [(flip, scale) for flip in self.aug_flips for scale in self.aug_scales]
        batch, spatial = x.shape[0], x.shape[2:]
        targets = _original_targets(model, x, target, region)
        last = x.dim() - 1
        copies = torch.cat([(x.flip(last) if flip else x) * scale for flip, scale in augmentations])
        aug_region = region
        if region is not None:
            mask = region_weights(region, spatial, batch, x.device)
            aug_region = torch.cat([mask.flip(last) if flip else mask for flip, _ in augmentations])
        result = explain(model, copies, self.method, target=targets.repeat(len(augmentations), 1), layer=layer, region=aug_region)
        maps = result.maps.view(len(augmentations), batch, *result.maps.shape[1:])
        restored = torch.stack([m.flip(last) if flip else m for m, (flip, _) in zip(maps, augmentations)])
        mean = restored.mean(dim=0)
        identity = augmentations.index((False, 1.0)) if (False, 1.0) in augmentations else 0
        scores = result.scores.view(len(augmentations), batch, -1)[identity]
        logits = result.logits.view(len(augmentations), batch, -1)[identity]
        info = {**result.info, "augmentations": len(augmentations)}
        return Explanation(normalise(mean), mean, targets, scores, logits, result.method, result.layers, result.task, info)


def aug_smooth(
    model: nn.Module,
    x: Tensor,
    method: str | Method,
    target: TargetSpec = "pred",
    layer: str | Sequence[str] | None = None,
    region: Region = None,
    aug_flips: Sequence[bool] = (False, True),
    aug_scales: Sequence[float] = (0.9, 1.0, 1.1),
    **options: Any,
) -> Explanation:
    """Test-time augmentation smoothing of any method: :class:`AugSmooth` around
    ``method`` built with ``options``; the other arguments as for :func:`medlens.explain`."""
    wrapper = AugSmooth(method=get_method(method, **options), aug_flips=tuple(aug_flips), aug_scales=tuple(aug_scales))
    return explain(model, x, wrapper, target=target, layer=layer, region=region)
