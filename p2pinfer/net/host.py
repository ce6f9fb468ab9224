"""Building a py-libp2p host from a p2pinfer identity.

Workarounds for py-libp2p 0.8.1 that live here:

* ``new_host()`` by default offers Noise, TLS, SECIO *and* ``/plaintext/2.0.0``, so any dialler can open an
  unauthenticated, unencrypted connection. We pass ``sec_opt`` with Noise only; a plaintext-only dialler
  fails security negotiation (tests/net/test_host.py proves it).
* With the default ``ConnectionConfig(max_connections_per_peer=3)`` every outbound dial waits a fixed
  ~250 ms (the swarm tries to open extra connections to the same peer). ``max_connections_per_peer=1``
  brings a dial on localhost to ~5 ms. One connection per peer is all we need: Yamux multiplexes streams.
* The swarm's auto-connector dials peers from the peerstore every 30 s (and on every disconnect) until it
  holds the midpoint of the low/high watermarks (150 connections by default, whatever ``min_connections``
  says). Our connectivity comes from bootstrap, the DHT and the gossip mesh; unsolicited dials to everyone
  we ever heard of would only add load (and make test topologies uncontrollable), so :func:`build_host`
  replaces that instance's ``maybe_connect`` with a no-op.
* Every failed dial is retried 3 times with backoff (``RetryConfig``), so an address that drops packets
  (a peer behind NAT) costs four dial timeouts. We dial once (``max_retries=0``): the callers have their
  own fallbacks (other addresses, relays, other peers).
* When two peers dial each other at once, ``Swarm._trim_connections`` leaves both connections up for its
  20 s grace period, then may close a different one at each end (both die). :mod:`p2pinfer.net.connection_trim`
  replaces it on this host: both ends close the same one, at once, after the streams on it have ended.
* A write cancelled between Noise's encryption and the socket skipped a nonce, and the other end dropped the
  whole connection at its next message: :mod:`p2pinfer.net.whole_writes` makes every secured write complete.
* The default muxer list also offers Mplex (deprecated, no flow control); we offer Yamux only.
* The swarm lets 32 dials run at once (go-libp2p's default) and queues the rest, first come first served;
  a dial holds its slot until its Noise handshake completes, which has no timeout of its own. A tarpit
  (accepts TCP, never answers) therefore holds a slot for as long as the caller waits (10 s for a possession
  challenge), and 32 tarpit candidates challenged at once left every other dial of the node waiting behind
  them: an honest candidate queued there timed out unanswered (tests/adversarial/test_sybil.py). We allow
  :data:`MAX_CONCURRENT_DIALS`; possession vetting uses at most half of them
  (``p2pinfer.request.possession.MAX_CONCURRENT_CHALLENGES``), so the node's other dials never queue behind it.

Identify (``/ipfs/id/1.0.0`` and push) and ping (``/ipfs/ping/1.0.0``) are registered by ``BasicHost``
itself. QUIC is not enabled: py-libp2p's QUIC transport needs its own TLS identity setup and is not yet
exercised by our tests; TCP is the supported transport.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import multiaddr

import libp2p
from libp2p.abc import IHost
from libp2p.crypto.x25519 import create_new_key_pair as _new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from ..identity import Identity
from .addrs import parse_multiaddr
from .connection_trim import install_duplicate_trim
from .keys import keypair_from_identity
from .whole_writes import make_writes_whole

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/4001",)
SECURITY_PROTOCOLS = (str(NOISE_PROTOCOL_ID),)
MUXER_PROTOCOLS = (str(YAMUX_PROTOCOL_ID),)
# Dials in flight at once (each a socket and a task until TCP, Noise and Yamux are done or the caller gives up):
# cheap, and high enough that possession vetting (half of it) never starves the node's other dials.
MAX_CONCURRENT_DIALS = 128


def build_host(
    identity: Identity,
    listen: Sequence[str] = DEFAULT_LISTEN,
    *,
    dial_timeout_s: float = 10.0,
    stream_negotiation_timeout_s: float = 10.0,
    max_connections: int = 300,
    addrs_factory: Callable[[list[multiaddr.Multiaddr]], list[multiaddr.Multiaddr]] | None = None,
) -> IHost:
    """A host keyed by ``identity``: TCP, Noise only, Yamux only, identify and ping.

    The host is not listening yet; :class:`p2pinfer.net.node.Node` runs it (``host.run(listen_addrs)``).
    ``addrs_factory`` decides what the host advertises (identify, relay reservations, DCUtR); the Node passes
    one that never advertises wildcard or undialable addresses (see :mod:`p2pinfer.net.publicaddrs`).
    """
    keypair = keypair_from_identity(identity)
    listen_addrs = [parse_multiaddr(a) for a in listen]
    # The Noise static key is a fresh X25519 key per process; Noise binds it to the identity key by signing
    # it inside the handshake, so it needs no persistence.
    noise = NoiseTransport(keypair, noise_privkey=_new_x25519_key_pair().private_key)
    connection_config = ConnectionConfig(
        max_connections_per_peer=1,  # see module docstring: avoids the fixed 250 ms per dial
        dial_timeout=dial_timeout_s,
        outbound_stream_protocol_negotiation_timeout=stream_negotiation_timeout_s,
        inbound_stream_protocol_negotiation_timeout=stream_negotiation_timeout_s,
        max_connections=max_connections,
        high_watermark=max_connections,
        min_connections=0,
    )
    # Not a field of py-libp2p's ConnectionConfig; its Swarm reads it with getattr (default 32): see module docstring.
    connection_config.max_concurrent_dials = MAX_CONCURRENT_DIALS  # type: ignore[attr-defined]
    host = libp2p.new_host(
        key_pair=keypair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=listen_addrs,
        connection_config=connection_config,
        enable_mDNS=False,
        enable_upnp=False,
        addrs_factory=addrs_factory,
    )
    network = host.get_network()
    if hasattr(network, "retry_config"):
        network.retry_config = RetryConfig(max_retries=0)  # see module docstring
    auto_connector = getattr(host.get_network(), "auto_connector", None)
    if auto_connector is not None:
        auto_connector.maybe_connect = _no_auto_connect  # see module docstring
    install_duplicate_trim(host)  # see module docstring
    make_writes_whole(host)  # see module docstring
    return host


async def _no_auto_connect() -> None:
    return None
