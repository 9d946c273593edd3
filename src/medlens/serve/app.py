"""``create_app(...)``: the FastAPI app behind ``medlens serve``.

One page (``static/``, plain HTML/JS/canvas, nothing fetched from a CDN) and a REST API:

* ``GET /api/models``, ``GET /api/methods``, ``GET /api/files``: what can be chosen.
* ``POST /api/open``: an uploaded file (sniffed by content, never by extension) or a path
  under ``--data``; returns an image id, its shape and geometry.
* ``GET /api/images/{id}/raw`` (uint8 pixels for the page), ``.../slice.png``.
* ``POST /api/explain``: image (upload, path or id), model, method, layer, target, region and an
  optional ground truth (mask file or box); returns the prediction, probabilities, boxes,
  scores against the ground truth and links to the map (``raw``, ``.npy``, ``.png``, ``.nii.gz``).

Safe by default: the CLI binds 127.0.0.1 and asks for a token on any other host; a token, when
set, is checked on every ``/api`` request; request bodies are limited; paths stay inside
``--data`` (after resolving symlinks); zip uploads are checked against zip bombs; explanations on
one model are serialised by a lock, so hooks never interleave.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import json
import os
import shutil
import tempfile
import threading
import uuid
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from torch import nn

from medlens.errors import MedlensError, one_line

STATIC = Path(__file__).with_name("static")
KNOWN_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".ima", ".nii", ".nii.gz", ".zip")
MB = 1 << 20


class HTTPProblem(Exception):
    """An error answered with ``status`` and a one-line ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail.strip().splitlines()[0][:500] if detail.strip() else "error"


@dataclass
class ServedModel:
    """A model the server explains with, and how inputs are prepared for it."""

    name: str
    model: nn.Module
    dims: int = 2
    in_channels: int = 1
    size: tuple[int, ...] | None = None
    normalize: Any = "none"  # none, imagenet, zscore, or a model's own preparation (callable)
    class_names: list[str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    layers: list[str] = field(default_factory=list)
    default_layer: str | None = None
    #: the full input preparation (a run folder's training steps, an hf:/bundle: model's own);
    #: None builds one from the fields above
    preprocessing: Any = None

    def input_preparation(self) -> Any:
        from medlens.data.prepare import Preprocessing

        if self.preprocessing is not None:
            return self.preprocessing
        if callable(self.normalize):
            return Preprocessing(channels=self.in_channels, size=self.size, model_transform=self.normalize)
        return Preprocessing(channels=self.in_channels, size=self.size, normalize=self.normalize)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "dims": self.dims, "in_channels": self.in_channels,
            "size": list(self.size) if self.size else None, "classes": self.classes(),
            "layers": self.layers, "default_layer": self.default_layer,
        }

    def classes(self) -> list[str]:
        if self.class_names:
            return list(self.class_names)
        head = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        n = head[-1].out_features if head else 0
        return [f"class {i}" for i in range(n)]


@dataclass
class Limits:
    max_upload: int = 512 * MB
    zip_total: int = 2048 * MB  # total uncompressed bytes of a zip upload
    zip_ratio: float = 200.0  # largest compression ratio of any member
    zip_members: int = 2000
    max_voxels: int = 256 * 1024 * 1024  # voxels a NIfTI header may declare
    lock_timeout: float = 300.0  # seconds a request waits for a model busy with others


def parse_bytes(text: str | int) -> int:
    """``512MB``, ``10KB``, ``1GB``, ``2048`` -> bytes."""
    if isinstance(text, int):
        return text
    value = str(text).strip().upper().replace(" ", "")
    for suffix, scale in (("GIB", 1 << 30), ("MIB", MB), ("KIB", 1 << 10), ("GB", 1 << 30), ("MB", MB), ("KB", 1 << 10), ("G", 1 << 30), ("M", MB), ("K", 1 << 10), ("B", 1)):
        if value.endswith(suffix):
            number = value[: -len(suffix)]
            break
    else:
        number, scale = value, 1
    try:
        result = int(float(number) * scale)
    except ValueError:
        raise MedlensError(f"size {text!r} is not like 512MB, 10KB or 2048") from None
    if result <= 0:
        raise MedlensError(f"size {text!r} must be positive")
    return result


# ----------------------------------------------------------------------------- content sniffing

