"""Dataset-scale explain (+ evaluate): streamed, sharded, resumable, on Lightning Fabric.

The plan (every input, folders expanded, in order) is cut into shards of ``shard_size`` items.
Shard ``s`` belongs to rank ``s % world_size``: ranks take disjoint subsets, with no padding
duplicates, and a shard's result does not depend on which rank (or how many) computed it. Each
finished shard is one Parquet part plus its maps in the Zarr store; the rank then records it in
``state/rank-NNN.json`` (atomically), and rank 0 merges every state into ``manifest.json``. A run
killed at any point resumes with ``resume=True``: recorded parts whose checksum matches are kept,
every other shard is computed again (deterministically, so the final table and maps equal an
uninterrupted run's). Resuming a run that is complete, over inputs that list the same files
(:func:`listing_digest`), answers from the manifest alone: no planning, no model, no loader.

A one-process run does not start (or import) Lightning. 2-D CNNs run in channels-last memory
format, and the deletion curve's forward passes use a copy of the model with BatchNorm folded
into the convolutions (checked against the model on the first batch).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from medlens.errors import MedlensError, one_line

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DatasetRunResult:
    out: Path
    planned: int = 0
    done: int = 0
    failed: int = 0
    parts_computed: int = 0
    parts_reused: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1


def autocast_context(device: torch.device, precision: str):
    """Autocast for the forward pass: ``32`` none, ``bf16`` (CPU and CUDA), ``fp16`` (CUDA only)."""
    if precision not in PRECISIONS:
        raise MedlensError(f"--precision {precision!r} not understood: use 32, bf16 or fp16")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device.type != "cuda":
        raise MedlensError("--precision fp16 needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


class SingleProcess:
    """The part of Lightning Fabric a one-process run uses (rank 0 of 1, no-op barrier), so a
    one-process run (and resuming a finished one) never imports Lightning (seconds of start-up)."""

    global_rank, world_size = 0, 1

    def __init__(self, accelerator: str = "cpu") -> None:
        if accelerator not in ("cpu", "cuda", "gpu", "auto"):
            raise MedlensError(f"--accelerator {accelerator!r} not understood: use cpu, cuda or auto")
        if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
            raise MedlensError(f"--accelerator {accelerator} asked for, but no CUDA device is available")
        cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")

    def barrier(self) -> None:
        return None


def _single_process(devices: int | str, num_nodes: int) -> bool:
    """One process asked for and none started by torchrun / SLURM around us."""
    import os

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    return str(devices) == "1" and num_nodes == 1 and not launched


def listing_digest(inputs: Sequence[str | Path]) -> str:
    """A digest of what the inputs name and hold: each argument, and for a folder the names of
    everything under it (``os.scandir``), with each file's size and modification time (no file
    is opened). The same digest means the same plan and unchanged files, so resuming a finished
    run need not expand its folders again; a file rewritten in place gives another digest."""
    import hashlib
    import os

    digest = hashlib.sha256()
    stack = [str(Path(p)) for p in reversed(list(inputs))]
    while stack:
        path = stack.pop()
        digest.update(path.encode(errors="surrogateescape") + b"\0")
        try:
            with os.scandir(path) as entries:
                names = sorted((e.name, e.is_dir(follow_symlinks=True), _stamp_of(e)) for e in entries)
        except NotADirectoryError:
            digest.update(_stamp_of(path).encode())
            continue
        except (FileNotFoundError, PermissionError):
            continue
        digest.update(b"/")
        stack.extend(os.path.join(path, name) for name, is_dir, _ in reversed(names) if is_dir)
        digest.update("\0".join(f"{name}:{stamp}" for name, is_dir, stamp in names if not is_dir).encode(errors="surrogateescape"))
    return digest.hexdigest()[:32]


def _stamp_of(entry: Any) -> str:
    """``size:mtime_ns`` of a file (an ``os.DirEntry`` or a path), or ``missing``."""
    import os

    try:
        info = entry.stat(follow_symlinks=True) if isinstance(entry, os.DirEntry) else os.stat(entry)
    except OSError:
        return "missing"
    return f"{info.st_size}:{info.st_mtime_ns}"


def inputs_stamp(paths: Sequence[str]) -> str:
    """A digest of the files of one part, each input with its annotations (mask, box JSON, YOLO
    text): path, size and modification time. A part whose files were rewritten since it was
    written is computed again when the run is resumed."""
    import hashlib

    from medlens.workflows.stream import annotation_files

    files = [f for p in paths for f in (p, *map(str, annotation_files(Path(p)).values()))]
    return hashlib.sha256("\0".join(f"{f}|{_stamp_of(f)}" for f in files).encode(errors="surrogateescape")).hexdigest()[:32]


def _preprocessing_record(pre: Any) -> dict[str, Any]:
    """The fields of a preprocessing record that change the model's inputs (for the manifest and
    the resume check); a model's own transform is named by its type."""
    return {"channels": pre.channels, "size": list(pre.size) if pre.size else None, "normalize": pre.normalize,
            "mean": list(pre.mean) if pre.mean else None, "std": list(pre.std) if pre.std else None,
            "source": pre.source, "model_transform": type(pre.model_transform).__name__ if pre.model_transform else None}


