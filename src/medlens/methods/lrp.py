"""Layer-wise Relevance Propagation for CNNs (Bach et al., PLoS ONE 2015; Montavon et al., 2019,
"Layer-wise relevance propagation: an overview"), with zennit 0.5.1 (Anders et al., 2021) as the
engine: its rules are modified-gradient hooks, its canonizers fold batch norms into the preceding
convolution and route torchvision ResNets' residual sums through a rule of their own.

A composite assigns a rule to every convolution and dense layer (activations pass relevance
through, average pools and sums redistribute it in proportion):

=========================  ==================  ==============  =================
composite                  convolutions        dense layers    first layer
=========================  ==================  ==============  =================
epsilon                    epsilon             epsilon         (same)
gamma                      gamma               gamma           (same)
alpha2-beta1               alpha=2, beta=1     alpha2-beta1    (same)
alpha1-beta0               alpha=1, beta=0     alpha1-beta0    (same)
epsilon-plus               z+ (alpha1-beta0)   epsilon         (same)
epsilon-plus-flat          z+                  epsilon         flat
epsilon-gamma-box          gamma               epsilon         z-box
epsilon-alpha2-beta1       alpha2-beta1        epsilon         (same)
epsilon-alpha2-beta1-flat  alpha2-beta1        epsilon         flat
=========================  ==================  ==============  =================

``first_layer="zbox"`` or ``"flat"`` replaces the first layer's rule of any composite. The
relevance starts as the target score itself (R = f_c(x) at the output), so conservative rules give
attributions that add up to about f_c(x). Per-channel relevance is ``exp.info["attributions"]``.

The model is left as it was: hooks and canonizers are removed in a ``finally`` (after an exception
too), batch-norm parameters are restored to the very tensors they were. A module called twice in
one forward (a shared convolution) is refused: zennit's rules keep one input per module.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from medlens.core.engine import Context, InputMethod, register
from medlens.core.options import check_choice, require
from medlens.core.targets import pool_scores, region_rows
from medlens.errors import MedlensError

__all__ = ["LRP", "COMPOSITES", "lrp_composite"]

#: composite name -> (convolution rule, dense rule, first-layer rule or None)
COMPOSITES: dict[str, tuple[str, str, str | None]] = {
    "epsilon": ("epsilon", "epsilon", None),
    "gamma": ("gamma", "gamma", None),
    "alpha2-beta1": ("alpha2-beta1", "alpha2-beta1", None),
    "alpha1-beta0": ("alpha1-beta0", "alpha1-beta0", None),
    "epsilon-plus": ("zplus", "epsilon", None),
    "epsilon-plus-flat": ("zplus", "epsilon", "flat"),
    "epsilon-gamma-box": ("gamma", "epsilon", "zbox"),
    "epsilon-alpha2-beta1": ("alpha2-beta1", "epsilon", None),
    "epsilon-alpha2-beta1-flat": ("alpha2-beta1", "epsilon", "flat"),
}
FIRST_LAYER_RULES = ("zbox", "flat")
CANONIZERS = ("auto", "resnet", "merge-batchnorm", "none")


def _rule(kind: str, epsilon: float, gamma: float, stabilizer: float, low: Tensor | None = None, high: Tensor | None = None) -> Any:
    from zennit import rules

    if kind == "epsilon":
        return rules.Epsilon(epsilon=epsilon)
    if kind == "gamma":
        return rules.Gamma(gamma=gamma, stabilizer=stabilizer)
    if kind == "zplus":
        return rules.ZPlus(stabilizer=stabilizer)
    if kind in ("alpha2-beta1", "alpha1-beta0"):
        alpha, beta = (2.0, 1.0) if kind == "alpha2-beta1" else (1.0, 0.0)
        return rules.AlphaBeta(alpha=alpha, beta=beta, stabilizer=stabilizer)
    if kind == "flat":
        return rules.Flat(stabilizer=stabilizer)
    return rules.ZBox(low=low, high=high, stabilizer=stabilizer)


def _canonizers(model: nn.Module, choice: str) -> list[Any]:
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer

    if choice == "auto":
        if any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules()):
            choice = "resnet"
        elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            choice = "merge-batchnorm"
    return {"resnet": [ResNetCanonizer()], "merge-batchnorm": [SequentialMergeBatchNorm()]}.get(choice, [])


def lrp_composite(model: nn.Module, composite: str, epsilon: float = 1e-6, gamma: float = 0.25, stabilizer: float = 1e-6,
                  first_layer: str | None = None, low: Tensor | None = None, high: Tensor | None = None,
                  canonizer: str = "auto") -> Any:
    """A fresh zennit composite (rules for ``composite``, see :data:`COMPOSITES`) with the
    canonizers for ``model``; ``low``/``high`` (n, C or 1, *S or 1s) bound the z-box first layer."""
    from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite, layer_map_base
    from zennit.types import Convolution, Linear

    conv, dense, first = COMPOSITES[composite]
    first = first_layer or first
    layer_map = layer_map_base(stabilizer) + [
        (Convolution, _rule(conv, epsilon, gamma, stabilizer)),
        (nn.Linear, _rule(dense, epsilon, gamma, stabilizer)),
    ]
    canonizers = _canonizers(model, canonizer)
    if first is None:
        return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)
    first_map = [(Convolution if first == "zbox" else Linear, _rule(first, epsilon, gamma, stabilizer, low, high))]
    return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=first_map, canonizers=canonizers)


@contextmanager
def _call_counts(model: nn.Module) -> Iterator[dict[str, int]]:
    """Counts the calls of every convolution, dense layer, average pool and sum (the modules
    whose zennit rule keeps the module's input); hooks removed on exit."""
    from zennit.layer import Sum
    from zennit.types import AvgPool, Linear

    counts: dict[str, int] = {}
    handles = []
    try:
        for name, module in model.named_modules():
            if isinstance(module, (Linear, AvgPool, Sum)):
                def count(_m: nn.Module, _i: Any, _o: Any, name: str = name) -> None:
                    counts[name] = counts.get(name, 0) + 1

                handles.append(module.register_forward_hook(count))
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@register
class LRP(InputMethod):
    """Layer-wise Relevance Propagation (Bach et al., 2015; Montavon et al., 2019) for CNNs, rules
    from zennit 0.5.1: composites epsilon, gamma, alpha2-beta1, alpha1-beta0, epsilon-plus,
    epsilon-plus-flat, epsilon-gamma-box, epsilon-alpha2-beta1(-flat). The map is the signed sum of
    the input relevance over channels; the relevance starts as the target score.

    Options:
        composite (str, "epsilon-plus-flat"); epsilon (float, 1e-6): the epsilon rule's
        stabiliser; gamma (float, 0.25); stabilizer (float, 1e-6): the other rules' stabiliser;
        first_layer ("zbox" | "flat" | None): replaces the composite's first-layer rule;
        low, high (float | None): the z-box input bounds (None: each image's min and max);
        canonizer ("auto" | "resnet" | "merge-batchnorm" | "none"): "auto" takes zennit's ResNet
        canonizer for torchvision ResNets, merges batch norms that follow a layer otherwise;
        batch_size (int, 32): (image, target) pairs per forward/backward pass.
    """

    name = "lrp"
    composite: str = "epsilon-plus-flat"
    epsilon: float = 1e-6
    gamma: float = 0.25
    stabilizer: float = 1e-6
    first_layer: str | None = None
    low: float | None = None
    high: float | None = None
    canonizer: str = "auto"
    batch_size: int = 32

    def validate(self) -> None:
        check_choice(self.name, "composite", self.composite, list(COMPOSITES))
        if self.first_layer is not None:
            check_choice(self.name, "first_layer", self.first_layer, FIRST_LAYER_RULES)
        check_choice(self.name, "canonizer", self.canonizer, CANONIZERS)
        require(self.epsilon > 0, self.name, "epsilon", self.epsilon, "must be > 0")
        require(self.gamma >= 0, self.name, "gamma", self.gamma, "must be >= 0")
        require(self.stabilizer > 0, self.name, "stabilizer", self.stabilizer, "must be > 0")
        require(self.batch_size >= 1, self.name, "batch_size", self.batch_size, "must be at least 1")
        require((self.low is None) == (self.high is None), self.name, "low", self.low, "and high must be given together")
        require(self.low is None or self.low < self.high, self.name, "low", self.low, f"must be below high={self.high}")

    def check(self, model: nn.Module, x: Tensor, task: str) -> None:
        super().check(model, x, task)
        attention = next((type(m).__name__ for m in model.modules() if isinstance(m, nn.MultiheadAttention)
                          or type(m).__name__.endswith("Attention")), None)
        if attention is not None:
            raise MedlensError(f"lrp: zennit's rules cover CNNs, not attention layers ({attention}); use chefer for transformers")
        if not any(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in model.modules()):
            raise MedlensError(f"lrp: {type(model).__name__} has no convolution or linear module to apply rules to")

    def bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The z-box bounds (B, 1, *1s): the options, or each image's own min and max."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        if self.low is not None:
            return x.new_full(shape, float(self.low)), x.new_full(shape, float(self.high))
        flat = x.flatten(1)
        return flat.amin(1).view(shape), flat.amax(1).view(shape)

    def relevance(self, ctx: Context, x: Tensor, target: Tensor, image: Tensor, low: Tensor, high: Tensor) -> Tensor:
        """Input relevance (n, C, *S) of the scores ``target`` (n,) of inputs ``x`` (n, C, *S) made
        from the images ``image`` (n,) of ``ctx.x``, in one hooked forward/backward pass."""
        composite = lrp_composite(ctx.model, self.composite, self.epsilon, self.gamma, self.stabilizer,
                                  self.first_layer, low, high, self.canonizer)
        inp = x.detach().requires_grad_(True)
        try:
            composite.register(ctx.model)
            with torch.enable_grad():
                with _call_counts(ctx.model) as counts:
                    output = ctx.model(inp)
                reused = next((f"{name!r} ({n} calls)" for name, n in counts.items() if n > 1), None)
                if reused is not None:
                    raise MedlensError(f"lrp: module {reused} is called more than once per forward; zennit's rules need one call per module")
                scores = pool_scores(output, inp, region_rows(ctx.region, ctx.x, image)).gather(1, target[:, None])
                (grad,) = torch.autograd.grad(scores, inp, grad_outputs=scores.detach())
        finally:
            composite.remove()
        return grad.detach()

    def compute(self, ctx: Context) -> Tensor:
        x, targets = ctx.x, ctx.targets
        b, k = targets.shape
        image = torch.arange(b, device=x.device).repeat_interleave(k)
        flat_targets = targets.reshape(-1)
        low, high = self.bounds(x)
        out = x.new_zeros(b * k, *x.shape[1:])
        for rows in torch.arange(b * k, device=x.device).split(self.batch_size):
            out[rows] = self.relevance(ctx, x[image[rows]], flat_targets[rows], image[rows], low[image[rows]], high[image[rows]])
        ctx.info["attributions"] = out.view(b, k, *x.shape[1:])  # (B, K, C_in, *S)
        return ctx.info["attributions"].sum(dim=2)
