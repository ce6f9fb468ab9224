"""Stop strings over a growing text (pure: no model, no I/O).

Generated text arrives in pieces, one per token. A stop string can span pieces, so text that could still
turn out to be the start of a stop string must not be shown yet: :class:`StopText` releases text only up to
``len(longest stop string) - 1`` characters before the end, and cuts the text at the first stop string as
soon as a piece completes one. Text once released is never taken back.

The executor's generation loop (:mod:`p2pinfer.runtime.generate`) and the client's decoding of verified
tokens (:mod:`p2pinfer.request.text`) both use it, so what a user sees is the same on either side.
"""

from __future__ import annotations

from typing import Sequence


class StopText:
    """The text so far, what of it was released, and where the first stop string cut it."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = tuple(s for s in stop if s)
        # a stop string completed by the next piece starts at most this many characters before the end
        self._reach = max(map(len, self.stop), default=1) - 1
        self.text = ""
        self.released = 0

    def push(self, piece: str) -> bool:
        """Append ``piece``; True when it completes a stop string (the text is then cut before it)."""
        before = len(self.text)
        self.text += piece
        return self.cut_at_stop(since=before)

    def append(self, piece: str) -> None:
        """Append ``piece`` without looking for stop strings (the tail decoded after generation ended)."""
        self.text += piece

    def cut_at_stop(self, since: int = 0) -> bool:
        """Cut the text at the first stop string that ends after position ``since``; True when one does."""
        if not self.stop:
            return False
        window = max(0, since - self._reach)
        hits = [p for p in (self.text.find(s, window) for s in self.stop) if p >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self.released = min(self.released, len(self.text))
        return True

    def release(self, *, final: bool = False) -> str:
        """The text not released before that can no longer become part of a stop string (all of it when
        ``final``: the output is complete)."""
        end = len(self.text)
        if self.stop and not final:
            end = max(self.released, end - self._reach)
        out = self.text[self.released:end]
        self.released = end
        return out
