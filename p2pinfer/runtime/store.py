"""A content-addressed local model store: ``root/<digest hex>/`` holds one model folder.

Each folder keeps the model's files (the digest's files, which include its JSON configs and chat template, plus
``special_tokens_map.json`` when present) and a metadata file ``p2pinfer-model.json``::

    {"format": "p2pinfer-model/1", "name": ..., "digest": <hex>, "numeric_class": "fp32-cpu",
     "tolerance": null | <measured>, "calibration": null | {...}, "files": [{"path", "size", "sha256"}, ...],
     "imported_at_ms": ..., "source": <folder it came from>}

``tolerance`` is the pair tolerance; ``calibration`` is :class:`~.calibrate.CalibrationResult` as JSON, with the
tie tolerances per path (``"tie_tolerances": {"kernel,amx,decode=integer": ..., "standard": ...}``). A record
calibrated by an older format holds no tie tolerances: it counts as uncalibrated and is calibrated again before it
is served (:attr:`ModelRecord.calibrated`), so a served model always has them.

Imports copy into a temporary folder under ``root``, hash the copy, and rename it into place, so a store
never holds a half-copied model under a digest. A model is imported without a tolerance: only its calibration
(:meth:`ModelStore.ensure_calibrated`) sets one, and :func:`resolve_models` calibrates before serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import P2PInferError
from ..log import get_logger
from .digest import DigestEntry, ModelFormatError, check_inside, digest_entries, digest_files, digest_from_entries
from .calibrate import CALIBRATION_FORMAT, SERVING_TOKENS, CalibrationResult
from .calibrate import calibrate as measure_tolerance
from .memory import release_freed_memory
from .model import LoadedModel, load_model
from .tie_tolerance import record as record_tie_tolerances

def _log():  # bound per call, so that log.configure() made later still applies
    return get_logger("p2pinfer.runtime.store")

METADATA_FILE = "p2pinfer-model.json"
#: Calibration measurements so far, kept while calibration runs so that an interrupted one resumes.
CALIBRATION_PARTIAL_FILE = "p2pinfer-calibration.partial.json"
METADATA_FORMAT = "p2pinfer-model/1"
EXTRA_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja")
#: Quantized classes: weights kept in one GGUF block quantization (MatMulNBits, float32 arithmetic). Each is
#: its own class: a verifier must run the very same quantized weights.
QUANTIZED_CLASSES = ("q4_0-cpu", "q4_1-cpu", "q8_0-cpu", "q4_k-cpu", "q6_k-cpu")
NUMERIC_CLASSES = ("fp32-cpu", "fp32-cuda", "fp16-cuda", *QUANTIZED_CLASSES)
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
    tolerance: float | None  # None until calibrated
    files: list[DigestEntry]
    calibration: dict[str, Any] | None = None
    imported_at_ms: int = 0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def digest_hex(self) -> str:
        return self.digest.hex()

    @property
    def calibrated(self) -> bool:
        """Its tolerance was measured, for the numeric class it is served as, by this calibration format."""
        done = self.calibration or {}
        return (self.tolerance is not None and bool(done)
                and done.get("numeric_class", self.numeric_class) == self.numeric_class
                and done.get("format") == CALIBRATION_FORMAT)

    @property
    def calibration_outdated(self) -> bool:
        """A calibration is stored, but an older p2pinfer measured it another way: it is measured again."""
        done = self.calibration or {}
        return bool(done) and done.get("format") != CALIBRATION_FORMAT

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
                tolerance=_stored_tolerance(data),
                files=[DigestEntry(f["path"], int(f["size"]), bytes.fromhex(f["sha256"])) for f in data["files"]],
                calibration=data.get("calibration"),
                imported_at_ms=int(data.get("imported_at_ms", 0)),
                source=str(data.get("source", "")),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{path / METADATA_FILE} is malformed: {exc}") from None

    @property
    def tie_tolerances(self) -> dict[str, Any]:
        """The calibration's near-tie detector widths per path (:mod:`.tie_tolerance`); empty when uncalibrated."""
        found = (self.calibration or {}).get("tie_tolerances") if self.calibrated else None
        return dict(found) if isinstance(found, dict) else {}

    def load(self, **session_options: Any) -> LoadedModel:
        """Open the model (``providers``, ``threads``, ``optimization`` pass through to the session); its
        session's near-tie detector uses the tie tolerance calibrated for the path it runs."""
        model = load_model(self.path, digest=self.digest, name=self.name, numeric_class=self.numeric_class,
                           tolerance=self.tolerance, **session_options)
        record_tie_tolerances(model, self.tolerance, self.tie_tolerances)
        return model


def _stored_tolerance(data: dict[str, Any]) -> float | None:
    """The tolerance a metadata file holds, if the current calibration format measured it. Stores written before
    tolerances were always measured hold the old default (0.001) beside ``"calibration": null``: that is no
    measurement; a calibration of an older format is not this one's (the model is calibrated again)."""
    calibration = data.get("calibration")
    if not isinstance(calibration, dict) or calibration.get("format") != CALIBRATION_FORMAT \
            or data.get("tolerance") is None:
        return None
    return float(data["tolerance"])


