"""The engine: (model, images, target) -> explanation maps.

One forward pass serves every target. Gradients are taken with ``torch.autograd.grad``
with respect to the captured activations only (or the input, for methods that need it),
and the graph starts at the first captured layer, so nothing is spent on the layers before it.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.core.attention import AttentionCapture
from medlens.core.capture import LayerCapture, auto_layer, preserved_modes
from medlens.core.heads import pooled_linear_gradients
from medlens.core.options import check_choice, check_names, check_types, coerce, option_names, typed_options
from medlens.core.resample import upsample_normalised
from medlens.errors import MedlensError
from medlens.core.targets import Region, TargetSpec, is_segmentation_output, model_output, pool_scores, region_rows, resolve_targets, scored


@dataclass
class Explanation:
    """The result of :func:`explain`.

    Attributes:
        maps: (B, K, *spatial) maps at input resolution, each min-max normalised to [0, 1].
        raw: (B, K, *spatial_layer) maps at the method's own resolution, not normalised.
        targets: (B, K) class indices explained.
        scores: (B, K) the model's score (logit, or pooled logit) for each target.
        logits: (B, N) all class scores.
        method: method name.
        layers: layers the maps were computed from (empty for input-space methods).
        task: ``"classification"`` or ``"segmentation"``.
        info: method-specific extras (e.g. the automatically chosen layer).
    """

    maps: Tensor
    raw: Tensor
    targets: Tensor
    scores: Tensor
    logits: Tensor
    method: str
    layers: list[str]
    task: str
    info: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> "Explanation":
        moved = {k: getattr(self, k).to(device) for k in ("maps", "raw", "targets", "scores", "logits")}
        return Explanation(**moved, method=self.method, layers=self.layers, task=self.task, info=self.info)

    @property
    def predictions(self) -> Tensor:
        """(B,) predicted class per image."""
        return self.logits.argmax(dim=1)


@dataclass
class Context:
    """What a method may read. Tensors stay on the model's device.

    Attributes:
        model: the model, in eval mode for the duration of the call.
        x: (B, C_in, *S) input.
        targets: (B, K) class indices; scores: (B, K) their scores; logits: (B, N).
        layers: captured layer names, in order.
        activations: layer -> (B, C, *s) activation (detached).
        gradients: layer -> (B, K, C, *s) gradient of each target score w.r.t. the activation.
        input_gradients: (B, K, C_in, *S) gradient of each target score w.r.t. the input.
        region: segmentation pooling region, if any.
        task: ``"classification"`` or ``"segmentation"``.
        info: what the method reports besides its maps, e.g. ``attributions`` (B, K, C_in, *S);
            the engine puts it on :attr:`Explanation.info` (per-target tensors joined over chunks).
        attention: for attention methods, their provider after the forward pass
            (:class:`medlens.core.attention.AttentionCapture`: ``sites``, ``indices``, ``records``, ``probs()``).
        attention_gradients: [(B, K, H, N, N)] gradient of each target score w.r.t. each
            captured attention matrix, in block order (:class:`AttentionGradientMethod`).
    """

    model: nn.Module
    x: Tensor
    targets: Tensor
    scores: Tensor
    logits: Tensor
    layers: list[str]
    activations: dict[str, Tensor]
    gradients: dict[str, Tensor]
    input_gradients: Tensor | None
    region: Region
    task: str
    info: dict[str, Any] = field(default_factory=dict)
    attention: Any = None
    attention_gradients: list[Tensor] | None = None

    def score(self, x: Tensor, targets: Tensor | None = None, batch_size: int = 64) -> Tensor:
        """Scores (b, K) of ``targets`` (default: the explained ones, repeated to match) for inputs
        ``x`` (b, C_in, *S), in no-grad chunks of ``batch_size``. For perturbation methods."""
        return score_batches(self.model, x, self.targets if targets is None else targets, self.region, batch_size)

    def gradients_at(self, x: Tensor, targets: Tensor, image: Tensor | None = None) -> Tensor:
        """Gradients (b, K, C_in, *S) of the ``targets`` (b, K) scores w.r.t. inputs ``x``
        (b, C_in, *S) made from the images ``image`` (b,) of ``ctx.x`` (each keeps its own
        segmentation region), in one forward/backward pass. For path and noise methods."""
        region = self.region if image is None else region_rows(self.region, self.x, image)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = pool_scores(self.model(x), x, region)
            return target_gradients(logits, targets, [x], ["input"])[0].detach()


def score_batches(model: nn.Module, x: Tensor, targets: Tensor, region: Region = None, batch_size: int = 64) -> Tensor:
    """Target scores (b, K) for a stack of inputs, chunked, without autograd.

    ``targets`` is (b, K), or (B, K) with b a multiple of B (each image's perturbations
    contiguous), or (1, K) for the same classes everywhere.
    """
    if targets.shape[0] != x.shape[0]:
        targets = targets.repeat_interleave(x.shape[0] // targets.shape[0], dim=0) if targets.shape[0] > 1 else targets.expand(x.shape[0], -1)
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start : start + batch_size]
            logits = pool_scores(model(chunk), chunk, region)
            out.append(logits.gather(1, targets[start : start + batch_size]))
    return torch.cat(out)


@dataclass(frozen=True)
class Needs:
    """What the engine captures for a method: its contract, declared by the method's base class
    (:meth:`Method.needs`), never by flags the engine reads.

    Attributes:
        layers: the activations (B, C, *s) of the chosen layer(s) -> ``ctx.activations``.
        layer_gradients: each target score's gradient w.r.t. them (B, K, C, *s) -> ``ctx.gradients``.
        input_gradients: each target score's gradient w.r.t. the input (B, K, C_in, *S)
            -> ``ctx.input_gradients``.
        attention: the forward pass runs under the method's attention-capture provider
            (:meth:`AttentionMethod.provider`) -> ``ctx.attention``.
        attention_gradients: each target score's gradient w.r.t. every captured attention
            matrix, [(B, K, H, N, N)] -> ``ctx.attention_gradients``.
    """

    layers: bool = False
    layer_gradients: bool = False
    input_gradients: bool = False
    attention: bool = False
    attention_gradients: bool = False


#: the capability flags of medlens <= 0.1, translated once per class (see :func:`_translate_flags`)
DEPRECATED_FLAGS = ("uses_layer", "uses_gradients", "uses_input_gradients", "classification_only", "reads_score")


def refuse_non_classifier(method: "Method", task: str) -> None:
    """MedlensError unless ``task`` is ``"classification"`` (see :class:`ClassifierOnly`)."""
    if task != "classification":
        raise MedlensError(f"{method.name} applies to classifiers only, not {task} outputs")


def refuse_score(method: "Method", score: str, reason: str = "reads the model's weights") -> None:
    """MedlensError unless ``score`` is ``"logit"`` (see :class:`ScoreFree`)."""
    if score != "logit":
        raise MedlensError(f"{method.name} {reason}, not a score: score={score!r} does not apply (use gradcam)")


def _translate_flags(cls: type["Method"]) -> None:
    """Deprecated: a subclass that still sets the old capability flags (``uses_layer``,
    ``uses_gradients``, ``uses_input_gradients``, ``classification_only``, ``reads_score``)
    gets the equivalent contract, once, when the class is created: its :meth:`Method.needs`
    returns what the flags said (the rest inherited), ``classification_only=True`` adds the
    :class:`ClassifierOnly` check and ``reads_score=False`` the :class:`ScoreFree` one.
    Derive from the base classes (:class:`LayerMethod`, :class:`ActivationMethod`,
    :class:`InputGradientMethod`, :class:`PerturbationMethod`, :class:`AttentionMethod`) and
    the mixins instead."""
    given = {flag: bool(cls.__dict__[flag]) for flag in DEPRECATED_FLAGS if flag in cls.__dict__}
    if not given:
        return
    warnings.warn(f"{cls.__qualname__} sets {', '.join(given)}: capability flags are deprecated; derive from "
                  "LayerMethod / ActivationMethod / InputGradientMethod / PerturbationMethod / AttentionMethod "
                  "and the ClassifierOnly / ScoreFree mixins", DeprecationWarning, stacklevel=4)
    if given.keys() & {"uses_layer", "uses_gradients", "uses_input_gradients"}:
        old = cls.needs()
        layers = given.get("uses_layer", old.layers)
        needs = replace(old, layers=layers, layer_gradients=layers and given.get("uses_gradients", old.layer_gradients),
                        input_gradients=given.get("uses_input_gradients", old.input_gradients))
        cls.needs = classmethod(lambda _cls: needs)  # type: ignore[method-assign]
    if given.get("classification_only"):
        check = cls.check

        def classifier_check(self: "Method", model: nn.Module, x: Tensor, task: str) -> None:
            refuse_non_classifier(self, task)
            check(self, model, x, task)

        cls.check = classifier_check  # type: ignore[method-assign]
    if given.get("reads_score") is False:
        check_score = cls.check_score

        def score_check(self: "Method", score: str) -> None:
            refuse_score(self, score)
            check_score(self, score)

        cls.check_score = score_check  # type: ignore[method-assign]


class Method:
    """Base of all methods: a short function of what the engine captured.

    A method's options are its annotated class attributes: every subclass becomes a keyword-only
    dataclass (:func:`medlens.core.options.typed_options`), so ``GradCAM(top_k_channels=32)`` is
    checked when built (unknown names, types, and each method's :meth:`validate`).

    What the engine captures for a method is its contract, given by its base class
    (:meth:`needs`): :class:`LayerMethod` (layer activations and per-target gradients),
    :class:`ActivationMethod` (activations only), :class:`InputGradientMethod` (input
    gradients), :class:`InputMethod` / :class:`PerturbationMethod` (nothing: the method runs
    the model itself, e.g. through ``ctx.score``), :class:`AttentionMethod` (a transformer's
    attention). Where a method applies is what its :meth:`check` and :meth:`check_score` do
    (the :class:`ClassifierOnly` and :class:`ScoreFree` mixins).

    Subclasses set ``name`` and implement :meth:`compute` returning (B, K, *s) maps; methods
    that fuse per-layer maps implement :meth:`layer_map` instead. A bare ``Method`` subclass
    is a layer method (activations and gradients), as in the README's custom-method example.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _translate_flags(cls)
        typed_options(cls)

    def __post_init__(self) -> None:
        check_types(self)
        self.validate()

    @classmethod
    def needs(cls) -> Needs:
        """What the engine captures for this method (see :class:`Needs`)."""
        return Needs(layers=True, layer_gradients=True)

    def validate(self) -> None:
        """Raise MedlensError for option values out of range (called when the method is built)."""
        fusion = getattr(self, "fusion", "mean")
        check_choice(self.name or type(self).__name__, "fusion", fusion, LAYER_FUSIONS)

    @property
    def options(self) -> dict[str, Any]:
        """The method's options as a dict (name -> value), defaults included."""
        return {name: getattr(self, name) for name in option_names(type(self))}

    def check(self, model: nn.Module, x: Tensor, task: str) -> None:
        """Raise MedlensError if the method cannot apply to this model and input (called after
        the forward pass, with the task read from the model's output)."""

    def check_score(self, score: str) -> None:
        """Raise MedlensError if the method cannot explain the classifier score ``score``
        (``"logit"``, ``"probability"`` or ``"log-probability"``; called before anything runs)."""

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        """(B, K, *s) map of one layer from its activation (B, C, *s) and the targets'
        gradients (B, K, C, *s) (None for gradient-free methods)."""
        raise NotImplementedError

    def compute(self, ctx: Context) -> Tensor:
        """(B, K, *s) maps: each captured layer's :meth:`layer_map`, fused when several."""
        maps = [self.layer_map(ctx.activations[l], ctx.gradients.get(l), ctx, l) for l in ctx.layers]
        if len(maps) == 1:
            return maps[0]
        return fuse_layer_maps(maps, ctx.x.shape[2:], getattr(self, "fusion", "mean"))


typed_options(Method)

#: how the maps of several layers are fused
LAYER_FUSIONS = ("mean", "max", "product", "prod")


class ClassifierOnly:
    """Mixin (before the method base): the method applies to classifiers only; its
    :meth:`check` refuses segmentation outputs. E.g. ``class CAM(ClassifierOnly, ActivationMethod)``."""

    name: ClassVar[str]

    def check(self, model: nn.Module, x: Tensor, task: str) -> None:
        refuse_non_classifier(self, task)  # type: ignore[arg-type]
        super().check(model, x, task)  # type: ignore[misc]


class ScoreFree:
    """Mixin (before the method base): the map is not a function of the target score (CAM reads
    the head's weights), so :meth:`check_score` refuses ``score="probability"`` and the like.

    Attributes:
        score_free_reason: what the method reads instead, for the error message.
    """

    name: ClassVar[str]
    score_free_reason: ClassVar[str] = "reads the model's weights"

    def check_score(self, score: str) -> None:
        refuse_score(self, score, self.score_free_reason)  # type: ignore[arg-type]
        super().check_score(score)  # type: ignore[misc]


class LayerMethod(Method):
    """A method computed from a layer's activations A (B, C, *s) and the gradients
    (B, K, C, *s) of each target score w.r.t. A (Grad-CAM and its family).

    Options:
        fusion: how the maps of several layers are fused (mean, max or product).
    """

    fusion: str = "mean"


class ActivationMethod(LayerMethod):
    """A gradient-free layer method: computed from the layer's activations A (B, C, *s) alone
    (``gradient`` is None in :meth:`layer_map`), e.g. Eigen-CAM, or Score-CAM and Ablation-CAM,
    which score perturbed inputs through ``ctx``. The forward pass runs without autograd."""

    @classmethod
    def needs(cls) -> Needs:
        return Needs(layers=True)


class InputMethod(Method):
    """A method whose maps live in input space (B, K, *S). The engine captures nothing: the
    method runs the model itself on modified inputs (``ctx.score`` for scores, or the input
    gradients at points of its own, e.g. Integrated Gradients). See :class:`InputGradientMethod`
    and :class:`PerturbationMethod` for the two common cases."""

    @classmethod
    def needs(cls) -> Needs:
        return Needs()


class InputGradientMethod(InputMethod):
    """An input-space method of the gradients (B, K, C_in, *S) of each target score w.r.t. the
    input itself (``ctx.input_gradients``), e.g. saliency, Input x Gradient."""

    @classmethod
    def needs(cls) -> Needs:
        return Needs(input_gradients=True)


class PerturbationMethod(InputMethod):
    """An input-space method that scores perturbed copies of the input with ``ctx.score``
    (no gradients, no captured layer), e.g. occlusion, RISE, feature ablation."""


@dataclass
class AttentionRun:
    """What an attention method's forward pass gives (see :meth:`AttentionMethod.attend`).

    Attributes:
        maps: (B, K, *grid) maps over the patch grid.
        logits: (B, N) scores (pooled over the region for segmentation outputs).
        targets: (B, K) class indices explained.
        task: ``"classification"`` or ``"segmentation"``, from the model's own output.
    """

    maps: Tensor
    logits: Tensor
    targets: Tensor
    task: str


class AttentionMethod(Method):
    """A method computed from the attention a transformer really uses. The engine runs the one
    forward pass under the method's attention-capture :meth:`provider` (a
    :class:`medlens.core.attention.AttentionCapture`: hooks removed on exit), resolves the
    targets and the task from the model's output (a segmentation ViT such as UNETR gives
    "segmentation"), and calls :meth:`compute` with ``ctx.attention`` (the provider) and, for
    :class:`AttentionGradientMethod`, ``ctx.attention_gradients``."""

    @classmethod
    def needs(cls) -> Needs:
        return Needs(attention=True)

    def provider(self, model: nn.Module, x: Tensor) -> AttentionCapture:
        """The attention capture the forward pass runs under (all blocks; with gradients and
        the spliced backward path when :meth:`needs` asks for attention gradients)."""
        return AttentionCapture(model, grad=self.needs().attention_gradients)

    def compute(self, ctx: Context) -> Tensor:
        raise NotImplementedError

    def attend(self, model: nn.Module, x: Tensor, target: TargetSpec, region: Region) -> AttentionRun:
        """The method through the engine, as maps (B, K, *grid) with the logits, targets and task
        of its forward pass (the pre-0.2 entry point; :func:`explain` is the usual one)."""
        exp = _explain_attention(model, x, self, target, region)
        return AttentionRun(exp.raw, exp.logits, exp.targets, exp.task)


class AttentionGradientMethod(AttentionMethod):
    """An attention method that also reads each target score's gradient w.r.t. every captured
    attention matrix (gradient rollout, Chefer et al.)."""

    @classmethod
    def needs(cls) -> Needs:
        return Needs(attention=True, attention_gradients=True)


class MethodWrapper(Method):
    """A method around another one (like Captum's NoiseTunnel): :meth:`explain` calls the engine
    on the wrapped ``method`` (e.g. on augmented inputs) and combines the explanations.

    Options:
        method: the wrapped method, a name or a built :class:`Method`.
    """

    method: Any = None

    def validate(self) -> None:
        if self.method is None:
            raise MedlensError(f"{type(self).__name__} needs the method it wraps, e.g. method='gradcam'")
        self.method = get_method(self.method)

    def check_score(self, score: str) -> None:
        self.method.check_score(score)

    def explain(self, model: nn.Module, x: Tensor, target: TargetSpec, layer: str | Sequence[str] | None, region: Region) -> "Explanation":
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}