def sniff(head: bytes) -> str | None:
    """The kind of a file from its first bytes: png, jpeg, tiff, bmp, dicom, nifti, nifti-gz, zip."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"BM") and len(head) > 26:
        return "bmp"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if len(head) >= 348 and _is_nifti_header(head):
        return "nifti"
    if head.startswith(b"\x1f\x8b"):
        try:
            inner = gzip.GzipFile(fileobj=io.BytesIO(head)).read(348)
        except (OSError, EOFError):
            inner = b""
        return "nifti-gz" if len(inner) >= 348 and _is_nifti_header(inner) else None
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    return None


def _is_nifti_header(head: bytes) -> bool:
    size_le = int.from_bytes(head[:4], "little")
    size_be = int.from_bytes(head[:4], "big")
    return (size_le == 348 or size_be == 348) and head[344:347] in (b"n+1", b"ni1")


SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "bmp": ".bmp", "dicom": ".dcm", "nifti": ".nii", "nifti-gz": ".nii.gz"}


def safe_extract_zip(path: Path, dest: Path, limits: Limits) -> Path:
    """Extract a zip of DICOM files into ``dest`` after checking it is no zip bomb.

    Members' names are never used as paths (files are numbered), the member count, the total
    uncompressed size and every member's compression ratio are limited, and the bytes actually
    written are counted (a forged header size does not get past the limit).
    """
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise HTTPProblem(400, "the upload looks like a zip but cannot be opened as one") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if not members:
            raise HTTPProblem(400, "the zip holds no files")
        if len(members) > limits.zip_members:
            raise HTTPProblem(413, f"the zip holds {len(members)} files; at most {limits.zip_members} are accepted")
        total = sum(m.file_size for m in members)
        if total > limits.zip_total:
            raise HTTPProblem(413, f"the zip expands to {total} bytes; at most {limits.zip_total} are accepted")
        for m in members:
            if m.file_size > 1024 * 1024 and m.file_size / max(m.compress_size, 1) > limits.zip_ratio:
                raise HTTPProblem(413, f"zip member {m.filename[:80]!r} is compressed {m.file_size / max(m.compress_size, 1):.0f}:1; refusing a possible zip bomb")
        written = 0
        dest.mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(members):
            target = dest / f"{i:05d}.dcm"
            with archive.open(m) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 16):
                    written += len(chunk)
                    if written > limits.zip_total:
                        raise HTTPProblem(413, "the zip expands past its declared size; refusing a possible zip bomb")
                    out.write(chunk)
            with open(target, "rb") as handle:
                if sniff(handle.read(132)) != "dicom":
                    target.unlink()
        files = sorted(dest.glob("*.dcm"))
        if not files:
            raise HTTPProblem(400, "the zip holds no DICOM files (checked by content)")
        return files[0] if len(files) == 1 else dest


# ----------------------------------------------------------------------------- caches

class LRU:
    """A small thread-safe least-recently-used store."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, value: Any) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return key

    def get(self, key: str, what: str) -> Any:
        with self._lock:
            if key not in self._items:
                raise HTTPProblem(404, f"{what} {key[:40]!r} not found (it may have expired; open the file again)")
            self._items.move_to_end(key)
            return self._items[key]


@dataclass
class Opened:
    name: str
    loaded: Any  # medlens.io.loaded.Loaded
    display: torch.Tensor  # (C, *S) in [0, 1]


@dataclass
class MapRecord:
    image_id: str
    image: Opened
    maps: torch.Tensor  # (K, *S) float32 in [0, 1] at the image's own size
    method: str
    model: str
    classes: list[int]


# ----------------------------------------------------------------------------- the app