def declared_numeric_class(model_dir: Path) -> str | None:
    """The numeric class ``model.onnx``'s metadata declares (``p2pinfer.numeric_class``), if any."""
    import onnx  # the graph proto only: external weights are not read

    try:
        proto = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    except Exception:  # an unreadable graph is refused later, with the loader's message
        return None
    for entry in proto.metadata_props:
        if entry.key == "p2pinfer.numeric_class" and entry.value in NUMERIC_CLASSES:
            return entry.value
    return None


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

    def import_dir(self, src: Path, name: str | None = None, numeric_class: str | None = None) -> ModelRecord:
        """Copy a model folder into the store (idempotent: an existing digest is returned as it is).

        ``numeric_class`` None takes the class the graph declares (GGUF imports name their quantization),
        else ``fp32-cpu``; a class that contradicts the graph's declaration is refused.
        """
        src = Path(src).expanduser().resolve()
        if not src.is_dir():
            raise ModelFormatError(f"{src} is not a directory")
        declared = declared_numeric_class(src)
        if numeric_class is None:
            numeric_class = declared or "fp32-cpu"
        elif declared is not None and numeric_class != declared:
            raise P2PInferError(f"{src} holds {declared} weights; it cannot be served as {numeric_class} "
                                f"(import it without --numeric-class, or re-import the GGUF with --weights fp32)")
        if numeric_class not in NUMERIC_CLASSES:
            raise P2PInferError(f"unknown numeric class {numeric_class!r}; use one of {', '.join(NUMERIC_CLASSES)}")
        files = digest_files(src)  # refuses links out of the folder
        files += [f for f in EXTRA_FILES if f not in files and (src / f).is_file() and check_inside(src, f)]
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
            record = ModelRecord(tmp, digest, name or src.name, numeric_class, None, entries,
                                 imported_at_ms=int(time.time() * 1000), source=str(src))
            _write_json_atomic(tmp / METADATA_FILE, record.to_json())
            if target.exists():  # a leftover without metadata
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError:  # another process sharing this store finished the same import first
                if (target / METADATA_FILE).is_file():
                    return self._read(target)
                raise
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
        record.calibration = {"format": CALIBRATION_FORMAT, **calibration, "numeric_class": record.numeric_class}
        _write_json_atomic(record.path / METADATA_FILE, record.to_json())
        with contextlib.suppress(FileNotFoundError):
            (record.path / CALIBRATION_PARTIAL_FILE).unlink()
        return record

    def set_extra(self, key: str, **extra: Any) -> ModelRecord:
        """Add free-form fields to a model's metadata (e.g. which importer wrote it)."""
        record = self.get(key)
        record.extra.update(extra)
        _write_json_atomic(record.path / METADATA_FILE, record.to_json())
        return record

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """An exclusive lock shared by every process using this store (imports, calibrations)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".lock-{name}", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def ensure_calibrated(self, key: str, *, tokens: int = SERVING_TOKENS,
                          progress: Callable[[int, int], None] | None = None) -> ModelRecord:
        """Calibrate the model once per digest and numeric class; resume an interrupted calibration.

        Runs under the store lock of that digest, so several peers sharing the store calibrate it once.
        Measurements are saved after every step in ``p2pinfer-calibration.partial.json`` in the model's
        folder; a calibration killed half-way continues from there. ``progress(done, total)`` reports steps.
        """
        record = self.get(key)
        if record.calibrated:
            return record  # the common case, without waiting for a lock another process may hold
        with self.locked(record.digest_hex):
            record = self.get(record.digest_hex)
            if not record.calibrated:
                self._calibrate_locked(record, tokens, progress)
        return self.get(record.digest_hex)

    def calibrate(self, key: str, *, tokens: int = SERVING_TOKENS,
                  progress: Callable[[int, int], None] | None = None) -> CalibrationResult:
        """Measure the model's honest drift again (or finish a measurement cut short) and store its tolerance,
        whether or not it was calibrated before (``p2pinfer models calibrate``)."""
        record = self.get(key)
        with self.locked(record.digest_hex):
            return self._calibrate_locked(record, tokens, progress)

    def _calibrate_locked(self, record: ModelRecord, tokens: int,
                          progress: Callable[[int, int], None] | None) -> CalibrationResult:
        result = measure_tolerance(record.load(providers=["CPUExecutionProvider"]), new_tokens=tokens,
                                   progress=progress, checkpoint=record.path / CALIBRATION_PARTIAL_FILE)
        release_freed_memory()
        _log().info("models.calibrated", digest=record.digest_hex, numeric_class=record.numeric_class,
                    worst_drift=f"{result.worst_drift:.3g}", tolerance=f"{result.tolerance:.3g}",
                    seconds=round(result.seconds, 1))
        self.set_calibration(record.digest_hex, result.tolerance, result.to_json())
        return result

    def calibration_pending(self, key: str) -> bool:
        """True when a calibration of this model was started and not finished."""
        return (self.get(key).path / CALIBRATION_PARTIAL_FILE).is_file()


def resolve_models(store: ModelStore, specs: Sequence[str], *,
                   calibration_progress: Callable[[str], Callable[[int, int], None] | None] | None = None,
                   **session_options: Any) -> list[LoadedModel]:
    """Load the models a peer serves: each spec is a model folder (imported into the store first) or a
    digest, digest prefix or name already in the store.

    A model is never served without a measured tolerance: one not yet calibrated (or whose calibration was
    cut short) is calibrated here, once per digest and numeric class; ``calibration_progress(name)`` may
    give a ``progress(done, total)`` callback for it."""
    models = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            record = store.import_dir(path)
        else:
            record = store.get(spec)
        if not record.calibrated:
            _log().info("models.calibrating", digest=record.digest_hex, name=record.name,
                        resumed=store.calibration_pending(record.digest_hex),
                        outdated=record.calibration_outdated)
            progress = calibration_progress(record.name) if calibration_progress is not None else None
            record = store.ensure_calibrated(record.digest_hex, progress=progress)
        models.append(record.load(**session_options))
    return models
