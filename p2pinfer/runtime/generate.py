"""The generation loop: one prefill, then one token per step over the KV cache.

Two faces over the same step machine (:class:`Generation`):

* :func:`generate` — plain synchronous, for benchmarks, tests and verifier tooling;
* :class:`TokenStream` — an async iterator for trio that runs every onnxruntime call in a worker thread
  (``trio.to_thread.run_sync``), so the event loop never blocks; it yields :class:`GeneratedToken` and holds
  the :class:`GenerationResult` in ``.result`` when exhausted.

Output index ``i`` is picked by :func:`.tiebreak.resolve` from (seed material, i, the log-probs at that
position, params) — and, at a near tie only, the float64 reference row of prompt + output so far — so
``prefix_ids`` (tokens another executor already emitted) continue a request exactly where it stopped.
The output includes the EOS token when one ends generation (its text does not); a stop string ends
generation after the token that completes it, and the returned text is cut before the stop string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import trio

from ..log import get_logger
from .fingerprint import FORMAT, Fingerprint, FingerprintBuilder, commitment
from .model import KVDecoder, LoadedModel
from .memory import release_freed_memory
from .reference import ReferenceSession, reference_session
from .sampling import GREEDY, SamplingParams, log_softmax
from .stop_text import StopText
from .tie_tolerance import tie_tolerance as model_tie_tolerance
from .tiebreak import resolve

def _log():  # bound per call, so that log.configure() made later still applies
    return get_logger("p2pinfer.runtime.generate")

PREFILL_CHUNK = 512
FINISH_REASONS = ("length", "eos", "stop")


class IncrementalDecoder:
    """Turns a token stream into text deltas without splitting multi-byte characters."""

    def __init__(self, model: LoadedModel) -> None:
        self._model = model
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        before = self._model.decode(self._ids[self._prefix:self._read])
        now = self._model.decode(self._ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self._model.decode(self._ids[self._prefix:self._read])
        now = self._model.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return now[len(before):]


@dataclass(frozen=True)
class GeneratedToken:
    index: int  # output index of this token
    token_id: int
    text: str  # text released with this token (may be empty while a stop string could still match)


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # "length", "eos" or "stop"
    fingerprint: Fingerprint
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    fingerprint_format: str = FORMAT

    @property
    def fingerprint_bytes(self) -> bytes:
        return self.fingerprint.pack()

    @property
    def commitment(self) -> bytes:
        return commitment(self.fingerprint_bytes, self.fingerprint_format)


@dataclass
class Generation:
    """The step machine. Call :meth:`start` once, then :meth:`step` until it returns None."""

    model: LoadedModel
    prompt_ids: Sequence[int]
    max_tokens: int
    params: SamplingParams = GREEDY
    seed_material: bytes = bytes(32)
    stop: Sequence[str] = ()
    prefix_ids: Sequence[int] = ()
    stop_at_eos: bool = True
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    _decoder_kv: KVDecoder | None = None
    _next_logprobs: np.ndarray | None = None
    _fp: FingerprintBuilder = field(default_factory=FingerprintBuilder)
    _decoder: IncrementalDecoder | None = None
    _text: StopText = field(default_factory=StopText)
    _prefill_s: float = 0.0
    _decode_s: float = 0.0
    _reference: ReferenceSession | None = None  # this request's float64 reference (near ties only)
    #: the near-tie detector's width; None: the model's, for the path its session runs (runtime/tie_tolerance.py).
    #: Given by hand only by tooling (benchmarks/sampler_freedom.py measures the single-width rule with it)
    tie_tolerance: float | None = None

    def __post_init__(self) -> None:
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        self.prefix_ids = [int(t) for t in self.prefix_ids]
        self.stop = tuple(s for s in self.stop if s)
        if not self.prompt_ids:
            raise ValueError("the prompt must have at least one token")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if len(self.prefix_ids) >= self.max_tokens:
            raise ValueError("prefix_ids already hold max_tokens tokens; nothing left to generate")
        if len(self.prompt_ids) + len(self.prefix_ids) >= self.model.context_length:
            raise ValueError(f"prompt of {len(self.prompt_ids)} tokens (+{len(self.prefix_ids)} emitted) leaves no "
                             f"room in the model's context of {self.model.context_length}")
        self._decoder = IncrementalDecoder(self.model)
        self._text = StopText(self.stop)
        self._reference = reference_session(self.model)  # builds nothing until a near tie asks for a row

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def start(self) -> list[GeneratedToken]:
        """Prefill prompt + prefix (in chunks); returns the prefix tokens as already-generated tokens."""
        t0 = time.perf_counter()
        seq = [*self.prompt_ids, *self.prefix_ids]
        cache = self.model.empty_cache()
        first_row = len(self.prompt_ids) - 1  # row that predicts output index 0
        n_prefix = len(self.prefix_ids)
        last: np.ndarray | None = None
        for lo in range(0, len(seq), PREFILL_CHUNK):
            chunk = seq[lo:lo + PREFILL_CHUNK]
            end = lo + len(chunk)
            # rows first_row .. first_row + n_prefix - 1 produced the prefix tokens; the last row is next:
            # only rows from first_row on are computed (the LM head of the prompt rows is wasted work)
            top = end - max(1, end - max(lo, first_row))
            logits, cache = self.model.forward(chunk, cache, last=end - top)
            for r in range(max(first_row, lo), min(first_row + n_prefix, end)):
                self._fp.add(log_softmax(logits[r - top]))
            last = logits[-1]
        # every later position goes through the in-place decoder: room for all tokens this request can add
        capacity = min(self.model.context_length, len(self.prompt_ids) + self.max_tokens)
        self._decoder_kv = self.model.decoder(cache, capacity)
        assert last is not None
        replay: list[GeneratedToken] = []
        for i, token in enumerate(self.prefix_ids):
            self.output_ids.append(token)
            replay.append(GeneratedToken(i, token, self._push_text(token)))
        self._next_logprobs = log_softmax(last)
        self._prefill_s = time.perf_counter() - t0
        return replay

    def _push_text(self, token: int) -> str:
        assert self._decoder is not None
        self._text.append(self._decoder.push(token))
        return self._text.release()

    def step(self) -> GeneratedToken | None:
        """Sample the next token (and run the model on it unless generation ends). None once finished."""
        if self.finished:
            return None
        if self._next_logprobs is None:
            raise RuntimeError("call start() first")
        t0 = time.perf_counter()
        i = len(self.output_ids)
        lp = self._next_logprobs
        tie = model_tie_tolerance(self.model) if self.tie_tolerance is None else self.tie_tolerance
        token = resolve(lp, self.params, self.seed_material, i, tie, self._reference_row)
        self._fp.add(lp)
        self.output_ids.append(token)
        is_eos = self.stop_at_eos and token in self.model.eos_token_ids
        piece = ""
        if not is_eos:
            assert self._decoder is not None
            piece = self._decoder.push(token)
        if is_eos:
            self.finish_reason = "eos"
        elif self._text.push(piece):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.max_tokens:
            self.finish_reason = "length"
        elif len(self.prompt_ids) + len(self.output_ids) >= self.model.context_length:
            self.finish_reason = "length"
        if self.finished:
            assert self._reference is not None
            self._reference.close()  # its float64 KV cache is this request's only
            if self.finish_reason != "stop":
                assert self._decoder is not None
                self._text.append(self._decoder.flush())
            text = self._text.release(final=True)
        else:
            text = self._text.release()
            assert self._decoder_kv is not None
            self._next_logprobs = log_softmax(self._decoder_kv.step(token))
        self._decode_s += time.perf_counter() - t0
        if self.finished:  # the request's KV buffers and what decoding freed go back to the OS, not held until
            self._decoder_kv = None  # the next request (glibc keeps freed heap: ~35 MB after 512 tokens)
            release_freed_memory()
            self.model.drop_weight_pages()  # the embedding rows its tokens faulted in (standard graph)
        return GeneratedToken(i, token, text)

    def _reference_row(self, index: int) -> np.ndarray:
        """The float64 reference row predicting output index ``index`` (a near tie only; see tiebreak), over
        this request's float64 KV cache (a later near tie computes only the positions after the last one)."""
        assert self._reference is not None
        return self._reference.row([*self.prompt_ids, *self.output_ids[:index]])

    def result(self) -> GenerationResult:
        if not self.finished:
            raise RuntimeError("generation has not finished")
        return GenerationResult(list(self.prompt_ids), list(self.output_ids), self._text.text,
                                str(self.finish_reason), self._fp.build(), self._prefill_s, self._decode_s)