class Server:
    """State shared by the routes: models, data folder, limits and caches."""

    def __init__(self, models: Sequence[ServedModel], data_dir: str | Path | None, token: str | None, limits: Limits) -> None:
        if not models:
            raise MedlensError("serve needs at least one model")
        self.models = {m.name: m for m in models}
        self.data_dir = Path(data_dir).resolve() if data_dir else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise MedlensError(f"--data {data_dir}: not a folder")
        self.token = token
        self.limits = limits
        self.images = LRU(32)
        self.maps = LRU(256)
        self.tmp = Path(tempfile.mkdtemp(prefix="medlens-serve-"))
        for m in models:
            self._describe_layers(m)

    @staticmethod
    def _describe_layers(m: ServedModel) -> None:
        from medlens.core.capture import auto_layer, trace_layers

        if m.layers:
            return
        size = m.size or (64,) * m.dims
        try:
            x = torch.zeros(1, m.in_channels, *size, device=_device(m.model))
            infos = trace_layers(m.model, x)
            m.layers = [i.name for i in infos if i.spatial][-12:]
            m.default_layer = auto_layer(m.model, x)
            if m.default_layer and m.default_layer not in m.layers:
                m.layers.append(m.default_layer)
        except Exception:  # a model we cannot trace still serves with the automatic layer
            m.layers, m.default_layer = [], None

    # paths ------------------------------------------------------------------
    def data_path(self, relative: str) -> Path:
        """``relative`` resolved inside --data, or a 403/404 problem."""
        if self.data_dir is None:
            raise HTTPProblem(404, "the server has no --data folder")
        text = str(relative).strip()
        if not text:
            raise HTTPProblem(400, "empty path")
        if "\x00" in text:
            raise HTTPProblem(400, "path holds a NUL byte")
        rel = Path(text)
        if rel.is_absolute() or text.startswith(("/", "\\")) or (len(text) > 1 and text[1] == ":"):
            raise HTTPProblem(403, f"path {text[:100]!r} is absolute; give a path relative to --data")
        if ".." in rel.parts or ".." in text.replace("\\", "/").split("/"):
            raise HTTPProblem(403, f"path {text[:100]!r} leaves --data ('..' is not allowed)")
        resolved = (self.data_dir / rel).resolve()
        if not resolved.is_relative_to(self.data_dir):
            raise HTTPProblem(403, f"path {text[:100]!r} resolves outside --data")
        if not resolved.exists():
            raise HTTPProblem(404, f"{text[:100]}: no such file under --data")
        return resolved

    def list_files(self, limit: int = 2000) -> list[str]:
        if self.data_dir is None:
            return []
        found: list[str] = []
        for root, dirs, files in os.walk(self.data_dir):  # os.walk does not follow symlinked folders
            dirs.sort()
            for name in sorted(files):
                full = Path(root) / name
                if not name.lower().endswith(KNOWN_SUFFIXES):
                    continue
                try:
                    if not full.resolve().is_relative_to(self.data_dir):
                        continue
                except OSError:
                    continue
                found.append(full.relative_to(self.data_dir).as_posix())
                if len(found) >= limit:
                    return found
        return found

    # reading ----------------------------------------------------------------
    def read_upload(self, data: bytes, filename: str) -> Opened:
        kind = sniff(data[:4096] if not data.startswith(b"\x1f\x8b") else data[: 1 << 16])
        if kind is None:
            raise HTTPProblem(415, f"{_short(filename)}: not a PNG, JPEG, TIFF, DICOM, NIfTI or zip file (checked by content, not by name)")
        work = Path(tempfile.mkdtemp(dir=self.tmp))
        try:
            if kind == "zip":
                archive = work / "upload.zip"
                archive.write_bytes(data)
                path = safe_extract_zip(archive, work / "series", self.limits)
            else:
                path = work / f"upload{SUFFIX[kind]}"
                path.write_bytes(data)
            return self._read(path, _short(filename) or f"upload{SUFFIX.get(kind, '')}")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def read_path(self, relative: str) -> Opened:
        path = self.data_path(relative)
        if path.is_file():
            with open(path, "rb") as handle:
                head = handle.read(1 << 16)
            kind = sniff(head)
            if kind is None:
                raise HTTPProblem(415, f"{relative}: not a PNG, JPEG, TIFF, DICOM, NIfTI or zip file (checked by content)")
            if kind == "zip":
                return self.read_upload(path.read_bytes(), relative)
            if not path.name.lower().endswith(SUFFIX[kind]) and not (kind == "jpeg" and path.name.lower().endswith(".jpeg")) and not (kind == "tiff" and path.name.lower().endswith(".tiff")):
                # the reader picks by suffix: give it a copy whose name says what the content is
                work = Path(tempfile.mkdtemp(dir=self.tmp))
                try:
                    copy = work / f"input{SUFFIX[kind]}"
                    shutil.copyfile(path, copy)
                    return self._read(copy, relative)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
        return self._read(path, relative)

    def _read(self, path: Path, name: str) -> Opened:
        from medlens.io.loading import read_image

        if path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")):
            self._check_nifti_size(path, name)
        try:
            loaded = read_image(path)
            display = loaded.display().float().clamp(0, 1)
        except MedlensError as error:
            raise HTTPProblem(400, f"{name}: {str(error).replace(str(path), '').lstrip(': ')}") from None
        except Exception as error:  # a reader library failing on a broken file
            raise HTTPProblem(400, f"{name}: cannot be read ({one_line(error)})") from None
        if display.dim() not in (3, 4):
            raise HTTPProblem(400, f"{name}: expected a 2D image or a 3D volume")
        loaded.meta["source"] = name
        return Opened(name, loaded, display)

    def _check_nifti_size(self, path: Path, name: str) -> None:
        """Refuse a NIfTI whose header declares more voxels than ``limits.max_voxels`` (a
        gzip bomb would otherwise be decompressed into memory by the reader)."""
        import nibabel as nib

        try:
            shape = nib.load(str(path)).shape
        except Exception as error:
            raise HTTPProblem(400, f"{name}: not a readable NIfTI header ({one_line(error)})") from None
        voxels = int(np.prod([int(v) for v in shape], dtype=np.float64))
        if voxels > self.limits.max_voxels:
            raise HTTPProblem(413, f"{name}: declares {voxels} voxels; at most {self.limits.max_voxels} are accepted")

    def describe_image(self, image_id: str, opened: Opened) -> dict[str, Any]:
        meta = opened.loaded.meta
        spacing = meta.get("spacing")
        return {
            "image_id": image_id, "name": opened.name, "kind": meta.get("kind"),
            "dims": opened.display.dim() - 1, "channels": int(opened.display.shape[0]),
            "shape": list(opened.display.shape[1:]),
            "spacing": [float(s) for s in spacing] if spacing is not None else None,
            "modality": meta.get("Modality"),
            "raw": f"/api/images/{image_id}/raw",
        }

    # explaining -------------------------------------------------------------
    def explain(
        self, image_id: str, opened: Opened, model_name: str, method: str, layer: str | None, target: str,
        region: str | None, truth_mask: torch.Tensor | None, truth_box: list[int] | None, box_fraction: float = 0.05,
    ) -> dict[str, Any]:
        from medlens.core.boxes import component_regions
        from medlens.core.engine import METHODS, explain
        from medlens.core.resample import upsample
        from medlens.workflows.explain import prepare

        served = self.models.get(model_name)
        if served is None:
            raise HTTPProblem(404, f"model {model_name!r} not served; choose one of {', '.join(self.models)}")
        if method not in METHODS:
            raise HTTPProblem(400, f"method {method!r} unknown; choose one of {', '.join(sorted(METHODS))}")
        dims = opened.display.dim() - 1
        if dims != served.dims:
            raise HTTPProblem(400, f"model {model_name!r} takes {served.dims}D inputs; {opened.name} is {dims}D")
        try:
            prepared = prepare(Path(opened.name), opened.loaded, None, None, preprocessing=served.input_preparation())
        except MedlensError as error:
            raise HTTPProblem(400, str(error)) from None
        region_value = _parse_box(region, dims, "region") if region else None
        device = _device(served.model)
        x = prepared.tensor.unsqueeze(0).to(device)
        region_t = None
        if region_value is not None:
            region_t = _scale_box(region_value, opened.display.shape[1:], x.shape[2:])
        try:
            # hooks of two requests never interleave on one model; a request never waits forever
            if not served.lock.acquire(timeout=self.limits.lock_timeout):
                raise HTTPProblem(503, f"model {model_name!r} stayed busy for {self.limits.lock_timeout:.0f} s; try again")
            try:
                result = explain(served.model, x, method, target=target or "pred", layer=layer or None, region=region_t)
            finally:
                served.lock.release()
        except HTTPProblem:
            raise
        except MedlensError as error:
            raise HTTPProblem(400, str(error)) from None
        except Exception as error:  # the model itself failed: a 500 with its message, never a hang
            raise HTTPProblem(500, f"the model failed: {one_line(error)}") from None
        spatial = tuple(opened.display.shape[1:])
        maps = upsample(result.maps[:1].float(), spatial)[0].clamp(0, 1).cpu().contiguous()
        logits = result.logits[0].float().cpu()
        probs = torch.softmax(logits, 0) if logits.numel() > 1 else torch.sigmoid(logits)
        classes = [int(c) for c in result.targets[0].tolist()]
        names = served.classes()
        name_of = (lambda c: names[c] if c < len(names) else f"class {c}")
        pred = int(logits.argmax())
        map_id = self.maps.put(MapRecord(image_id, opened, maps, method, model_name, classes))
        targets = []
        for k in range(maps.shape[0]):
            cls = classes[min(k, len(classes) - 1)]
            # regions at the model's resolution (connected components on a 1024x1024 map are slow),
            # boxes scaled to the image's own size
            small = result.maps[0, k].float().cpu()
            regions = component_regions(small, fraction=box_fraction)[:3]
            targets.append({
                "k": k, "class": cls, "name": name_of(cls), "score": float(result.scores[0, min(k, len(classes) - 1)]),
                "boxes": [{"box": _scale_box([int(v) for v in r["box"]], small.shape, spatial), "peak": float(r.get("peak", 0.0))} for r in regions],
            })
        answer: dict[str, Any] = {
            "image_id": image_id, "map_id": map_id, "model": model_name, "method": result.method,
            "layers": result.layers, "auto_layer": result.info.get("auto_layer"),
            "prediction": {"class": pred, "name": name_of(pred), "probability": float(probs[pred])},
            "probabilities": [{"class": i, "name": name_of(i), "probability": float(p)} for i, p in enumerate(probs.tolist())],
            "targets": targets, "shape": list(spatial),
            "map_sha256": hashlib.sha256(maps.numpy().astype(np.float32).tobytes()).hexdigest(),
            "downloads": {
                "raw": f"/api/maps/{map_id}/raw", "npy": f"/api/maps/{map_id}.npy", "png": f"/api/maps/{map_id}.png",
            },
            "metrics": None,
        }
        if dims == 3:
            answer["downloads"]["nifti"] = f"/api/maps/{map_id}.nii.gz"
        answer["ground_truth_box"] = truth_box
        if truth_mask is not None or truth_box is not None:
            answer["metrics"] = _metrics(maps[:1], truth_mask, truth_box, spatial)
        return answer


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _short(name: str | None) -> str:
    return Path(str(name or "")).name[:120]


