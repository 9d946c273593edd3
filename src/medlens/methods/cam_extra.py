"""More class activation maps, each written to agree with a reference implementation:

* from pytorch-grad-cam 1.5.7: FullGrad, KPCA-CAM, Shapley-CAM, Finer-CAM, FEM, Random-CAM;
* from TorchCAM 0.5: SS-CAM, IS-CAM, Smooth Grad-CAM++.

All formulas work on 2D and 3D feature maps. Methods that need more than the engine's one
forward pass and first-order gradients (second derivatives, gradients of another score, noisy
inputs, every bias layer) run their own passes through :func:`layer_pass`, whose hooks live in
a :class:`~medlens.core.capture.LayerCapture` and are removed on exit. Random draws come from a
``torch.Generator`` seeded by the ``seed`` option and are shared by the images of a batch, so a
batch gives exactly the maps of its images explained one by one.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.core.capture import LayerCapture
from medlens.core.engine import ActivationMethod, Context, InputMethod, method_class, register, target_gradients
from medlens.core.options import check_choice, require
from medlens.core.resample import upsample
from medlens.core.targets import model_output, pool_scores
from medlens.errors import MedlensError
from medlens.methods.cam import ChannelOptions, weighted_cam
from medlens.methods.perturbation import ScoreCAM, _chunk, _copy_scores, _scatter_weights, select_channels
from medlens.methods.smoothing import agreeing_sign

__all__ = ["FEM", "FinerCAM", "FullGrad", "ISCAM", "KPCACAM", "RandomCAM", "SSCAM", "ShapleyCAM", "SmoothGradCAMpp",
           "bias_layers", "kernel_pca_projection", "layer_pass"]


def _space(t: Tensor, lead: int) -> tuple[int, ...]:
    return tuple(range(lead, t.dim()))


def _per_channel(t: Tensor, lead: int) -> tuple[int, ...]:
    """The view shape that broadcasts a (B, K, C) or (B, C) tensor over ``lead`` + spatial dims."""
    return (*t.shape, *([1] * (lead - t.dim())))


def layer_pass(ctx: Context, layer: str, x: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """One forward pass of ``x`` (B, C_in, *S) recording ``layer``: its activation (B, C, *s),
    a leaf of the graph (nothing is spent on the layers before it), and the pooled scores (B, N)
    attached to the graph. The hook is removed on exit."""
    with LayerCapture(ctx.model, [layer], grad_from_first=True) as cap:
        mode = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)
            output = ctx.model(x)
            logits = pool_scores(model_output(output), x, ctx.region) if layer in cap.activations else None
        finally:
            torch.set_grad_enabled(mode)
    if logits is None:
        raise MedlensError(f"layer {layer!r} was not called during the forward pass")
    act = cap.activations[layer]
    if act.dim() != x.dim():
        raise MedlensError(f"{method} needs a convolutional (B, C, *spatial) feature map at {layer!r}, not tokens")
    return act, logits


def _vjp(logits: Tensor, inputs: Tensor, cotangents: Tensor) -> Tensor:
    """Gradients (B, K, *inputs.shape[1:]) of the K scores sum_n cot[b, k, n] logits[b, n]."""
    cot = cotangents.transpose(0, 1).to(logits.dtype)  # (K, B, N)
    if cot.shape[0] == 1:
        return torch.autograd.grad(logits, inputs, grad_outputs=cot[0], retain_graph=True)[0].unsqueeze(1)
    try:
        grads = torch.autograd.grad(logits, inputs, grad_outputs=cot, retain_graph=True, is_grads_batched=True)[0]
    except RuntimeError:  # an op without a batching rule
        grads = torch.stack([torch.autograd.grad(logits, inputs, grad_outputs=c, retain_graph=True)[0] for c in cot])
    return grads.transpose(0, 1)


def _class_agnostic(cam: Tensor, ctx: Context) -> Tensor:
    """(B, *s) -> (B, K, *s): the same map for every target."""
    return cam.unsqueeze(1).expand(-1, ctx.targets.shape[1], *cam.shape[1:])


# ----------------------------------------------------------------------------- FullGrad


def bias_layers(model: nn.Module, dims: int) -> list[tuple[str, Tensor]]:
    """(name, bias (C,)) of every ``dims``-D convolution with a bias and every affine batch norm
    with running statistics, in module order. A batch norm's bias is the one it adds in eval
    mode: beta - mu gamma / sqrt(var + eps) (FullGrad's "implicit" bias)."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    out = []
    for name, module in model.named_modules():
        if type(module) is conv and module.bias is not None:
            out.append((name, module.bias.detach()))
        elif type(module) is norm and module.bias is not None and module.running_mean is not None:
            scale = module.weight.detach() / torch.sqrt(module.running_var + module.eps)
            out.append((name, module.bias.detach() - module.running_mean * scale))
    return out


def channel_normalised_sum(maps: Tensor) -> Tensor:
    """sum_c of the per-channel maps (B, K, C, *s), each min-max normalised over its positions
    first (pytorch-grad-cam's ``scale_accross_batch_and_channels``, eps 1e-7) -> (B, K, *s)."""
    space = _space(maps, 3)
    shifted = maps - maps.amin(dim=space, keepdim=True)
    return (shifted / (shifted.amax(dim=space, keepdim=True) + 1e-7)).sum(dim=2)


@register
class FullGrad(InputMethod):
    """FullGrad (Srinivas & Fleuret, NeurIPS 2019), as pytorch-grad-cam computes it:
    M = psi(|x * dY/dx|) + sum_l psi(|b_l * dY/dz_l|), with z_l the output of every convolution
    or batch norm with a bias b_l, psi normalising each channel to [0, 1], upsampling it to the
    input and summing over channels.

    Every bias layer is needed, so the method runs its own forward and backward pass over the
    whole network (hooks on all those layers, removed on exit); no layer is chosen.
    """

    name = "fullgrad"

    def compute(self, ctx: Context) -> Tensor:
        model, x = ctx.model, ctx.x
        layers = bias_layers(model, x.dim() - 2)
        if not layers:
            raise MedlensError(f"fullgrad needs {x.dim() - 2}D convolutions or batch norms with biases; {type(model).__name__} has none")
        names = [name for name, _ in layers]
        x_in = x.detach().requires_grad_(True)
        with LayerCapture(model, names) as cap, torch.enable_grad():
            logits = pool_scores(model_output(model(x_in)), x_in, ctx.region)
        called = [(name, bias) for name, bias in layers if name in cap.activations]
        grads = target_gradients(logits, ctx.targets, [x_in, *(cap.activations[n] for n, _ in called)], ["input", *(n for n, _ in called)])
        total = channel_normalised_sum((x_in.detach().unsqueeze(1) * grads[0]).abs())
        for (_, bias), grad in zip(called, grads[1:]):
            contribution = (bias.to(grad.dtype).view(1, 1, -1, *([1] * (grad.dim() - 3))) * grad).abs()
            total = total + upsample(channel_normalised_sum(contribution), x.shape[2:]).to(total.dtype)
        return total


# ----------------------------------------------------------------------------- KPCA-CAM

#: kernels of KPCA-CAM (scikit-learn's names and defaults: poly degree 3, coef0 1)
KERNELS = ("linear", "poly", "rbf", "sigmoid", "cosine")


def kernel_matrix(features: Tensor, kernel: str, gamma: float | None, degree: int, coef0: float) -> Tensor:
    """(B, n, n) kernel between the rows of ``features`` (B, n, C); gamma None means 1 / C."""
    gamma = 1.0 / features.shape[-1] if gamma is None else float(gamma)
    dot = features @ features.transpose(1, 2)
    if kernel == "linear":
        return dot
    if kernel == "poly":
        return (gamma * dot + coef0) ** degree
    if kernel == "sigmoid":
        return torch.tanh(gamma * dot + coef0)
    if kernel == "rbf":
        sq = features.pow(2).sum(-1)
        return torch.exp(-gamma * (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * dot).clamp_min(0))
    norms = features.norm(dim=-1).clamp_min(1e-12)
    return dot / (norms.unsqueeze(2) * norms.unsqueeze(1))


def kernel_pca_projection(activation: Tensor, kernel: str = "sigmoid", gamma: float | None = None,
                          degree: int = 3, coef0: float = 1.0) -> Tensor:
    """First kernel principal component of the positions' channel vectors, per image.

    The (n, C) matrix of an image's n positions is centred over positions, its kernel matrix K
    double-centred, and each position gets sqrt(lambda_1) v_1 (scikit-learn's
    ``KernelPCA(n_components=1).fit_transform``). The sign is fixed so that the map correlates
    positively with the channel sum, as for Eigen-CAM.

    Args:
        activation: (B, C, *s).
    Returns:
        (B, *s) projection, not rectified.
    """
    spatial = activation.shape[2:]
    feats = activation.flatten(2).transpose(1, 2).double()  # (B, n, C)
    feats = torch.nan_to_num(feats) - torch.nan_to_num(feats).mean(dim=1, keepdim=True)
    gram = kernel_matrix(feats, kernel, gamma, degree, coef0)
    gram = gram - gram.mean(1, keepdim=True) - gram.mean(2, keepdim=True) + gram.mean((1, 2), keepdim=True)
    values, vectors = torch.linalg.eigh(gram)
    projection = vectors[..., -1] * values[..., -1:].clamp_min(0).sqrt()  # (B, n)
    projection = projection * agreeing_sign(projection, activation.flatten(2).sum(1).double()).view(-1, 1)
    return projection.view(-1, *spatial).to(activation.dtype)


@register
class KPCACAM(ActivationMethod):
    """KPCA-CAM (Karmani et al., 2024, arXiv:2410.00267): Eigen-CAM with kernel PCA, the first
    kernel principal component of the activations' channel vectors, rectified. Class-agnostic.

    Options:
        kernel: linear, poly, rbf, sigmoid (default) or cosine; gamma: kernel coefficient
            (None: 1 / channels); degree (3) and coef0 (1.0) of the poly / sigmoid kernels.
    """

    name = "kpcacam"
    kernel: str = "sigmoid"
    gamma: float | None = None
    degree: int = 3
    coef0: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_choice(self.name, "kernel", self.kernel, KERNELS)
        require(self.gamma is None or self.gamma > 0, self.name, "gamma", self.gamma, "must be positive or None")
        require(self.degree >= 1, self.name, "degree", self.degree, "must be at least 1")

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        cam = kernel_pca_projection(activation, self.kernel, self.gamma, self.degree, self.coef0)
        return _class_agnostic(F.relu(cam), ctx)


# ----------------------------------------------------------------------------- FEM


@register
class FEM(ActivationMethod):
    """FEM, the Feature Explanation Method (Fuad et al., IPTA 2020): channel weights
    w_c = fraction of positions where A_c > mean(A_c) + k std(A_c) (the k-sigma rule),
    map ReLU(sum_c w_c A_c). Gradient-free and class-agnostic.

    Options:
        k (float, 2.0): the threshold in standard deviations.
    """

    name = "fem"
    k: float = 2.0

    def validate(self) -> None:
        super().validate()
        require(math.isfinite(self.k), self.name, "k", self.k, "must be finite")

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        space = _space(activation, 2)
        std, mean = torch.std_mean(activation, dim=space, correction=0, keepdim=True)
        weights = (activation > mean + self.k * std).to(activation.dtype).mean(dim=space)  # (B, C)
        return _class_agnostic(F.relu(torch.einsum("bc,bc...->b...", weights, activation)), ctx)


# ----------------------------------------------------------------------------- Random-CAM


@register
class RandomCAM(ChannelOptions, ActivationMethod):
    """Random-CAM (pytorch-grad-cam's RandomCAM), a sanity-check baseline: channel weights drawn
    uniformly from [-1, 1], map ReLU(sum_c w_c A_c). A method that does not beat it on a metric
    is not explaining anything. The draws (one per target and channel, shared by the images of
    a batch) come from ``seed``.
    """

    name = "randomcam"
    seed: int = 0

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        generator = torch.Generator(device=activation.device).manual_seed(self.seed)
        draws = torch.rand((ctx.targets.shape[1], activation.shape[1]), generator=generator, device=activation.device)
        weights = (2 * draws - 1).to(activation.dtype).expand(activation.shape[0], -1, -1)  # (B, K, C)
        return weighted_cam(weights, activation, self.options)


# ----------------------------------------------------------------------------- Shapley-CAM


@register
class ShapleyCAM(ChannelOptions, ActivationMethod):
    """Shapley-CAM (Cai, 2025, arXiv:2501.06261): channel weights from a second-order Taylor
    expansion of the score, w_c = mean_s (g - H A / 2)_c(s), with g the gradient and H A the
    Hessian-vector product of the target score with respect to the activation A, map
    ReLU(sum_c w_c A_c). For a piecewise-linear network and a logit score H = 0 and the map is
    Grad-CAM's; with ``score="probability"`` (the paper's choice) the term matters.

    The second derivative needs the graph of the first, so the method runs its own forward
    pass (one double backward per target).
    """

    name = "shapleycam"

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        act, logits = layer_pass(ctx, layer, ctx.x, self.name)
        scores = logits.gather(1, ctx.targets)
        weights = []
        with torch.enable_grad():
            for k in range(scores.shape[1]):
                grad = torch.autograd.grad(scores[:, k].sum(), act, retain_graph=True, create_graph=True)[0]
                hvp = torch.zeros_like(grad)
                if grad.requires_grad:
                    second = torch.autograd.grad(grad, act, grad_outputs=act.detach(), retain_graph=True, allow_unused=True)[0]
                    hvp = hvp if second is None else second
                weights.append((grad - 0.5 * hvp).detach().mean(dim=_space(act, 2)))
        return weighted_cam(torch.stack(weights, dim=1), act.detach(), self.options)


# ----------------------------------------------------------------------------- Finer-CAM

#: the gradient CAMs Finer-CAM can build on
FINER_BASES = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "gradcam-elementwise")


