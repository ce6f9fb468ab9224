"""Typed errors for everything that can be wrong with bytes received from the network.

Each carries a short machine-readable ``reason`` (logged and counted, e.g. ``reason=oversized``) and a
human-readable message saying exactly what was wrong.
"""

from __future__ import annotations


class WireError(ValueError):
    """Bytes from the network were rejected. ``reason`` is a stable short code."""

    reason = "invalid"

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class OversizedError(WireError):
    reason = "oversized"


class MalformedError(WireError):
    """Not valid msgpack: truncated, trailing bytes, invalid UTF-8, ..."""

    reason = "malformed"


class ExtensionTypeError(WireError):
    reason = "extension-type"


class NestingError(WireError):
    reason = "too-deep"


class NonCanonicalError(WireError):
    """Valid msgpack, but not the one canonical encoding of its value."""

    reason = "non-canonical"


class SchemaError(WireError):
    """The value does not match the message schema: missing or unknown field, wrong type, out of range."""

    reason = "schema"


class UnknownTypeError(WireError):
    reason = "unknown-type"


class VersionError(WireError):
    reason = "version"


class SignatureError(WireError):
    """The signature does not verify for this signer, message type and payload."""

    reason = "bad-signature"


class ReplayError(WireError):
    """The message was seen before, or is outside its validity window."""

    reason = "replay"
