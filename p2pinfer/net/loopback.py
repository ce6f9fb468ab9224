"""Streams from a node to itself.

libp2p cannot dial its own peer ID, but a peer's own client (its OpenAI gateway) must be able to offer work
to, and have work verified by, the peer it runs in: otherwise a single peer with a gateway could never
serve, and the gateway's peer would silently drop out of every election it starts. A loopback pair is an
in-memory stream that the node's registered protocol handler serves exactly as it serves a remote stream:
the same framing, limits, timeouts and signed messages, minus the socket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.id import ID


@dataclass(frozen=True)
class _Conn:
    peer_id: ID


class LoopbackStream:
    """One end of an in-memory stream pair, with the subset of ``INetStream`` that ``FrameStream`` uses."""

    def __init__(self, protocol: str, peer_id: ID, send: trio.MemorySendChannel[bytes],
                 receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._protocol = protocol
        self.muxed_conn = _Conn(peer_id)
        self._send = send
        self._receive = receive
        self._pending = bytearray()
        self._reset = False
        self.other: "LoopbackStream | None" = None

    def get_protocol(self) -> str:
        return self._protocol

    async def read(self, n: int = -1) -> bytes:
        if self._reset:
            raise StreamReset("loopback stream was reset")
        if not self._pending:
            try:
                self._pending += await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                if self._reset:
                    raise StreamReset("loopback stream was reset") from None
                return b""
        take = len(self._pending) if n is None or n < 0 else min(n, len(self._pending))
        data = bytes(self._pending[:take])
        del self._pending[:take]
        return data

    async def write(self, data: bytes) -> None:
        if self._reset:
            raise StreamReset("loopback stream was reset")
        try:
            await self._send.send(bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise StreamReset("the other end of the loopback stream is gone") from None

    async def close_write(self) -> None:
        await self._send.aclose()

    async def close(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()

    async def reset(self) -> None:
        self._reset = True
        if self.other is not None:
            self.other._reset = True
        await self.close()


def loopback_pair(protocol: str, peer_id: ID) -> tuple[LoopbackStream, LoopbackStream]:
    """(dialer end, listener end). Unbounded buffers: frames are bounded by the framing layer's limits."""
    a_send, b_receive = trio.open_memory_channel[bytes](math.inf)
    b_send, a_receive = trio.open_memory_channel[bytes](math.inf)
    dialer = LoopbackStream(protocol, peer_id, a_send, a_receive)
    listener = LoopbackStream(protocol, peer_id, b_send, b_receive)
    dialer.other, listener.other = listener, dialer
    return dialer, listener
