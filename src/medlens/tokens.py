"""Token sequences to feature maps, so CAM methods run on Vision Transformer layers.

A ViT layer outputs (B, N, C) tokens: extra tokens (class, distillation, registers) first,
then a row-major grid of patch tokens. Swin-style layers output (B, H, W, C).
"""

from __future__ import annotations

from torch import Tensor, nn

from medlens.errors import MedlensError


def patch_grid(model: nn.Module, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The patch grid (h, w) of ``model`` for an input of size ``spatial``."""
    patch = None
    embed = getattr(model, "patch_embed", None)
    if embed is not None:
        patch = getattr(embed, "patch_size", None)
    if patch is None:
        patch = getattr(model, "patch_size", None)
    if patch is None:
        raise MedlensError(f"cannot tell the patch size of {type(model).__name__} to reshape its tokens into a grid")
    patch = (patch,) * len(spatial) if isinstance(patch, int) else tuple(patch)
    return tuple(s // p for s, p in zip(spatial, patch))


def tokens_to_grid(tokens: Tensor, model: nn.Module, x: Tensor) -> Tensor:
    """(B, N, C) tokens or (B, H, W, C) Swin maps -> (B, C, *grid); extra tokens are dropped."""
    spatial = tuple(x.shape[2:])
    if tokens.dim() == x.dim() and tokens.dim() == 4:  # (B, H, W, C), channels last
        return tokens.movedim(-1, 1)
    if tokens.dim() != 3:
        raise MedlensError(f"cannot read a feature map from a layer output of shape {tuple(tokens.shape)}")
    grid = patch_grid(model, spatial)
    n_patches = 1
    for g in grid:
        n_patches *= g
    extra = tokens.shape[1] - n_patches
    if extra < 0:
        raise MedlensError(f"layer has {tokens.shape[1]} tokens, fewer than the {n_patches} patches of a {grid} grid")
    return tokens[:, extra:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def default_token_layer(model: nn.Module) -> str | None:
    """The layer CAM methods use on a transformer by default (the last block's first norm,
    as in pytorch-grad-cam's ViT tutorial), or None if ``model`` is not a known ViT."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks) and hasattr(blocks[-1], "norm1"):
        return f"blocks.{len(blocks) - 1}.norm1"
    return None