def finer_cotangents(logits: Tensor, targets: Tensor, ranks: tuple[int, ...], alpha: float) -> Tensor:
    """dS/dy (B, K, N) of Finer-CAM's score for each target t:
    S = sum_j p_j (y_t - alpha y_j) / (sum_j p_j + 1e-9), p = softmax(y), over the classes j
    at ``ranks`` (1 = the most similar) when the classes are sorted by |y - y_t|."""
    batch, n_classes = logits.shape
    y = logits.detach().unsqueeze(1).repeat(1, targets.shape[1], 1).requires_grad_(True)  # (B, K, N)
    with torch.enable_grad():
        main = y.gather(2, targets.unsqueeze(2))  # (B, K, 1)
        distance = (y.detach() - main.detach()).abs().scatter(2, targets.unsqueeze(2), -1.0)  # the target ranks first
        order = distance.argsort(dim=2)
        picked = order[..., [r for r in ranks if r < n_classes]]  # (B, K, J)
        prob = torch.softmax(y, dim=2).gather(2, picked)
        score = (prob * (main - alpha * y.gather(2, picked))).sum(2) / (prob.sum(2) + 1e-9)
        return torch.autograd.grad(score.sum(), y)[0]


@register
class FinerCAM(ChannelOptions, ActivationMethod):
    """Finer-CAM (Zhang et al., CVPR 2025, arXiv:2501.11309): a base CAM (Grad-CAM by default)
    of the target's score against its most similar classes, S = sum_j p_j (y_t - alpha y_j) /
    sum_j p_j, with j the classes whose logits are closest to the target's (``comparisons``:
    their ranks, 1 = closest) and p the softmax probabilities. What separates the target from
    its look-alikes stays; what they share cancels.

    The gradient of S is not one of the per-class gradients the engine takes, so the method runs
    its own forward pass and one backward pass per target.

    Options:
        base: gradcam (default), gradcam++, xgradcam, hirescam, layercam, gradcam-elementwise.
        alpha (float, 1.0): strength of the comparison; 0 gives the base CAM of a p-weighted y_t.
        comparisons (tuple of ints, (1, 2, 3)): ranks of the compared classes.
    """

    name = "finercam"
    base: str = "gradcam"
    alpha: float = 1.0
    comparisons: tuple[int, ...] = (1, 2, 3)

    def validate(self) -> None:
        super().validate()
        check_choice(self.name, "base", self.base, FINER_BASES)
        ok = len(self.comparisons) > 0 and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.comparisons)
        require(ok, self.name, "comparisons", self.comparisons, "must be ranks >= 1, e.g. (1, 2, 3)")
        self.comparisons = tuple(self.comparisons)

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        if ctx.logits.shape[1] < 2:
            raise MedlensError("finercam compares the target with other classes; the model has one output")
        act, logits = layer_pass(ctx, layer, ctx.x, self.name)
        cotangents = finer_cotangents(logits, ctx.targets, self.comparisons, float(self.alpha))
        grad = _vjp(logits, act, cotangents)
        base = method_class(self.base)(top_k_channels=self.top_k_channels, eigen_smooth=self.eigen_smooth)
        return base.layer_map(act.detach(), grad, ctx, layer)


