"""Serving a model's tokenizer by digest: ``/p2pinfer/tokenizer/1`` (peer side).

A client that does not hold a model still shows text only from verified token IDs (docs/architecture.md,
"Text from verified tokens"), so it needs the model's tokenizer, and it must not trust the peer that sends it.
The model digest is built from per-file entries (:mod:`p2pinfer.runtime.digest`), so a peer answers

* ``TokenizerQuery(path="")`` with ``TokenizerManifest``: every digest entry (path, size, SHA-256), from which
  the client recomputes the digest it asked for;
* ``TokenizerQuery(path=P, offset=O)`` with ``FileChunk``: up to ``MAX_FILE_CHUNK`` bytes of P from O, where P
  is one of the model's text files (:data:`TEXT_FILES`: tokenizer, configs, chat template) — never weights.

Every reply is signed by this peer; the content needs no trust (the client checks sizes and hashes). Work per
query is a dictionary lookup and a slice of bytes held in memory: the manifest and the files are read once
per model (in a worker thread), from the store's metadata when the model came from a store. Queries are
rate-limited per peer (:data:`~p2pinfer.request.limits.TOKENIZER_RATE`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import trio

from ..errors import P2PInferError
from ..identity import Identity
from ..log import get_logger
from ..net import Node
from ..runtime import LoadedModel
from ..runtime.digest import CONFIG_FILES, TOKENIZER_FILE, DigestEntry, digest_entries, digest_from_entries
from ..wire import WireError, decode_signed, encode_signed
from ..wire.messages import MAX_FILE_CHUNK, FileChunk, ModelFile, TokenizerManifest, TokenizerQuery
from .limits import TOKENIZER_RATE, PeerRateLimiter
from .rate_gate import within_rate

log = get_logger("p2pinfer.tokenizer")

TOKENIZER_PROTOCOL = "/p2pinfer/tokenizer/1"
TEXT_FILES = (TOKENIZER_FILE, *CONFIG_FILES)  # what a client needs to render prompts and decode text
MAX_QUERY_FRAME = 1024
MAX_REPLY_FRAME = MAX_FILE_CHUNK + 4096
STORE_METADATA = "p2pinfer-model.json"


class TokenizerQueryError(P2PInferError):
    """A tokenizer query this peer cannot answer (sent back to the asker as a remote error)."""


@dataclass
class _Served:
    entries: list[DigestEntry]
    files: dict[str, bytes]


def _stored_entries(model: LoadedModel) -> list[DigestEntry] | None:
    """The digest entries a model store recorded after hashing its copy, if they still name this digest."""
    try:
        data = json.loads((Path(model.path) / STORE_METADATA).read_text(encoding="utf-8"))
        entries = [DigestEntry(str(f["path"]), int(f["size"]), bytes.fromhex(f["sha256"])) for f in data["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entries if digest_from_entries(entries) == model.digest else None


def load_served(model: LoadedModel) -> _Served:
    """Manifest and text files of ``model`` (blocking: reads, and hashes when no store metadata exists)."""
    entries = _stored_entries(model) or digest_entries(Path(model.path))
    if digest_from_entries(entries) != model.digest:
        raise TokenizerQueryError("this peer's model files do not match its digest")
    files = {}
    for e in entries:
        if e.relpath in TEXT_FILES:
            files[e.relpath] = (Path(model.path) / e.relpath).read_bytes()
    return _Served(entries, files)


class TokenizerService:
    """Answers ``/p2pinfer/tokenizer/1`` for the models this peer serves."""

    def __init__(self, node: Node, identity: Identity, models: Sequence[LoadedModel]) -> None:
        self.node = node
        self.identity = identity
        self.models = {m.digest: m for m in models}
        self._served: dict[bytes, _Served] = {}
        self._lock = trio.Lock()
        self._rate = PeerRateLimiter(TOKENIZER_RATE)

    def install(self) -> None:
        self.node.register_request_handler(TOKENIZER_PROTOCOL, self._on_query, max_frame=MAX_REPLY_FRAME)

    async def _served_for(self, digest: bytes) -> _Served:
        model = self.models.get(digest)
        if model is None:
            raise TokenizerQueryError("this peer does not serve that model")
        async with self._lock:  # one read per model, however many clients ask at once
            if digest not in self._served:
                self._served[digest] = await trio.to_thread.run_sync(load_served, model)
        return self._served[digest]

    async def _on_query(self, peer_id: str, body: bytes) -> bytes:
        if not await within_rate(self._rate, peer_id, self.node.peer_id):
            raise TokenizerQueryError(f"busy: more than {TOKENIZER_RATE.per_second:g} tokenizer queries/s (burst "
                                      f"{TOKENIZER_RATE.burst}) from this peer; back off and retry")
        try:
            query: TokenizerQuery = decode_signed(body, expect=TokenizerQuery, max_size=MAX_QUERY_FRAME).message
        except WireError as exc:
            log.info("tokenizer.invalid_query", peer_id=peer_id, error=str(exc)[:200])
            raise TokenizerQueryError(f"invalid tokenizer query: {exc}") from None
        served = await self._served_for(query.model)
        if not query.path:
            entries = tuple(ModelFile(e.relpath, e.size, e.sha256) for e in served.entries)
            return encode_signed(self.identity, TokenizerManifest(model=query.model, entries=entries))
        data = served.files.get(query.path)
        if data is None:
            raise TokenizerQueryError(f"{query.path!r} is not a tokenizer file of that model")
        if query.offset > len(data):
            raise TokenizerQueryError("offset beyond the end of the file")
        chunk = data[query.offset:query.offset + MAX_FILE_CHUNK]
        log.debug("tokenizer.chunk", peer_id=peer_id, path=query.path, offset=query.offset, bytes=len(chunk))
        return encode_signed(self.identity, FileChunk(model=query.model, path=query.path, offset=query.offset,
                                                      data=chunk))
