"""Capture layer activations without harming the model.

Every hook lives inside a context manager and is removed on exit, exceptions included.
The model's train/eval flags are restored module by module; no ``inplace`` flag is touched.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from medlens.core.hooks import Hooks, hook_count  # noqa: F401  (hook_count re-exported)
from medlens.errors import MedlensError


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule at dotted path ``name`` (``layer4``, ``features.6.5``).

    Raises:
        MedlensError: naming the closest existing layer paths when ``name`` is unknown.
    """
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; run `medlens layers` to list them"
    raise MedlensError(f"unknown layer {name!r} in {type(model).__name__}{hint}")


@contextmanager
def preserved_modes(model: nn.Module, train: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` in eval (or train) mode and restore every module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@dataclass
class LayerInfo:
    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    spatial: bool


def _first_tensor(output: object) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def trace_layers(model: nn.Module, x: Tensor) -> list[LayerInfo]:
    """Run one no-grad forward pass and report every module's output shape, in call order."""
    seen: dict[str, LayerInfo] = {}
    spatial_rank = x.dim()
    names = {m: n for n, m in model.named_modules() if n}

    def hook(module: nn.Module, _inp: object, out: object) -> None:
        name = names.get(module)
        t = _first_tensor(out)
        if name is None or t is None:
            return
        seen.pop(name, None)  # re-insert so the order is that of the last call
        is_spatial = t.dim() == spatial_rank and all(s > 1 for s in t.shape[2:])
        params = sum(p.numel() for p in module.parameters(recurse=False))
        seen[name] = LayerInfo(name, type(module).__name__, tuple(t.shape), params, is_spatial)

    with Hooks() as hooks:
        for module in names:
            hooks.forward(module, hook)
        with preserved_modes(model), torch.no_grad():
            model(x)
    return list(seen.values())


def auto_layer(model: nn.Module, x: Tensor) -> str:
    """The last layer whose output is still a feature map of the input's rank (B, C, *spatial).

    Transformers get their last block's first norm (see :func:`medlens.core.tokens.default_token_layer`).
    Adaptive pooling heads are skipped. A ResNet gives ``layer4``, a VGG its ``features``. For a
    segmentation network the output layer itself is spatial: the deepest spatial layer
    (smallest map) is chosen instead, the bottleneck that holds the semantics.
    """
    from medlens.core.tokens import default_token_layer

    token_layer = default_token_layer(model)
    if token_layer is not None:
        return token_layer
    layers = trace_layers(model, x[:1])
    spatial = [info for info in layers if info.spatial and not info.kind.startswith("Adaptive")]
    if not spatial:
        raise MedlensError(
            f"no layer of {type(model).__name__} outputs a {x.dim() - 2}D feature map; name one with --layer"
        )
    out_shape = layers[-1].shape
    if len(out_shape) == x.dim() and tuple(out_shape[2:]) == tuple(x.shape[2:]):
        smallest = min(spatial, key=lambda i: (torch.Size(i.shape[2:]).numel(), -spatial.index(i)))
        return smallest.name
    # Hooks fire after a container's children, so the last entry is the outermost module
    # producing the last feature map (``layer4`` rather than ``layer4.1.relu``).
    return spatial[-1].name


class LayerCapture:
    """Context manager that records the outputs of named layers during forward passes.

    With ``grad_from_first=True`` the forward pass can run under ``torch.no_grad()``: the first
    captured layer switches autograd on and hands the rest of the network a leaf copy of its
    output, so no graph (and no memory) is spent on the layers before it. Each captured tensor
    is handed on as a clone, so an in-place op downstream (``ReLU(inplace=True)``) cannot
    overwrite what was captured.

    Attributes:
        activations: layer name -> output of its last call, shape (B, C, *spatial) for CNNs.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], grad_from_first: bool = False) -> None:
        self.model = model
        self.layers = list(layers)
        self.modules = [resolve_layer(model, name) for name in self.layers]
        self.grad_from_first = grad_from_first
        self.activations: dict[str, Tensor] = {}
        self._hooks = Hooks()

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inp: object, out: object) -> object:
            t = _first_tensor(out)
            if t is None:
                raise MedlensError(f"layer {name!r} returned {type(out).__name__}, not a tensor")
            if self.grad_from_first and not torch.is_grad_enabled():
                torch.set_grad_enabled(True)  # the caller restores the mode after forward
                t = t.detach().requires_grad_(True)
            self.activations[name] = t
            passed_on = t.clone()
            if isinstance(out, Tensor):
                return passed_on
            return (passed_on, *out[1:]) if isinstance(out, tuple) else [passed_on, *out[1:]]

        return hook

    def __enter__(self) -> "LayerCapture":
        try:
            for name, module in zip(self.layers, self.modules):
                self._hooks.forward(module, self._hook(name))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove the hooks now (the activations stay readable)."""
        self._hooks.remove()

    def __exit__(self, *exc: object) -> None:
        self.close()
