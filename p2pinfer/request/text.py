"""Text from verified tokens (client side): what a user sees is decoded from token IDs, never taken from the
executor's ``TokenChunk.text``.

The executor signs token IDs and verifiers check token IDs; text is a function of those IDs and the model's
tokenizer, which the model digest covers. So the client decodes the IDs itself with :class:`VerifiedText`,
which releases text exactly as the executor's generation loop does (no split UTF-8 characters, EOS not shown,
text held back while it could still become a stop string, cut at the first stop string).

A client that does not hold the model gets the tokenizer by digest from any peer serving it
(``/p2pinfer/tokenizer/1``, :mod:`p2pinfer.request.tokenizer_service`): the manifest of digest entries must
hash to the digest asked for, and each file (tokenizer, configs, chat template; never weights) must match its
entry's size and SHA-256, or the next peer is asked. Verified files are cached on disk under
``<cache>/<digest hex>/`` (written to a temporary folder, renamed into place) and in memory, so only the first
request for a model pays for the fetch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import trio
from tokenizers import Tokenizer

from ..errors import P2PInferError
from ..identity import Identity
from ..log import get_logger
from ..net import NetError, Node
from ..runtime.digest import TOKENIZER_FILE, DigestEntry, digest_from_entries
from ..runtime.generate import IncrementalDecoder
from ..runtime.model import read_model_info
from ..runtime.stop_text import StopText
from ..wire import WireError, decode_signed, encode_signed
from ..wire.messages import FileChunk, TokenizerManifest, TokenizerQuery
from .tokenizer_service import MAX_REPLY_FRAME, TEXT_FILES, TOKENIZER_PROTOCOL

log = get_logger("p2pinfer.text")

MAX_TOKENIZER_BYTES = 64 << 20  # all text files of one model together; bounds what a peer can make us hold
FETCH_TIMEOUT_S = 20.0


class TokenizerUnavailable(P2PInferError):
    """No peer sent a tokenizer that matches the model digest."""


@dataclass
class ModelText:
    """A model's tokenizer and what decoding needs from its configs (checked against the digest)."""

    digest: bytes
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]
    folder: Path

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @classmethod
    def load(cls, digest: bytes, folder: Path) -> "ModelText":
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        info = read_model_info(folder, tokenizer)
        return cls(digest, tokenizer, tuple(info.eos_token_ids), folder)


class VerifiedText:
    """Turns verified token IDs into the text a user sees, chunk by chunk (mirrors ``runtime.generate``)."""

    def __init__(self, model: ModelText, stop: Sequence[str] = ()) -> None:
        self._decoder = IncrementalDecoder(model)  # type: ignore[arg-type]  # it only calls .decode
        self._eos = set(model.eos_token_ids)
        self._text = StopText(stop)
        self._ended = False

    def push(self, token_ids: Sequence[int]) -> str:
        """The text these tokens release (may be empty while a stop string could still complete)."""
        for token in token_ids:
            if self._ended:
                break  # tokens after EOS or a stop string are never shown (verification rejects them)
            if token in self._eos:
                self._text.append(self._decoder.flush())
                self._ended = True
                break
            if self._text.push(self._decoder.push(int(token))):
                self._ended = True
        return self._text.release(final=self._ended)

    def finish(self) -> str:
        """The rest, once the output is complete."""
        if not self._ended:
            self._text.append(self._decoder.flush())
            self._text.cut_at_stop()
            self._ended = True
        return self._text.release(final=True)


