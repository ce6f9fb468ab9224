"""Importing Llama-family GGUF models (llama.cpp's format) into ONNX model folders.

Public API::

    import_gguf(src, out_dir, *, progress=None, overwrite=False, single_file=False) -> ImportResult
    find_default_gguf() -> Path
    ensure_default_model(store, *, progress=None, calibration_progress=None) -> ModelRecord
"""

from .default_model import DEFAULT_GGUF_DISTRIBUTION, DEFAULT_MODEL_NAME, ensure_default_model, find_default_gguf
from .errors import (DefaultModelMissingError, GGUFImportError, UnsupportedArchitectureError,
                     UnsupportedTensorTypeError, UnsupportedTokenizerError)
from .importer import ImportResult, import_gguf

__all__ = [
    "DEFAULT_GGUF_DISTRIBUTION", "DEFAULT_MODEL_NAME", "DefaultModelMissingError", "GGUFImportError",
    "ImportResult", "UnsupportedArchitectureError", "UnsupportedTensorTypeError", "UnsupportedTokenizerError",
    "ensure_default_model", "find_default_gguf", "import_gguf",
]
