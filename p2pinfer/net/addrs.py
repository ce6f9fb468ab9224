"""Peer addresses as plain strings, so py-libp2p's types stay inside ``p2pinfer.net``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

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
        """py-libp2p's PeerInfo; addresses that do not parse are left out (they may come from the DHT)."""
        parsed = []
        for a in self.addrs:
            try:
                parsed.append(multiaddr.Multiaddr(a))
            except Exception:
                continue
        return _Libp2pPeerInfo(to_libp2p_id(self.peer_id), parsed)

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


# Announced addresses must be something a peer can dial: an IP or DNS name, then a TCP (or UDP) port, then
# optionally a relay circuit (``/p2p/<relay id>/p2p-circuit``).
_HOST_PROTOCOLS = frozenset({"ip4", "ip6", "dns", "dns4", "dns6"})
_PORT_PROTOCOLS = frozenset({"tcp", "udp"})
_SUFFIX_PROTOCOLS = frozenset({"quic-v1", "p2p", "p2p-circuit", "ws", "wss", "tls"})
_WILDCARDS = frozenset({"0.0.0.0", "::", "0:0:0:0:0:0:0:0"})
MAX_ADDR_CHARS = 256


def dialable_problem(addr: str) -> str | None:
    """Why ``addr`` is not a dialable multiaddr (``None`` when it is). Pure; never raises."""
    if not isinstance(addr, str) or not addr or len(addr) > MAX_ADDR_CHARS:
        return "empty or longer than 256 characters"
    try:
        parts = [(p.name, v) for p, v in multiaddr.Multiaddr(addr).items()]
    except Exception:
        return "not a multiaddr"
    if len(parts) < 2 or parts[0][0] not in _HOST_PROTOCOLS or parts[1][0] not in _PORT_PROTOCOLS:
        return "not /ip4|ip6|dns*/<host>/tcp|udp/<port>"
    host, port = parts[0][1], parts[1][1]
    if host in _WILDCARDS or not host:
        return "wildcard address"
    try:
        if not 0 < int(port or 0) < 65536:
            return "port 0"
    except ValueError:
        return "bad port"
    if any(name not in _SUFFIX_PROTOCOLS for name, _ in parts[2:]):
        return "unsupported protocol after the port"
    return None


def parse_dialable(addrs: Iterable[str]) -> list[multiaddr.Multiaddr]:
    """The addresses of ``addrs`` that are dialable (``/p2p`` stripped); others are skipped, never raised."""
    out = []
    for addr in addrs:
        if dialable_problem(addr) is None:
            try:
                out.append(multiaddr.Multiaddr(strip_p2p(addr)) if "/p2p-circuit" not in addr
                           else multiaddr.Multiaddr(addr))
            except Exception:
                continue
    return out


def merge_peer_infos(infos: list[PeerInfo]) -> list[PeerInfo]:
    """One entry per peer ID (first-seen order), with the union of their addresses."""
    merged: dict[str, list[str]] = {}
    for info in infos:
        addrs = merged.setdefault(info.peer_id, [])
        addrs.extend(a for a in info.addrs if a not in addrs)
    return [PeerInfo(pid, tuple(addrs)) for pid, addrs in merged.items()]