def plan_items(inputs: Sequence[str | Path]):
    from medlens.workflows.stream import PlannedItem
    from medlens.io.loading import plan_inputs

    return [PlannedItem(i, str(path), None if problem is None else str(problem))
            for i, (path, problem) in enumerate(plan_inputs(inputs))]


def check_overlays(spec: str) -> tuple[str, int]:
    """``(kind, K)`` of an overlay spec (``all`` and ``none`` give K = 0); a one-line error otherwise."""
    if spec in ("all", "none"):
        return spec, 0
    kind, _, k = spec.partition(":")
    if kind not in ("worst", "best", "sample") or not k.isdigit():
        raise MedlensError(f"--overlays {spec!r} not understood: use all, none, worst:K, best:K or sample:K")
    return kind, int(k)


def _select_overlays(rows, spec: str):
    """Rows to draw: ``all``, ``none``, ``worst:K``, ``best:K`` (by IoU@10, else pointing game,
    else deletion AUC, else score), ``sample:K`` (seeded)."""
    kind, k = check_overlays(spec)
    ok = rows[rows["status"] == "ok"]
    if spec == "none" or len(ok) == 0:
        return ok.iloc[:0]
    if spec == "all":
        return ok
    if kind == "sample":
        return ok.sample(n=min(k, len(ok)), random_state=0).sort_values("row_id")
    for column, higher_better in (("iou@10", True), ("pointing_game", True), ("deletion_auc", False), ("score", True)):
        if ok[column].notna().any():
            ranked = ok[ok[column].notna()].sort_values([column, "row_id"], ascending=[not higher_better, True], kind="stable")
            return ranked.iloc[-k:] if kind == "best" else ranked.iloc[:k]
    return ok.iloc[:0]


