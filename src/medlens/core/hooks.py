"""One idiom for torch hooks: a :class:`Hooks` list of handles that is a context manager.

Every place in medlens that hooks a user's model (layer capture, attention capture, guided
backprop, Ablation-CAM, the score transform, LRP's head capture) registers through a
:class:`Hooks` and removes everything on exit, exceptions included, so a failure in the middle
of a forward pass (or in the middle of registering) never leaves a hook on the model. The
pattern is zennit's ``RemovableHandleList``: a list of removable handles with one ``remove``.

Example:
    >>> with Hooks() as hooks:
    ...     hooks.forward(model.layer4, lambda _m, _i, out: seen.append(out))
    ...     model(x)
    >>> hook_count(model)
    0
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import nn
from torch.utils.hooks import RemovableHandle


class Hooks(list):
    """A list of hook handles (anything with ``remove()``), removed together by :meth:`remove`
    or on leaving the ``with`` block, exceptions included. Removal is idempotent."""

    def __init__(self, handles: Iterable[RemovableHandle] = ()) -> None:
        super().__init__(handles)

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        """Keep ``handle`` (returned) so that it is removed with the others."""
        self.append(handle)
        return handle

    def forward(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        """``module.register_forward_hook(hook, **kwargs)``, kept."""
        return self.add(module.register_forward_hook(hook, **kwargs))

    def forward_pre(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        """``module.register_forward_pre_hook(hook, **kwargs)``, kept."""
        return self.add(module.register_forward_pre_hook(hook, **kwargs))

    def backward(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        """``module.register_full_backward_hook(hook, **kwargs)``, kept."""
        return self.add(module.register_full_backward_hook(hook, **kwargs))

    def remove(self) -> None:  # type: ignore[override]
        """Remove every handle (last registered first) and empty the list."""
        while self:
            self.pop().remove()

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def hook_count(model: nn.Module) -> int:
    """Number of forward, forward-pre, backward and backward-pre hooks on ``model``'s modules
    (to check that nothing is left behind)."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        total += len(getattr(m, "_backward_pre_hooks", {}))
    return total
