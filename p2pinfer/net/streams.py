"""Framed request/response over our own libp2p protocols.

A frame is ``uvarint(len(body)) || body`` (unsigned LEB128, as multiformats and libp2p's own protocols use).
Bodies are opaque bytes here; p2pinfer puts canonical msgpack or signed envelopes in them. Every read has a
maximum frame size, checked on the length prefix *before* any body byte is buffered, and a timeout.

Two ways to use a protocol:

* **Streaming** (:class:`FrameStream`): both sides send and receive any number of frames; the handler
  registered with ``Node.register_handler`` gets a ``FrameStream`` (e.g. a task handler sending token
  chunks). A stream can carry many exchanges, which saves the multistream-select round trip that opening a
  new stream costs; the connection itself is always reused (one per peer, streams multiplexed by Yamux).
* **One-shot** (``Node.request`` / ``Node.register_request_handler``): the client sends one frame and gets
  one response frame. Response frames start with a status byte: ``0x00`` + body on success, ``0x01`` + a
  UTF-8 reason (at most 256 bytes) when the server's handler raised, so the caller gets a clean
  :class:`RemoteError` instead of a bare reset. A request handler serves requests on a stream in a loop until
  the client closes it, so ``FrameStream.call`` can reuse one stream for many requests.
"""

from __future__ import annotations

import math
from typing import AsyncIterator

import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError

from ..log import get_logger
from ..wire.hashing import uvarint
from .errors import (
    FrameTooLargeError,
    MalformedFrameError,
    NetError,
    RemoteError,
    RequestTimeout,
    StreamClosedError,
    StreamResetError,
)

log = get_logger("p2pinfer.net.streams")

DEFAULT_MAX_FRAME = 1 << 20  # matches p2pinfer.wire.codec.DEFAULT_MAX_SIZE
MAX_UVARINT_BYTES = 10  # a uvarint of a 64-bit length; anything longer is malformed
STATUS_OK = 0x00
STATUS_ERROR = 0x01
MAX_ERROR_BYTES = 256