def generate(model: LoadedModel, prompt_ids: Sequence[int], *, max_tokens: int,
             params: SamplingParams = GREEDY, seed_material: bytes = bytes(32), stop: Sequence[str] = (),
             prefix_ids: Sequence[int] = (), stop_at_eos: bool = True,
             tie_tolerance: float | None = None) -> GenerationResult:
    """Generate synchronously (blocks the calling thread). ``tie_tolerance``: see :class:`Generation`."""
    gen = Generation(model, prompt_ids, max_tokens, params, seed_material, stop, prefix_ids, stop_at_eos,
                     tie_tolerance=tie_tolerance)
    gen.start()
    while gen.step() is not None:
        pass
    return gen.result()


class TokenStream:
    """``async for token in TokenStream(...)``: generation in worker threads; ``.result`` at the end.

    The tokens of ``prefix_ids`` are not yielded again (the client already has them).
    """

    def __init__(self, model: LoadedModel, prompt_ids: Sequence[int], *, max_tokens: int,
                 params: SamplingParams = GREEDY, seed_material: bytes = bytes(32), stop: Sequence[str] = (),
                 prefix_ids: Sequence[int] = (), stop_at_eos: bool = True,
                 limiter: trio.CapacityLimiter | None = None) -> None:
        self._gen = Generation(model, prompt_ids, max_tokens, params, seed_material, stop, prefix_ids,
                               stop_at_eos)
        self._started = False
        self._limiter = limiter
        self.result: GenerationResult | None = None

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> GeneratedToken:
        if not self._started:
            await trio.to_thread.run_sync(self._gen.start, limiter=self._limiter)
            self._started = True
        token = await trio.to_thread.run_sync(self._gen.step, limiter=self._limiter)
        if token is None:
            if self.result is None:
                self.result = self._gen.result()
            raise StopAsyncIteration
        if self._gen.finished and self.result is None:
            self.result = self._gen.result()
        return token

    async def collect(self) -> GenerationResult:
        """Run to the end and return the result."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result
