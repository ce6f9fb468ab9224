"""Bridging p2pinfer identities and peer IDs to py-libp2p's key and ID types."""

from __future__ import annotations

from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from ..identity import Identity


def keypair_from_identity(identity: Identity) -> KeyPair:
    """The libp2p key pair of ``identity``: the same Ed25519 key, so the Noise handshake proves the peer ID."""
    private = Ed25519PrivateKey.from_bytes(identity.seed)
    keypair = KeyPair(private, private.get_public_key())
    # Cheap guard against a future py-libp2p changing how it derives IDs: the whole protocol relies on the
    # envelope signer's peer ID being the transport-authenticated peer ID.
    if ID.from_pubkey(keypair.public_key).to_base58() != identity.peer_id:
        raise RuntimeError("py-libp2p derives a different peer ID from this key than p2pinfer does")
    return keypair


def to_libp2p_id(peer_id: str | ID) -> ID:
    """A py-libp2p ``ID`` from a base58 peer ID string (or an ``ID``, returned as is)."""
    if isinstance(peer_id, ID):
        return peer_id
    try:
        return ID.from_base58(peer_id)
    except Exception:
        raise ValueError(f"{peer_id!r} is not a libp2p peer ID") from None