def run_dataset(
    model_factory: Callable[[], nn.Module],
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    methods: Sequence[str] = ("gradcam",),
    target: Any = "pred",
    layer: str | None = None,
    size: Sequence[int] | None = None,
    normalize: str = "none",
    batch_size: int = 8,
    workers: int = 0,
    shard_size: int = 64,
    map_dtype: str = "float16",
    overlays: str = "worst:16",
    deletion_steps: int = 0,
    resume: bool = False,
    devices: int | str = 1,
    num_nodes: int = 1,
    accelerator: str = "cpu",
    strategy: str = "auto",
    precision: str = "32",
    class_names: Sequence[str] | None = None,
    box_fraction: float = 0.05,
    method_options: dict[str, Any] | None = None,
    n_boot: int = 1000,
    ci: str = "percentile",
    nifti: bool = False,
    preprocessing: Any = None,
    policy: Any = None,
    config_extra: dict[str, Any] | None = None,
    progress: bool = False,
    fabric: Any = None,
) -> DatasetRunResult:
    """Explain every input with every method and write the dataset-scale outputs to ``out_dir``.

    ``model_factory`` builds the model (on CPU, eval mode); each rank moves it to its device.
    ``preprocessing`` (a :class:`medlens.data.prepare.Preprocessing`, e.g. a run folder's: size,
    channels, normalisation, class names) replaces ``size`` and ``normalize``.
    With ``devices * num_nodes > 1`` the processes are started by Lightning Fabric (re-running
    the command line) or were started by torchrun / SLURM. Returns this rank's counts.
    """
    from medlens.core.engine import get_method
    from medlens.io.store import RunStore

    if map_dtype not in ("float16", "float32"):
        raise MedlensError(f"--map-dtype {map_dtype!r} not understood: use float16 or float32")
    check_overlays(overlays)
    if ci not in ("percentile", "bca"):
        raise MedlensError(f"--ci {ci!r} not understood: use percentile or bca")
    for method in methods:
        get_method(method, **(method_options or {}))
    if precision not in PRECISIONS:
        raise MedlensError(f"--precision {precision!r} not understood: use 32, bf16 or fp16")
    if preprocessing is not None:
        if preprocessing.slice_axis is not None:
            raise MedlensError("a model trained on 2D slices of volumes: use medlens explain for its volumes "
                               "(medlens run explains inputs whole)")
        size, normalize = preprocessing.size, preprocessing.normalize
        class_names = class_names or preprocessing.class_names
        config_extra = {**(config_extra or {}), "preprocessing": _preprocessing_record(preprocessing)}
    started = time.perf_counter()
    _config = lambda paths: {  # noqa: E731
        "inputs": paths, "methods": list(methods), "target": str(target), "layer": layer,
        "size": list(size) if size else None, "normalize": normalize, "batch_size": batch_size, "shard_size": shard_size,
        "map_dtype": map_dtype, "deletion_steps": deletion_steps, "precision": precision, "box_fraction": box_fraction,
        "method_options": method_options or {}, "class_names": list(class_names) if class_names else None,
        "n_boot": n_boot, "ci": ci, **(config_extra or {}),
        "workers": workers, "devices": devices, "num_nodes": num_nodes, "accelerator": accelerator,
        "strategy": strategy, "overlays": overlays, **({"nifti": True} if nifti else {}),
    }
    listing = listing_digest(inputs)
    if resume and fabric is None:  # a finished run: no planning, no processes, no model, no loader
        finished_run = _finished_run(RunStore(out_dir), listing, _config)
        if finished_run is not None:
            finished_run.seconds = time.perf_counter() - started
            return finished_run
    plan = plan_items(inputs)
    config = _config([it.path for it in plan])
    if fabric is None and _single_process(devices, num_nodes):
        fabric = SingleProcess(accelerator)
    elif fabric is None:
        from lightning.fabric import Fabric

        single = str(devices) == "1" and num_nodes == 1
        fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="auto" if single else strategy)
        fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    device = fabric.device
    autocast_context(device, precision)  # refuse fp16 on CPU before anything is written

    store = RunStore(out_dir, rank)
    fabric.barrier()
    error: str | None = None
    try:
        store.check_fresh_or_resumable(config, resume)
    except MedlensError as exc:
        error = str(exc)
    fabric.barrier()
    if error:
        raise MedlensError(error)
    if rank == 0:
        store.cleanup_partials()
        store.init(config, len(plan))
        store.set_fields(listing=listing)  # lets resuming a finished run skip planning (see _finished_run)
    fabric.barrier()

    n_shards = math.ceil(len(plan) / shard_size) if plan else 0
    shard_paths = lambda s: [it.path for it in plan[s * shard_size : (s + 1) * shard_size]]  # noqa: E731
    finished = store.finished_parts()
    changed = sorted(k for k, info in finished.items()  # parts written before stamps existed are kept as they are
                     if "inputs" in info and info["inputs"] != inputs_stamp(shard_paths(int(k))))
    if changed and rank == 0:
        print(f"medlens run: the inputs of {len(changed)} finished part(s) changed since they were written "
              f"(size or modification time); computing them again: {', '.join(changed[:5])}"
              + (" ..." if len(changed) > 5 else ""), file=sys.stderr)
    for k in changed:
        finished.pop(k)
    mine = [s for s in range(n_shards) if s % world == rank]
    todo = [s for s in mine if f"{s:06d}" not in finished]
    my_parts = {k: v for k, v in finished.items() if int(k) % world == rank}
    result = DatasetRunResult(Path(out_dir), planned=len(plan), rank=rank, world_size=world,
                              parts_reused=len(mine) - len(todo))

    torch.manual_seed(0)  # a randomly initialised model ('none' weights) is the same on every rank and run
    model = model_factory().to(device).eval()
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)  # 4-D weights only; 2-D inputs follow per batch
    from medlens.workflows.explain import model_input_spec

    channels, _ = model_input_spec(model)
    from medlens.workflows.stream import ExplainDataset, make_loader

    if preprocessing is not None and preprocessing.channels is None:
        preprocessing = preprocessing.override(channels=channels)
    dataset = ExplainDataset(plan, channels, size, normalize, policy, geometry=nifti, preprocessing=preprocessing)
    batches, owner = [], []
    for s in todo:
        positions = list(range(s * shard_size, min((s + 1) * shard_size, len(plan))))
        for b in range(0, len(positions), batch_size):
            batches.append(positions[b : b + batch_size])
            owner.append(s)
    stamps = {s: inputs_stamp(shard_paths(s)) for s in todo}  # taken before the files are read
    shard_rows: dict[int, list[dict[str, Any]]] = {s: [] for s in todo}
    remaining = {s: sum(1 for o in owner if o == s) for s in todo}
    names = list(class_names) if class_names else None
    runner = _BatchRunner(model, methods, target, layer, method_options or {}, device, precision, store, len(plan),
                          map_dtype, names, box_fraction, deletion_steps, Path(out_dir) / "nifti" if nifti else None)
    from tqdm import tqdm

    bar = tqdm(total=sum(len(b) for b in batches), desc=f"rank {rank}", unit="input", disable=not progress)
    for shard, batch in zip(owner, make_loader(dataset, batches, workers)):
        shard_rows[shard].extend(runner.run(batch, shard))
        bar.update(sum(len(g["indices"]) for g in batch["groups"]) + len(batch["errors"]))
        remaining[shard] -= 1
        if remaining[shard] == 0:
            rows = sorted(shard_rows.pop(shard), key=lambda r: r["row_id"])
            info = store.write_part(shard, rows)
            info["inputs"] = stamps[shard]
            failed_items = {r["item"] for r in rows if r["status"] == "error"}
            all_items = {r["item"] for r in rows}
            info.update(items=len(all_items), items_failed=len(failed_items), items_ok=len(all_items - failed_items))
            my_parts[f"{shard:06d}"] = info
            store.record_part(my_parts)
            if rank == 0:
                store.merge_manifest()
            result.parts_computed += 1
    bar.close()
    fabric.barrier()
    already_complete = len(finished) == n_shards and (store.read_manifest() or {}).get("complete", False)
    if rank == 0 and not already_complete:  # resuming a finished run recomputes nothing, not even summaries
        _finish(store, config, overlays, n_boot, ci, names, plan, size, normalize, channels)
    fabric.barrier()
    manifest = store.read_manifest()
    result.done, result.failed = manifest["done"], manifest["failed"]
    from medlens.io.store import read_errors

    if rank == 0:
        bad = read_errors(out_dir)
        result.bad = list(zip(bad["source"], bad["error"]))
    result.seconds = time.perf_counter() - started
    return result


