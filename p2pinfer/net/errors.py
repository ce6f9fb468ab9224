"""Typed errors of the network layer.

Every failure the rest of p2pinfer can see from ``p2pinfer.net`` is one of these; py-libp2p's own exception
types never leak out. Each has a short machine-readable ``reason`` for logs and counters.
"""

from __future__ import annotations

from ..errors import P2PInferError


class NetError(P2PInferError):
    """Something went wrong talking to another peer."""

    reason = "net"


class DialError(NetError):
    """The peer could not be reached (no address, refused, handshake failed, ...)."""

    reason = "dial-failed"


class ProtocolNotSupported(NetError):
    """The peer is reachable but does not speak the requested protocol."""

    reason = "protocol-unsupported"


class StreamResetError(NetError):
    """The other side reset the stream (or the connection went away) mid-exchange."""

    reason = "reset"


class StreamClosedError(NetError):
    """The other side closed the stream before sending the frame we were waiting for."""

    reason = "closed"


class FrameTooLargeError(NetError):
    """A frame's announced length exceeds the limit for this protocol."""

    reason = "oversized"


class MalformedFrameError(NetError):
    """The bytes on the stream are not a valid frame (bad length prefix, truncated body, bad status)."""

    reason = "malformed"


class RequestTimeout(NetError):
    """The peer did not answer within the call's timeout."""

    reason = "timeout"


class RemoteError(NetError):
    """The peer's handler failed and said why (the message is the peer's, untrusted, at most 256 bytes)."""

    reason = "remote-error"


class BootstrapUnreachable(DialError):
    """None of the configured bootstrap nodes could be reached (the message names each address and cause)."""

    reason = "bootstrap-unreachable"