def _parse_box(text: str, dims: int, what: str) -> list[int]:
    try:
        values = json.loads(text) if text.strip().startswith("[") else [int(float(v)) for v in text.replace(";", ",").split(",")]
        values = [int(v) for v in values]
    except (ValueError, TypeError):
        raise HTTPProblem(400, f"{what} {text[:60]!r} is not a box like y0,x0,y1,x1 (2D) or z0,y0,x0,z1,y1,x1 (3D)") from None
    if len(values) != 2 * dims:
        raise HTTPProblem(400, f"{what} needs {2 * dims} numbers for a {dims}D image; got {len(values)}")
    return values


def _scale_box(box: list[int], source: Sequence[int], dest: Sequence[int]) -> list[int]:
    n = len(source)
    lo = [int(box[i] * dest[i] / source[i]) for i in range(n)]
    hi = [max(lo[i] + 1, int(round(box[n + i] * dest[i] / source[i]))) for i in range(n)]
    return lo + hi


def _metrics(maps: torch.Tensor, mask: torch.Tensor | None, box: list[int] | None, spatial: tuple[int, ...]) -> dict[str, float | None]:
    from medlens.metrics.localisation import localisation_metrics

    if mask is not None:
        if tuple(mask.shape) != spatial:
            from medlens.core.resample import upsample

            mask = upsample(mask.float()[None, None], spatial)[0, 0] > 0.5
        kwargs = {"masks": mask.bool()[None]}
    else:
        kwargs = {"boxes": torch.tensor([box], dtype=torch.long)}
    try:
        values = localisation_metrics(maps.float(), **kwargs)
    except MedlensError as error:
        raise HTTPProblem(400, f"ground truth: {error}") from None
    out: dict[str, float | None] = {}
    for key, value in values.items():
        v = float(value.reshape(-1)[0])
        out[key] = None if v != v else v
    return out


