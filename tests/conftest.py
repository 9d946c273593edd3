"""Shared fixtures: the real data beside the repository, and small real models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDLENS_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (it lives beside the repository as ../shared/data)")
    return path


@pytest.fixture
def brain_mri() -> Path:
    return shared_path("brain-tumor-mri")


@pytest.fixture
def hippocampus() -> Path:
    return shared_path("hippocampus")


@pytest.fixture
def chest_dicom() -> Path:
    return shared_path("chest-xray-dicom")
