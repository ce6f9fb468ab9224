"""A content-addressed local model store: ``root/<digest hex>/`` holds one model folder.

Each folder keeps the model's files (the digest's files plus its JSON configs and chat template) and a
metadata file ``p2pinfer-model.json``::

    {"format": "p2pinfer-model/1", "name": ..., "digest": <hex>, "numeric_class": "fp32-cpu",
     "tolerance": 0.001, "calibration": null | {...}, "files": [{"path", "size", "sha256"}, ...],
     "imported_at_ms": ..., "source": <folder it came from>}

Imports copy into a temporary folder under ``root``, hash the copy, and rename it into place, so a store
never holds a half-copied model under a digest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import P2PInferError
from ..log import get_logger
from .digest import DigestEntry, ModelFormatError, digest_entries, digest_files, digest_from_entries
from .model import DEFAULT_TOLERANCE, LoadedModel, load_model

def _log():  # bound per call, so that log.configure() made later still applies
    return get_logger("p2pinfer.runtime.store")

METADATA_FILE = "p2pinfer-model.json"
METADATA_FORMAT = "p2pinfer-model/1"
EXTRA_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja")
NUMERIC_CLASSES = ("fp32-cpu", "fp32-cuda", "fp16-cuda")
_HEX = re.compile(r"^[0-9a-f]+$")
MIN_PREFIX = 4


class ModelNotFoundError(P2PInferError):
    """No model (or more than one) in the store matches what the user gave."""


@dataclass
class ModelRecord:
    """One stored model, as its metadata file describes it."""

    path: Path
    digest: bytes
    name: str
    numeric_class: str
    tolerance: float
    files: list[DigestEntry]
    calibration: dict[str, Any] | None = None
    imported_at_ms: int = 0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def digest_hex(self) -> str:
        return self.digest.hex()

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": METADATA_FORMAT,
            "name": self.name,
            "digest": self.digest_hex,
            "numeric_class": self.numeric_class,
            "tolerance": self.tolerance,
            "calibration": self.calibration,
            "files": [{"path": f.relpath, "size": f.size, "sha256": f.sha256.hex()} for f in self.files],
            "imported_at_ms": self.imported_at_ms,
            "source": self.source,
            **self.extra,
        }

    @classmethod
    def from_json(cls, path: Path, data: dict[str, Any]) -> "ModelRecord":
        if data.get("format") != METADATA_FORMAT:
            raise ModelFormatError(f"{path / METADATA_FILE}: unknown format {data.get('format')!r}")
        known = {"format", "name", "digest", "numeric_class", "tolerance", "calibration", "files",
                 "imported_at_ms", "source"}
        try:
            return cls(
                path=path,
                digest=bytes.fromhex(data["digest"]),
                name=str(data["name"]),
                numeric_class=str(data["numeric_class"]),
                tolerance=float(data["tolerance"]),
                files=[DigestEntry(f["path"], int(f["size"]), bytes.fromhex(f["sha256"])) for f in data["files"]],
                calibration=data.get("calibration"),
                imported_at_ms=int(data.get("imported_at_ms", 0)),
                source=str(data.get("source", "")),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{path / METADATA_FILE} is malformed: {exc}") from None

    def load(self, **session_options: Any) -> LoadedModel:
        """Open the model (``providers``, ``threads``, ``optimization`` pass through to the session)."""
        return load_model(self.path, digest=self.digest, name=self.name, numeric_class=self.numeric_class,
                          tolerance=self.tolerance, **session_options)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ModelStore:
    """Models under ``root/<digest hex>/``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, digest: bytes) -> Path:
        return self.root / digest.hex()

    def _read(self, folder: Path) -> ModelRecord:
        try:
            data = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{folder / METADATA_FILE} is not readable: {exc}") from None
        if not isinstance(data, dict):
            raise ModelFormatError(f"{folder / METADATA_FILE} must hold a JSON object")
        return ModelRecord.from_json(folder, data)

    def import_dir(self, src: Path, name: str | None = None, numeric_class: str = "fp32-cpu") -> ModelRecord:
        """Copy a model folder into the store (idempotent: an existing digest is returned as it is)."""
        src = Path(src).expanduser().resolve()
        if not src.is_dir():
            raise ModelFormatError(f"{src} is not a directory")
        if numeric_class not in NUMERIC_CLASSES:
            raise P2PInferError(f"unknown numeric class {numeric_class!r}; use one of {', '.join(NUMERIC_CLASSES)}")
        files = digest_files(src) + [f for f in EXTRA_FILES if (src / f).is_file()]
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=self.root))
        try:
            for rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, tmp / rel)
            entries = digest_entries(tmp)  # hash the copy: what we store is what we name
            digest = digest_from_entries(entries)
            target = self._dir(digest)
            if (target / METADATA_FILE).is_file():
                _log().info("models.import.exists", digest=digest.hex(), source=str(src))
                return self._read(target)
            # load once before accepting it: a graph we cannot run has no place in the store
            load_model(tmp, digest=digest, providers=["CPUExecutionProvider"], threads=1)
            record = ModelRecord(tmp, digest, name or src.name, numeric_class, DEFAULT_TOLERANCE, entries,
                                 imported_at_ms=int(time.time() * 1000), source=str(src))
            _write_json_atomic(tmp / METADATA_FILE, record.to_json())
            if target.exists():  # a leftover without metadata
                shutil.rmtree(target)
            os.rename(tmp, target)
            record.path = target
            _log().info("models.imported", digest=digest.hex(), name=record.name, bytes=record.size_bytes)
            return record
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def list(self) -> list[ModelRecord]:
        if not self.root.is_dir():
            return []
        out = []
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            try:
                out.append(self._read(folder))
            except ModelFormatError as exc:
                _log().warning("models.store.skipped", folder=str(folder), reason=str(exc))
        return out

    def get(self, key: str) -> ModelRecord:
        """A model by full digest, unique digest prefix (>= 4 hex digits) or name."""
        key = key.strip()
        records = self.list()
        low = key.lower()
        if len(low) >= MIN_PREFIX and _HEX.match(low):
            hits = [r for r in records if r.digest_hex.startswith(low)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise ModelNotFoundError(f"digest prefix {key!r} matches {len(hits)} models; give more digits")
        hits = [r for r in records if r.name == key]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ModelNotFoundError(f"name {key!r} matches {len(hits)} models "
                                     f"({', '.join(r.digest_hex[:12] for r in hits)}); use a digest")
        from ..catalog import did_you_mean

        hint = did_you_mean(key, [r.name for r in records])
        raise ModelNotFoundError(f"no model {key!r} in {self.root}{hint}; see `p2pinfer models list`")

    def remove(self, key: str) -> ModelRecord:
        record = self.get(key)
        shutil.rmtree(record.path)
        _log().info("models.removed", digest=record.digest_hex, name=record.name)
        return record

    def set_calibration(self, key: str, tolerance: float, calibration: dict[str, Any]) -> ModelRecord:
        record = self.get(key)
        record.tolerance = float(tolerance)
        record.calibration = calibration
        _write_json_atomic(record.path / METADATA_FILE, record.to_json())
        return record


def resolve_models(store: ModelStore, specs: Sequence[str], **session_options: Any) -> list[LoadedModel]:
    """Load the models a peer serves: each spec is a model folder (imported into the store first) or a
    digest, digest prefix or name already in the store."""
    models = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            record = store.import_dir(path)
        else:
            record = store.get(spec)
        models.append(record.load(**session_options))
    return models
