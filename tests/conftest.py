"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_models() -> Path:
    """``shared/models`` beside the repository (CI layout), else ``$P2PINFER_SHARED_MODELS``."""
    beside = REPO_ROOT.parent / "shared" / "models"
    if beside.is_dir():
        return beside
    env = os.environ.get("P2PINFER_SHARED_MODELS")
    if env and Path(env).is_dir():
        return Path(env)
    raise RuntimeError(f"fixture models not found: expected {beside} or P2PINFER_SHARED_MODELS to point at them")


@pytest.fixture(scope="session")
def shared_models() -> Path:
    return find_shared_models()


@pytest.fixture(scope="session")
def trained_model(shared_models: Path):
    from p2pinfer.runtime import load_model

    return load_model(shared_models / "tiny-llama-trained", providers=["CPUExecutionProvider"])
