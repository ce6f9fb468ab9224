"""Replay protection for signed messages.

A signature proves who said something, not when. Every message type that can be replayed carries either a
validity window (``issued_at_ms`` / ``expires_at_ms``), a per-signer sequence number, or is bound to a
request ID that is itself fresh. :class:`ReplayGuard` enforces the window and remembers the IDs of messages
already accepted until they expire, so the same signed bytes are accepted at most once.
"""

from __future__ import annotations

import heapq
import time

from .errors import ReplayError

DEFAULT_MAX_CLOCK_SKEW_MS = 30_000
DEFAULT_MAX_LIFETIME_MS = 10 * 60_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def check_window(
    issued_at_ms: int,
    expires_at_ms: int,
    *,
    now: int | None = None,
    max_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS,
    max_lifetime_ms: int = DEFAULT_MAX_LIFETIME_MS,
) -> None:
    """Raise :class:`ReplayError` unless ``now`` lies in the message's validity window."""
    now = now_ms() if now is None else now
    if expires_at_ms <= issued_at_ms:
        raise ReplayError(f"expires ({expires_at_ms}) before it was issued ({issued_at_ms})")
    if expires_at_ms - issued_at_ms > max_lifetime_ms:
        raise ReplayError(f"validity of {expires_at_ms - issued_at_ms} ms exceeds the maximum of {max_lifetime_ms} ms")
    if issued_at_ms > now + max_skew_ms:
        raise ReplayError(f"issued {issued_at_ms - now} ms in the future (more than {max_skew_ms} ms of clock skew)")
    if expires_at_ms <= now:
        raise ReplayError(f"expired {now - expires_at_ms} ms ago")


class ReplayGuard:
    """Remembers accepted message IDs until they expire. Bounded: the oldest are forgotten first."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._max_entries = max_entries
        self._expiry: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def check_and_remember(self, message_id: bytes, expires_at_ms: int, *, now: int | None = None) -> None:
        """Raise :class:`ReplayError` if ``message_id`` was accepted before; otherwise remember it."""
        now = now_ms() if now is None else now
        self._forget_expired(now)
        if message_id in self._expiry:
            raise ReplayError("message was already received (replay)")
        if expires_at_ms <= now:
            raise ReplayError(f"expired {now - expires_at_ms} ms ago")
        while len(self._expiry) >= self._max_entries and self._heap:
            _, oldest = heapq.heappop(self._heap)
            self._expiry.pop(oldest, None)
        self._expiry[message_id] = expires_at_ms
        heapq.heappush(self._heap, (expires_at_ms, message_id))

    def _forget_expired(self, now: int) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, message_id = heapq.heappop(self._heap)
            self._expiry.pop(message_id, None)
