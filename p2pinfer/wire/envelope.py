"""Signed envelopes: how every protocol message travels.

An envelope is the canonical msgpack map::

    {"payload": bin, "sig": bin(64), "signer": bin(32), "type": str, "v": 1}

``payload`` is the canonical encoding of the message. ``sig`` is the signer's Ed25519 signature of::

    varint(len(domain)) || domain || varint(len(payload)) || payload,   domain = "p2pinfer/v1/<type>"

so a signature made for one message type (or protocol version) can never be replayed as another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Iterable, TypeVar

from ..identity import Identity, peer_id_from_public_key, verify_signature
from . import codec
from .errors import SchemaError, SignatureError, UnknownTypeError, VersionError
from .hashing import length_prefixed, tagged_hash
from .messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message, signing_domain

M = TypeVar("M", bound=Message)

_ENVELOPE_KEYS = {"v", "type", "payload", "signer", "sig"}


def signing_input(message_type: str, payload: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    return length_prefixed(signing_domain(message_type, version).encode("utf-8"), payload)


@dataclass(frozen=True)
class Signed(Generic[M]):
    """A message together with who signed it and the exact bytes that were signed."""

    message: M
    signer: bytes
    signature: bytes
    payload: bytes

    @property
    def signer_peer_id(self) -> str:
        return peer_id_from_public_key(self.signer)

    @property
    def message_id(self) -> bytes:
        """Stable ID of this message: the tagged hash of its type and payload (independent of the signature)."""
        return tagged_hash("p2pinfer/v1/message-id", self.message.TYPE.encode(), self.payload)

    def to_bytes(self) -> bytes:
        return codec.encode(
            {"v": PROTOCOL_VERSION, "type": self.message.TYPE, "payload": self.payload, "signer": self.signer, "sig": self.signature}
        )


def sign(identity: Identity, message: M) -> Signed[M]:
    payload = message.encode()
    signature = identity.sign(signing_input(message.TYPE, payload))
    return Signed(message=message, signer=identity.public_key, signature=signature, payload=payload)


def encode_signed(identity: Identity, message: Message) -> bytes:
    """Sign ``message`` with ``identity`` and return the envelope bytes."""
    return sign(identity, message).to_bytes()


def decode_signed(
    data: bytes,
    *,
    expect: type[M] | Iterable[type[Message]] | None = None,
    max_size: int = codec.DEFAULT_MAX_SIZE,
) -> Signed[Any]:
    """Decode and verify an envelope. Raises a :class:`WireError` subclass naming what was wrong.

    ``expect`` restricts which message types are acceptable here (a token chunk arriving where a bid is
    expected is rejected before its signature is even checked).
    """
    raw = codec.decode(data, max_size=max_size)
    if not isinstance(raw, dict):
        raise SchemaError("an envelope must be a map", path="envelope")
    if set(raw) != _ENVELOPE_KEYS:
        raise SchemaError(
            f"envelope keys must be exactly {sorted(_ENVELOPE_KEYS)}, got {sorted(map(str, raw))}", path="envelope"
        )
    version, message_type, payload, signer, signature = (raw[k] for k in ("v", "type", "payload", "signer", "sig"))
    if not isinstance(version, int) or isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise VersionError(f"unsupported protocol version {version!r}; this peer speaks v{PROTOCOL_VERSION}")
    if not isinstance(message_type, str):
        raise SchemaError("type must be a string", path="envelope.type")
    cls = MESSAGE_TYPES.get(message_type)
    if cls is None:
        raise UnknownTypeError(f"unknown message type {message_type[:32]!r}")
    if expect is not None:
        allowed = (expect,) if isinstance(expect, type) else tuple(expect)
        if cls not in allowed:
            names = ", ".join(c.TYPE for c in allowed)
            raise UnknownTypeError(f"message type {message_type!r} is not acceptable here (expected {names})")
    if not isinstance(payload, bytes):
        raise SchemaError("payload must be bytes", path="envelope.payload")
    if not isinstance(signer, bytes) or len(signer) != 32:
        raise SchemaError("signer must be a 32-byte Ed25519 public key", path="envelope.signer")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise SchemaError("sig must be a 64-byte Ed25519 signature", path="envelope.sig")
    if not verify_signature(signer, signing_input(message_type, payload), signature):
        raise SignatureError(f"signature does not verify for signer {peer_id_from_public_key(signer)} and type {message_type!r}")
    message = cls.from_wire(codec.decode(payload, max_size=max_size), cls.TYPE)
    return Signed(message=message, signer=signer, signature=signature, payload=payload)
