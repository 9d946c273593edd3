"""The demo behind ``make demo``: train, explain, evaluate and report on synthetic phantoms.

Everything runs from nothing on a CPU in about a minute: phantoms with known lesions are
generated (:mod:`medlens.data.phantoms`), a small CNN learns to tell a round lesion from an elongated
one, every applicable registered method explains the held-out phantoms, and each map is scored
against the lesion masks (pointing game, energy pointing game, AUROC), for faithfulness
(deletion/insertion) and with the model randomisation sanity check. The result is a
self-contained ``report.html``, a ``results.csv``, the trained weights and the held-out phantoms
on disk, so ``medlens explain`` can be tried on them next.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medlens.core.engine import METHODS, explain
from medlens.errors import MedlensError
from medlens.io.atomic import write_text
from medlens.metrics.faithfulness import faithfulness_metrics
from medlens.metrics.localisation import auroc, energy_pointing_game, pointing_game
from medlens.models.phantom import PhantomNet, phantom_net  # noqa: F401  (phantom_net: the demo's model spec)
from medlens.data.phantoms import PhantomSet, make_phantoms, write_phantoms

__all__ = ["DemoConfig", "DemoResult", "run_demo", "train_classifier"]

def train_classifier(
    model: nn.Module, images: Tensor, labels: Tensor, epochs: int = 8, batch_size: int = 32,
    lr: float = 3e-3, seed: int = 0, progress: bool = True,
) -> list[float]:
    """Train ``model`` with Adam and a one-cycle schedule; returns the mean loss per epoch.

    Images are (N, C, *S) on the model's device; flips along every spatial axis augment them
    (the phantom's class does not depend on orientation).
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(epochs), desc="training", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(labels), generator=gen).to(labels.device)
        total = 0.0
        for start in range(0, len(labels), batch_size):
            idx = order[start : start + batch_size]
            x = images[idx]
            for axis in range(2, x.dim()):
                if torch.rand(1, generator=gen).item() < 0.5:
                    x = x.flip(axis)
            loss = F.cross_entropy(model(x), labels[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(idx)
        losses.append(total / len(labels))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@dataclass
class DemoConfig:
    """What the demo does. The defaults take well under 90 s on two CPU cores; ``full=True`` (every
    registered method that applies) takes a few minutes."""

    n: int = 600
    size: int = 64
    dims: int = 2
    test_fraction: float = 0.2
    epochs: int = 8
    methods: Sequence[str] | None = None  # None: DEFAULT_METHODS, or every registered method with full
    full: bool = False
    sanity_images: int = 8
    shown: int = 4
    seed: int = 0
    device: str = "cpu"


@dataclass
class DemoResult:
    """Rows (one per method, in the order run) of mean metrics and timings, plus what was written.

    ``ranked``: the rows best energy pointing game first, as every table shows them. ``maps_computed``: every map the demo computed (images x targets over all explain calls),
    the sanity check's maps of the randomised model included.
    """

    accuracy: float
    rows: list[dict[str, Any]]
    skipped: dict[str, str]
    files: list[Path] = field(default_factory=list)
    train_seconds: float = 0.0
    maps_computed: int = 0
    seconds: float = 0.0

    @property
    def ranked(self) -> list[dict[str, Any]]:
        return sort_rows(self.rows)


#: the default comparison, about a minute on a CPU: CAM methods (gradcam, gradcam++, layercam, eigencam),
#: gradients (saliency, inputxgradient), path and noise averages (integrated-gradients, smoothgrad), the
#: guided methods Adebayo et al. (2018) warn about (guided-backprop, guided-gradcam) and one perturbation
#: method (occlusion); ``--full`` runs every registered method that applies (rise, scorecam, shapley-sampling...)
DEFAULT_METHODS = ("gradcam", "gradcam++", "layercam", "eigencam", "guided-gradcam", "saliency", "inputxgradient",
                   "integrated-gradients", "smoothgrad", "guided-backprop", "occlusion")

#: lighter settings for the sampling methods, so the demo stays about a minute on a CPU
DEMO_OPTIONS: dict[str, dict[str, Any]] = {
    "rise": {"n_masks": 250}, "smoothgrad": {"samples": 16}, "integrated-gradients": {"steps": 16},
    "smoothgrad-sq": {"samples": 16}, "vargrad": {"samples": 16}, "gradient-shap": {"samples": 16},
}

#: which way is better, per numeric column of the results table (the sanity correlation: closest to 0,
#: i.e. lowest in absolute value: the maps of the re-initialised model are unrelated to the trained one's)
HIGHER_IS_BETTER = {"pointing_game": True, "energy_pointing_game": True, "auroc": True, "deletion_auc": False,
                    "insertion_auc": True, "sanity_spearman": False, "ms_per_image": False}
_ABSOLUTE = {"sanity_spearman"}


def _goodness(column: str, value: float) -> float:
    """A value to maximise for ``column``."""
    value = abs(value) if column in _ABSOLUTE else value
    return value if HIGHER_IS_BETTER[column] else -value


class _Counter:
    """Counts the maps (images x targets) the demo computes."""

    def __init__(self) -> None:
        self.maps = 0

    def explain(self, model: nn.Module, x: Tensor, method: str, **kwargs: Any):
        result = explain(model, x, method, **DEMO_OPTIONS.get(method, {}), **kwargs)
        self.maps += result.maps.shape[0] * result.maps.shape[1]
        return result


def applicable_methods(model: nn.Module, x: Tensor, names: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Which methods run on ``model``: tried on two images; the others with the reason they refuse."""
    chosen, skipped = [], {}
    for name in names or sorted(METHODS):
        try:
            explain(model, x[:2], name, **DEMO_OPTIONS.get(name, {}))
            chosen.append(name)
        except MedlensError as error:
            skipped[name] = str(error)
    return chosen, skipped


def _timed_explain(counter: _Counter, model: nn.Module, x: Tensor, labels: Tensor, method: str, batch_size: int) -> tuple[Tensor, float]:
    """(N, *S) maps of ``method`` for the true labels, batch by batch, and the seconds taken.
    A method that does not apply raises :class:`MedlensError` on the first batch, before any work is wasted."""
    start = time.perf_counter()
    maps = torch.cat([
        counter.explain(model, x[i : i + batch_size], method, target=labels[i : i + batch_size, None]).maps[:, 0]
        for i in range(0, len(x), batch_size)
    ])
    return maps, time.perf_counter() - start


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every parameterised block re-initialised: the end of Adebayo et al.'s
    cascading randomisation (2018), built once and shared by every method's sanity check."""
    from medlens.metrics.sanity import _randomise, randomisation_units

    twin = copy.deepcopy(model)
    modules = dict(twin.named_modules())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in randomisation_units(twin)[::-1]:
            _randomise(modules[name], own_only=name == "")
    return twin.eval()


def score_method(
    model: nn.Module, test: PhantomSet, method: str, batch_size: int, sanity_images: int,
    randomised: nn.Module | None = None, counter: _Counter | None = None,
) -> tuple[dict[str, Any], Tensor]:
    """Explain ``test`` for its true labels with ``method`` once and score those maps; returns (row, maps).

    Sanity: Spearman correlation of the first ``sanity_images`` maps with the same method's maps of
    ``randomised`` (the whole model re-initialised; default :func:`randomised_copy`), the only maps
    computed twice. Raises :class:`MedlensError` when the method does not apply.
    """
    from medlens.metrics.sanity import spearman

    counter = counter or _Counter()
    maps, seconds = _timed_explain(counter, model, test.images, test.labels, method, batch_size)
    masks = test.masks[:, 0]
    faith, _ = faithfulness_metrics(model, test.images, maps, test.labels, steps=10, batch_size=128, with_road=False)
    k = min(sanity_images, len(test))
    twin = randomised if randomised is not None else randomised_copy(model)
    after = counter.explain(twin, test.images[:k], method, target=test.labels[:k, None]).maps[:, 0]
    rho = float(spearman(maps[:k], after).mean())
    row = {
        "method": method,
        "pointing_game": float(pointing_game(maps, masks).float().mean()),
        "energy_pointing_game": float(energy_pointing_game(maps, masks).mean()),
        "auroc": float(auroc(maps, masks).nanmean()),
        "deletion_auc": float(faith["deletion_auc"].mean()),
        "insertion_auc": float(faith["insertion_auc"].mean()),
        "sanity_spearman": rho,
        "sanity": "fails" if rho > 0.5 else "passes",
        "ms_per_image": 1000 * seconds / len(test),
    }
    return row, maps


COLUMNS = ("method", "pointing_game", "energy_pointing_game", "auroc", "deletion_auc", "insertion_auc",
           "sanity_spearman", "sanity", "ms_per_image")


def sort_rows(rows: Sequence[dict[str, Any]], key: str = "energy_pointing_game") -> list[dict[str, Any]]:
    """Rows best first by ``key`` (then by method name, so ties keep a stable order)."""
    return sorted(rows, key=lambda r: (-_goodness(key, r[key]), r["method"]))


def best_per_column(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The best value of each numeric column (see :data:`HIGHER_IS_BETTER`); columns that are all NaN,
    or where every row shows the same value (nothing to tell apart), are left out."""
    best = {}
    for column, higher in HIGHER_IS_BETTER.items():
        values = [r[column] for r in rows if column in r and not math.isnan(r[column])]
        if values and (len(rows) == 1 or len({f"{v:.3g}" for v in values}) > 1):
            best[column] = max(values, key=lambda v: _goodness(column, v))
    return best


def _is_best(row: dict[str, Any], column: str, best: dict[str, float]) -> bool:
    return column in best and not math.isnan(row[column]) and f"{row[column]:.3g}" == f"{best[column]:.3g}"


def results_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table, in the rows' order, the best value of each column in bold with an asterisk."""
    best = best_per_column(rows)
    arrows = {c: (" ↑" if h else " ↓") for c, h in HIGHER_IS_BETTER.items()} | {c: " →0" for c in _ABSOLUTE}
    lines = ["| " + " | ".join(c + arrows.get(c, "") for c in COLUMNS) + " |",
             "|" + "|".join(":--" if c in ("method", "sanity") else "--:" for c in COLUMNS) + "|"]
    for row in rows:
        cells = [f"**{row[c]:.3g}\\***" if _is_best(row, c, best) else (f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]))
                 for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n↑ higher is better, ↓ lower is better, →0 closest to zero is better; **bold\\*** marks the best value of each column.\n"


def run_demo(out_dir: str | Path, config: DemoConfig | None = None, overwrite: bool = False, progress: bool = True) -> DemoResult:
    """Generate phantoms, train, explain with each method (:data:`DEFAULT_METHODS`, every applicable one
    with ``full``, or ``methods``), evaluate, write the report.

    Every map is computed once: the held-out maps are explained for the true labels once per method
    and scored from memory (localisation, deletion/insertion, and the sanity correlation against one
    re-initialised copy of the model, shared by all methods). Writes to ``out_dir``: ``report.html``
    (self-contained), ``results.csv``, ``results.md`` (best per column marked), ``model.safetensors``
    and ``phantoms/`` (the held-out phantoms with their masks and boxes).
    """
    from tqdm.auto import tqdm

    from medlens.models import save_weights

    begin = time.perf_counter()
    cfg = config or DemoConfig()
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MedlensError(f"--out {out} is not empty; pass --overwrite to replace the demo there, or choose another folder")
    unknown = [m for m in cfg.methods or () if m not in METHODS]
    if unknown:
        raise MedlensError(f"--method {unknown[0]!r} is not a registered method; see medlens methods")
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = make_phantoms(cfg.n, cfg.size, cfg.dims, seed=cfg.seed, distractors=True, device=device)
    n_test = max(2, int(round(cfg.n * cfg.test_fraction)))
    train, test = data.subset(slice(0, cfg.n - n_test)), data.subset(slice(cfg.n - n_test, cfg.n))
    model = PhantomNet(len(data.class_names), 1, cfg.dims).to(device)
    start = time.perf_counter()
    losses = train_classifier(model, train.images, train.labels, epochs=cfg.epochs, seed=cfg.seed, progress=progress)
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(test.images).argmax(1) == test.labels).float().mean())
    methods = list(cfg.methods or (sorted(METHODS) if cfg.full else DEFAULT_METHODS))
    counter, twin = _Counter(), randomised_copy(model, cfg.seed)
    rows, all_maps, skipped = [], {}, {}
    for method in tqdm(methods, desc="explain + evaluate", unit="method", disable=not progress):
        try:
            row, maps = score_method(model, test, method, 32, cfg.sanity_images, twin, counter)
        except MedlensError as error:  # the method does not apply to this model: refused on the first batch
            skipped[method] = str(error)
            continue
        rows.append(row)
        all_maps[method] = maps
    result = DemoResult(accuracy, rows, skipped, train_seconds=train_seconds)
    out.mkdir(parents=True, exist_ok=True)
    result.files.append(save_weights(model, out / "model.safetensors"))
    result.files.append(write_phantoms(out / "phantoms", test.to("cpu"), fmt="png" if cfg.dims == 2 else "nifti", overwrite=True))
    shown = _shown(test, cfg.shown).to(test.labels.device)
    panel = _panel_maps(counter, model, test, shown[0], all_maps) if cfg.dims == 2 and all_maps else None
    result.maps_computed = counter.maps
    result.files.append(write_text(out / "results.csv", _csv(result.ranked)))
    result.files.append(write_text(out / "results.md", results_markdown(result.ranked)))
    result.seconds = time.perf_counter() - begin
    result.files.append(write_text(out / "report.html", _report(model, test, result, all_maps, losses, cfg, shown, panel)))
    return result


def _first(maps: dict[str, Tensor]) -> str:
    return "gradcam" if "gradcam" in maps else next(iter(maps))


def _panel_maps(counter: _Counter, model: nn.Module, test: PhantomSet, index: Tensor, maps: dict[str, Tensor]) -> Tensor:
    """(K, *S) maps of the first method for every class on held-out image ``index``: the true class's map
    is the one already computed, only the other classes are explained."""
    method, label, k = _first(maps), int(test.labels[index]), len(test.class_names)
    others = [c for c in range(k) if c != label]
    extra = counter.explain(model, test.images[index][None], method, target=torch.tensor([others], device=index.device)).maps[0]
    rows = {c: extra[j] for j, c in enumerate(others)} | {label: maps[method][index]}
    return torch.stack([rows[c] for c in range(k)])


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _shown(test: PhantomSet, n: int) -> Tensor:
    """Indices of ``n`` held-out phantoms, classes alternating."""
    per_class = [(test.labels == c).nonzero().flatten() for c in range(len(test.class_names))]
    picked = [int(idx[i]) for i in range(max(len(p) for p in per_class)) for idx in per_class if i < len(idx)]
    return torch.tensor(picked[:n])


def _report(model: nn.Module, test: PhantomSet, result: DemoResult, maps: dict[str, Tensor], losses: list[float],
            cfg: DemoConfig, idx: Tensor, panel_maps: Tensor | None) -> str:
    from medlens.render.html import figure_html, html_page, png_data_uri, table_html
    from medlens.render.panels import class_panels, method_grid, new_figure

    images, masks = test.images[idx].cpu(), test.masks[idx, 0].cpu()
    with torch.no_grad():
        probabilities = model(test.images[idx]).softmax(1).cpu()
    names = test.class_names
    titles = [f"{names[int(test.labels[i])]} → {names[int(probabilities[k].argmax())]}" for k, i in enumerate(idx.tolist())]
    sections: list[tuple[str, str]] = []
    which = ("every registered method that applies" if cfg.full else "the methods asked for" if cfg.methods else
             "the default set; medlens demo --full runs every method")
    summary = (
        f"<p>{len(test)} held-out phantoms ({cfg.size}px, {cfg.dims}D); a {sum(p.numel() for p in model.parameters()):,}-parameter CNN "
        f"trained for {cfg.epochs} epochs in {result.train_seconds:.0f} s reaches <b>{result.accuracy:.1%}</b> accuracy. "
        "The class is decided by the lesion's shape (round or elongated), so a trustworthy map points at the lesion "
        "(outlined), not at the faint distractor or the vessels.</p>"
        f"<p>{len(result.rows)} methods ({which}): {result.maps_computed:,} maps computed, each once, "
        f"in {result.seconds:.0f} s all told.</p>"
    )
    ranked = result.ranked
    best = ranked[0] if ranked else None
    if best is not None:
        summary += f"<p>Best localiser here: <b>{best['method']}</b> (energy pointing game {best['energy_pointing_game']:.2f}).</p>"
    sections.append(("Summary", summary))
    if cfg.dims == 2 and maps:
        grid = method_grid(images, {m["method"]: maps[m["method"]][idx].cpu() for m in ranked}, titles, masks=masks,
                           title="Held-out phantoms (true → predicted), explained by every method (best localiser first)")
        sections.append(("Every method on the same images", figure_html(png_data_uri(grid), wide=True)))
        first = _first(maps)
        panel = class_panels(images[0], panel_maps.cpu(), list(range(len(names))), names, probabilities[0],
                             int(test.labels[idx[0]]), masks[0], method=first)
        sections.append((f"Per-class panel ({first})", figure_html(png_data_uri(panel), wide=True)))
    elif maps:
        from medlens.render.views3d import orthogonal_figure

        first = _first(maps)
        fig = orthogonal_figure(images[0], maps[first][idx[0]].cpu(), mask=masks[0], title=f"{first}: {titles[0]}")
        sections.append((f"Orthogonal slices through the peak ({first})", figure_html(png_data_uri(fig), wide=True)))
    sections.append(("How each method scores", table_html(ranked, COLUMNS, best=best_per_column(ranked), caption=(
        "Sorted by energy pointing game; the best value of each column is in bold with an asterisk. "
        "Pointing game: share of maps whose peak is in the lesion. Energy pointing game: share of the map's mass in the lesion. "
        "AUROC: the map as a lesion detector. Deletion AUC (lower is better) and insertion AUC (higher is better): the "
        "class probability as the top-ranked pixels are removed or revealed. Sanity: Spearman correlation of the maps after "
        "the whole model is re-initialised (closest to 0 is best); a method that passes changes its maps (correlation <= 0.5)."))))
    if result.skipped:
        sections.append(("Methods that do not apply to this model", table_html(sorted(result.skipped.items()), ("method", "reason"))))
    fig = new_figure(4.5, 2.6)
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses, marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    sections.append(("Training", figure_html(png_data_uri(fig), caption="cross-entropy per epoch")))
    return html_page("medlens demo", sections, subtitle="What does the model look at, and can the picture be trusted?")
