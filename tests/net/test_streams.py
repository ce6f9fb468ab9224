"""Framed request/response between two real hosts on 127.0.0.1."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

from p2pinfer.errors import P2PInferError
from p2pinfer.net import (
    FrameStream,
    FrameTooLargeError,
    MalformedFrameError,
    ProtocolNotSupported,
    RemoteError,
    RequestTimeout,
    StreamResetError,
)
from p2pinfer.wire.hashing import uvarint

from .helpers import start

ECHO = "/p2pinfer/test-echo/1"
TOKENS = "/p2pinfer/test-tokens/1"
RAW = "/p2pinfer/test-raw/1"


async def expect_dropped(stream: FrameStream) -> None:
    """The server gave up on the stream: we see a reset, or (py-libp2p's Yamux reports some resets as a
    plain FIN) the end of the stream without a frame."""
    try:
        frame = await stream.receive(timeout=5)
    except StreamResetError:
        return
    assert frame is None


async def two_nodes(stack: AsyncExitStack):
    server = await start(stack, role="bootstrap")
    client = await start(stack, role="client", bootstrap=server.addrs)
    return server, client


async def test_request_response_errors_and_stream_reuse() -> None:
    async with AsyncExitStack() as stack:
        server, client = await two_nodes(stack)
        seen_peers = []

        async def echo(peer_id: str, body: bytes) -> bytes:
            seen_peers.append(peer_id)
            if body == b"fail":
                raise P2PInferError("no free slot")
            if body == b"crash":
                raise ZeroDivisionError("secret detail")
            if body == b"slow":
                await trio.sleep(5)
            return body.upper()

        server.register_request_handler(ECHO, echo)
        assert await client.request(server.peer_id, ECHO, b"hello", timeout=5) == b"HELLO"
        assert seen_peers == [client.peer_id]  # the handler learns the authenticated caller
        with pytest.raises(RemoteError, match="no free slot"):
            await client.request(server.peer_id, ECHO, b"fail", timeout=5)
        with pytest.raises(RemoteError, match="internal error"):  # details of unexpected errors stay local
            await client.request(server.peer_id, ECHO, b"crash", timeout=5)
        with pytest.raises(RequestTimeout):
            await client.request(server.peer_id, ECHO, b"slow", timeout=0.3)
        with pytest.raises(ProtocolNotSupported):
            await client.request(server.peer_id, "/p2pinfer/nobody-serves-this/1", b"x", timeout=5)
        # One stream, many calls (saves the protocol negotiation round trip).
        async with await client.open_stream(server.peer_id, ECHO, timeout=5) as stream:
            for i in range(20):
                assert await stream.call(b"x%d" % i) == b"X%d" % i
        # The server is still healthy after all of that.
        assert await client.request(server.peer_id, ECHO, b"ok", timeout=5) == b"OK"


async def test_streaming_handler_sends_many_frames() -> None:
    async with AsyncExitStack() as stack:
        server, client = await two_nodes(stack)

        async def tokens(stream: FrameStream) -> None:
            request = await stream.receive_required()
            for i in range(int(request)):
                await stream.send(b"chunk-%d" % i)

        server.register_handler(TOKENS, tokens)
        async with await client.open_stream(server.peer_id, TOKENS, timeout=5) as stream:
            await stream.send(b"50")
            chunks = [frame async for frame in stream]
        assert chunks == [b"chunk-%d" % i for i in range(50)]


async def test_oversized_and_malformed_frames_are_rejected_cleanly() -> None:
    async with AsyncExitStack() as stack:
        server, client = await two_nodes(stack)
        outcomes: list[str] = []

        async def raw(stream: FrameStream) -> None:
            try:
                await stream.receive_required()
                outcomes.append("frame")
            except (FrameTooLargeError, MalformedFrameError) as exc:
                outcomes.append(exc.reason)
                raise

        server.register_handler(RAW, raw, max_frame=1024)
        # An announced length over the limit is refused before the body is read.
        stream = await client.open_stream(server.peer_id, RAW, timeout=5)
        await stream._stream.write(uvarint(10_000_000))
        await expect_dropped(stream)
        # A length prefix that never ends.
        stream = await client.open_stream(server.peer_id, RAW, timeout=5)
        await stream._stream.write(b"\xff" * 11)
        await expect_dropped(stream)
        # A frame cut short by the sender closing.
        stream = await client.open_stream(server.peer_id, RAW, timeout=5)
        await stream._stream.write(uvarint(100) + b"only ten b")
        await stream.close_write()
        await expect_dropped(stream)
        assert outcomes == ["oversized", "malformed", "malformed"]
        # The sending side refuses to send oversized frames too.
        stream = await client.open_stream(server.peer_id, RAW, timeout=5, max_frame=16)
        with pytest.raises(FrameTooLargeError):
            await stream.send(b"x" * 17)
        await stream.reset()
        assert server.counters["handler.oversized"] == 1 and server.counters["handler.malformed"] == 2