# ----------------------------------------------------------------------------- SS-CAM, IS-CAM


def channel_normalised(activation: Tensor) -> Tensor:
    """Each channel of (B, C, *s) min-max normalised over its positions (TorchCAM, eps 1e-8)."""
    space = _space(activation, 2)
    shifted = activation - activation.amin(dim=space, keepdim=True)
    return shifted / (shifted.amax(dim=space, keepdim=True) + 1e-8)


def _gather_channels(maps: Tensor, index: Tensor) -> Tensor:
    """maps (B, C, *s), index (B, c) -> (B, c, *s)."""
    return maps.gather(1, index.view(*index.shape, *([1] * (maps.dim() - 2))).expand(-1, -1, *maps.shape[2:]))


def _masked(x: Tensor, masks: Tensor) -> Tensor:
    """x (B, C_in, *S) times masks (B, c, *S) -> (B * c, C_in, *S), image-major."""
    return (x.unsqueeze(1) * masks.unsqueeze(2)).flatten(0, 1)


def _score_weights(logit: Tensor, live: Tensor) -> Tensor:
    """softmax over the channels (dim 1) of (B, n, K) scores, ignoring the entries not ``live``."""
    return torch.softmax(torch.where(live.unsqueeze(2), logit, torch.full_like(logit, -math.inf)), dim=1)


