"""Protocol descriptors: each of our protocols' ID, frame limit and message types, stated once.

The serving side (``Node.register_request_handler`` / ``Node.register_handler``) and the asking side
(``Node.request`` / ``Node.open_stream``) both accept a :class:`Protocol` in place of a protocol ID string;
they then take the frame limit from it, so the two ends cannot disagree, and :meth:`Protocol.decode_request`
/ :meth:`Protocol.decode_response` check a frame against the declared message types and size.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from ..wire import Message, Signed, decode_signed


class Exchange(enum.Enum):
    ONE_SHOT = "one-shot"    # one request frame, one status-prefixed response frame (Node.request)
    STREAM = "stream"        # any number of frames both ways (Node.open_stream / register_handler)
    RAW = "raw"              # bodies are not signed envelopes (e.g. capacity sync pages, msgpack)


@dataclass(frozen=True)
class Protocol:
    id: str
    max_frame: int
    request: tuple[type[Message], ...] = ()
    response: tuple[type[Message], ...] = ()
    exchange: Exchange = Exchange.ONE_SHOT
    summary: str = ""

    def __str__(self) -> str:
        return self.id

    def decode_request(self, body: bytes) -> Signed[Any]:
        return decode_signed(body, expect=self.request, max_size=self.max_frame)

    def decode_response(self, body: bytes) -> Signed[Any]:
        return decode_signed(body, expect=self.response, max_size=self.max_frame)


def protocol_id(protocol: "Protocol | str") -> str:
    return protocol.id if isinstance(protocol, Protocol) else protocol


def frame_limit(protocol: "Protocol | str", explicit: int | None, default: int) -> int:
    """The frame limit to use: an explicit one wins, then the descriptor's, then ``default``."""
    if explicit is not None:
        return explicit
    return protocol.max_frame if isinstance(protocol, Protocol) else default
