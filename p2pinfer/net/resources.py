"""A small resource manager in the spirit of libp2p's: every limit on what a remote peer may hold open.

All limits are declared once, in :class:`ResourceLimits`; ``docs/network.md`` lists them. They bound what
one peer can make us hold, whatever it sends:

* inbound streams at once, per peer and per (peer, protocol), and per protocol over all peers;
* connections per peer (one: Yamux multiplexes streams) and in total;
* bytes buffered per Yamux stream (the receive window we granted, plus slack) and per connection.

py-libp2p 0.8.1 ships a resource manager (``libp2p.rcmgr``), but its stream limit is one global counter
(no per-peer or per-protocol scope is enforced when a stream is accepted), so the per-peer scopes live
here. The counting is pure; :mod:`p2pinfer.net.guard` applies it to the host.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class ResourceLimits:
    # A client running many requests at once opens one bid stream and one task stream per request to each
    # peer, plus verification; 128 concurrent per (peer, protocol) leaves room for that, and each stream's
    # buffered bytes are bounded separately (Yamux limits below), so these counts bound tasks, not memory.
    inbound_streams_per_peer: int = 256
    inbound_streams_per_protocol: int = 2048             # over all peers, per protocol
    inbound_streams_per_peer_protocol: int = 128         # default per (peer, protocol)
    per_peer_protocol: Mapping[str, int] = field(default_factory=lambda: {
        "/meshsub/1.1.0": 4, "/meshsub/1.2.0": 4,          # one long-lived pubsub stream (plus a replacement)
        "/ipfs/id/1.0.0": 4, "/ipfs/id/push/1.0.0": 4, "/ipfs/ping/1.0.0": 4,
    })
    connections_per_peer: int = 1                        # Yamux multiplexes; see host.py
    connections_total: int = 300
    yamux_stream_buffer_slack: int = 64 * 1024           # beyond the granted window: a protocol violation
    yamux_connection_buffer: int = 32 * 1024 * 1024      # all streams of one connection: twice the largest
                                                         # window one honest stream can be granted (16 MiB)


DEFAULT_LIMITS = ResourceLimits()


class ResourceScopes:
    """Counts of open inbound streams; ``try_open_*`` returns False (and counts nothing) past a limit."""

    def __init__(self, limits: ResourceLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.streams_per_peer: Counter[str] = Counter()
        self.streams_per_peer_protocol: Counter[tuple[str, str]] = Counter()
        self.streams_per_protocol: Counter[str] = Counter()

    def try_open_stream(self, peer_id: str) -> bool:
        if self.streams_per_peer[peer_id] >= self.limits.inbound_streams_per_peer:
            return False
        self.streams_per_peer[peer_id] += 1
        return True

    def close_stream(self, peer_id: str) -> None:
        _decrement(self.streams_per_peer, peer_id)

    def peer_protocol_limit(self, protocol: str) -> int:
        return self.limits.per_peer_protocol.get(protocol, self.limits.inbound_streams_per_peer_protocol)

    def try_open_protocol(self, peer_id: str, protocol: str) -> bool:
        key = (peer_id, protocol)
        if self.streams_per_peer_protocol[key] >= self.peer_protocol_limit(protocol):
            return False
        if self.streams_per_protocol[protocol] >= self.limits.inbound_streams_per_protocol:
            return False
        self.streams_per_peer_protocol[key] += 1
        self.streams_per_protocol[protocol] += 1
        return True

    def close_protocol(self, peer_id: str, protocol: str) -> None:
        _decrement(self.streams_per_peer_protocol, (peer_id, protocol))
        _decrement(self.streams_per_protocol, protocol)


def _decrement(counter: Counter, key: object) -> None:  # type: ignore[type-arg]
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