def _finished_run(store, listing: str, make_config: Callable[[list[str]], dict[str, Any]]) -> DatasetRunResult | None:
    """The result of the complete run in ``store`` when the inputs list the same files as when it
    was planned (:func:`listing_digest`), read from its manifest (and its error rows, if any),
    every part checked against its checksum; None when work is left or the plan may differ.
    Raises the usual one-line refusal when the configuration differs."""
    manifest = store.read_manifest()
    if manifest is None or not manifest.get("complete") or manifest.get("listing") != listing:
        return None
    config = make_config(list(manifest["config"]["inputs"]))
    store.check_fresh_or_resumable(config, resume=True)
    planned, shard_size = int(manifest["planned"]), int(config["shard_size"])
    n_shards = math.ceil(planned / shard_size) if planned else 0
    if len(manifest.get("parts", {})) != n_shards or len(store.finished_parts()) != n_shards:
        return None  # a part was removed or changed since: the regular path recomputes it
    bad: list[tuple[str, str]] = []
    if manifest["failed"]:
        from medlens.io.store import read_errors

        errors = read_errors(store.root)
        bad = list(zip(errors["source"], errors["error"]))
    return DatasetRunResult(store.root, planned=planned, done=manifest["done"], failed=manifest["failed"],
                            parts_reused=n_shards, bad=bad)


