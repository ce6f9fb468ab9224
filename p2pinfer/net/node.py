"""A p2pinfer network node: lifecycle, dialing and our protocols; the behaviours it owns in one nursery.

Behaviours (libp2p style, each in its own module):

* lifecycle and dialing: this module (start/stop, ``connect``, ``open_stream``, ``request``, handlers,
  loopback streams to ourselves);
* protection: :class:`~p2pinfer.net.guard.PeerGuard` (every inbound stream guarded, resource limits,
  fault book and bans, bounded Yamux buffers);
* capacity: :class:`~p2pinfer.net.capacity.Capacity` (announcements, capacity sync, DHT providing,
  lookups), over :mod:`p2pinfer.net.gossip` and :mod:`p2pinfer.net.dht`;
* protocol descriptors: :mod:`p2pinfer.net.protocol` (ID, frame limit, message types, used by both ends).

::

    async with Node(identity, NodeConfig(listen=["/ip4/0.0.0.0/tcp/4001"], bootstrap=[...])) as node:
        node.register_request_handler("/p2pinfer/echo/1", handler)
        node.update_capacity(models=[offer], free_slots=2, total_slots=2)
        peers = node.serving(offer.digest)                  # live announcements with free slots
        reply = await node.request(peers[0].peer_id, "/p2pinfer/echo/1", b"hi", timeout=5)

Roles: ``peer`` (DHT server, gossip, announces), ``bootstrap`` (DHT server and gossip relay, announces
nothing) and ``client`` (DHT client mode; still receives gossip so it sees capacity).

Workaround for py-libp2p 0.8.1 that lives here: stopping Pubsub while messages are in flight can raise
``RuntimeError: Nursery is closed to new arrivals`` out of ``host.run()`` (a stream handler tries to start a
task in the swarm's already-closed nursery). :meth:`Node.__aexit__` closes all connections first, then
stops the services, and swallows exactly that error during shutdown (logged at debug), so shutting down
never raises.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal, Sequence

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.tools.anyio_service import background_trio_service

from .. import __version__
from ..identity import Identity
from ..log import get_logger
from ..wire import CapacityAnnouncement, ModelOffer, now_ms
from .addrs import PeerInfo, dialable_problem, merge_peer_infos, parse_dialable, parse_peer_multiaddr
from .announcements import AnnouncementTable, ServingEntry
from .capacity import Capacity
from .capacity_sync import CAPACITY_SYNC
from .dht import DEFAULT_REFRESH_INTERVAL_S, Discovery
from .errors import BootstrapUnreachable, DialError, NetError, ProtocolNotSupported, RequestTimeout
from .gossip import HEARTBEAT_S, CapacityGossip, build_pubsub
from .guard import PeerGuard
from .host import build_host
from .keys import to_libp2p_id
from .listen import check_listen_ports
from .loopback import loopback_pair
from .nat import NatTraversal, Reachability, RelayLimits, is_circuit
from .nat_rules import NatTiming
from .protocol import Protocol, frame_limit
from .protocol import protocol_id as protocol_id_of
from .publicaddrs import announceable
from .streams import DEFAULT_MAX_FRAME, FrameStream, encode_error, encode_ok

log = get_logger("p2pinfer.net.node")

Role = Literal["peer", "bootstrap", "client"]

# A newly joined node asks its bootstrap nodes for the live announcements they hold, instead of waiting
# up to a whole announce interval for gossip: see p2pinfer.net.capacity_sync.
CONNECT_TIMEOUT_S = 10.0  # Node.connect() without a timeout: dial (dial_timeout_s per address), Noise, Yamux
# nat hooks (see p2pinfer.net.nat):
DIRECT_BEFORE_RELAY_S = 1.0        # a peer announcing direct and relayed addresses gets this long on the direct ones
UNREACHABLE_MEMORY_S = 30.0        # a peer whose dial failed is not offered work again for this long
MAX_REMEMBERED_UNREACHABLE = 4096
PROVIDER_HINTS_TTL_S = 30.0        # DHT provider hints are looked up again (in the background) after this long
StreamHandler = Callable[[FrameStream], Awaitable[None]]
RequestHandler = Callable[[str, bytes], Awaitable[bytes]]


@dataclass(frozen=True)
class NodeConfig:
    listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/4001",)
    bootstrap: Sequence[str] = ()            # multiaddrs ending in /p2p/<peer id>
    role: Role = "peer"
    announce_interval_s: float = 60.0        # periodic re-announcement (also sent on start and on change)
    announce_ttl_s: float = 180.0            # validity of each announcement (< the 10 min maximum)
    dht_refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S
    gossip_heartbeat_s: int = HEARTBEAT_S
    dial_timeout_s: float = 3.0              # TCP connect; an address that drops packets (NAT) costs this long
    # how long either side of a new stream may take to agree on its protocol (py-libp2p's default, 10 s)
    stream_negotiation_timeout_s: float = 10.0
    software: str = f"p2pinfer/{__version__}"
    extra_addrs: Sequence[str] = field(default_factory=tuple)  # public addresses to announce (NAT)
    # NAT traversal (p2pinfer.net.nat): relay hop service (None: on for role "bootstrap"), its limits,
    # reachability check + relay reservation at join, and how long joining may wait for bootstrap nodes.
    relay_hop: bool | None = None
    relay_limits: RelayLimits = field(default_factory=RelayLimits)
    nat_traversal: bool = True
    hole_punch: bool = True                  # DCUtR: upgrade relayed connections to direct ones
    bootstrap_timeout_s: float = 5.0
    nat_timing: NatTiming = field(default_factory=NatTiming)  # re-check, relay upkeep and re-announce intervals


def quiet_libp2p_logging() -> None:
    """Silence py-libp2p's own stdlib logging unless ``LIBP2P_DEBUG`` asks for it.

    py-libp2p logs routine events (a peer closing a DHT stream, a client refusing the DHT protocol) as
    warnings and errors, which Python's last-resort handler prints to stderr in the middle of our logfmt
    lines. ``LIBP2P_DEBUG=DEBUG`` (py-libp2p's own switch) turns them back on.
    """
    if not os.environ.get("LIBP2P_DEBUG"):
        logging.getLogger("libp2p").setLevel(logging.CRITICAL + 1)


class Node:
    def __init__(self, identity: Identity, config: NodeConfig = NodeConfig()) -> None:
        quiet_libp2p_logging()
        self.identity = identity
        self.config = config
        self.peer_id = identity.peer_id
        self.host = build_host(identity, config.listen, dial_timeout_s=config.dial_timeout_s,
                               stream_negotiation_timeout_s=config.stream_negotiation_timeout_s,
                               addrs_factory=self._advertised_addrs)  # nat hook: no wildcards in identify
        self.guard = PeerGuard(self.host)  # every inbound stream guarded; limits, faults, bans
        self.guard.install()
        self.discovery = Discovery(self.host, server=config.role != "client",
                                   refresh_interval_s=config.dht_refresh_interval_s)
        self.pubsub, self.router = build_pubsub(self.host, heartbeat_s=config.gossip_heartbeat_s)
        # --- nat hook: NAT traversal (AutoNAT, relay, DCUtR); see p2pinfer.net.nat ---
        relay_hop = config.role == "bootstrap" if config.relay_hop is None else config.relay_hop
        self.nat = NatTraversal(self.host, listen=config.listen, announce=config.extra_addrs,
                                relay_hop=relay_hop, relay_limits=config.relay_limits,
                                hole_punch=config.hole_punch, timing=config.nat_timing)
        # re-announce when the addresses we would announce differ from the last announced ones
        self.nat.on_change = lambda: self.capacity.update()
        self.nat.addresses = self.announce_addrs if config.role != "bootstrap" else tuple  # bootstrap: none
        self.nat.announced = lambda: self.capacity.last_addrs
        # a restored relay may have restarted: does it still hold our announcement? (nat.py)
        self.nat.own_announcement = lambda: (self.capacity.last_announcement or (None, 0))[0]
        self.nat.request = self.request
        self.nat.gossip_peers = lambda: self.gossip.topic_peers()
        self.table = AnnouncementTable()
        self.gossip = CapacityGossip(self.pubsub, self.table, local_peer_id=self.peer_id,
                                     on_fault=self.guard.fault)
        self.stats: Counter[str] = Counter()
        self.capacity = Capacity(self, self.table, self.gossip, self.discovery, self.stats)
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._local_handlers: dict[str, Callable[[Any], Awaitable[None]]] = {}  # for streams to ourselves
        self._unreachable: dict[str, float] = {}  # peer ID -> trio time until which we do not offer it work
        self._provider_hints: dict[bytes, tuple[float, list[PeerInfo]]] = {}  # digest -> (when, DHT providers)
        self._hint_lookups: set[bytes] = set()

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> "Node":
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            listen_addrs = [multiaddr.Multiaddr(a) for a in self.config.listen]
            check_listen_ports(self.config.listen)  # nat hook: a taken port is an error, never shared
            await stack.enter_async_context(self.host.run(listen_addrs))
            await stack.enter_async_context(background_trio_service(self.pubsub))
            await stack.enter_async_context(background_trio_service(self.router))
            await self.pubsub.wait_until_ready()
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            self._stack = stack
            await self._nursery.start(self.guard.run)
            await self._nursery.start(self.discovery.run)
            await self._nursery.start(self.nat.run)
            await self.gossip.start()
            self._nursery.start_soon(self.gossip.drain)
            log.info("node.started", peer_id=self.peer_id, role=self.config.role, addrs=self.addrs)
            bootstrap = [parse_peer_multiaddr(a) for a in self.config.bootstrap]
            bootstrap = [b for b in merge_peer_infos(bootstrap) if b.peer_id != self.peer_id]
            self.register_request_handler(CAPACITY_SYNC, self.capacity.serve_sync)
            if bootstrap:
                bootstrap = await self._reach_bootstrap(bootstrap)  # nat hook: fails fast, naming each cause
                # nat hook: the DHT self-lookup may wait on peers behind NAT; the join does not wait for it
                await self.discovery.bootstrap(bootstrap, connect=self.connect, refresh_nursery=self._nursery)
            async with trio.open_nursery() as sync_nursery:
                for info in bootstrap:
                    sync_nursery.start_soon(self.capacity.join_sync, info.peer_id, self._nursery)
                if self.config.role != "client" and self.config.nat_traversal:
                    sync_nursery.start_soon(self.nat.establish, bootstrap)  # nat hook: reachability, relay
            if self.config.role != "client" and self.config.nat_traversal:  # nat hook
                self._nursery.start_soon(self.nat.recheck_loop, self.nat.direct_peers)
            if self.config.role != "bootstrap":
                self._nursery.start_soon(self.capacity.announce_loop, self._nursery)
        except BaseException:
            self._stack = None
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
            await self._close_stack(stack, *sys.exc_info())
            raise
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        self._closing = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        return await self._close_stack(stack, exc_type, exc, tb)

    async def _close_stack(self, stack: AsyncExitStack, exc_type: Any, exc: Any, tb: Any) -> bool:
        self._closing = True
        # Close connections before the services stop, so no handler is mid-flight when nurseries close.
        with trio.move_on_after(2) as scope:
            scope.shield = True
            for peer in list(self.host.get_connected_peers()):
                try:
                    await self.host.disconnect(peer)
                except Exception:
                    pass
        await self._close_listeners()
        try:
            return bool(await stack.__aexit__(exc_type, exc, tb))
        except BaseException as error:
            rest = _without_shutdown_noise(error)
            if rest is None:
                log.debug("node.shutdown_noise_suppressed", error=repr(error)[:200])
                return False if exc is not None else True
            if exc is not None and _only_contains(rest, exc):
                # py-libp2p's nurseries wrap the exception that ended the `async with` block in nested
                # ExceptionGroups; let the original propagate as it was, so callers (and tests) see it.
                return False
            # The cause sits under ten or more levels of py-libp2p's nested groups, deeper than a traceback
            # prints (max_group_depth): name each one in the log.
            log.warning("node.shutdown_failed", peer_id=self.peer_id, errors=_leaf_summaries(rest))
            raise rest from None
        finally:
            log.info("node.stopped", peer_id=self.peer_id)

    async def _close_listeners(self) -> None:
        """Close the listen sockets before the host's service stops. py-libp2p's swarm closes its listeners in
        the ``finally`` of its own run, but by then that service is being cancelled, so the close is cancelled at
        its first checkpoint and the socket stays open (still accepting) after the node has ended; shielded here."""
        listeners = getattr(self.host.get_network(), "listeners", {})
        with trio.move_on_after(2) as scope:
            scope.shield = True
            for listener in list(listeners.values()):
                try:
                    await listener.close()
                except Exception as error:  # one listener's failure must not keep the others open
                    log.debug("node.listener_close_failed", error=repr(error)[:200])

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled (``nursery.start(node.run)`` returns once the node is up)."""
        async with self:
            task_status.started(self)
            await trio.sleep_forever()

    def start_background(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Run ``fn(*args)`` in the node's own nursery (it ends with the node); False when the node is not
        running, so the caller runs it itself. For work that should outlive the request that started it."""
        if self._nursery is None or self._closing:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    # ---- addresses and connections ------------------------------------------------------------------

    @property
    def addrs(self) -> list[str]:
        """Our dialable multiaddrs, each ending in ``/p2p/<peer id>``."""
        # nat hook: wildcards expanded, undialable addresses dropped, relayed addresses added
        direct = [str(a) for a in self.host.get_transport_addrs()] + list(self.config.extra_addrs)
        bare = announceable(direct, listen=self.config.listen) + list(self.nat.relayed_addrs)
        return [f"{a}/p2p/{self.peer_id}" for a in dict.fromkeys(bare)]

    def announce_addrs(self) -> tuple[str, ...]:
        """Addresses put in announcements, without ``/p2p/<our id>`` (nat hook).

        Wildcards are expanded to interface addresses and undialable ones dropped
        (:mod:`p2pinfer.net.publicaddrs`); a peer that is only reachable through a relay announces its
        relayed addresses only, so nobody waits on a direct dial the NAT will drop.
        """
        if self.nat.relayed_addrs and self.nat.status.state is not Reachability.PUBLIC:
            return _dialable(self.nat.relayed_addrs)[:16]  # also while our relay is briefly away (re-reserved)
        if self.nat.status.state is Reachability.UNREACHABLE and self.nat.status.checked:
            return ()  # others tried to dial us and failed, and no relay took us: no address would work
        direct = [str(a) for a in self.host.get_transport_addrs()] + list(self.config.extra_addrs)
        # Anything every validator would reject (p2pinfer.net.announcements, "bad-addr") is left out too.
        return _dialable(dict.fromkeys(announceable(direct, listen=self.config.listen)))[:16]

    async def _reach_bootstrap(self, bootstrap: list[PeerInfo]) -> list[PeerInfo]:
        """Dial all bootstrap nodes at once; the reachable ones, or :class:`BootstrapUnreachable` naming
        every address and its cause when none is (nat hook)."""
        errors: dict[str, str] = {}

        async def dial(info: PeerInfo) -> None:
            try:
                await self.connect(info, timeout=self.config.bootstrap_timeout_s)
            except DialError as exc:
                errors[info.peer_id] = str(exc)

        async with trio.open_nursery() as nursery:
            for info in bootstrap:
                nursery.start_soon(dial, info)
        reached = [info for info in bootstrap if info.peer_id not in errors]
        if not reached:
            causes = "; ".join(f"{'/'.join(info.dial_addrs()[:1])}: {errors[info.peer_id].split(': ', 1)[-1]}"
                               for info in bootstrap)
            raise BootstrapUnreachable(f"no bootstrap node is reachable ({causes[:600]}); check the address "
                                       f"and your connection, or pass a working --bootstrap")
        for info in bootstrap:
            if info.peer_id in errors:
                log.warning("node.bootstrap_unreachable", addr=info.dial_addrs()[:1], error=errors[info.peer_id][:200])
        return reached

    @property
    def reachability(self) -> str:
        """One line: ``reachability: public|relayed|unreachable (reason)``."""
        return self.nat.status.line()

    def _advertised_addrs(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        """What the host tells others (identify, relay, DCUtR): dialable direct addresses only (nat hook).

        Relayed addresses go in our signed announcements, not here: py-libp2p's identify and DCUtR would
        strip their ``/p2p-circuit`` part and dial the relay's address expecting us (a wasted dial each).
        """
        direct = [str(c) for c in candidates] + list(self.config.extra_addrs)
        return [multiaddr.Multiaddr(a) for a in dict.fromkeys(announceable(direct, listen=self.config.listen))]

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers()]

    async def connect(self, peer: PeerInfo | str, *, timeout: float | None = None) -> None:
        """Make sure we are connected to ``peer`` (a PeerInfo or a multiaddr with ``/p2p/``)."""
        info = parse_peer_multiaddr(peer) if isinstance(peer, str) else peer
        try:
            await self._connect(info, timeout=timeout)
        except DialError:
            self._remember_unreachable(info.peer_id)  # nat hook
            raise
        self._unreachable.pop(info.peer_id, None)

    def _remember_unreachable(self, peer_id: str) -> None:
        """A peer we just failed to dial is left out of :meth:`candidates` for a while (nat hook)."""
        if len(self._unreachable) >= MAX_REMEMBERED_UNREACHABLE:
            self._unreachable.pop(min(self._unreachable, key=self._unreachable.__getitem__))
        self._unreachable[peer_id] = trio.current_time() + UNREACHABLE_MEMORY_S

    def known_unreachable(self, peer_id: str) -> bool:
        until = self._unreachable.get(peer_id)
        if until is not None and until <= trio.current_time():
            del self._unreachable[peer_id]
            return False
        return until is not None

    async def _connect(self, info: PeerInfo, *, timeout: float | None = None) -> None:
        timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
        circuits = [a for a in info.addrs if is_circuit(a)]
        if circuits:  # nat hook: py-libp2p's swarm drops /p2p-circuit addresses; dial them ourselves
            if self.nat.is_connected(info.peer_id):
                return
            direct = PeerInfo(info.peer_id, tuple(a for a in info.addrs if not is_circuit(a)))
            if direct.addrs:
                try:
                    return await self._connect(direct, timeout=min(timeout, DIRECT_BEFORE_RELAY_S))
                except DialError:
                    pass
            return await self.nat.dial_circuit(info.peer_id, circuits, timeout=timeout)
        with trio.move_on_after(timeout) as scope:
            try:
                await self.host.connect(info.to_libp2p())
            except (BaseLibp2pError, OSError) as exc:
                raise DialError(f"cannot connect to {info.peer_id}: {type(exc).__name__}: {exc}"[:300]) from None
            return
        assert scope.cancelled_caught
        raise DialError(f"cannot connect to {info.peer_id}: no connection within {timeout} s")

    # ---- our protocols ------------------------------------------------------------------------------

    def register_handler(self, protocol: Protocol | str, handler: StreamHandler, *,
                         max_frame: int | None = None, timeout: float | None = 30.0) -> None:
        """Serve ``protocol``: ``handler`` gets a :class:`FrameStream` and may exchange any frames.

        ``protocol`` is a :class:`~p2pinfer.net.protocol.Protocol` descriptor (its frame limit applies) or
        a bare protocol ID. When the handler returns the stream is closed; when it raises, the stream is
        reset and the error logged.
        """
        protocol_id = protocol_id_of(protocol)
        max_frame = frame_limit(protocol, max_frame, DEFAULT_MAX_FRAME)

        async def on_stream(stream: INetStream) -> None:
            frames = FrameStream(stream, max_frame=max_frame, timeout=timeout)
            try:
                await handler(frames)
            except NetError as exc:
                self.stats[f"handler.{exc.reason}"] += 1
                log.debug("stream.handler_net_error", protocol=protocol_id, reason=exc.reason, error=str(exc)[:200])
                await frames.reset()
                return
            except Exception as exc:
                self.stats["handler.error"] += 1
                log.warning("stream.handler_failed", protocol=protocol_id, error=repr(exc)[:200])
                await frames.reset()
                return
            await frames.aclose()

        self.host.set_stream_handler(TProtocol(protocol_id), on_stream)
        self._local_handlers[protocol_id] = on_stream

    def register_request_handler(self, protocol: Protocol | str, handler: RequestHandler, *,
                                 max_frame: int | None = None, idle_timeout: float = 60.0) -> None:
        """Serve one-shot requests: ``await handler(peer_id, body) -> response body``.

        Requests on one stream are served in order until the client closes it (stream reuse). A handler that
        raises :class:`~p2pinfer.errors.P2PInferError` sends its message back as a :class:`RemoteError`;
        any other exception sends ``internal error``.
        """

        protocol_id = protocol_id_of(protocol)

        async def serve(frames: FrameStream) -> None:
            while True:
                body = await frames.receive(timeout=idle_timeout)
                if body is None:
                    return
                try:
                    reply = encode_ok(await handler(frames.remote_peer_id, body))
                except NetError:
                    raise
                except Exception as exc:
                    from ..errors import P2PInferError
                    reason = str(exc) if isinstance(exc, P2PInferError) else "internal error"
                    if not isinstance(exc, P2PInferError):
                        log.warning("request.handler_failed", protocol=protocol_id, error=repr(exc)[:200])
                    reply = encode_error(reason)
                await frames.send(reply)

        self.register_handler(protocol, serve, max_frame=max_frame, timeout=idle_timeout)

    async def open_stream(self, peer_id: str, protocol: Protocol | str, *, timeout: float = 10.0,
                          max_frame: int | None = None, addrs: Sequence[str] = ()) -> FrameStream:
        """Open a stream to ``peer_id`` on ``protocol_id``, dialling if needed.

        Addresses come from ``addrs``, the peer's live announcement, or what the host already knows.
        ``timeout`` bounds the dial and the protocol negotiation and becomes the stream's default
        per-operation timeout. With a :class:`~p2pinfer.net.protocol.Protocol`, its frame limit applies.
        """
        protocol_id = protocol_id_of(protocol)
        max_frame = frame_limit(protocol, max_frame, DEFAULT_MAX_FRAME)
        if peer_id == self.peer_id:
            return self._open_loopback(protocol_id, timeout=timeout, max_frame=max_frame)
        try:
            libp2p_peer = to_libp2p_id(peer_id)
        except Exception:
            raise DialError(f"{peer_id[:80]!r} is not a libp2p peer ID") from None
        known = tuple(addrs) or (self._announced_addrs(peer_id))
        if any(is_circuit(a) for a in known):  # nat hook: reach a relayed peer through its relay first
            await self.connect(PeerInfo(peer_id, known), timeout=timeout)
        # Announced addresses are validated on arrival, but ``addrs`` may come from anywhere (DHT provider
        # records, callers): an address that does not parse is skipped here, never raised out of a request.
        direct = parse_dialable(a for a in known if not is_circuit(a))
        if direct:
            self.host.get_peerstore().add_addrs(libp2p_peer, direct, 600)
        with trio.move_on_after(timeout) as scope:
            try:
                stream = await self.host.new_stream(libp2p_peer, [TProtocol(protocol_id)])
            except (BaseLibp2pError, OSError, ValueError) as exc:
                cause = exc.__cause__ or exc
                text = f"{type(cause).__name__}: {cause}"
                if "ProtocolNotSupported" in text or "protocol" in text.lower() and "not" in text.lower():
                    raise ProtocolNotSupported(f"{peer_id} does not serve {protocol_id}") from None
                if not self.nat.is_connected(peer_id):
                    self._remember_unreachable(peer_id)  # nat hook
                raise DialError(f"cannot open {protocol_id} to {peer_id}: {text}"[:300]) from None
            return FrameStream(stream, max_frame=max_frame, timeout=timeout)
        assert scope.cancelled_caught
        raise RequestTimeout(f"opening {protocol_id} to {peer_id} took more than {timeout} s")

    def _open_loopback(self, protocol_id: str, *, timeout: float, max_frame: int) -> FrameStream:
        """A stream to ourselves, served by our own handler (libp2p cannot dial its own peer ID)."""
        handler = self._local_handlers.get(protocol_id)
        if handler is None or self._nursery is None:
            raise ProtocolNotSupported(f"this node ({self.peer_id}) does not serve {protocol_id}")
        dialer, listener = loopback_pair(protocol_id, to_libp2p_id(self.peer_id))
        self._nursery.start_soon(handler, listener)
        return FrameStream(dialer, max_frame=max_frame, timeout=timeout)  # type: ignore[arg-type]

    async def request(self, peer_id: str, protocol: Protocol | str, payload: bytes, *, timeout: float = 10.0,
                      max_frame: int | None = None) -> bytes:
        """One request, one response, within ``timeout`` in total (dial included)."""
        deadline = trio.current_time() + timeout
        frames = await self.open_stream(peer_id, protocol, timeout=timeout, max_frame=max_frame)
        try:
            remaining = max(deadline - trio.current_time(), 0.0)
            reply = await frames.call(payload, timeout=remaining)
        except BaseException:
            await frames.reset()
            raise
        await frames.aclose()
        return reply

    # ---- capacity (p2pinfer.net.capacity): what we announce, what others announce --------------------

    def update_capacity(self, *, models: Sequence[ModelOffer] | None = None, free_slots: int | None = None,
                        total_slots: int | None = None) -> None:
        """Change what we announce; an announcement goes out promptly (bursts are coalesced)."""
        self.capacity.update(models=models, free_slots=free_slots, total_slots=total_slots)

    def build_announcement(self) -> CapacityAnnouncement:
        return self.capacity.build_announcement()

    async def announce_now(self) -> CapacityAnnouncement:
        return await self.capacity.announce_now()

    async def wait_announced(self) -> None:
        await self.capacity.wait_announced()

    async def sync_announcements(self, peer_id: str, *, timeout: float = 5.0) -> int:
        """Ask ``peer_id`` for the live announcements it holds, page by page; returns how many were new."""
        return await self.capacity.sync_from(peer_id, timeout=timeout)

    # ---- other gossip topics (low rate only: see p2pinfer.net.gossip) ---------------------------------

    async def subscribe_topic(self, topic: str, validate: Callable[[bytes, str | None], bool],
                              on_message: Callable[[bytes], Awaitable[None]]) -> None:
        """Subscribe to ``topic``: ``validate(data, source_peer_id)`` runs before a message is accepted or
        forwarded (it must be fast and never block); accepted messages are then passed to ``on_message``.

        The topic must be one of :data:`~p2pinfer.net.gossip.GOSSIP_TOPICS`.
        """
        assert self._nursery is not None, "the node is not running"

        def validator(forwarder: Any, msg: Any) -> bool:
            source = to_base58(msg.from_id)
            try:
                return bool(validate(bytes(msg.data), source))
            except Exception as exc:  # a validator must never crash the pubsub service
                log.warning("gossip.validator_error", topic=topic, error=repr(exc)[:200])
                return False

        self.pubsub.set_topic_validator(topic, validator, is_async_validator=False)
        subscription = await self.pubsub.subscribe(topic)

        async def drain() -> None:
            while True:
                msg = await subscription.get()
                if to_base58(msg.from_id) == self.peer_id:
                    continue
                try:
                    await on_message(bytes(msg.data))
                except Exception as exc:
                    log.warning("gossip.handler_failed", topic=topic, error=repr(exc)[:200])

        self._nursery.start_soon(drain)

    async def publish(self, topic: str, data: bytes) -> None:
        await self.pubsub.publish(topic, data)

    # ---- lookups for the request path ---------------------------------------------------------------

    def serving(self, model_digest: bytes, *, min_free_slots: int = 1,
                include_self: bool = False) -> list[ServingEntry]:
        """Peers whose live announcement serves ``model_digest`` with free slots (most free first)."""
        return self.capacity.serving(model_digest, min_free_slots=min_free_slots, include_self=include_self)

    async def find_providers(self, model_digest: bytes, *, timeout: float = 10.0) -> list[PeerInfo]:
        """DHT provider records for ``model_digest`` (hints; see ``p2pinfer.net.dht``)."""
        return await self.discovery.find_providers(model_digest, timeout=timeout)

    async def candidates(self, model_digest: bytes, *, min_free_slots: int = 1,
                         timeout: float = 10.0, include_self: bool = False) -> list[PeerInfo]:
        """Who to try for ``model_digest``: live announcements with free slots first, then DHT providers
        that have no live announcement yet (a newly joined client may not have heard the gossip)."""
        from_table = self.serving(model_digest, min_free_slots=min_free_slots, include_self=include_self)
        out = [PeerInfo(s.peer_id, s.addrs) for s in from_table if self._worth_dialling(s.peer_id, s.addrs)]
        if len(out) < 3:
            live = {a.peer_id for a in self.table.live(now_ms())}
            # nat hook: a DHT lookup can wait on peers nobody can reach (behind NAT), so its result is kept:
            # the first request for a model waits for the lookup (it may find peers gossip has not told us
            # about yet), later ones get the last hints at once while a fresh lookup runs in the background
            # (at most every PROVIDER_HINTS_TTL_S).
            if out and model_digest in self._provider_hints:
                hints = self._cached_provider_hints(model_digest, timeout)
            else:
                hints = await self.find_providers(model_digest, timeout=timeout)
                self._store_provider_hints(model_digest, hints)
            for info in hints:
                if (info.peer_id != self.peer_id and info.peer_id not in live
                        and not self.known_unreachable(info.peer_id)):
                    out.append(info)
        return out

    def _store_provider_hints(self, model_digest: bytes, hints: list[PeerInfo]) -> None:
        if model_digest not in self._provider_hints and len(self._provider_hints) >= 256:
            self._provider_hints.pop(next(iter(self._provider_hints)))
        self._provider_hints[model_digest] = (trio.current_time(), hints)

    def _cached_provider_hints(self, model_digest: bytes, timeout: float) -> list[PeerInfo]:
        """The last DHT provider lookup for ``model_digest``; starts a fresh one in the background when it is
        older than :data:`PROVIDER_HINTS_TTL_S` (nat hook)."""
        at, hints = self._provider_hints.get(model_digest, (None, []))
        fresh = at is not None and trio.current_time() - at < PROVIDER_HINTS_TTL_S
        if not fresh and model_digest not in self._hint_lookups and self._nursery is not None:
            self._hint_lookups.add(model_digest)

            async def look_up() -> None:
                try:
                    self._store_provider_hints(model_digest, await self.find_providers(model_digest, timeout=timeout))
                finally:
                    self._hint_lookups.discard(model_digest)

            self._nursery.start_soon(look_up)
        return hints

    def _worth_dialling(self, peer_id: str, addrs: Sequence[str]) -> bool:
        """nat hook: leave out peers whose last dial failed recently, and peers announcing no address that
        we are not already connected to (they found out nobody can dial them)."""
        if peer_id == self.peer_id or self.nat.is_connected(peer_id):
            return True
        if self.known_unreachable(peer_id):
            self.stats["candidates.skipped_unreachable"] += 1
            return False
        if not addrs:
            self.stats["candidates.skipped_no_address"] += 1
            return False
        return True

    def _announced_addrs(self, peer_id: str) -> tuple[str, ...]:
        a = self.table.get(peer_id, now_ms())
        return a.addrs if a is not None else ()

    @property
    def counters(self) -> dict[str, int]:
        """Gossip drop reasons and acceptance counts, plus stream handler errors."""
        return dict(self.gossip.counters + self.stats + self.guard.counters)


def _dialable(addrs: Sequence[str] | dict[str, None]) -> tuple[str, ...]:
    return tuple(a for a in addrs if dialable_problem(a) is None)


def _leaf_summaries(error: BaseException, limit: int = 5) -> list[str]:
    """The innermost exceptions of ``error`` (groups flattened), each with the frame that raised it."""
    leaves: list[BaseException] = []
    pending = [error]
    while pending and len(leaves) < limit:
        current = pending.pop(0)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        else:
            leaves.append(current)
    summaries = []
    for leaf in leaves:
        tb = leaf.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
        summaries.append(f"{type(leaf).__name__}({str(leaf)[:160]!r}) at {where}")
    return summaries


def _only_contains(error: BaseException, original: BaseException) -> bool:
    """True when ``error`` is ``original`` or groups that hold nothing else."""
    if isinstance(error, BaseExceptionGroup):
        return all(_only_contains(e, original) for e in error.exceptions)
    return error is original



def to_base58(from_id: bytes | None) -> str | None:
    from libp2p.peer.id import ID
    return ID(from_id).to_base58() if from_id else None


def _is_shutdown_noise(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "Nursery is closed to new arrivals" in str(error)


def _without_shutdown_noise(error: BaseException) -> BaseException | None:
    """``error`` minus the known py-libp2p shutdown RuntimeErrors (None if nothing else remains)."""
    if isinstance(error, BaseExceptionGroup):
        _, rest = error.split(_is_shutdown_noise)
        return rest
    return None if _is_shutdown_noise(error) else error