@dataclasses.dataclass
class _Samples:
    """Option ``num_samples`` (at least 1) of a method that averages over samples (mixed in
    first; a dataclass, so the option is one of the method's fields)."""

    num_samples: int = 10

    def validate(self) -> None:
        super().validate()
        require(self.num_samples >= 1, self.name, "num_samples", self.num_samples, "must be at least 1")


@dataclasses.dataclass
class _NoiseSamples(_Samples):
    """Options ``std`` (>= 0) and ``seed`` of the Gaussian noise drawn for each sample."""

    std: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        require(self.std >= 0, self.name, "std", self.std, "must be >= 0")


@register
class SSCAM(_NoiseSamples, ScoreCAM):
    """SS-CAM (Wang et al., 2020, arXiv:2006.14255), as TorchCAM computes it: Score-CAM whose
    masks get Gaussian noise, w_c = softmax_c(mean_i Y(X * (H_c + delta_i))), delta_i ~ N(0, std^2)
    at input resolution, H_c the channel map normalised to [0, 1] at the layer and upsampled;
    map ReLU(sum_c w_c A_c). ``num_samples`` x channels forward passes per image.

    Options (besides Score-CAM's batch_size, top_k_channels, eigen_smooth):
        num_samples (int, 35), std (float, 2.0), seed (int, 0): the noise, drawn per sample for
        all channels in TorchCAM's order (with torch.manual_seed(seed), TorchCAM draws the same
        noise for one image), shared by the images of a batch.
    """

    name = "sscam"
    num_samples: int = 35
    std: float = 2.0

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        x = ctx.x
        batch, n_channels = activation.shape[:2]
        if self.top_k_channels:
            channels, live = select_channels(activation, self.top_k_channels)
        else:  # noise makes even an all-zero channel's mask informative: all of them
            channels = torch.arange(n_channels, device=x.device).expand(batch, -1)
            live = torch.ones_like(channels, dtype=torch.bool)
        norm = channel_normalised(activation)
        per_pass = _chunk(self.batch_size, batch)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        total = x.new_zeros(batch, channels.shape[1], ctx.targets.shape[1])
        for _ in range(self.num_samples):
            noise = torch.randn((n_channels, *x.shape[2:]), generator=generator, device=x.device, dtype=x.dtype) * self.std
            for start in range(0, channels.shape[1], per_pass):
                idx = channels[:, start : start + per_pass]
                masks = upsample(_gather_channels(norm, idx), x.shape[2:]).to(x.dtype) + noise[idx]
                total[:, start : start + idx.shape[1]] += _copy_scores(ctx, _masked(x, masks))
        weights = _score_weights(total / self.num_samples, live)
        return weighted_cam(_scatter_weights(weights, channels, live, n_channels), activation, self.options)


