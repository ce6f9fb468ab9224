"""The network layer: everything that touches py-libp2p lives in this package.

Public API (what the request path and the CLI use):

* :class:`Node`, :class:`NodeConfig` — a running node (host + DHT + capacity gossip + our protocols).
* :class:`FrameStream` — a framed stream for our own protocols; errors from :mod:`p2pinfer.net.errors`.
* :class:`AnnouncementTable`, :class:`ServingEntry`, :func:`verify_announcement` — capacity announcements.
* :class:`PeerInfo`, :func:`parse_peer_multiaddr` — addresses as plain strings.
* :class:`Protocol`, :class:`Exchange` — protocol descriptors (ID, frame limit, message types).
* :class:`ResourceLimits`, :class:`FaultKind` — what a peer may hold open; what counts against it.
* :class:`RelayLimits`, :class:`Reachability` — NAT traversal (:mod:`p2pinfer.net.nat`).
* :func:`build_host`, :func:`keypair_from_identity` — the lower-level pieces.
"""

from .addrs import PeerInfo, parse_peer_multiaddr
from .announcements import (
    MAX_ANNOUNCEMENT_BYTES,
    AnnouncementRejected,
    AnnouncementTable,
    ServingEntry,
    verify_announcement,
)
from .dht import PROTOCOL_ID as DHT_PROTOCOL_ID
from .dht import Discovery, provider_key
from .errors import (
    BootstrapUnreachable,
    DialError,
    FrameTooLargeError,
    MalformedFrameError,
    NetError,
    ProtocolNotSupported,
    RemoteError,
    RequestTimeout,
    StreamClosedError,
    StreamResetError,
)
from .gossip import CAPACITY_TOPIC
from .host import build_host
from .keys import keypair_from_identity
from .faults import FaultKind
from .nat import Reachability, ReachabilityStatus, RelayLimits
from .nat_rules import Backoff, NatTiming
from .node import Node, NodeConfig
from .protocol import Exchange, Protocol
from .resources import ResourceLimits
from .streams import DEFAULT_MAX_FRAME, FrameStream

__all__ = [
    "AnnouncementRejected", "AnnouncementTable", "BootstrapUnreachable", "CAPACITY_TOPIC", "DEFAULT_MAX_FRAME",
    "DHT_PROTOCOL_ID", "DialError", "Discovery", "Exchange", "FaultKind", "FrameStream", "FrameTooLargeError",
    "MAX_ANNOUNCEMENT_BYTES", "MalformedFrameError", "NatTiming", "NetError", "Node", "NodeConfig", "PeerInfo",
    "Protocol", "Backoff",
    "ProtocolNotSupported", "Reachability", "ReachabilityStatus", "RelayLimits", "RemoteError", "RequestTimeout",
    "ResourceLimits",
    "ServingEntry", "StreamClosedError", "StreamResetError", "build_host", "keypair_from_identity",
    "parse_peer_multiaddr", "provider_key", "verify_announcement",
]