def default_cache_dir() -> Path:
    """``$P2PINFER_TOKENIZER_CACHE``, else ``$XDG_CACHE_HOME/p2pinfer/tokenizers`` (``~/.cache/...``)."""
    if os.environ.get("P2PINFER_TOKENIZER_CACHE"):
        return Path(os.environ["P2PINFER_TOKENIZER_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "p2pinfer" / "tokenizers"


def _check_entries(digest: bytes, manifest: TokenizerManifest) -> list[DigestEntry]:
    entries = [DigestEntry(f.path, f.size, f.sha256) for f in manifest.entries]
    if manifest.model != digest or digest_from_entries(entries) != digest:
        raise TokenizerUnavailable("the peer's digest entries do not hash to the model digest")
    wanted = [e for e in entries if e.relpath in TEXT_FILES]
    if TOKENIZER_FILE not in {e.relpath for e in wanted}:
        raise TokenizerUnavailable("the digest entries list no tokenizer.json")
    if sum(e.size for e in wanted) > MAX_TOKENIZER_BYTES:
        raise TokenizerUnavailable(f"the model's tokenizer files exceed {MAX_TOKENIZER_BYTES} bytes")
    return wanted


class TokenizerCache:
    """Verified tokenizers by model digest: memory, then disk, then any peer serving the model."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._memory: dict[bytes, ModelText] = {}
        self._lock = trio.Lock()
        self.fetched_bytes = 0  # bytes received from peers by this cache (for benchmarks and the CLI)

    def has(self, digest: bytes) -> bool:
        """Whether ``digest``'s tokenizer is held here (memory or disk), so :meth:`get` asks no peer."""
        return digest in self._memory or (self.cache_dir / digest.hex() / TOKENIZER_FILE).is_file()

    async def get(self, node: Node, identity: Identity, digest: bytes, peers: Sequence[str]) -> ModelText:
        async with self._lock:  # concurrent requests for one model fetch it once
            if digest in self._memory:
                return self._memory[digest]
            folder = self.cache_dir / digest.hex()
            model = await trio.to_thread.run_sync(self._load_cached, digest, folder)
            if model is None:
                model = await self._fetch(node, identity, digest, peers, folder)
            self._memory[digest] = model
            return model

    @staticmethod
    def _load_cached(digest: bytes, folder: Path) -> ModelText | None:
        if not (folder / TOKENIZER_FILE).is_file():
            return None
        try:
            return ModelText.load(digest, folder)
        except Exception as exc:  # a damaged cache entry: fetch it again
            log.warning("tokenizer.cache_unreadable", folder=str(folder), error=repr(exc)[:200])
            return None

    async def _fetch(self, node: Node, identity: Identity, digest: bytes, peers: Sequence[str],
                     folder: Path) -> ModelText:
        problems = []
        for peer_id in peers:
            try:
                with trio.fail_after(FETCH_TIMEOUT_S):
                    files = await self._fetch_from(node, identity, digest, peer_id)
                model = await trio.to_thread.run_sync(self._store, digest, folder, files)
                log.info("tokenizer.fetched", model=digest.hex()[:16], peer_id=peer_id,
                         bytes=sum(len(d) for d in files.values()))
                return model
            except (NetError, WireError, TokenizerUnavailable, trio.TooSlowError) as exc:
                reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)[:160]
                problems.append(f"{peer_id[-8:]}: {reason}")
                log.info("tokenizer.fetch_failed", model=digest.hex()[:16], peer_id=peer_id, reason=reason)
        raise TokenizerUnavailable(
            f"no peer sent a tokenizer matching model {digest.hex()[:16]}… ({'; '.join(problems) or 'no peers'}); "
            "the text cannot be decoded safely, so retry later")

    async def _fetch_from(self, node: Node, identity: Identity, digest: bytes, peer_id: str) -> dict[str, bytes]:
        async def ask(path: str, offset: int, expect: type) -> object:
            query = encode_signed(identity, TokenizerQuery(model=digest, path=path, offset=offset))
            reply = await node.request(peer_id, TOKENIZER_PROTOCOL, query, timeout=FETCH_TIMEOUT_S,
                                       max_frame=MAX_REPLY_FRAME)
            self.fetched_bytes += len(reply)
            return decode_signed(reply, expect=expect, max_size=MAX_REPLY_FRAME).message

        manifest = await ask("", 0, TokenizerManifest)
        files: dict[str, bytes] = {}
        for entry in _check_entries(digest, manifest):  # type: ignore[arg-type]
            data = bytearray()
            while len(data) < entry.size:
                chunk = await ask(entry.relpath, len(data), FileChunk)
                if chunk.model != digest or chunk.path != entry.relpath or chunk.offset != len(data) or not chunk.data:  # type: ignore[attr-defined]
                    raise TokenizerUnavailable(f"the peer sent a wrong or empty chunk of {entry.relpath}")
                data += chunk.data  # type: ignore[attr-defined]
                if len(data) > entry.size:
                    raise TokenizerUnavailable(f"the peer sent more bytes of {entry.relpath} than its entry says")
            if hashlib.sha256(data).digest() != entry.sha256:
                raise TokenizerUnavailable(f"{entry.relpath} does not match its SHA-256 in the digest")
            files[entry.relpath] = bytes(data)
        return files

    def _store(self, digest: bytes, folder: Path, files: dict[str, bytes]) -> ModelText:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.cache_dir))
        try:
            for rel, data in files.items():
                (tmp / rel).write_bytes(data)
            try:
                model = ModelText.load(digest, tmp)
            except Exception as exc:  # verified bytes that still do not load: a broken model, not a peer's lie
                raise TokenizerUnavailable(f"the model's tokenizer does not load: {exc}") from None
            if folder.exists():
                shutil.rmtree(folder)
            os.rename(tmp, folder)
            model.folder = folder
            return model
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