class _BatchRunner:
    """Explains one loader batch (its same-shape groups) and turns it into result rows; maps go
    to the Zarr store. Tensors move to the host once per group, not per image."""

    def __init__(self, model, methods, target, layer, options, device, precision, store, n_items, map_dtype,
                 class_names, box_fraction, deletion_steps, nifti_dir: Path | None = None) -> None:
        self.nifti_dir = nifti_dir
        self.model, self.methods, self.target, self.layer, self.options = model, methods, target, layer, options
        self.device, self.precision, self.store, self.n_items = device, precision, store, n_items
        self.map_dtype, self.class_names, self.box_fraction, self.deletion_steps = map_dtype, class_names, box_fraction, deletion_steps
        self._scorer: nn.Module | None = None

    def scorer(self, x: torch.Tensor) -> nn.Module:
        """The model the deletion forwards use: a copy with each eval-mode BatchNorm folded into its
        convolution (torch.fx; same float32 logits within 1e-4 of their scale, checked once on the
        first batch, also when the run is under bf16/fp16 autocast), else the model itself."""
        if self._scorer is None:
            self._scorer = self.model
            try:
                from torch.fx.experimental.optimization import fuse

                fused = fuse(self.model).eval()
                # checked in float32 even when called under autocast: bf16 rounding is not a fusion error
                with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
                    want, got = self.model(x[:2].float()), fused(x[:2].float())
                if torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-6):
                    self._scorer = fused
            except Exception:  # not traceable (data-dependent control flow, non-tensor outputs...): keep the model
                pass
        return self._scorer

    def name(self, c: int) -> str:
        return self.class_names[c] if self.class_names and 0 <= c < len(self.class_names) else f"class {c}"

    def run(self, batch: dict[str, Any], shard: int) -> list[dict[str, Any]]:
        rows = []
        for record in batch["errors"]:
            rows.extend(self.error_rows(record["index"], record["path"], record["error"], shard, self.methods))
        for group in batch["groups"]:
            for m, method in enumerate(self.methods):
                rows.extend(self.run_group(group, m, method, shard))
        return rows

    def error_rows(self, index: int, path: str, error: str, shard: int, methods) -> list[dict[str, Any]]:
        return [{"row_id": (index * len(self.methods) + self.methods.index(method)) * 1000, "item": index, "source": path,
                 "status": "error", "error": error, "method": method, "target_rank": 0, "shard": shard} for method in methods]

    def explain(self, x, method):
        from medlens.core.engine import explain

        with autocast_context(self.device, self.precision):
            return explain(self.model, x, method, target=self.target, layer=self.layer, **self.options)

    def run_group(self, group: dict[str, Any], m: int, method: str, shard: int) -> list[dict[str, Any]]:
        x = group["x"].to(self.device, non_blocking=True)
        if x.dim() == 4:  # 2-D CNNs run about 1.7x faster on CPU in NHWC (the model was converted too)
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            result = self.explain(x, method)
        except (MedlensError, RuntimeError) as error:
            if len(group["indices"]) == 1:
                return self.error_rows(group["indices"][0], group["paths"][0], f"{method}: {one_line(error)}", shard, [method])
            rows = []  # one failing input must not take the good ones of its batch with it: retry one by one
            for i in range(len(group["indices"])):
                single = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v[i : i + 1]) if v is not None else None
                          for k, v in group.items()}
                rows.extend(self.run_group(single, m, method, shard))
            return rows
        return self.rows_of(group, result, m, method, shard, x)

    def rows_of(self, group, result, m, method, shard, x) -> list[dict[str, Any]]:
        from medlens.core.boxes import component_regions
        from medlens.metrics.localisation import pointing_game, topk_box_iou

        maps = result.maps.float()
        B, K = maps.shape[:2]
        finite = torch.isfinite(maps.flatten(1)).all(dim=1)
        maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
        masks = group["masks"].to(self.device) if group["masks"] is not None else None
        boxes = group["boxes"].to(self.device) if group["boxes"] is not None else None
        pg = torch.full((B, K), float("nan"), device=maps.device, dtype=torch.float64)
        iou = pg.clone()
        dele = pg.clone()
        for k in range(K):
            if masks is not None:
                pg[:, k] = pointing_game(maps[:, k], masks).double()
            if boxes is not None:
                iou[:, k] = topk_box_iou(maps[:, k], boxes, percentages=(10,))[:, 0].double()
            if self.deletion_steps > 0:
                from medlens.metrics.faithfulness import perturbation_curve

                with torch.no_grad(), autocast_context(self.device, self.precision):
                    clean = result.logits.float() if result.task == "classification" and result.logits.dim() == 2 else None
                    # forward chunks of the run's batch size (on a CPU, 56 rows at once cost ~15% more per row than 8)
                    curve = perturbation_curve(self.scorer(x), x, maps[:, k], result.targets[:, k], steps=self.deletion_steps,
                                               clean_logits=clean, batch_size=x.shape[0])  # the explanation's forward is the clean step
                dele[:, k] = curve.auc.double()
        # one transfer per group: everything the rows need comes to the host together
        probs = torch.softmax(result.logits.float(), dim=1)
        host = [t.detach().to("cpu") for t in (maps, result.targets, result.scores.float(), result.predictions, probs, pg, iou, dele, finite)]
        maps_h, targets_h, scores_h, preds_h, probs_h, pg_h, iou_h, del_h, finite_h = host
        spatial = tuple(maps_h.shape[2:])
        array_name, array = self.store.map_array(method, spatial, self.n_items, K, self.map_dtype)
        maps_np = maps_h.numpy().astype(self.map_dtype)
        index = group["indices"]
        good = [i for i in range(B) if bool(finite_h[i])]
        for lo, hi in _runs(sorted(index[i] for i in good)):  # contiguous items -> one slice write
            positions = [index.index(j) for j in range(lo, hi)]
            array[lo:hi] = maps_np[positions]
        rows = []
        box_h = group["boxes"]
        for i in range(B):
            base = (index[i] * len(self.methods) + m) * 1000
            if not bool(finite_h[i]):
                rows.extend(self.error_rows(index[i], group["paths"][i], f"{group['paths'][i]}: {method} map has NaN or Inf values", shard, [method]))
                continue
            pred = int(preds_h[i])
            for k in range(K):
                cls = int(targets_h[i, k])
                regions = component_regions(maps_h[i, k], fraction=self.box_fraction) if self.box_fraction > 0 else []
                rows.append({
                    "row_id": base + k, "item": index[i], "source": group["paths"][i], "status": "ok", "error": None,
                    "method": method, "target_rank": k, "target": cls, "target_name": self.name(cls),
                    "prediction": pred, "prediction_name": self.name(pred), "probabilities": probs_h[i].tolist(),
                    "score": float(scores_h[i, k]), "boxes": [[int(v) for v in r["box"]] for r in regions[:5]],
                    "annotation_box": [int(v) for v in box_h[i]] if box_h is not None and int(box_h[i].sum()) > 0 else None,
                    "pointing_game": float(pg_h[i, k]), "iou@10": float(iou_h[i, k]), "deletion_auc": float(del_h[i, k]),
                    "map_array": array_name, "map_index": index[i], "shard": shard,
                    "nifti": self.write_nifti(group, i, k, cls, method, maps_h),
                })
        return rows


    def write_nifti(self, group, i: int, k: int, cls: int, method: str, maps_h: torch.Tensor) -> str | None:
        """A volume's map k in the input's own geometry (``--nifti``), at
        ``nifti/<item>_<name>_<method>_c<class>.nii.gz``; its path relative to the run folder."""
        geometry = group.get("geometries", [None] * (i + 1))[i]
        if self.nifti_dir is None or geometry is None:
            return None
        import re

        from medlens.core.resample import upsample
        from medlens.io.nifti import write_nifti

        stem = re.sub(r"(\.nii\.gz|\.nii|\.dcm)$", "", Path(group["paths"][i]).name, flags=re.IGNORECASE)
        name = f"{group['indices'][i]:07d}_{re.sub(r'[^A-Za-z0-9_.-]+', '-', stem)[:80]}_{re.sub(r'[^A-Za-z0-9_-]+', '-', method)}_c{cls}.nii.gz"
        self.nifti_dir.mkdir(parents=True, exist_ok=True)
        heat = upsample(maps_h[i, k][None, None].float(), tuple(group["originals"][i]))[0, 0]
        write_nifti(self.nifti_dir / name, heat, geometry)  # atomic: a whole file or none
        return f"nifti/{name}"


