"""Outputs of a dataset-scale run: Parquet result parts, one Zarr store of maps, a manifest.

Layout of a run folder::

    manifest.json          version, configuration + its hash, items planned/done/failed, parts
    results/part-000012.parquet   one part per shard (rows: input x method x target)
    maps.zarr/<method>/<D>x<H>x<W>  float16/32 arrays (items, targets, *S), one chunk per map
    state/rank-000.json    each rank's finished parts (merged into manifest.json by rank 0)
    bad_files.csv, summary.csv, summary.html, overlays/

Nothing partial is ever visible under its final name: parts are written to a hidden temporary
name (``.part-....tmp``, ignored by Parquet readers) and renamed; the manifest and the rank
states are replaced atomically; Zarr writes each chunk to a temporary file and renames it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from medlens.errors import MedlensError
from medlens.io.atomic import write_text

VERSION = 1
#: configuration keys that may change between a run and its resumption (they do not change results)
RUNTIME_KEYS = ("workers", "devices", "num_nodes", "accelerator", "strategy", "overlays", "progress")


def config_hash(config: dict[str, Any]) -> str:
    text = json.dumps({k: v for k, v in config.items() if k not in RUNTIME_KEYS}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key (old -> new)`` for every result-changing key that differs."""
    keys = sorted((set(old) | set(new)) - set(RUNTIME_KEYS))
    return [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys if json.dumps(old.get(k), default=str) != json.dumps(new.get(k), default=str)]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, doc: Any) -> None:
    write_text(path, json.dumps(doc, indent=1, sort_keys=True, default=str))


