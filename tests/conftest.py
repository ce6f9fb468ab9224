"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_models() -> Path:
    """``shared/models`` beside the repository (CI layout), else ``$P2PINFER_SHARED_MODELS``."""
    candidates = [REPO_ROOT.parent / "shared" / "models"]
    if os.environ.get("P2PINFER_SHARED_MODELS"):
        candidates.append(Path(os.environ["P2PINFER_SHARED_MODELS"]))
    for candidate in candidates:
        if (candidate / "README.md").is_file():
            return candidate
    raise FileNotFoundError(
        f"fixture models not found in {', '.join(map(str, candidates))}; put shared/models beside the "
        f"repository or set P2PINFER_SHARED_MODELS")