def _runs(values: list[int]):
    """[lo, hi) runs of consecutive integers in sorted ``values``."""
    if not values:
        return
    lo = prev = values[0]
    for v in values[1:]:
        if v != prev + 1:
            yield lo, prev + 1
            lo = v
        prev = v
    yield lo, prev + 1


#: the result columns the summaries, overlays and summary.html read
_SUMMARY_COLUMNS = ["item", "source", "status", "error", "method", "target_rank", "target", "target_name", "score",
                    "pointing_game", "iou@10", "deletion_auc", "map_array"]


def _finish(store, config, overlays, n_boot, ci, names, plan, size, normalize, channels) -> None:
    """Rank 0, after every rank is done: manifest, bad_files.csv, summary.csv, overlays, summary.html."""
    from medlens.io.report import write_bad_files
    from medlens.io.store import read_results
    from medlens.metrics.bootstrap import summarise_table
    from medlens.io.atomic import write_text

    store.cleanup_partials()
    rows = read_results(store.root, columns=_SUMMARY_COLUMNS)  # not the per-row lists: memory stays flat in n
    bad = rows[rows["status"] == "error"].drop_duplicates(["item"])
    if len(bad):
        write_bad_files(store.root / "bad_files.csv", list(zip(bad["source"], bad["error"])))
    ok = rows[rows["status"] == "ok"]
    metrics = [c for c in ("pointing_game", "iou@10", "deletion_auc", "score") if c in ok and ok[c].notna().any()]
    summary = summarise_table(ok, ("method",), metrics, n_boot=n_boot, method=ci) if len(ok) else None
    if summary is not None:
        write_text(store.root / "summary.csv", summary.to_csv(index=False))
    drawn = _draw_overlays(store, _select_overlays(rows, overlays), size, normalize, channels)
    store.merge_manifest(extra={"overlays": drawn}, verify=True)
    _summary_html(store, rows, summary, drawn)
    store.merge_manifest(complete=True)  # last: a run killed while finishing redoes the summaries


