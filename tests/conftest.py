"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_models() -> Path:
    """The fixture ONNX models: ``<repo>/../shared/models`` (CI layout) or ``$P2PINFER_SHARED_MODELS``."""
    candidates = [REPO_ROOT.parent / "shared" / "models"]
    if os.environ.get("P2PINFER_SHARED_MODELS"):
        candidates.append(Path(os.environ["P2PINFER_SHARED_MODELS"]))
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"fixture models not found in {', '.join(map(str, candidates))}; set P2PINFER_SHARED_MODELS"
    )