@register
class ISCAM(_Samples, ScoreCAM):
    """IS-CAM (Naidu et al., 2020, arXiv:2010.03023), as TorchCAM computes it: Score-CAM with the
    masked input integrated along a path, w_c = softmax_c(mean_i Y(a_i X * H_c)) with
    a_i = sum_{j<=i} j / N, i = 1..N (TorchCAM's running coefficient), H_c the channel map
    normalised at the layer and upsampled; map ReLU(sum_c w_c A_c). All-zero channels mask the
    input to zero at every step: one pass of the zero image scores them all (as in Score-CAM).

    Options (besides Score-CAM's batch_size, top_k_channels, eigen_smooth):
        num_samples (int, 10): integration steps.
    """

    name = "iscam"

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        x = ctx.x
        batch, n_channels = activation.shape[:2]
        channels, live = select_channels(activation, self.top_k_channels)
        norm = channel_normalised(activation)
        steps = torch.arange(1, self.num_samples + 1, dtype=torch.float64) / self.num_samples
        coefficients = steps.cumsum(0).tolist()
        per_pass = _chunk(self.batch_size, batch)
        parts = []
        for start in range(0, channels.shape[1], per_pass):
            masked = _masked(x, upsample(_gather_channels(norm, channels[:, start : start + per_pass]), x.shape[2:]).to(x.dtype))
            parts.append(sum(_copy_scores(ctx, a * masked) for a in coefficients))
        logit = torch.cat(parts, dim=1) / self.num_samples  # (B, n, K)
        return self._softmax_cam(logit, live, channels, n_channels, activation, ctx)