def _draw_overlays(store, chosen, size, normalize, channels) -> list[dict[str, Any]]:
    import zarr

    from medlens.core.resample import upsample
    from medlens.io.atomic import atomic_path
    from medlens.io.loading import read_image
    from medlens.render import overlay
    from medlens.render.overlay import png_bytes

    drawn = []
    folder = store.root / "overlays"
    arrays: dict[str, Any] = {}
    for row in chosen.to_dict("records"):
        row = _Row(row)
        try:
            loaded = read_image(row.source)
            display = loaded.display().float()
            array = arrays.setdefault(row.map_array, zarr.open_array(str(store.maps_path / row.map_array), mode="r"))
            heat = torch.from_numpy(np.asarray(array[int(row.item), int(row.target_rank)], dtype=np.float32))
            heat = upsample(heat[None, None], tuple(display.shape[1:]))[0, 0].clamp(0, 1)
            if heat.dim() != 2:
                continue
            name = f"{int(row.item):06d}_{row.method.replace('+', 'p')}_c{int(row.target)}.png"
            with atomic_path(folder / name) as tmp:
                tmp.write_bytes(png_bytes(overlay(display, heat)))
            drawn.append({"row_id": int(row.row_id), "png": f"overlays/{name}", "source": row.source, "method": row.method,
                          "target": row.target_name, "score": float(row.score), "iou@10": float(row["iou@10"])})
        except Exception:  # an overlay is a convenience: a failure to draw one never fails the run
            continue
    return drawn


