"""Token sequences to feature maps, so CAM methods run on Vision Transformer layers.

A ViT layer outputs (B, N, C) tokens: extra tokens (class, distillation, registers) first,
then a row-major grid of patch tokens. Swin-style layers output (B, H, W, C).
The patch size is read from the model (timm ``patch_embed``, torchvision ``conv_proj`` /
``patch_size``, MONAI ``patch_embedding``, or the first convolution whose stride equals its
kernel), the grid from the input size, so inputs other than 224 and non-square grids work.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from medlens.errors import MedlensError


def _as_tuple(value: object, dims: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,) * dims
    values = tuple(int(v) for v in value)  # type: ignore[union-attr]
    if len(values) == dims:
        return values
    return values * dims if len(values) == 1 else None


def _patchify_conv(model: nn.Module) -> nn.Module | None:
    """The first convolution with kernel == stride (a patch embedding), if any."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.kernel_size == module.stride and max(module.kernel_size) > 1:
            return module
    return None


def patch_size(model: nn.Module, dims: int) -> tuple[int, ...]:
    """The patch size of a ViT-like ``model`` for ``dims``-D inputs.

    Raises:
        MedlensError: if no patch embedding can be found.
    """
    for owner in (getattr(model, "patch_embed", None), model, getattr(model, "vit", None)):
        if owner is not None:
            size = _as_tuple(getattr(owner, "patch_size", None), dims)
            if size is not None:
                return size
    conv = _patchify_conv(model)
    if conv is not None:
        return _as_tuple(conv.kernel_size, dims)  # type: ignore[return-value]
    raise MedlensError(f"cannot tell the patch size of {type(model).__name__} to reshape its tokens into a grid")


def patch_grid(model: nn.Module, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The patch grid (h, w) or (d, h, w) of ``model`` for an input of size ``spatial``.

    timm models built with ``dynamic_img_pad`` pad the input up to a multiple of the patch,
    so the grid rounds up there and down elsewhere.
    """
    size = patch_size(model, len(spatial))
    embed = getattr(model, "patch_embed", None)
    round_up = bool(getattr(embed, "dynamic_img_pad", False))
    return tuple(math.ceil(s / p) if round_up else s // p for s, p in zip(spatial, size))


def prefix_tokens(model: nn.Module, n_tokens: int, spatial: tuple[int, ...]) -> int:
    """How many extra tokens (class, distillation, registers) precede the patch tokens."""
    n_patches = math.prod(patch_grid(model, spatial))
    extra = n_tokens - n_patches
    if extra < 0:
        raise MedlensError(f"layer has {n_tokens} tokens, fewer than the {n_patches} patches of a {patch_grid(model, spatial)} grid")
    return extra


def has_class_token(model: nn.Module) -> bool:
    """True when token 0 is a class token (timm ``cls_token``, torchvision ``class_token``, MONAI ``cls_token``)."""
    for owner in (model, getattr(model, "vit", None)):
        if owner is not None and (getattr(owner, "cls_token", None) is not None or getattr(owner, "class_token", None) is not None):
            return True
    return False


def tokens_to_grid(tokens: Tensor, model: nn.Module, x: Tensor) -> Tensor:
    """Token activations to a feature map, extra tokens dropped.

    Args:
        tokens: (B, N, C) tokens (extra tokens first, then the row-major patch grid), or
            (B, H, W, C) / (B, D, H, W, C) channels-last Swin-style maps.
        model: the transformer (read for its patch size).
        x: (B, C_in, *S) the input, for the grid size.

    Returns:
        (B, C, *grid).
    """
    spatial = tuple(x.shape[2:])
    if tokens.dim() == x.dim():  # channels last, one spatial dim per input dim
        return tokens.movedim(-1, 1)
    if tokens.dim() != 3:
        raise MedlensError(f"cannot read a feature map from a layer output of shape {tuple(tokens.shape)}")
    token_grid = getattr(model, "token_grid", None)  # models that know their own layout (medlens.models.hf)
    if callable(token_grid):
        grid, extra = token_grid(tokens.shape[1], spatial)
    else:
        grid = patch_grid(model, spatial)
        extra = prefix_tokens(model, tokens.shape[1], spatial)
    return tokens[:, extra:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def _last_index(container: nn.Module) -> str | None:
    names = [name for name, _ in container.named_children()]
    return names[-1] if names else None


def default_token_layer(model: nn.Module) -> str | None:
    """The layer CAM methods use on a transformer by default, or None if ``model`` is not a known ViT.

    This is the last block's first norm (its output is what the last attention reads), as in
    pytorch-grad-cam's ViT tutorial and the attention-maps paper: ``blocks.<last>.norm1`` for
    timm and MONAI ViTs, ``encoder.layers.<last>.ln_1`` for torchvision, and
    ``layers.<last>.blocks.<last>.norm1`` for timm Swin. A model may name its own
    (``default_token_layer_name``, as :mod:`medlens.models.hf` does).
    """
    own = getattr(model, "default_token_layer_name", None)
    if isinstance(own, str):
        return own
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        last = _last_index(blocks)
        if hasattr(blocks[-1], "norm1"):
            return f"blocks.{last}.norm1"
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None) if encoder is not None else None
    if isinstance(layers, nn.Sequential) and len(layers) and hasattr(layers[-1], "ln_1"):
        return f"encoder.layers.{_last_index(layers)}.ln_1"
    stages = getattr(model, "layers", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages):
        stage_blocks = getattr(stages[-1], "blocks", None)
        if isinstance(stage_blocks, (nn.Sequential, nn.ModuleList)) and len(stage_blocks) and hasattr(stage_blocks[-1], "norm1"):
            return f"layers.{_last_index(stages)}.blocks.{_last_index(stage_blocks)}.norm1"
    return None


def split_heads(qkv: Tensor, heads: int, parts: int = 3) -> tuple[Tensor, ...]:
    """(B, N, parts*H*D) fused projection -> q, k(, v) each (B, H, N, D) (timm/MONAI/torch layout)."""
    b, n, _ = qkv.shape
    return qkv.reshape(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(t: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    return t.transpose(1, 2).flatten(2)
