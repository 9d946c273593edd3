"""Atomic writes: a temporary file in the destination folder, then a rename.

A reader never sees a half-written file, and an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from medlens.errors import MedlensError


@contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The temporary name keeps the suffix(es) of ``path`` (``.nii.gz``, ``.png``) so writers that
    infer the format from the name work. With ``overwrite=False`` an existing file is an error.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise MedlensError(f"{path} exists; refusing to overwrite it (pass --overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), overwrite)
