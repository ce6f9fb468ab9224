"""Peer addresses as plain strings, so py-libp2p's types stay inside ``p2pinfer.net``."""

from __future__ import annotations

from dataclasses import dataclass

import multiaddr
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as _Libp2pPeerInfo

from .keys import to_libp2p_id


@dataclass(frozen=True)
class PeerInfo:
    """A peer ID and the multiaddrs (without ``/p2p/...``) it can be dialled on."""

    peer_id: str
    addrs: tuple[str, ...] = ()

    def to_libp2p(self) -> _Libp2pPeerInfo:
        return _Libp2pPeerInfo(to_libp2p_id(self.peer_id), [multiaddr.Multiaddr(a) for a in self.addrs])

    @classmethod
    def from_libp2p(cls, info: _Libp2pPeerInfo) -> "PeerInfo":
        return cls(info.peer_id.to_base58(), tuple(strip_p2p(str(a)) for a in info.addrs))

    def dial_addrs(self) -> list[str]:
        """Full multiaddrs including ``/p2p/<peer id>``, as printed for others to use."""
        return [f"{a}/p2p/{self.peer_id}" for a in self.addrs]


def strip_p2p(addr: str) -> str:
    """``/ip4/1.2.3.4/tcp/4001/p2p/12D3...`` -> ``/ip4/1.2.3.4/tcp/4001``.

    A relayed address keeps its relay's ID: ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>`` ->
    ``<relay addr>/p2p/<relay>/p2p-circuit``.
    """
    marker = "/p2p/"
    circuit = addr.rfind("/p2p-circuit")
    start = circuit + len("/p2p-circuit") if circuit >= 0 else 0
    i = addr.find(marker, start)
    return addr if i < 0 else addr[:i]


def parse_multiaddr(addr: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(addr)
    except Exception as exc:
        raise ValueError(f"{addr!r} is not a valid multiaddr ({exc})") from None


def parse_peer_multiaddr(addr: str) -> PeerInfo:
    """Parse a dialable multiaddr that ends in ``/p2p/<peer id>`` (as bootstrap lists contain)."""
    ma = parse_multiaddr(addr.strip())
    try:
        # the last /p2p/ names the peer (a relayed address names its relay first)
        peer = ma.get_peer_id() if "/p2p-circuit" in str(ma) else ma.value_for_protocol("p2p")
    except Exception:
        peer = None
    if not peer:
        raise ValueError(f"{addr!r} has no /p2p/<peer id> part; a bootstrap address must name the peer")
    try:
        peer_id = ID.from_base58(peer).to_base58()
    except Exception:
        raise ValueError(f"{addr!r}: {peer!r} is not a libp2p peer ID") from None
    return PeerInfo(peer_id, (strip_p2p(str(ma)),))


def merge_peer_infos(infos: list[PeerInfo]) -> list[PeerInfo]:
    """One entry per peer ID (first-seen order), with the union of their addresses."""
    merged: dict[str, list[str]] = {}
    for info in infos:
        addrs = merged.setdefault(info.peer_id, [])
        addrs.extend(a for a in info.addrs if a not in addrs)
    return [PeerInfo(pid, tuple(addrs)) for pid, addrs in merged.items()]