class _Row(dict):
    __getattr__ = dict.__getitem__


def _summary_html(store, rows, summary, drawn) -> None:
    import html

    from medlens.io.atomic import write_text
    from medlens.render.html import html_page

    ok = rows[rows["status"] == "ok"]
    manifest = store.read_manifest()
    facts = (f"<p>{manifest['planned']} input(s) planned, {manifest['done']} explained, {manifest['failed']} failed; "
             f"{len(manifest['parts'])} part(s); {len(ok)} result row(s). Table: <code>results/</code> (Parquet), "
             f"maps: <code>maps.zarr</code>.</p>")
    sections = [("Run", facts)]
    if summary is not None and len(summary):
        head = "<tr><th>method</th><th>metric</th><th>mean</th><th>95% CI</th><th>n</th></tr>"
        body = "".join(f"<tr><td>{html.escape(r.method)}</td><td>{html.escape(r.metric)}</td><td>{r.mean:.3f}</td>"
                       f"<td>[{r.ci_low:.3f}, {r.ci_high:.3f}]</td><td>{r.n}</td></tr>" for r in summary.itertuples())
        sections.append(("Summary", f"<table>{head}{body}</table>"))
    if drawn:
        cards = "".join(f'<figure class="card"><img src="{html.escape(d["png"])}" alt="{html.escape(d["source"])}">'
                        f"<figcaption>{html.escape(Path(d['source']).name)}<br>{html.escape(d['method'])}: "
                        f"{html.escape(str(d['target']))} (score {d['score']:.3g})</figcaption></figure>" for d in drawn)
        sections.append(("Overlays", f'<div class="gallery">{cards}</div>'))
    bad = rows[rows["status"] == "error"].drop_duplicates(["item"])
    if len(bad):
        items = "".join(f"<li><code>{html.escape(s)}</code>: {html.escape(str(e))}</li>" for s, e in zip(bad["source"], bad["error"]))
        sections.append(("Inputs that were skipped", f"<ul>{items}</ul>"))
    write_text(store.root / "summary.html", html_page("medlens run", sections))
