"""A model's identity: SHA-256 over its ONNX graph, external weight files, tokenizer, configs and chat template.

Layout (documented in docs/models.md)::

    files  = ["model.onnx"] + sorted(external data files the graph references) + ["tokenizer.json"]
             + those of CONFIG_FILES that exist, in that order
    entry  = relpath (UTF-8, "/" separators) , size (uint64 big-endian) , SHA-256(file bytes)
    digest = tagged_hash("p2pinfer/v2/model-digest", entry_1.relpath, entry_1.size, entry_1.sha256, ...)

Everything a verdict or a shown text depends on is in it: the chat template decides ``prompt_ids``, the
configs decide EOS and the context length, the tokenizer decodes the text. Every file must be a regular file
inside the folder: a symbolic link that leads out of it is refused, never followed.

``tagged_hash`` prefixes the domain and every part with its length (LEB128), so the listing is unambiguous.
The external files are read from the graph itself (each initializer's ``external_data`` ``location``), so a
weight file cannot be swapped without changing the digest, and a graph that points outside its folder is
refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import P2PInferError
from ..wire.hashing import tagged_hash

DIGEST_DOMAIN = "p2pinfer/v2/model-digest"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja")
_CHUNK = 1 << 20


class ModelFormatError(P2PInferError):
    """A model folder that is incomplete or does not have the expected layout."""


@dataclass(frozen=True)
class DigestEntry:
    relpath: str
    size: int
    sha256: bytes


def file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.digest()


def external_data_files(onnx_path: Path) -> list[str]:
    """Relative paths of the external weight files ``onnx_path`` references (sorted, unique)."""
    import onnx  # imported lazily: only digests and the importer need it

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelFormatError(f"{onnx_path} is not a readable ONNX file: {exc}") from None
    locations: set[str] = set()

    def visit_tensor(t: "onnx.TensorProto") -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    locations.add(entry.value)

    def visit_graph(g: "onnx.GraphProto") -> None:
        for t in g.initializer:
            visit_tensor(t)
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    visit_tensor(attr.t)
                for t in attr.tensors:
                    visit_tensor(t)
                if attr.HasField("g"):
                    visit_graph(attr.g)
                for sub in attr.graphs:
                    visit_graph(sub)

    visit_graph(model.graph)
    out = []
    for loc in sorted(locations):
        rel = PurePosixPath(loc.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts:
            raise ModelFormatError(f"{onnx_path}: external data location {loc!r} points outside the model folder")
        out.append(str(rel))
    return out


def check_inside(model_dir: Path, rel: str) -> Path:
    """``model_dir / rel``, refused when it (or a link on its way) leads outside ``model_dir``."""
    root = Path(model_dir).resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise ModelFormatError(f"{model_dir}/{rel} is a link to {target}, outside the model folder; copy the file "
                               f"into the folder instead")
    return target


def digest_files(model_dir: Path) -> list[str]:
    """The files (relative to ``model_dir``) that make up the digest, in digest order."""
    model_dir = Path(model_dir)
    for name in (ONNX_FILE, TOKENIZER_FILE):
        check_inside(model_dir, name)
        if not (model_dir / name).is_file():
            raise ModelFormatError(f"{model_dir} has no {name}; a model folder needs model.onnx and tokenizer.json")
    external = external_data_files(model_dir / ONNX_FILE)
    for rel in external:
        check_inside(model_dir, rel)
        if not (model_dir / rel).is_file():
            raise ModelFormatError(f"{model_dir}/model.onnx references external weights {rel!r}, which is missing")
    configs = [name for name in CONFIG_FILES if (model_dir / name).exists() or (model_dir / name).is_symlink()]
    for name in configs:
        check_inside(model_dir, name)
        if not (model_dir / name).is_file():
            raise ModelFormatError(f"{model_dir}/{name} is not a regular file")
    return [ONNX_FILE, *external, TOKENIZER_FILE, *configs]


def digest_entries(model_dir: Path) -> list[DigestEntry]:
    model_dir = Path(model_dir)
    return [DigestEntry(rel, (model_dir / rel).stat().st_size, file_sha256(model_dir / rel))
            for rel in digest_files(model_dir)]


def digest_from_entries(entries: list[DigestEntry]) -> bytes:
    parts: list[bytes] = []
    for e in entries:
        parts += [e.relpath.encode("utf-8"), e.size.to_bytes(8, "big"), e.sha256]
    return tagged_hash(DIGEST_DOMAIN, *parts)


def compute_digest(model_dir: Path) -> bytes:
    """The 32-byte model digest of a model folder."""
    return digest_from_entries(digest_entries(Path(model_dir)))
