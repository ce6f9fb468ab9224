"""Domain-separated hashing and the length-prefixed framing our signatures and IDs use.

Every hash or signature input starts with a domain string (``p2pinfer/v1/...``), each part prefixed with
its length as an unsigned LEB128 varint (as in libp2p's signed envelopes, RFC 0002). Two different
purposes therefore never hash or sign the same bytes.
"""

from __future__ import annotations

import hashlib


def uvarint(n: int) -> bytes:
    """Unsigned LEB128, as used by multiformats and protobuf."""
    if n < 0:
        raise ValueError("uvarint of a negative number")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_prefixed(*parts: bytes) -> bytes:
    return b"".join(uvarint(len(p)) + p for p in parts)


def tagged_hash(domain: str, *parts: bytes) -> bytes:
    """SHA-256 over ``varint(len(domain)) || domain || varint(len(p)) || p ...``."""
    return hashlib.sha256(length_prefixed(domain.encode("utf-8"), *parts)).digest()