#: option flags of :func:`explain` that wrap the method, e.g. ``aug_smooth=True``
WRAPPERS: dict[str, type[MethodWrapper]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name`` (CLI and :func:`explain`)."""
    METHODS[cls.name] = cls
    return cls


def register_wrapper(flag: str) -> Callable[[type[MethodWrapper]], type[MethodWrapper]]:
    """Class decorator: ``explain(..., <flag>=True, **options)`` wraps the method in the class,
    which takes the options it declares (the rest go to the wrapped method)."""

    def decorate(cls: type[MethodWrapper]) -> type[MethodWrapper]:
        WRAPPERS[flag] = cls
        return cls

    return decorate


def method_class(method: str) -> type[Method]:
    """The registered class of a method name (case, ``-`` and ``_`` ignored)."""
    key = method.lower().replace("-", "").replace("_", "")
    for name, cls in METHODS.items():
        if name.replace("-", "").replace("_", "") == key:
            return cls
    close = difflib.get_close_matches(method, list(METHODS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise MedlensError(f"unknown method {method!r}{hint}; available: {', '.join(sorted(METHODS))}")


def get_method(method: str | Method, **options: Any) -> Method:
    """A built method: ``method`` itself if already built (then ``options`` must be empty), else
    the registered class of that name built with ``options`` (checked, see :mod:`medlens.core.options`)."""
    if isinstance(method, Method):
        if options:
            raise MedlensError(f"options {', '.join(sorted(options))} given with a built {method.name} method; pass them to its constructor")
        return method
    return method_class(method)(**options)


def options_for(method: str | Method, options: Mapping[str, Any], among: Sequence[str | Method] = ()) -> dict[str, Any]:
    """The options among ``options`` that ``method`` takes, for one set of options given to
    several methods (``medlens explain -m gradcam -m rollout --block 3``): strings are converted
    to the option's annotated type (see :func:`medlens.core.options.convert`); a name that
    neither ``method`` nor any method in ``among`` takes (nor a wrapper flag) is a MedlensError."""
    classes = [type(m) if isinstance(m, Method) else method_class(m) for m in [method, *among]]
    wrappers = [WRAPPERS[flag] for flag in WRAPPERS if options.get(flag)]
    known = set(WRAPPERS).union(*(option_names(c) for c in classes + wrappers))
    for key in options:
        if key not in known:
            check_names(classes[0], [key])  # raises, with the did-you-mean of the first method
    own = set(option_names(classes[0])).union(*(option_names(w) for w in wrappers), set(WRAPPERS))
    return {k: (coerce(classes[0], k, v) if k in option_names(classes[0]) else v) for k, v in options.items() if k in own}


def _wrapped(method: str | Method, options: dict[str, Any]) -> Method:
    """The method built from ``options``, inside the wrappers whose flags are set in them."""
    flags = [flag for flag in WRAPPERS if options.pop(flag, False)]
    for flag in WRAPPERS:
        options.pop(flag, None)
    own = [{k: options.pop(k) for k in option_names(WRAPPERS[f]) if k in options and k != "method"} for f in flags]
    algo = get_method(method, **options)
    for flag, kwargs in zip(flags, own):
        algo = WRAPPERS[flag](method=algo, **kwargs)
    return algo


def fuse_layer_maps(maps: Sequence[Tensor], size: Sequence[int], fusion: str = "mean") -> Tensor:
    """Fuse per-layer maps: each upsampled to ``size`` and normalised, then mean, max or product."""
    stacked = torch.stack([upsample_normalised(m, size) for m in maps])
    if fusion == "mean":
        return stacked.mean(0)
    if fusion == "max":
        return stacked.amax(0)
    if fusion in ("product", "prod"):
        return stacked.prod(0)
    raise MedlensError(f"unknown layer fusion {fusion!r}: use mean, max or product")


def target_gradients(
    logits: Tensor, targets: Tensor, inputs: Sequence[Tensor], names: Sequence[str], budget: int = 2**27
) -> list[Tensor]:
    """Gradient of each target's score w.r.t. each input, (B, K, *input.shape[1:]).

    Each image's score depends on its own sample only (eval mode), so one backward pass whose
    output gradient is one-hot at ``targets[:, k]`` yields every image's gradient for target k.
    The K passes are batched with ``is_grads_batched`` (vmap), in chunks of at most ``budget``
    gradient elements, falling back to a loop where an op has no batching rule.

    Args:
        logits: (B, N) scores, still attached to the graph.
        targets: (B, K) class indices.
        inputs: tensors in the graph (captured activations or the input).
        names: their names, for the error raised when no gradient reaches one.
    """
    batch, k = targets.shape
    per_target = batch * sum(t[0].numel() for t in inputs)
    chunk = max(1, budget // max(per_target, 1))
    one_hot = F.one_hot(targets.t(), logits.shape[1]).to(logits.dtype)  # (K, B, N)
    parts: list[list[Tensor]] = [[] for _ in inputs]
    for start in range(0, k, chunk):
        grad_out = one_hot[start : start + chunk]
        try:
            grads = torch.autograd.grad(logits, inputs, grad_outputs=grad_out if len(grad_out) > 1 else grad_out[0],
                                        retain_graph=True, allow_unused=True, is_grads_batched=len(grad_out) > 1)
            if len(grad_out) == 1:
                grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
        except RuntimeError:
            rows = [torch.autograd.grad(logits, inputs, grad_outputs=g, retain_graph=True, allow_unused=True) for g in grad_out]
            grads = tuple(None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(inputs)))
        for i, g in enumerate(grads):
            if g is None:
                raise MedlensError(f"no gradient reaches {names[i]!r} from the target score; choose a layer the output depends on")
            parts[i].append(g)
    return [(p[0] if len(p) == 1 else torch.cat(p)).transpose(0, 1) for p in parts]


#: gradient elements per chunk of targets (16 MiB of float32): small enough to stay in cache
TARGET_CHUNK_ELEMENTS = 2**22


def target_chunk(n_targets: int, inputs: Sequence[Tensor], budget: int | None = None) -> int:
    """How many targets' gradients w.r.t. ``inputs`` fit in ``budget`` elements (at least 1)."""
    budget = TARGET_CHUNK_ELEMENTS if budget is None else budget
    per_target = sum(t.numel() for t in inputs)
    return max(1, min(n_targets, budget // max(per_target, 1)))


def _as_model_dtype(model: nn.Module, x: Tensor) -> Tensor:
    """A floating input of another precision (float64, half) cast to the model's parameter dtype."""
    if isinstance(x, Tensor) and x.is_floating_point():
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        if param is not None and x.dtype != param.dtype:
            return x.to(param.dtype)
    return x


def check_input(model: nn.Module, x: Tensor) -> None:
    """Raise a one-line MedlensError for inputs the model cannot take."""
    if not isinstance(x, Tensor):
        raise MedlensError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4, 5):
        raise MedlensError(f"input has shape {tuple(x.shape)}; expected (B, C, H, W) or (B, C, D, H, W)")
    if not x.is_floating_point():
        raise MedlensError(f"input dtype is {x.dtype}; convert images to float")
    if x.shape[0] == 0:
        raise MedlensError(f"input batch is empty (shape {tuple(x.shape)}); pass at least one image")
    if any(s == 0 for s in x.shape[1:]):
        raise MedlensError(f"input has a zero-size axis (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise MedlensError("input contains NaN or Inf values")
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    if first is not None:
        dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(first)]
        if x.dim() - 2 != dims:
            raise MedlensError(f"model expects {dims}D inputs but got a {x.dim() - 2}D input of shape {tuple(x.shape)}")
        if x.shape[1] != first.in_channels:
            raise MedlensError(f"model expects {first.in_channels} input channel(s) but the input has {x.shape[1]}")


def _is_grid_of(sizes: Sequence[int], spatial: Sequence[int]) -> bool:
    """True when ``sizes`` is ``spatial`` downscaled by one factor per axis (within rounding)."""
    ratios = [s / a for s, a in zip(spatial, sizes) if a > 0]
    return len(ratios) == len(spatial) and min(ratios) >= 1 and max(ratios) <= 1.15 * min(ratios)


def _channels_last(act: Tensor, x: Tensor) -> bool:
    """A Swin-style (B, *grid, C) map rather than a (B, C, *grid) one."""
    return _is_grid_of(act.shape[1:-1], x.shape[2:]) and not _is_grid_of(act.shape[2:], x.shape[2:])


def _as_feature_maps(ctx: Context, model: nn.Module) -> None:
    """Reshape token activations (B, N, C) and their gradients (B, K, N, C) to (B, C, *grid)."""
    from medlens.core.tokens import tokens_to_grid

    for layer, act in ctx.activations.items():
        if act.dim() == ctx.x.dim() and not _channels_last(act, ctx.x):
            continue
        grid = tokens_to_grid(act, model, ctx.x)
        ctx.activations[layer] = grid
        if layer in ctx.gradients:
            g = ctx.gradients[layer]
            ctx.gradients[layer] = tokens_to_grid(g.flatten(0, 1), model, ctx.x).unflatten(0, g.shape[:2])


def explain(
    model: nn.Module,
    x: Tensor,
    method: str | Method = "gradcam",
    target: TargetSpec = "pred",
    layer: str | Sequence[str] | None = None,
    region: Region = None,
    score: str = "logit",
    **options: Any,
) -> Explanation:
    """Explain ``model``'s decision on ``x``.

    Args:
        model: any ``nn.Module`` (classifier with (B, N) output or segmentation network with
            (B, N, *S) output). Its modes, flags and hooks are left as they were.
        x: (B, C, H, W) or (B, C, D, H, W) float input on the model's device.
        method: a registered method name (see ``medlens.METHODS``) or a :class:`Method`.
        target: what to explain; see :func:`medlens.core.targets.resolve_targets`.
        layer: dotted module path(s) for layer methods; None picks the last spatial layer.
        region: for segmentation outputs, the mask or box whose mean logit is explained.
        score: a classifier's target score: ``"logit"`` (default), ``"probability"`` (softmax)
            or ``"log-probability"``, for every method (a forward hook applies it to every pass,
            see :func:`medlens.core.targets.scored`); segmentation keeps the region-pooled logit.
        **options: method options (e.g. ``fusion="product"`` for several layers).

    Returns:
        An :class:`Explanation` with maps (B, K, *S) in [0, 1] on the model's device.
    """
    x = _as_model_dtype(model, x)
    check_input(model, x)
    algo = _wrapped(method, dict(options))
    with scored(model, score) as kind:
        algo.check_score(kind)
        result = algo.explain(model, x, target, layer, region) if isinstance(algo, MethodWrapper) else _explain(model, x, algo, target, layer, region)
    if kind != "logit" and result.task == "classification":
        result.info["score"] = kind
    return result


#: from this many targets on, the engine tries the closed-form gradients of a GAP -> Linear head
CLOSED_FORM_FROM = 8


def _closed_form(model: nn.Module, needs: Needs, layers: list[str], activations: dict[str, Tensor], logits: Tensor,
                 targets: Tensor, grad_inputs: list[Tensor], grad_names: list[str], task: str) -> Callable[[Tensor], Tensor] | None:
    """Closed-form layer gradients for many targets (see :mod:`medlens.core.heads`) when the one
    layer feeds a provable GAP -> Linear head; None keeps the generic autograd path."""
    if (task != "classification" or len(layers) != 1 or len(grad_inputs) != 1 or needs.input_gradients
            or targets.shape[1] < CLOSED_FORM_FROM):
        return None
    first = target_gradients(logits, targets[:, :1], grad_inputs, grad_names)[0]
    return pooled_linear_gradients(model, activations[layers[0]], logits, first, targets[:, :1])


def _joined(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The methods' reports of each chunk of targets as one: (B, k, ...) tensors joined along the
    target dim, anything else taken from the first chunk."""
    out = dict(reports[0]) if reports else {}
    for key, value in out.items():
        if isinstance(value, Tensor) and len(reports) > 1:
            out[key] = torch.cat([r[key] for r in reports], dim=1)
    return out


def _task(output: Tensor, x: Tensor) -> str:
    return "segmentation" if is_segmentation_output(output, x) else "classification"


def _explain_attention(model: nn.Module, x: Tensor, algo: AttentionMethod, target: TargetSpec, region: Region) -> Explanation:
    """An attention method: one forward pass under its provider, then (if it needs them) the
    targets' gradients w.r.t. the captured attention, then its :meth:`compute`."""
    if type(algo).attend is not AttentionMethod.attend:  # deprecated: a method that runs its own pass
        with preserved_modes(model):
            run = algo.attend(model, x, target, region)
        maps = upsample_normalised(run.maps, x.shape[2:])
        return Explanation(maps, run.maps, run.targets, run.logits.gather(1, run.targets), run.logits, algo.name, [], run.task)
    needs = algo.needs()
    with preserved_modes(model):
        with algo.provider(model, x) as cap, torch.set_grad_enabled(needs.attention_gradients):
            output = model_output(model(x.detach().requires_grad_(True) if needs.attention_gradients else x))
            task = _task(output, x)
            algo.check(model, x, task)
            logits = pool_scores(output, x, region)
        targets = resolve_targets(target, logits.detach())
        grads = None
        if needs.attention_gradients:
            probs = cap.probs()
            grads = target_gradients(logits, targets, probs, [f"attention {i}" for i in range(len(probs))])
        logits = logits.detach()
        scores = logits.gather(1, targets)
        ctx = Context(model=model, x=x.detach(), targets=targets, scores=scores, logits=logits, layers=[], activations={},
                      gradients={}, input_gradients=None, region=region, task=task, attention=cap, attention_gradients=grads)
        raw = algo.compute(ctx)
    maps = upsample_normalised(raw, x.shape[2:])
    return Explanation(maps, raw, targets, scores, logits, algo.name, [], task, dict(ctx.info))


def _explain(model: nn.Module, x: Tensor, algo: Method, target: TargetSpec, layer: str | Sequence[str] | None, region: Region) -> Explanation:
    """:func:`explain` for a built method, inside the score hook: what is captured is what the
    method's contract (:meth:`Method.needs`) asks for."""
    if isinstance(algo, AttentionMethod):
        return _explain_attention(model, x, algo, target, region)
    needs = algo.needs()
    info: dict[str, Any] = {}
    layers: list[str] = []
    if needs.layers:
        if layer is None:
            layers = [auto_layer(model, x)]
            info["auto_layer"] = layers[0]
        else:
            layers = [layer] if isinstance(layer, str) else list(layer)
    layer_grads = needs.layer_gradients and bool(layers)
    with preserved_modes(model), LayerCapture(model, layers, grad_from_first=layer_grads and not needs.input_gradients) as cap:
        grad_mode = torch.is_grad_enabled()
        try:
            x_in = x.detach().requires_grad_(True) if needs.input_gradients else x
            torch.set_grad_enabled(needs.input_gradients)
            output = model_output(model(x_in))
            task = _task(output, x)
            algo.check(model, x, task)
            logits = pool_scores(output, x, region)
            targets = resolve_targets(target, logits.detach())
            scores = logits.detach().gather(1, targets)
            missing = [l for l in layers if l not in cap.activations]
            if missing:
                raise MedlensError(f"layer {missing[0]!r} was not called during the forward pass")
            grad_inputs = [cap.activations[l] for l in layers] if layer_grads else []
            grad_names = list(layers) if grad_inputs else []
            if needs.input_gradients:
                grad_inputs.append(x_in)
                grad_names.append("input")
            # layer-gradient methods run per chunk of targets: all 1000 classes never hold
            # 1000 full gradient tensors at once (and the chunk's buffers stay in cache)
            per_chunk = target_chunk(targets.shape[1], grad_inputs) if grad_inputs and not needs.input_gradients else targets.shape[1]
        finally:
            torch.set_grad_enabled(grad_mode)
        activations = {l: cap.activations[l].detach() for l in layers}
        cap.close()
        closed = _closed_form(model, needs, layers, activations, logits, targets, grad_inputs, grad_names, task)
        if closed is not None:
            info["closed_form_gradients"] = True
        raws: list[Tensor] = []
        reports: list[dict[str, Any]] = []
        for start in range(0, targets.shape[1], per_chunk):
            part = slice(start, start + per_chunk)
            if closed is not None:
                grads = [closed(targets[:, part])]
            else:
                grads = target_gradients(logits, targets[:, part], grad_inputs, grad_names) if grad_inputs else []
            ctx = Context(
                model=model,
                x=x.detach(),
                targets=targets[:, part],
                scores=scores[:, part].detach(),
                logits=logits.detach(),
                layers=layers,
                activations=dict(activations),
                gradients=dict(zip(layers, grads[: len(layers)])) if layer_grads else {},
                input_gradients=grads[-1] if needs.input_gradients else None,
                region=region,
                task=task,
            )
            _as_feature_maps(ctx, model)
            raws.append(algo.compute(ctx))
            reports.append(ctx.info)
        raw = raws[0] if len(raws) == 1 else torch.cat(raws, dim=1)
        info.update(_joined(reports))
    maps = upsample_normalised(raw, x.shape[2:])
    return Explanation(maps, raw, targets, scores.detach(), logits.detach(), algo.name, layers, task, info)