class RunStore:
    """The run folder: parts, maps, manifest and per-rank state."""

    def __init__(self, root: str | Path, rank: int = 0) -> None:
        self.root = Path(root)
        self.rank = rank
        self.results = self.root / "results"
        self.state_dir = self.root / "state"
        self.maps_path = self.root / "maps.zarr"
        self._arrays: dict[str, Any] = {}
        self._zarr_root = None

    # ------------------------------------------------------------ manifest and state
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text())

    def check_fresh_or_resumable(self, config: dict[str, Any], resume: bool) -> dict[str, Any] | None:
        """The existing manifest when resuming a matching run; raises a one-line error otherwise."""
        manifest = self.read_manifest()
        if manifest is None:  # a run killed before its manifest was written leaves an empty folder
            if self.root.is_dir() and any(p for p in self.root.iterdir() if not p.name.startswith(".manifest.")):
                raise MedlensError(f"--out {self.root} is not empty and holds no run; choose another folder")
            return None
        if not resume:
            raise MedlensError(f"--out {self.root} holds a run already; pass --resume to continue it, or choose another folder")
        if manifest.get("config_hash") != config_hash(config):
            diff = config_difference(manifest.get("config", {}), config)
            raise MedlensError(f"--resume refused: the configuration differs from the run in {self.root}: "
                               + ("; ".join(diff) if diff else "configuration hash differs"))
        return manifest

    def init(self, config: dict[str, Any], planned: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.read_manifest() is None:  # the manifest first: a folder with anything else in it has one
            write_json(self.manifest_path, {"version": VERSION, "config": config, "config_hash": config_hash(config),
                                            "planned": planned, "done": 0, "failed": 0, "parts": {}, "complete": False})
        self.results.mkdir(exist_ok=True)
        self.state_dir.mkdir(exist_ok=True)
        import zarr

        zarr.open_group(str(self.maps_path), mode="a")  # rank 0, before the other ranks open it

    def set_fields(self, **fields: Any) -> None:
        """Set top-level manifest fields (atomically), leaving the rest as it is."""
        manifest = self.read_manifest()
        if any(manifest.get(k) != v for k, v in fields.items()):
            write_json(self.manifest_path, {**manifest, **fields})

    def state_file(self, rank: int) -> Path:
        return self.state_dir / f"rank-{rank:03d}.json"

    def finished_parts(self, verify: bool = True) -> dict[str, dict[str, Any]]:
        """Parts recorded by any rank (state files and manifest) whose file exists with its checksum
        (``verify=False``: whose file exists; for the manifest's running record, which resuming
        checks again)."""
        parts: dict[str, dict[str, Any]] = {}
        manifest = self.read_manifest() or {}
        parts.update(manifest.get("parts", {}))
        for file in sorted(self.state_dir.glob("rank-*.json")) if self.state_dir.exists() else []:
            parts.update(json.loads(file.read_text()).get("parts", {}))
        good = {}
        for shard, info in parts.items():
            path = self.results / info["file"]
            if path.exists() and (not verify or sha256_file(path) == info["sha256"]):
                good[shard] = info
        return good

    def record_part(self, my_parts: dict[str, dict[str, Any]]) -> None:
        """Replace this rank's state (atomically) after each finished part."""
        write_json(self.state_file(self.rank), {"rank": self.rank, "parts": my_parts})

    def merge_manifest(self, complete: bool = False, extra: dict[str, Any] | None = None,
                       verify: bool = False) -> dict[str, Any]:
        """Merge every rank's state into the manifest (checksums checked again with ``verify``)."""
        manifest = self.read_manifest()
        parts = self.finished_parts(verify)
        manifest["parts"] = dict(sorted(parts.items()))
        manifest["done"] = sum(p["items_ok"] for p in parts.values())
        manifest["failed"] = sum(p["items_failed"] for p in parts.values())
        manifest["complete"] = complete
        manifest.update(extra or {})
        write_json(self.manifest_path, manifest)
        return manifest

    # ------------------------------------------------------------ parts
    def part_name(self, shard: int) -> str:
        return f"part-{shard:06d}.parquet"

    def write_part(self, shard: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from medlens.io.atomic import atomic_path

        self.results.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows, schema=result_schema())
        path = self.results / self.part_name(shard)
        with atomic_path(path) as tmp:  # hidden ".part-...tmp.parquet": ignored by Parquet dataset readers
            pq.write_table(table, tmp)
        return {"file": path.name, "sha256": sha256_file(path), "rows": len(rows)}

    # ------------------------------------------------------------ maps
    def _root_group(self):
        import zarr

        if self._zarr_root is None:
            self._zarr_root = zarr.open_group(str(self.maps_path), mode="r+")
        return self._zarr_root

    def map_array(self, method: str, spatial: tuple[int, ...], n_items: int, n_targets: int, dtype: str):
        """The (items, targets, *S) array for ``method`` at ``spatial``, created on first use
        (several ranks may create it at once: identical metadata, written atomically)."""
        import zarr

        name = f"{method.replace('/', '_')}/{'x'.join(map(str, spatial))}"
        if name in self._arrays:
            return name, self._arrays[name]
        import time

        root = self._root_group()
        array = None
        for attempt in range(100):  # ranks may race to create it: open, else create, else wait and retry
            try:
                array = zarr.open_array(str(self.maps_path / name), mode="r+")
                break
            except Exception:
                pass
            try:
                array = root.create_array(name, shape=(n_items, n_targets, *spatial), chunks=(1, 1, *spatial),
                                          dtype=dtype, fill_value=float("nan"), compressors=None, overwrite=False)
                break
            except Exception:  # another rank is creating it
                time.sleep(0.05)
        if array is None:
            raise MedlensError(f"{self.maps_path}/{name}: could not open or create the maps array")
        if tuple(array.shape[1:]) != (n_targets, *spatial):
            raise MedlensError(f"{self.maps_path}/{name}: holds {array.shape[1]} targets per map; this batch has {n_targets}")
        self._arrays[name] = array
        return name, array

    def cleanup_partials(self) -> int:
        """Remove temporary files an interrupted run left behind (never visible as results)."""
        removed = 0
        for folder in (self.results, self.maps_path, self.state_dir, self.root):
            if not folder.exists():
                continue
            candidates: Iterable[Path] = folder.rglob("*") if folder != self.root else folder.iterdir()
            for path in list(candidates):
                if path.is_file() and (path.name.endswith(".partial") or ".tmp" in path.name and path.name.startswith(".")):
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("row_id", pa.int64()), ("item", pa.int64()), ("source", pa.string()), ("status", pa.string()),
        ("error", pa.string()), ("method", pa.string()), ("target_rank", pa.int32()), ("target", pa.int32()),
        ("target_name", pa.string()), ("prediction", pa.int32()), ("prediction_name", pa.string()),
        ("probabilities", pa.list_(pa.float32())), ("score", pa.float32()),
        ("boxes", pa.list_(pa.list_(pa.int32()))), ("annotation_box", pa.list_(pa.int32())),
        ("pointing_game", pa.float64()), ("iou@10", pa.float64()), ("deletion_auc", pa.float64()),
        ("map_array", pa.string()), ("map_index", pa.int64()), ("shard", pa.int64()), ("nifti", pa.string()),
    ])


import functools


@functools.lru_cache(maxsize=1)
def result_schema():
    """The Arrow schema of the results table (pyarrow imported on first use)."""
    return _schema()


def read_results(root: str | Path, columns: list[str] | None = None, errors_only: bool = False):
    """The results table of a run folder (``columns`` only, error rows only with ``errors_only``),
    rows in plan order."""
    import pandas as pd

    path = Path(root) / "results"
    if columns is not None and "row_id" not in columns:
        columns = ["row_id", *columns]
    if not any(path.glob("part-*.parquet")):
        return pd.DataFrame(columns=columns or [f.name for f in result_schema()])
    filters = [("status", "==", "error")] if errors_only else None
    table = pd.read_parquet(path, columns=columns, filters=filters)
    return table.sort_values("row_id", kind="stable").reset_index(drop=True)


def read_errors(root: str | Path):
    """``item``, ``source``, ``error`` of every failed input of a run, once per item and error."""
    rows = read_results(root, columns=["item", "source", "error", "status"], errors_only=True)
    return rows.drop_duplicates(["item", "error"])


def os_fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