class FrameStream:
    """A libp2p stream carrying length-prefixed frames.

    ``timeout`` is the default per-operation timeout in seconds (``None``: wait forever); each method also
    accepts its own. Errors are always :class:`~p2pinfer.net.errors.NetError` subclasses.
    """

    def __init__(self, stream: INetStream, *, max_frame: int = DEFAULT_MAX_FRAME, timeout: float | None = 30.0):
        self._stream = stream
        self.max_frame = max_frame
        self.timeout = timeout
        self._buffer = bytearray()
        self._eof = False
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()

    @property
    def remote_peer_id(self) -> str:
        return self._stream.muxed_conn.peer_id.to_base58()

    @property
    def protocol(self) -> str:
        return str(self._stream.get_protocol())

    # ---- low-level I/O ----------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        t = self.timeout if timeout is None else timeout
        return math.inf if t is None else trio.current_time() + t

    async def _fill(self) -> bool:
        """Read more bytes into the buffer; False at end of stream."""
        if self._eof:
            return False
        try:
            chunk = await self._stream.read(max(self.max_frame + MAX_UVARINT_BYTES - len(self._buffer), 1))
        except EOFError:
            self._eof = True
            return False
        except BaseLibp2pError as exc:
            raise _translate(exc) from None
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    async def _receive_unlocked(self) -> bytes | None:
        # Length prefix: at most MAX_UVARINT_BYTES bytes, checked against max_frame before reading the body.
        length = 0
        shift = 0
        pos = 0
        while True:
            while pos >= len(self._buffer):
                if not await self._fill():
                    if pos == 0 and not self._buffer:
                        return None  # clean end of stream between frames
                    raise MalformedFrameError("stream ended inside a frame's length prefix")
            byte = self._buffer[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if pos >= MAX_UVARINT_BYTES:
                raise MalformedFrameError("frame length prefix is longer than 10 bytes")
        if pos > 1 and byte == 0:
            raise MalformedFrameError("frame length prefix is not minimally encoded")
        if length > self.max_frame:
            raise FrameTooLargeError(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        while len(self._buffer) < pos + length:
            if not await self._fill():
                raise MalformedFrameError(
                    f"stream ended inside a frame: got {len(self._buffer) - pos} of {length} bytes"
                )
        body = bytes(self._buffer[pos:pos + length])
        del self._buffer[:pos + length]
        return body

    # ---- public API --------------------------------------------------------------------------------

    async def receive(self, *, timeout: float | None = None) -> bytes | None:
        """The next frame, or ``None`` if the peer closed its side cleanly between frames."""
        async with self._receive_lock:
            with trio.move_on_at(self._deadline(timeout)) as scope:
                return await self._receive_unlocked()
        assert scope.cancelled_caught
        raise RequestTimeout(f"no frame from {self.remote_peer_id} within {timeout or self.timeout} s")

    async def receive_required(self, *, timeout: float | None = None) -> bytes:
        """The next frame; a clean end of stream here is an error (:class:`StreamClosedError`)."""
        frame = await self.receive(timeout=timeout)
        if frame is None:
            raise StreamClosedError(f"{self.remote_peer_id} closed the stream before answering")
        return frame

    async def send(self, body: bytes, *, timeout: float | None = None) -> None:
        if len(body) > self.max_frame:
            raise FrameTooLargeError(f"refusing to send a frame of {len(body)} bytes (limit {self.max_frame})")
        async with self._send_lock:
            with trio.move_on_at(self._deadline(timeout)) as scope:
                try:
                    await self._stream.write(uvarint(len(body)) + body)
                except BaseLibp2pError as exc:
                    raise _translate(exc) from None
                return
        assert scope.cancelled_caught
        raise RequestTimeout(f"could not send to {self.remote_peer_id} within {timeout or self.timeout} s")

    async def call(self, body: bytes, *, timeout: float | None = None) -> bytes:
        """One request/response exchange on this stream (status-byte protocol, see the module docstring)."""
        deadline = self._deadline(timeout)
        with trio.move_on_at(deadline) as scope:
            await self.send(body, timeout=math.inf)
            return decode_response(await self.receive_required(timeout=math.inf))
        assert scope.cancelled_caught
        raise RequestTimeout(f"{self.remote_peer_id} did not answer within {timeout or self.timeout} s")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """Frames until the peer closes its side; each wait is bounded by the stream's timeout."""
        while True:
            frame = await self.receive()
            if frame is None:
                return
            yield frame

    async def close_write(self) -> None:
        """Tell the peer we will send no more frames (it reads end-of-stream); we can still receive."""
        try:
            await self._stream.close_write()
        except Exception:
            pass

    async def aclose(self) -> None:
        try:
            await self._stream.close()
        except BaseLibp2pError:
            pass
        except Exception:  # closing a half-dead stream must never raise out of a finally block
            pass

    async def reset(self) -> None:
        try:
            await self._stream.reset()
        except Exception:
            pass

    async def __aenter__(self) -> "FrameStream":
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None:
            await self.reset()
        else:
            await self.aclose()


def encode_ok(body: bytes) -> bytes:
    return bytes([STATUS_OK]) + body


def encode_error(reason: str) -> bytes:
    return bytes([STATUS_ERROR]) + reason.encode("utf-8", "replace")[:MAX_ERROR_BYTES]


def decode_response(frame: bytes) -> bytes:
    if not frame:
        raise MalformedFrameError("empty response frame (no status byte)")
    status = frame[0]
    if status == STATUS_OK:
        return frame[1:]
    if status == STATUS_ERROR:
        if len(frame) - 1 > MAX_ERROR_BYTES:
            raise MalformedFrameError("error response longer than 256 bytes")
        raise RemoteError(frame[1:].decode("utf-8", "replace"))
    raise MalformedFrameError(f"unknown response status byte 0x{status:02x}")


def _translate(exc: BaseException) -> NetError:
    name = type(exc).__name__
    if "Reset" in name:
        return StreamResetError(f"stream reset by peer ({name})")
    if "Closed" in name or "EOF" in name:
        return StreamClosedError(f"stream closed ({name})")
    return StreamResetError(f"stream failed: {name}: {exc}")