def create_app(
    models: Sequence[ServedModel] | ServedModel,
    data_dir: str | Path | None = None,
    token: str | None = None,
    max_upload: int | str = 512 * MB,
    limits: Limits | None = None,
):
    """The FastAPI app: one page and the REST API (schema at ``/openapi.json``).

    Args:
        models: the models to serve (see :class:`ServedModel`, :func:`served_model`).
        data_dir: files the page may open by path; nothing outside it is ever read.
        token: when set, every ``/api`` request needs ``Authorization: Bearer <token>``.
        max_upload: largest request body accepted, bytes or text like ``512MB``.
        limits: zip-bomb limits (member count, total size, ratio); ``max_upload`` wins over its own.
    """
    limits = limits or Limits()
    limits.max_upload = parse_bytes(max_upload)
    state = Server([models] if isinstance(models, ServedModel) else list(models), data_dir, token, limits)
    # no /docs or /redoc: they would load Swagger from a CDN; the schema is at /openapi.json
    app = FastAPI(title="medlens serve", version="1", description="Explain medical imaging models in the browser.",
                  docs_url=None, redoc_url=None)
    app.state.medlens = state

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(MedlensError)
    async def _medlens_error(request: Request, exc: MedlensError):
        return JSONResponse({"detail": one_line(exc)}, status_code=400)

    app.add_middleware(_Guard, token=token, max_body=limits.max_upload)

    # pages -------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # listings ----------------------------------------------------------------
    @app.get("/api/models", summary="Models served, with their classes and candidate layers")
    def list_models() -> list[dict[str, Any]]:
        return [m.describe() for m in state.models.values()]

    @app.get("/api/methods", summary="Explanation methods")
    def list_methods() -> list[dict[str, Any]]:
        from medlens.core.engine import METHODS

        return [{"name": n, "uses_layer": METHODS[n].needs().layers} for n in sorted(METHODS)]

    @app.get("/api/files", summary="Files under --data the page may open")
    def list_files() -> dict[str, Any]:
        return {"data": state.data_dir is not None, "files": state.list_files()}

    # images ------------------------------------------------------------------
    def _open(file: UploadFile | None, path: str | None, image_id: str | None) -> tuple[str, Opened]:
        if image_id:
            return image_id, state.images.get(image_id, "image")
        if file is not None and getattr(file, "filename", None) is not None:
            data = file.file.read(limits.max_upload + 1)
            if len(data) > limits.max_upload:
                raise HTTPProblem(413, f"upload larger than --max-upload ({limits.max_upload} bytes)")
            if not data:
                raise HTTPProblem(400, f"{_short(file.filename)}: empty upload")
            opened = state.read_upload(data, file.filename or "upload")
        elif path:
            opened = state.read_path(path)
        else:
            raise HTTPProblem(400, "give a file upload, a path under --data or an image_id")
        return state.images.put(opened), opened

    @app.post("/api/open", summary="Open an uploaded file or a path under --data")
    def open_image(file: UploadFile | None = File(None), path: str | None = Form(None)) -> dict[str, Any]:
        image_id, opened = _open(file, path, None)
        return state.describe_image(image_id, opened)

    @app.get("/api/images/{image_id}", summary="An opened image's shape and geometry")
    def image_info(image_id: str) -> dict[str, Any]:
        return state.describe_image(image_id, state.images.get(image_id, "image"))

    @app.get("/api/images/{image_id}/raw", summary="uint8 pixels (C, *S), C-order; shape in X-Shape")
    def image_raw(image_id: str):
        opened: Opened = state.images.get(image_id, "image")
        pixels = (opened.display * 255).round().to(torch.uint8).numpy()
        return Response(pixels.tobytes(), media_type="application/octet-stream", headers={"X-Shape": ",".join(map(str, pixels.shape))})

    @app.get("/api/images/{image_id}/slice.png", summary="One slice of an opened image as PNG")
    def image_slice(image_id: str, axis: int = 0, index: int | None = None):
        from medlens.render.overlay import grey_to_rgb, png_bytes, to_uint8

        opened: Opened = state.images.get(image_id, "image")
        plane = _plane(opened.display, axis, index)
        rgb = grey_to_rgb(plane) if plane.shape[0] == 1 else plane
        return Response(png_bytes(to_uint8(rgb)), media_type="image/png")

    # explanations ------------------------------------------------------------
    @app.post("/api/explain", summary="Explain a model's decision on an image")
    def explain_route(
        file: UploadFile | None = File(None, description="PNG/JPEG/TIFF, DICOM, zip of a DICOM series or NIfTI"),
        path: str | None = Form(None, description="a file under --data"),
        image_id: str | None = Form(None, description="an image opened before"),
        model: str | None = Form(None), method: str = Form("gradcam"), layer: str | None = Form(None),
        target: str = Form("pred"), region: str | None = Form(None, description="box for segmentation models"),
        mask: UploadFile | None = File(None, description="ground-truth mask (any readable format)"),
        mask_path: str | None = Form(None, description="ground-truth mask under --data"),
        box: str | None = Form(None, description="ground-truth box y0,x0,y1,x1 (or z0,y0,x0,z1,y1,x1)"),
    ) -> dict[str, Any]:
        iid, opened = _open(file, path, image_id)
        truth = None
        if mask is not None and getattr(mask, "filename", None) is not None:
            data = mask.file.read(limits.max_upload + 1)
            truth = state.read_upload(data, mask.filename or "mask")
        elif mask_path:
            truth = state.read_path(mask_path)
        truth_mask = None
        if truth is not None:
            truth_mask = truth.loaded.image[0] > 0
            if truth_mask.dim() != opened.display.dim() - 1:
                raise HTTPProblem(400, f"mask {truth.name} is {truth_mask.dim()}D; the image is {opened.display.dim() - 1}D")
        truth_box = _parse_box(box, opened.display.dim() - 1, "box") if box else None
        name = model or next(iter(state.models))
        return state.explain(iid, opened, name, method, layer, target, region, truth_mask, truth_box)

    @app.get("/api/maps/{map_id}/raw", summary="uint8 map k (*S) scaled 0-255; shape in X-Shape")
    def map_raw(map_id: str, k: int = 0):
        record: MapRecord = state.maps.get(map_id, "map")
        heat = record.maps[min(max(k, 0), record.maps.shape[0] - 1)]
        pixels = (heat * 255).round().to(torch.uint8).numpy()
        return Response(pixels.tobytes(), media_type="application/octet-stream", headers={"X-Shape": ",".join(map(str, pixels.shape))})

    @app.get("/api/maps/{map_id}.npy", summary="The maps (K, *S) float32 as NumPy .npy")
    def map_npy(map_id: str):
        record: MapRecord = state.maps.get(map_id, "map")
        buffer = io.BytesIO()
        np.save(buffer, record.maps.numpy().astype(np.float32))
        return Response(buffer.getvalue(), media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{_stem(record)}.npy"'})

    @app.get("/api/maps/{map_id}.png", summary="The overlay as PNG (orthogonal views through the peak for volumes)")
    def map_png(map_id: str, k: int = 0, cmap: str = "jet", alpha: float = 0.5):
        from medlens.render.overlay import png_bytes
        from medlens.workflows.explain import draw

        record: MapRecord = state.maps.get(map_id, "map")
        if cmap not in ("jet", "viridis", "inferno", "magma", "hot", "gray", "turbo", "plasma"):
            raise HTTPProblem(400, f"cmap {cmap!r} not offered")
        heat = record.maps[min(max(k, 0), record.maps.shape[0] - 1)]
        rgb = draw(record.image.display, heat, cmap, min(max(alpha, 0.0), 1.0))
        return Response(png_bytes(rgb), media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{_stem(record)}.png"'})

    @app.get("/api/maps/{map_id}.nii.gz", summary="The maps as NIfTI in the input's geometry (volumes)")
    def map_nifti(map_id: str):
        from medlens.io.nifti import write_nifti

        record: MapRecord = state.maps.get(map_id, "map")
        if record.maps.dim() != 4:
            raise HTTPProblem(400, "NIfTI downloads are for volumes")
        work = Path(tempfile.mkdtemp(dir=state.tmp))
        try:
            target = write_nifti(work / "map.nii.gz", record.maps, record.image.loaded.meta)
            data = Path(target).read_bytes()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return Response(data, media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{_stem(record)}.nii.gz"'})

    @app.get("/api/maps/{map_id}/slice.png", summary="One slice of a map as PNG (colormapped)")
    def map_slice(map_id: str, axis: int = 0, index: int | None = None, cmap: str = "jet"):
        from medlens.render.overlay import colorize, png_bytes, to_uint8

        record: MapRecord = state.maps.get(map_id, "map")
        plane = _plane(record.maps[:1], axis, index)[0]
        return Response(png_bytes(to_uint8(colorize(plane, cmap))), media_type="image/png")

    return app


def _plane(volume: torch.Tensor, axis: int, index: int | None) -> torch.Tensor:
    """(C, H, W) plane of a (C, *S) image: the image itself in 2D, a slice along ``axis`` in 3D."""
    if volume.dim() == 3:
        return volume
    if axis not in (0, 1, 2):
        raise HTTPProblem(400, "axis must be 0 (axial), 1 (coronal) or 2 (sagittal)")
    n = volume.shape[1 + axis]
    i = n // 2 if index is None else index
    if not 0 <= i < n:
        raise HTTPProblem(400, f"slice {i} out of range 0..{n - 1}")
    return volume.select(1 + axis, i)


def _stem(record: MapRecord) -> str:
    import re

    name = Path(record.image.name).name
    for suffix in (".nii.gz", ".nii", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".zip"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}_{record.method}") or "map"


class _Guard:
    """ASGI middleware: bearer token on /api (when set) and a hard limit on request bodies."""

    def __init__(self, app, token: str | None, max_body: int) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.token and (path.startswith("/api") or path == "/openapi.json" or path.startswith("/docs")):
            given = headers.get("authorization", "")
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return await _plain(send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        length = headers.get("content-length")
        if length is not None:
            try:
                if int(length) > self.max_body + 64 * 1024:  # multipart framing on top of the file
                    return await _drain_and_refuse(receive, send, self.max_body)
            except ValueError:
                return await _plain(send, 400, "bad Content-Length")
        seen = 0
        started = False
        limit = self.max_body + 64 * 1024

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message, headers=list(message.get("headers", [])) + SECURITY_HEADERS)
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await _plain(send, 413, f"request body larger than --max-upload ({self.max_body} bytes)")


#: sent with every response: no framing, no MIME sniffing, scripts only from the server itself
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
                                 b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'"),
]


class _TooLarge(Exception):
    pass


async def _plain(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _drain_and_refuse(receive, send, limit: int) -> None:
    drained = 0  # read (a bounded part of) the body first, so the client sees the answer, not a reset
    while drained < 64 * MB:
        message = await receive()
        if message["type"] != "http.request":
            break
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await _plain(send, 413, f"request body larger than --max-upload ({limit} bytes)")


def served_model(
    spec: str, weights: str | None = None, num_classes: int = 2, in_channels: int = 1, dims: int = 2,
    size: Sequence[int] | None = None, normalize: str = "none", class_names: Sequence[str] | None = None,
    device: str = "cpu", name: str | None = None,
) -> ServedModel:
    """Build a :class:`ServedModel` from a model spec or a ``medlens train`` run folder.

    The model and its preparation come from :func:`medlens.models.run_folder.load_model_source`,
    the loader ``explain``, ``evaluate`` and ``prototype`` use: a run folder gives the spec, kwargs,
    channels, size, training normalisation and class names of the run; an ``hf:`` or ``bundle:``
    model its own. Options given here win. Weights load safely (``weights_only`` or safetensors)
    and only from ``.pt/.pth/.ckpt/.safetensors/.bin`` files.
    """
    from medlens.data.prepare import parse_normalize
    from medlens.models.run_folder import is_run_folder, is_weights_file, load_model_source

    if weights is not None and not is_weights_file(weights):
        raise MedlensError(f"--weights {weights}: only .pt/.pth/.ckpt/.safetensors files are loaded")
    source = load_model_source(spec, weights, num_classes=num_classes, in_channels=in_channels, dims=dims,
                               device=device, class_names=list(class_names) if class_names else None)
    pre = source.preprocessing
    run = is_run_folder(spec)
    changes = parse_normalize(normalize) if (normalize != "none" or not run) else {}
    if size is not None:
        dims_now = pre.dims or dims
        changes["size"] = tuple(size) * dims_now if len(size) == 1 else tuple(size)
    pre = pre.override(channels=pre.channels or in_channels, dims=pre.dims or dims,
                       class_names=list(class_names) if class_names else None, **changes)
    if pre.model_transform is not None and normalize != "none":
        pre = replace(pre, model_transform=None)
    return ServedModel(
        name=name or (Path(spec).name if run else spec), model=source.model.eval(), dims=pre.dims or dims,
        in_channels=pre.channels or in_channels, size=pre.size, normalize=pre.normalize,
        class_names=list(pre.class_names) if pre.class_names else None, preprocessing=pre,
    )