# ----------------------------------------------------------------------------- Smooth Grad-CAM++


@register
class SmoothGradCAMpp(_NoiseSamples, ActivationMethod):
    """Smooth Grad-CAM++ (Omeiza et al., 2019, arXiv:1908.01224), as TorchCAM computes it: the
    gradients g_i of ``num_samples`` noisy copies X + N(0, std^2) give the averages
    D2 = mean_i g_i^2 and D3 = mean_i g_i^3, alpha = D2 / (2 D2 + sum_s A(s) D3(s) + 1e-8) with
    A the clean activation, w_c = sum_s alpha_c(s) ReLU(g_c(s)), map ReLU(sum_c w_c A'_c). As in
    TorchCAM, g and A' in the last two terms are those of the last noisy pass.

    Runs its own ``num_samples`` forward and backward passes.

    Options:
        num_samples (int, 4), std (float, 0.3), seed (int, 0): the input noise, drawn per sample
        in TorchCAM's order (with torch.manual_seed(seed) TorchCAM draws the same for one image)
        and shared by the images of a batch.
    """

    name = "smoothgradcampp"
    num_samples: int = 4
    std: float = 0.3

    def layer_map(self, activation: Tensor, gradient: Tensor | None, ctx: Context, layer: str) -> Tensor:
        x = ctx.x
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        d2 = d3 = 0.0
        for _ in range(self.num_samples):
            noisy = x + torch.randn(x.shape[1:], generator=generator, device=x.device, dtype=x.dtype) * self.std
            act, logits = layer_pass(ctx, layer, noisy, self.name)
            grad = target_gradients(logits, ctx.targets, [act], [layer])[0].detach()  # (B, K, C, *s)
            d2, d3 = d2 + grad.pow(2), d3 + grad.pow(3)
        d2, d3 = d2 / self.num_samples, d3 / self.num_samples
        spread = (d3 * activation.unsqueeze(1)).sum(dim=_space(d3, 3))  # (B, K, C)
        alpha = d2 / (2 * d2 + spread.view(_per_channel(spread, d2.dim())) + 1e-8)
        weights = (alpha * F.relu(grad)).sum(dim=_space(grad, 3))
        return F.relu(torch.einsum("bkc,bc...->bk...", weights, act.detach()))
