"""The keys and values of a recent request's first positions, kept for the next verification that starts alike.

Requests through the chat template share their first tokens: on SmolLM2 the system prompt
(``<|im_start|>system ... <|im_end|>\\n<|im_start|>user\\n``) is 24 of a short request's 35-60 prompt positions,
and a conversation's next turn repeats the whole of the last one. A key or value at position ``p`` depends only
on the tokens up to ``p``, so the positions a verifier computed for one request are what it would compute for
the next: it starts the next one after the longest prefix the two share, and its passes read the kept keys and
values from their past, as every pass after a verification's first does. On the default model the rows are
then bit for bit those of passes from position 0 (4-bit: tests/test_prefix_kv.py; fp32 measured alike); where
onnxruntime's attention rounds a row differently with its keys in the past than within the pass (seen on a tiny
fixture model), they are still the session's own honest rows, the kind calibration measures.

One entry per session (the bits are the session's: another graph or many-row path computes other rounding),
at most :data:`PREFIX_POSITIONS` positions and :data:`PREFIX_BYTES` bytes, replaced by the newest prompt that
does not start with it. Safe across threads: an entry is never changed once stored, only replaced.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: Positions kept: the chat template's system prompt and a short user message (24 + ~40 on SmolLM2).
PREFIX_POSITIONS = 64
#: And at most this many bytes of keys and values (46 KB a position on SmolLM2: 2.9 MB at 64 positions).
PREFIX_BYTES = 4 << 20


@dataclass(frozen=True)
class _Entry:
    session: object  # the onnxruntime session that computed it (compared by identity)
    tokens: tuple[int, ...]
    arrays: tuple[np.ndarray, ...]  # per past input, [1, kv_heads, len(tokens), head_dim]


class PrefixStore:
    """The newest stored prefix of one model's session (see the module's doc)."""

    def __init__(self) -> None:
        self._entry: _Entry | None = None
        self._lock = threading.Lock()

    def lookup(self, session: object, tokens: Sequence[int], limit: int) -> tuple[int, list[np.ndarray]]:
        """``(n, arrays)``: the keys and values of ``tokens[:n]`` (views of the stored arrays; n <= ``limit``),
        the longest stored prefix ``tokens`` starts with; ``(0, [])`` when there is none."""
        entry = self._entry
        if entry is None or entry.session is not session or limit < 1:
            return 0, []
        n = _common_prefix(entry.tokens, tokens, limit)
        if n == 0:
            return 0, []
        return n, [a[:, :, :n] for a in entry.arrays]

    def remember(self, session: object, tokens: Sequence[int], bytes_per_position: int,
                 keys_values: Callable[[int], list[np.ndarray]]) -> None:
        """Keep the first positions of ``tokens`` (as many as the limits allow), their keys and values copied by
        ``keys_values(n)``: only when the stored entry does not already hold them."""
        n = min(len(tokens), PREFIX_POSITIONS, PREFIX_BYTES // max(1, bytes_per_position))
        if n < 1:
            return
        head = tuple(int(t) for t in tokens[:n])
        entry = self._entry
        if entry is not None and entry.session is session and entry.tokens[:n] == head:
            return  # already held (the same prompt start, or a longer one)
        arrays = tuple(keys_values(n))
        with self._lock:
            self._entry = _Entry(session, head, arrays)

    def clear(self) -> None:
        with self._lock:
            self._entry = None


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
