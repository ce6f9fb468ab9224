"""Shared fixtures.

The ONNX fixture models live in ``shared/models`` beside the repository (CI clones the repo to
``<dir>/main`` with ``<dir>/shared``); ``P2PINFER_SHARED_MODELS`` overrides the location.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_models() -> Path:
    env = os.environ.get("P2PINFER_SHARED_MODELS")
    candidates = [Path(env)] if env else []
    candidates += [REPO_ROOT.parent / "shared" / "models", REPO_ROOT / "shared" / "models"]
    for candidate in candidates:
        if (candidate / "README.md").exists():
            return candidate
    raise FileNotFoundError(
        "fixture models not found: expected shared/models beside the repository, or set P2PINFER_SHARED_MODELS"
    )


@pytest.fixture(scope="session")
def shared_models() -> Path:
    return find_shared_models()


@pytest.fixture(scope="session")
def trained_model(shared_models: Path):
    from p2pinfer.runtime import load_model

    return load_model(shared_models / "tiny-llama-trained", providers=["CPUExecutionProvider"])
