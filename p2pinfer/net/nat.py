"""NAT traversal: AutoNAT reachability, Circuit Relay v2 reservations and dials, DCUtR hole punching.

A peer at home sits behind a router that drops unsolicited inbound connections. At join,
:class:`NatTraversal`

1. asks the bootstrap nodes it reached to **dial it back** (AutoNAT, ``/libp2p/autonat/1.0.0``) on the
   addresses it could be reached at: its observed IP (identify) with its listen ports, its interface
   addresses and ``--announce``. One dial-back that our own listener saw arrive (:mod:`p2pinfer.net.inbound`;
   a server's "reached" alone is no evidence) from the internet (one from our own LAN proves only that the
   LAN reaches us: :func:`~p2pinfer.net.nat_rules.proves_public`) makes it ``public``, if it would then
   announce an address the internet can dial (behind port forwarding without ``--announce`` it would not).
2. Otherwise it **reserves a slot** on a relay (Circuit Relay v2 hop, ``/libp2p/circuit/relay/0.2.0/hop``;
   bootstrap nodes are relays by default; relays with an internet address first) and announces its relayed address
   ``<relay addr>/p2p/<relay id>/p2p-circuit``: it is ``relayed``. With no relay it is ``unreachable``.
3. **DCUtR** runs on every node: whenever a connection is relayed, both ends try to replace it by a direct
   one (unilateral dial first, then TCP simultaneous open from the listen port); streams then prefer the
   direct connection and the relayed one is closed after a grace period.

Afterwards :meth:`NatTraversal.recheck_loop` keeps that true: a relayed node keeps its reservation (retrying
with backoff, moving to another connected relay after a few failures) and re-checks now and then whether it
is public after all; the pure rules are in :mod:`p2pinfer.net.nat_rules`. Announcements follow only a
change of the announced addresses, at most every ``NatTiming.reannounce_min_interval_s``.

:meth:`NatTraversal.connect` dials ``/p2p-circuit`` addresses itself, because py-libp2p 0.8.1's
``Swarm.dial_peer`` silently drops them.

Fixes for py-libp2p 0.8.1 that live here (see docs/network.md):

* AutoNAT's server dials back with ``host.connect()``, which returns at once when the requester is already
  connected (it always is: it just sent the request), so every node is told it is reachable.
  :class:`DialBackAutoNAT` opens a *fresh* TCP connection and completes a Noise handshake that proves the
  requester's peer ID, then closes it: the TCP connection within :data:`DIAL_BACK_CONNECT_S` (3 s; a NAT drops
  the SYN: no connection is the evidence), the handshake within :data:`DIAL_BACK_HANDSHAKE_S` (10 s) more (a NAT
  never gets that far, but a loaded requester is slow to answer it), at most
  :data:`MAX_CONCURRENT_DIAL_BACKS` at a time.
* AutoNAT's client wants 4 agreeing servers before it flips; a young network has one bootstrap node. We
  take each answer as evidence and decide ourselves (any success we saw arrive: public).
* The circuit transport's reservation refresher has no call to release a reservation: a relay we left is
  removed from the table it reads (:meth:`NatTraversal._stop_refreshing`).
* The relay's default limits allow 4 reservations; :class:`RelayLimits` makes them volunteer-settable.
* ``RelayDiscovery`` runs before the peer has connected to anyone and then sleeps 300 s; we never start
  it and reserve explicitly at join.
* ``DCUtRProtocol.initiate_hole_punch()`` can return False after the direct connection was made (a
  parallel dial succeeded while the round was cancelled); :meth:`NatTraversal.hole_punch` decides by
  looking at the connections, not at the return value.
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as Libp2pPeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits as Libp2pRelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from ..log import get_logger
from .addrs import PeerInfo, strip_p2p
from .capacity_sync import CAPACITY_SYNC, encode_sync_request, parse_sync_page
from .errors import DialError
from .keys import to_libp2p_id
from .inbound import InboundHandshakes, watch_inbound
from .nat_rules import (Backoff, DialBack, DialBackAnswer, NatTiming, PublicEvidence, RelayAction, RelayHealth,
                        dial_back_answer, netgroup, reaches_internet, reannounce_wait)
from .publicaddrs import CIRCUIT, announceable, interface_ips, ip_of, listens_on_loopback_only
from ..wording import plural

log = get_logger("p2pinfer.net.nat")

# The dial-back's limits (defaults; a node's own are in its NatTiming): TCP connect, then Noise handshake.
DIAL_BACK_CONNECT_S = NatTiming.dial_back_connect_s
DIAL_BACK_HANDSHAKE_S = NatTiming.dial_back_handshake_s
MAX_CONCURRENT_DIAL_BACKS = 8      # AutoNAT server: dial-backs in flight at once (each is a TCP + Noise)
MAX_DIAL_BACK_ADDRS = 4            # AutoNAT server: addresses tried per request
AUTONAT_QUERY_TIMEOUT_S = 15.0     # the requester's wait for the verdict: one address's connect + handshake
IDENTIFY_WAIT_S = 2.0              # how long to wait for identify to tell us our observed address
RESERVE_TIMEOUT_S = 5.0
MAX_RECHECK_SERVERS = 3            # peers asked per re-check (the intervals: NatTiming in nat_rules.py)
MAX_RELAY_CANDIDATES = 8           # connected peers asked for a reservation when our relay is lost
NOT_CHECKED = "not checked yet: no other peer to dial us back"
HOLE_PUNCH_DIAL_TIMEOUT_S = 2      # DCUtR's own default (10 s) makes a failed round take 10 s
RELAY_HOLDS_US_S = 20.0            # a restored relay: one capacity-sync page from it (stream negotiation + reply)
RELAY_SUBSCRIBED_WAIT_S = 30.0     # ... and, if it lacks our announcement, its gossip subscription before we announce


class Reachability(enum.Enum):
    PUBLIC = "public"              # someone dialled us back on a direct address
    RELAYED = "relayed"            # not dialable, but a relay holds a reservation for us
    UNREACHABLE = "unreachable"    # neither (or not checked yet)


@dataclass(frozen=True)
class ReachabilityStatus:
    state: Reachability
    reason: str
    checked: bool = True  # False until some peer has answered (or could have answered) a dial-back request

    def line(self) -> str:
        return f"reachability: {self.state.value} ({self.reason})"


@dataclass(frozen=True)
class RelayLimits:
    """What a relay (hop) node grants; a volunteer sets these (``[relay]`` in the config, CLI options)."""

    max_reservations: int = 128          # peers that may hold a reservation at once
    max_circuits_per_peer: int = 16      # relayed connections at once to one reserved peer
    circuit_duration_s: int = 600        # a relayed connection is closed after this long
    circuit_bytes: int = 64 * 1024 * 1024  # ... or after this many bytes
    reservation_ttl_s: int = 3600        # reservations are refreshed before they expire

    def to_libp2p(self) -> Libp2pRelayLimits:
        return Libp2pRelayLimits(duration=self.circuit_duration_s, data=self.circuit_bytes,
                                 max_circuit_conns=self.max_circuits_per_peer,
                                 max_reservations=self.max_reservations,
                                 reservation_ttl=self.reservation_ttl_s)


def is_circuit(addr: str) -> bool:
    return CIRCUIT in addr


class DialBackAutoNAT(AutoNATService):
    """py-libp2p's AutoNAT server, with a dial-back that really dials (see the module docstring)."""

    def __init__(self, host: IHost, *, connect_timeout_s: float = DIAL_BACK_CONNECT_S,
                 handshake_timeout_s: float = DIAL_BACK_HANDSHAKE_S) -> None:
        super().__init__(host, serve=True)  # type: ignore[arg-type]
        self.connect_timeout_s = connect_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self._slots = trio.Semaphore(MAX_CONCURRENT_DIAL_BACKS)
        self.dial_backs = 0
        self.refused_busy = 0
        self.peak_in_flight = 0

    async def _handle_dial(self, message: Any, observed_ip: str | None, is_relayed: bool) -> Any:
        # Busy: say "refused" (the requester does not count it) rather than "dial failed" (which would tell
        # an honest requester it is unreachable). Requests never queue: a flood costs us nothing but answers.
        if self._slots.value == 0:
            self.refused_busy += 1
            response = AutoNATMessage()
            response.type = AutoNATMessage.DIAL_RESPONSE
            response.dialResponse.status = AutoNATMessage.E_DIAL_REFUSED
            response.dialResponse.statusText = "busy"
            return response
        async with self._slots:
            self.peak_in_flight = max(self.peak_in_flight, MAX_CONCURRENT_DIAL_BACKS - self._slots.value)
            return await super()._handle_dial(message, observed_ip, is_relayed)

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        self.dial_backs += 1
        for raw in addrs[:MAX_DIAL_BACK_ADDRS]:
            try:
                addr = multiaddr.Multiaddr(raw)
            except Exception:
                continue
            if await fresh_handshake(self.host, peer_id, addr, connect_timeout=self.connect_timeout_s,
                                     handshake_timeout=self.handshake_timeout_s):
                return bytes(raw)
        return None


async def fresh_handshake(host: IHost, peer_id: ID, addr: multiaddr.Multiaddr, *, connect_timeout: float,
                          handshake_timeout: float) -> bool:
    """Open a new TCP connection to ``addr`` (within ``connect_timeout``) and prove it reaches ``peer_id``
    (a Noise handshake, within ``handshake_timeout`` more); close it."""
    network: Any = host.get_network()
    raw = None
    with trio.move_on_after(connect_timeout):
        try:
            transport = network.transport_manager.transport_for_dialing(addr)
            if transport is None:
                return False
            raw = await transport.dial(addr)
        except Exception:
            return False
    if raw is None:
        return False
    with trio.move_on_after(handshake_timeout):
        try:
            secured = await network.upgrader.upgrade_security(raw, True, peer_id)
        except Exception:
            await _quiet_close(raw)
            return False
        await _quiet_close(secured)
        return True
    await _quiet_close(raw)
    return False


async def _quiet_close(conn: Any) -> None:
    with trio.move_on_after(1):
        try:
            await conn.close()
        except Exception:
            pass


class NatTraversal:
    """AutoNAT server and client, relay (hop when ``relay_hop``, always stop/client), DCUtR; one per Node."""

    def __init__(self, host: IHost, *, listen: Sequence[str], announce: Sequence[str], relay_hop: bool,
                 relay_limits: RelayLimits, hole_punch: bool = True, timing: NatTiming = NatTiming()) -> None:
        self.host = host
        self.timing = timing
        self.listen = tuple(listen)
        # Loopback is the whole network only when we listen there alone (then loopback is all we announce):
        # only then does a dial-back from this machine prove anything (nat_rules.proves_public).
        self.loopback_network = listens_on_loopback_only(self.listen)
        self.announce = tuple(announce)
        self.relay_hop = relay_hop
        self.relay_limits = relay_limits
        self.autonat = DialBackAutoNAT(host, connect_timeout_s=timing.dial_back_connect_s,
                                       handshake_timeout_s=timing.dial_back_handshake_s)
        self.relay_protocol = CircuitV2Protocol(host, limits=relay_limits.to_libp2p(), allow_hop=relay_hop)
        # No CLIENT role: with it, every dial through a relay first takes a reservation there (a slot wasted per
        # dialler); we reserve explicitly, only when we need to be reachable.
        roles = RelayRole.STOP | (RelayRole.HOP if relay_hop else RelayRole(0))
        relay_config = RelayConfig(roles=roles, limits=relay_limits.to_libp2p(),
                                   max_circuit_duration=relay_limits.circuit_duration_s,
                                   max_circuit_bytes=relay_limits.circuit_bytes)
        # Used to dial /p2p-circuit addresses and to reserve; its RelayDiscovery service is never started.
        self.relay_transport = CircuitV2Transport(host, self.relay_protocol, relay_config)
        self.dcutr = DCUtRProtocol(host, dial_timeout=HOLE_PUNCH_DIAL_TIMEOUT_S) if hole_punch else None
        self.status = ReachabilityStatus(Reachability.UNREACHABLE, NOT_CHECKED, checked=False)
        # Dial-backs count only when we saw them arrive ourselves (see p2pinfer/net/inbound.py).
        self.inbound = InboundHandshakes()
        watch_inbound(host, self.inbound)
        self.relayed_addrs: tuple[str, ...] = ()
        self.reserved_on: tuple[str, ...] = ()
        self._nursery: trio.Nursery | None = None
        # Our announced addresses depend on the reachability: the node tells us what it would announce now
        # (``addresses``) and what it announced last (``announced``); ``on_change`` makes it announce.
        self.on_change: Callable[[], None] = lambda: None
        self.addresses: Callable[[], Sequence[str]] = lambda: ()
        self.announced: Callable[[], Sequence[str]] = lambda: ()
        # After our relay connection was lost and restored: our last signed announcement (None before the
        # first), a request to a peer (Node.request) and the peers subscribed to our gossip topic.
        self.own_announcement: Callable[[], bytes | None] = lambda: None
        self.request: Callable[..., Awaitable[bytes]] | None = None
        self.gossip_peers: Callable[[], Sequence[str]] = lambda: ()
        self._reannounced_at: float | None = None
        self._reannounce_pending = False
        self._reannounce_forced = False
        self._relays: list[PeerInfo] = []  # where we hold reservations (first: the one we announce)
        self._relay_up = False  # connected to self._relays[0] with a reservation, as far as we know
        self._relay_conns: list[Any] = []  # the connections to it when we reserved (one closing: reserve again)
        self.relay_health = RelayHealth(timing.relay_tries_before_lost, timing.relay_retry, timing.relay_check_s)
        self.public_evidence = PublicEvidence(timing.public_confirmations, timing.public_window)
        self._next_public_check = 0.0
        self._unanswered_rounds = 0  # re-checks in a row that asked peers and got no verdict
        self._lan_only_last_check = 0  # servers that reached us from our own network only, at the last check
        self._public_undialable_reason: str | None = None  # reached from the internet, announcing no such address
        self.stats: dict[str, int] = {"relay_restored": 0, "relay_replaced": 0, "reannounced": 0,
                                      "public_rechecks": 0}

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async with background_trio_service(self.relay_protocol):
                await self.relay_protocol.event_started.wait()
                if self.dcutr is None:
                    task_status.started()
                    await trio.sleep_forever()
                async with background_trio_service(self.dcutr):
                    await self.dcutr.event_started.wait()
                    task_status.started()
                    await trio.sleep_forever()

    # ---- reachability -------------------------------------------------------------------------------

    def internet_first(self, peers: Sequence[PeerInfo]) -> list[PeerInfo]:
        """``peers`` with those known at an internet address first (order otherwise kept): the servers whose
        dial-back can prove us public, and the relays whose relayed address the internet can dial. A peer
        on our own LAN is still asked, after them (in a LAN-only network it is all there is)."""
        return sorted(peers, key=lambda p: not self._reach_internet(p.addrs))

    def _reach_internet(self, addrs: Sequence[str]) -> bool:
        """Whether any of ``addrs`` can be dialled from the internet (a DNS name is taken at its word)."""
        if any(a.startswith(("/dns4/", "/dns6/", "/dns/")) for a in addrs):
            return True
        ips = [str(ip) for ip in (ip_of(a) for a in addrs) if ip is not None]
        return reaches_internet(ips, loopback_network=self.loopback_network)

    def direct_addrs(self) -> list[str]:
        """The direct addresses we would announce when public (the node announces the same)."""
        return announceable([str(a) for a in self.host.get_transport_addrs()] + list(self.announce),
                            listen=self.listen)

    def _public_undialable(self, where: str) -> str | None:
        """None when the direct addresses we would announce as a public peer include one the internet can
        dial. Otherwise the reason we stay relayed although a dial-back from the internet reached us (at
        ``where``, behind port forwarding or a 1:1 NAT): public, we would announce only LAN addresses."""
        if self._reach_internet(self.direct_addrs()):
            return None
        log.info("nat.public_unannounced", reached=where, addrs=",".join(self.direct_addrs())[:300],
                 reason="no-internet-address")
        return (f"dialled back from the internet at {where}, an address we do not announce "
                f"(add --announce {where} if it is this machine's)")

    def dial_back_candidates(self) -> list[str]:
        """Where others might reach us: observed IP x listen ports, our interface addresses, --announce."""
        transport = [str(a) for a in self.host.get_transport_addrs()]
        ports = sorted({str(multiaddr.Multiaddr(a).value_for_protocol("tcp")) for a in transport if "/tcp/" in a})
        out: list[str] = list(self.announce)
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is not None:
            for observed in manager.addrs(min_observers=1):
                ip = ip_of(str(observed))
                if ip is not None and not is_circuit(str(observed)):
                    out.extend(f"/ip{ip.version}/{ip}/tcp/{port}" for port in ports)
        out.extend(announceable(transport, listen=self.listen))
        return [a for a in dict.fromkeys(out) if not is_circuit(a)]

    async def _wait_identified(self, peers: Sequence[PeerInfo]) -> None:
        """Identify tells us the address each peer sees us at; wait (briefly) until the peers have answered."""
        identified = getattr(self.host, "_identified_peers", None)
        if identified is None:
            return
        ids = [to_libp2p_id(p.peer_id) for p in peers]
        with trio.move_on_after(IDENTIFY_WAIT_S):
            while not all(i in identified for i in ids):
                await trio.sleep(0.02)

    async def _ask_dial_backs(self, servers: Sequence[PeerInfo], candidates: Sequence[str]
                              ) -> dict[str, tuple[DialBack, bytes | None]]:
        """Ask each of ``servers`` at once to dial us back on ``candidates``: peer ID -> (what the answer is
        worth, the address it names). A "reached" counts only if that server's connection reached our own
        listener (:func:`~p2pinfer.net.nat_rules.dial_back_answer`)."""
        raw = [multiaddr.Multiaddr(a).to_bytes() for a in candidates]
        asked = set(raw)
        own_ips = interface_ips(socket.AF_INET) + interface_ips(socket.AF_INET6)  # a server beside us: not evidence
        answers: dict[str, tuple[DialBack, bytes | None]] = {}

        async def ask(server: PeerInfo) -> None:
            try:
                code, addr = await self.autonat.query_server(
                    to_libp2p_id(server.peer_id), raw, timeout=AUTONAT_QUERY_TIMEOUT_S)
            except BaseException as exc:  # noqa: BLE001 - any failure means "no answer from this server"
                if isinstance(exc, trio.Cancelled):
                    raise
                log.debug("nat.autonat_no_answer", peer=server.peer_id, error=repr(exc)[:200])
                return
            says_reached = code == int(AutoNATMessage.OK)
            if addr is not None and bytes(addr) not in asked:
                addr = None  # the server's word for where it reached us names none of ours: shown as "an address"
            seen_from = (await watch.wait_for(server.peer_id, self.timing.dial_back_confirm_s)
                         if says_reached else None)
            answer = dial_back_answer(says_reached, code == int(AutoNATMessage.E_DIAL_ERROR), seen_from,
                                      loopback_network=self.loopback_network, own_ips=own_ips)
            if answer is DialBackAnswer.UNCONFIRMED:
                log.info("nat.dial_back_unconfirmed", peer=server.peer_id, claimed=_addr_text(addr),
                         reason="no connection from this server reached us")
            elif answer is DialBackAnswer.LAN_ONLY:
                log.info("nat.dial_back_lan_only", peer=server.peer_id, seen_from=seen_from, reached=_addr_text(addr),
                         reason="lan-only")
            group = _group(seen_from) if answer is DialBackAnswer.REACHED else None
            answers[server.peer_id] = (DialBack(answer, group), addr)

        with self.inbound.watching([s.peer_id for s in servers]) as watch:
            async with trio.open_nursery() as nursery:
                for server in servers:
                    nursery.start_soon(ask, server)
        return answers

    async def check_reachability(self, servers: Sequence[PeerInfo]) -> ReachabilityStatus | None:
        """Ask ``servers`` (connected peers) to dial us back. None when no server gave a verdict."""
        await self._wait_identified(servers)
        candidates = self.dial_back_candidates()
        if not candidates:
            return ReachabilityStatus(Reachability.UNREACHABLE, "no address to be dialled on")
        answers = await self._ask_dial_backs(servers, candidates)
        ok = [(pid, addr) for pid, (d, addr) in answers.items() if d.answer is DialBackAnswer.REACHED]
        # Only "I dialled and failed" is evidence against us; a refusal (busy, relayed, no address on our
        # observed IP) says nothing about our reachability, nor does a "reached" we did not see arrive.
        failed = [pid for pid, (d, _) in answers.items() if d.answer is DialBackAnswer.FAILED]
        unconfirmed = sum(1 for d, _ in answers.values() if d.answer is DialBackAnswer.UNCONFIRMED)
        lan_only = sum(1 for d, _ in answers.values() if d.answer is DialBackAnswer.LAN_ONLY)
        self._lan_only_last_check = lan_only
        log.info("nat.autonat", asked=len(servers), answered=len(answers), reached=len(ok), failed=len(failed),
                 unconfirmed=unconfirmed, lan_only=lan_only, candidates=",".join(candidates)[:300])
        self._public_undialable_reason = None
        if ok:
            where = _addr_text(ok[0][1])
            self._public_undialable_reason = self._public_undialable(where)
            if self._public_undialable_reason is None:
                return ReachabilityStatus(Reachability.PUBLIC,
                                          f"dialled back at {where} by {len(ok)} of {plural(len(answers), 'peer')}")
            return None  # reachable from the internet, so not "behind NAT" whoever failed; but not public either
        on_lan = f", {lan_only} on our own network could" if lan_only else ""
        if failed:
            why = f"behind NAT or firewall: {plural(len(failed), 'peer')} could not dial us back{on_lan}"
            return ReachabilityStatus(Reachability.UNREACHABLE, why)
        return None

    # ---- relays -------------------------------------------------------------------------------------

    async def reserve(self, relay: PeerInfo) -> list[str]:
        """Reserve a slot on ``relay`` (connected); return our relayed addresses through it ([] on refusal)."""
        assert self._nursery is not None, "NatTraversal is not running"
        relay_id = to_libp2p_id(relay.peer_id)
        with trio.move_on_after(RESERVE_TIMEOUT_S):
            try:
                stream = await self.host.new_stream(relay_id, [TProtocol(HOP_PROTOCOL_ID)])
            except Exception as exc:
                log.info("nat.relay_refused", relay=relay.peer_id, error=f"{type(exc).__name__}: {exc}"[:200])
                return []
            try:
                ok = await self.relay_transport.reserve(stream, relay_id, self._nursery)
            finally:
                await _quiet_close(stream)
            if not ok:
                log.info("nat.relay_refused", relay=relay.peer_id, error="reservation refused")
                return []
            return [f"{a}/p2p/{relay.peer_id}{CIRCUIT}" for a in relay.addrs if not is_circuit(a)]
        log.info("nat.relay_refused", relay=relay.peer_id, error=f"no answer within {RESERVE_TIMEOUT_S} s")
        return []

    def _use_relay(self, relay: PeerInfo, addrs: Sequence[str], *, told_failed: bool = True) -> None:
        """From now on we are reachable through ``relay`` (and announce only its addresses). ``told_failed``:
        a dial-back said we are behind NAT (False: nobody gave a verdict, so ask again soon)."""
        for old in self._relays:
            if old.peer_id != relay.peer_id:
                self._stop_refreshing(old.peer_id)
        self.relayed_addrs = tuple(dict.fromkeys(addrs))
        self.reserved_on = (relay.peer_id,)
        self._relays = [relay]
        self._relay_up = True
        self._relay_conns = self._open_connections(relay.peer_id)
        self.relay_health.record(True)
        self.public_evidence.reset(told_failed=told_failed)
        self._next_public_check = trio.current_time() + self._public_check_s()

    def _stop_refreshing(self, relay_peer_id: str) -> None:
        """Stop refreshing our reservation on a relay we moved away from.

        py-libp2p 0.8.1 runs one refresher for all reservations: it re-reserves every entry of the transport's
        reservation table shortly before it expires, and drops an entry only once expired; there is no call
        to release one, and the relay protocol has no "unreserve" message. Without this, a relay we left
        (we turned public, or moved to another relay) kept one of its ``max_reservations`` slots for us for
        as long as it ran. Removing the entry from the table the refresher reads every pass is what stops it;
        the relay frees the slot when the reservation expires (``reservation_ttl_s``, 1 h by default)."""
        pid = to_libp2p_id(relay_peer_id)
        for table in ("_reservations", "_reservation_proofs"):
            entries = getattr(self.relay_transport, table, None)
            if isinstance(entries, dict):
                entries.pop(pid, None)
        log.info("nat.relay_released", relay=relay_peer_id)

    def refreshed_relays(self) -> list[str]:
        """The relays py-libp2p's refresher keeps a reservation on for us (see :meth:`_stop_refreshing`)."""
        entries = getattr(self.relay_transport, "_reservations", {})
        return sorted(pid.to_base58() for pid in entries)

    def _public_check_s(self) -> float:
        """Delay to the next public re-check: the public_recheck backoff after a failed dial-back; while nobody
        has given a verdict, the shorter backoff of unanswered checks (10, 20, 40 s ... up to 120 s)."""
        no_verdict = Backoff(self.timing.recheck_first_s, self.timing.recheck_interval_s)
        return self.public_evidence.next_check_s(self.timing.public_recheck, no_verdict)

    async def establish(self, servers: Sequence[PeerInfo]) -> ReachabilityStatus:
        """Join-time: find out whether we are reachable; if not, reserve on a relay. Sets :attr:`status`."""
        checked = await self.check_reachability(servers) if servers else None
        if checked is not None and checked.state is Reachability.PUBLIC:
            self.status = checked
        else:
            why = checked.reason if checked is not None else self._no_verdict_reason(bool(servers))
            for relay in self.internet_first(servers):
                addrs = await self.reserve(relay)
                if addrs:
                    self._use_relay(relay, addrs, told_failed=checked is not None)
                    break
            if self.relayed_addrs:
                self.status = ReachabilityStatus(Reachability.RELAYED,
                                                 f"{why}; reachable through relay {self.reserved_on[0]}")
            elif checked is None:
                self.status = ReachabilityStatus(Reachability.UNREACHABLE, why, checked=False)
            else:
                self.status = ReachabilityStatus(Reachability.UNREACHABLE, f"{why}; no relay granted a reservation")
        log.info("nat.reachability", state=self.status.state.value, reason=self.status.reason,
                 relayed=",".join(self.relayed_addrs)[:300])
        self.addresses_may_have_changed()
        return self.status

    def _no_verdict_reason(self, asked: bool) -> str:
        """Why the last check gave no verdict, for the reachability line."""
        if not asked:
            return NOT_CHECKED
        if self._public_undialable_reason is not None:
            return self._public_undialable_reason
        if self._lan_only_last_check:
            return (f"no dial-back verdict: only {plural(self._lan_only_last_check, 'peer')} on our own network "
                    "reached us, which proves nothing about the internet")
        return "no dial-back verdict: peers were busy, silent, or claimed a dial-back that never arrived"

    async def recheck_loop(self, servers: Callable[[], list[PeerInfo]]) -> None:
        """Keep our reachability true while we run.

        ``servers()`` gives peers we hold direct connections to. A relayed peer keeps its relay (or finds
        another) and now and then asks whether it is public after all; an unreachable one asks again (a
        first bootstrap node has nobody to ask at start); a public peer is not re-checked.
        """
        wait = self.timing.recheck_first_s
        while True:
            await trio.sleep(wait)
            try:
                wait = await self._recheck_once(servers)
            except Exception as exc:  # a failed re-check must never take the node down; try again later
                log.warning("nat.recheck_failed", error=repr(exc)[:200])
                wait = self.timing.relay_check_s

    async def _recheck_once(self, servers: Callable[[], list[PeerInfo]]) -> float:
        """One round of upkeep; returns how long to sleep before the next."""
        if self._relays:  # we hold (or held) a reservation: keep it, and see whether we are public after all
            wait = await self._keep_reservation(servers)
            if self._relays and self.status.state is not Reachability.PUBLIC:
                until_public_check = self._next_public_check - trio.current_time()
                if until_public_check <= 0:
                    await self._recheck_public(servers)
                    until_public_check = self._next_public_check - trio.current_time()
                wait = min(wait, max(until_public_check, 0.0))
            return wait
        if self.status.state is not Reachability.UNREACHABLE:
            return self.timing.recheck_interval_s
        candidates = servers()[:MAX_RECHECK_SERVERS]
        if not candidates:
            return self.timing.recheck_first_s  # nobody to ask yet: look again soon
        before = self.status
        await self.establish(candidates)
        if self.status != before:
            log.info("nat.reachability_changed", state=self.status.state.value, reason=self.status.reason)
        if self.status.checked:
            self._unanswered_rounds = 0
            return self.timing.recheck_interval_s
        # Asked, and nobody answered (loaded servers, busy refusals): back off instead of asking every 5 s,
        # each round a dial-back (TCP + Noise) for every server asked.
        self._unanswered_rounds += 1
        return Backoff(self.timing.recheck_first_s, self.timing.recheck_interval_s).delay(self._unanswered_rounds)

    async def _reconnect_and_reserve(self, relay: PeerInfo) -> bool:
        network: Any = self.host.get_network()
        negative = getattr(network, "_negative_peer_cache", None)
        if negative is not None:  # py-libp2p refuses to redial a peer for 60 s after a failed dial
            negative.evict(relay.peer_id)
        if not self.is_connected(relay.peer_id):
            with trio.move_on_after(RESERVE_TIMEOUT_S):
                try:
                    await self.host.connect(relay.to_libp2p())
                except Exception as exc:
                    log.debug("nat.relay_reconnect_failed", relay=relay.peer_id, error=repr(exc)[:200])
        return self.is_connected(relay.peer_id) and bool(await self.reserve(relay))

    async def _keep_reservation(self, servers: Callable[[], list[PeerInfo]]) -> float:
        """A relay that went away (restart, network) took our reservation with it: reconnect and reserve again,
        instead of staying unreachable until the next refresh (up to an hour). Returns the next check's delay.

        A failed try is retried with backoff; only :attr:`NatTiming.relay_tries_before_lost` failures in a row
        make the relay lost, and then another connected relay is asked. Our relayed address stays announced
        meanwhile (it works again as soon as the relay is back), and nothing is announced unless our
        addresses change: a relay that comes back under the same address costs the network no gossip."""
        relay = self._relays[0]
        if self._relay_up and any(not getattr(c, "is_closed", False) for c in self._relay_conns):
            self.relay_health.record(True)
            return self.relay_health.next_check_s()
        if self._relay_up:
            log.info("nat.relay_lost", relay=relay.peer_id)
            self._relay_up = False
        ok = await self._reconnect_and_reserve(relay)
        action = self.relay_health.record(ok)
        if action is RelayAction.KEEP:
            self._relay_up = True
            self._relay_conns = self._open_connections(relay.peer_id)
            self.stats["relay_restored"] += 1
            log.info("nat.relay_restored", relay=relay.peer_id)
            if self.status.state is not Reachability.RELAYED:
                self.status = ReachabilityStatus(Reachability.RELAYED, f"reachable through relay {relay.peer_id}")
            self.addresses_may_have_changed()
            if self._nursery is not None:
                self._nursery.start_soon(self._relay_holds_our_announcement, relay.peer_id)
            return self.relay_health.next_check_s()
        if action is RelayAction.RETRY:
            log.info("nat.relay_retry", relay=relay.peer_id, failures=self.relay_health.failures,
                     retry_in_s=self.relay_health.next_check_s())
            return self.relay_health.next_check_s()
        for other in self.internet_first(servers())[:MAX_RELAY_CANDIDATES]:
            if other.peer_id == relay.peer_id or not other.addrs:
                continue
            addrs = await self.reserve(other)
            if addrs:
                self._use_relay(other, addrs)
                self.stats["relay_replaced"] += 1
                self.status = ReachabilityStatus(Reachability.RELAYED,
                                                 f"relay {relay.peer_id} lost; reachable through relay {other.peer_id}")
                log.info("nat.relay_replaced", lost=relay.peer_id, relay=other.peer_id)
                self.addresses_may_have_changed()
                return self.relay_health.next_check_s()
        wait = self.relay_health.next_check_s()
        if self.status.state is not Reachability.UNREACHABLE:
            log.info("nat.relay_gone", relay=relay.peer_id, failures=self.relay_health.failures)
        self.status = ReachabilityStatus(Reachability.UNREACHABLE,
                                         f"lost relay {relay.peer_id}; trying again every {wait:.0f} s", checked=False)
        self.addresses_may_have_changed()
        return wait

    async def _recheck_public(self, servers: Callable[[], list[PeerInfo]]) -> None:
        """Ask again whether we are dialable: a public peer once told it was behind NAT (its dial-backs failed
        on a loaded machine) would otherwise stay relayed for good. Public after several confirmations."""
        self.stats["public_rechecks"] += 1
        now = trio.current_time()
        candidates = self.internet_first(servers())[:MAX_RECHECK_SERVERS]
        addrs = self.dial_back_candidates()
        if not candidates or not addrs:
            self._next_public_check = now + self._public_check_s()
            return
        answers = await self._ask_dial_backs(candidates, addrs)
        dial_backs = [d for d, _ in answers.values()]
        verdicts = [d.answer for d in dial_backs]
        self.public_evidence.record_round(dial_backs)
        self._next_public_check = trio.current_time() + self._public_check_s()
        needed = self.public_evidence.needed if self.public_evidence.told_failed else 1
        log.info("nat.public_recheck", asked=len(candidates), reached=verdicts.count(DialBackAnswer.REACHED),
                 failed=verdicts.count(DialBackAnswer.FAILED), unconfirmed=verdicts.count(DialBackAnswer.UNCONFIRMED),
                 lan_only=verdicts.count(DialBackAnswer.LAN_ONLY), confirmations=self.public_evidence.reached(),
                 needed=needed)
        if not self.public_evidence.confirmed():
            return
        where = next((_addr_text(addr) for d, addr in answers.values()
                      if d.answer is DialBackAnswer.REACHED), "an address")
        undialable = self._public_undialable(where)
        if undialable is not None:  # reachable, but at no address we would announce: the relay stays
            if self._relays:
                self.status = ReachabilityStatus(Reachability.RELAYED,
                                                 f"{undialable}; reachable through relay {self._relays[0].peer_id}")
            return
        self.status = ReachabilityStatus(
            Reachability.PUBLIC,
            f"dialled back at {where}, confirmed {plural(self.public_evidence.reached(), 'time')} on re-check")
        for old in self._relays:
            self._stop_refreshing(old.peer_id)
        self.relayed_addrs, self.reserved_on, self._relays, self._relay_up, self._relay_conns = (), (), [], False, []
        self.public_evidence.reset()
        log.info("nat.reachability_changed", state=self.status.state.value, reason=self.status.reason)
        self.addresses_may_have_changed()

    async def _relay_holds_our_announcement(self, relay_id: str) -> None:
        """Our relay connection closed and we reserved again. A blip leaves the relay as it was; a restarted
        relay (a bootstrap node, where clients join) lost every announcement it held, ours too, and would show
        clients nothing of us until our next periodic announcement (up to ``announce_interval_s``, 60 s).

        So we ask it for one capacity-sync page starting at our peer ID: it holds our last announcement, or
        it does not. If not, we announce once, through the same rate limit as address changes, after the relay
        subscribed to our gossip topic (a flood publish before that would miss it). A blip costs one small
        request and no gossip; a restart one announcement per relayed peer, which the relay needs."""
        own = self.own_announcement()
        if own is None or self.request is None:
            log.debug("nat.relay_check_skipped", relay=relay_id, announced=own is not None)
            return
        me = self.host.get_id().to_base58()
        cursor = me[:-1]  # a prefix sorts just before us: the page starts with our entry if the relay has it
        try:
            reply = await self.request(relay_id, CAPACITY_SYNC, encode_sync_request(cursor), timeout=RELAY_HOLDS_US_S)
            envelopes, _ = parse_sync_page(reply, after=cursor)
        except Exception as exc:  # NetError, SyncPageError, anything: a background task must not end the node
            log.info("nat.relay_sync_check_failed", relay=relay_id, error=repr(exc)[:200])
            return
        if self.own_announcement() in envelopes:
            log.debug("nat.relay_holds_announcement", relay=relay_id)
            return
        with trio.move_on_after(RELAY_SUBSCRIBED_WAIT_S):
            while relay_id not in self.gossip_peers():
                await trio.sleep(0.1)
        log.info("nat.relay_lacks_announcement", relay=relay_id)
        self.addresses_may_have_changed(forced=True)

    # ---- announcing address changes -------------------------------------------------------------------

    def addresses_may_have_changed(self, *, forced: bool = False) -> None:
        """Announce when the addresses we would announce differ from the last announced ones (or ``forced``: a
        relay lacks our announcement), at most every ``reannounce_min_interval_s`` (a later change waits, and
        is announced once, with the latest state)."""
        now = trio.current_time()
        self._reannounce_forced = self._reannounce_forced or forced
        wait = reannounce_wait(self.announced(), self.addresses(), self._reannounced_at, now,
                               self.timing.reannounce_min_interval_s, forced=self._reannounce_forced)
        if wait is None:
            return
        if wait > 0:
            if not self._reannounce_pending and self._nursery is not None:
                self._reannounce_pending = True
                self._nursery.start_soon(self._reannounce_later, wait)
            return
        self._reannounced_at = now
        self._reannounce_forced = False
        self.stats["reannounced"] += 1
        log.info("nat.reannounce", addrs=",".join(self.addresses())[:300])
        self.on_change()

    async def _reannounce_later(self, wait: float) -> None:
        await trio.sleep(wait)
        self._reannounce_pending = False
        self.addresses_may_have_changed()

    def direct_peers(self) -> list[PeerInfo]:
        """Peers we hold a direct (not relayed) connection to, with their peerstore addresses."""
        out = []
        for pid in self.host.get_connected_peers():
            peer_id = pid.to_base58()
            if self.has_direct_connection(peer_id):
                try:
                    known = self.host.get_peerstore().addrs(pid)
                except Exception:  # PeerStoreError: connected, but identify has not told us its addresses
                    known = []
                direct = dict.fromkeys(strip_p2p(str(a)) for a in known if not is_circuit(str(a)))
                out.append(PeerInfo(peer_id, tuple(direct)))
        return out

    # ---- dialling -----------------------------------------------------------------------------------

    def _open_connections(self, peer_id: str) -> list[Any]:
        conns = self.host.get_network().get_connections(to_libp2p_id(peer_id))  # type: ignore[attr-defined]
        return [c for c in conns or [] if not getattr(c, "is_closed", False)]

    def is_connected(self, peer_id: str) -> bool:
        return bool(self._open_connections(peer_id))

    async def dial_circuit(self, peer_id: str, circuit_addrs: Sequence[str], *, timeout: float) -> None:
        """Connect to ``peer_id`` through the relays named in ``circuit_addrs`` (tried in order)."""
        errors: list[str] = []
        with trio.move_on_after(timeout):
            for addr in circuit_addrs:
                full = addr if addr.endswith(f"/p2p/{peer_id}") else f"{addr}/p2p/{peer_id}"
                relay = _relay_info(addr)
                try:
                    if relay is not None:
                        await self.host.connect(relay)
                    await self.relay_transport.dial(multiaddr.Multiaddr(full))
                    if self._nursery is not None and self.dcutr is not None:
                        self._nursery.start_soon(self._upgrade, peer_id)  # don't wait for DCUtR's 2 s loop
                    return
                except Exception as exc:
                    errors.append(f"{addr}: {type(exc).__name__}: {exc}"[:200])
            raise DialError(f"cannot reach {peer_id} through a relay: {'; '.join(errors) or 'no relay address'}"[:300])
        raise DialError(f"cannot reach {peer_id} through a relay within {timeout} s")

    async def hole_punch(self, peer_id: str) -> bool:
        """Try to replace a relayed connection to ``peer_id`` by a direct one; True if one exists after."""
        if self.dcutr is None:
            return False
        pid = to_libp2p_id(peer_id)
        await self.dcutr.initiate_hole_punch(pid)
        # 0.8.1 can report failure although a parallel dial made the direct connection: look for ourselves.
        return self.has_direct_connection(peer_id)

    async def _upgrade(self, peer_id: str) -> None:
        try:
            direct = await self.hole_punch(peer_id)
        except Exception as exc:  # DCUtR errors are the peer's or the network's; the relayed link still works
            log.debug("nat.hole_punch_failed", peer=peer_id, error=repr(exc)[:200])
            return
        log.info("nat.hole_punch", peer=peer_id, direct=direct)

    def has_direct_connection(self, peer_id: str) -> bool:
        conns = self.host.get_network().get_connections(to_libp2p_id(peer_id))  # type: ignore[attr-defined]
        for conn in conns or []:
            if getattr(conn, "is_closed", False):
                continue
            try:
                addrs = conn.get_transport_addresses()
            except Exception:
                continue
            if addrs and all(CIRCUIT not in str(a) for a in addrs):
                return True
        return False


def _group(ip: str | None) -> str | None:
    try:
        return netgroup(ip) if ip is not None else None
    except ValueError:  # our socket's own report; not an IP would be a py-libp2p oddity: its own group
        return ip


def _addr_text(raw: bytes | None) -> str:
    """A peer-supplied address, for a log line or the reachability reason (never raises)."""
    try:
        return str(multiaddr.Multiaddr(raw))[:100] if raw else "an address"
    except Exception:
        return "an address"


def _relay_info(circuit_addr: str) -> Libp2pPeerInfo | None:
    """The relay part of ``<relay addr>/p2p/<relay id>/p2p-circuit[...]`` as a libp2p PeerInfo."""
    head = circuit_addr.split(CIRCUIT, 1)[0]
    marker = head.rfind("/p2p/")
    if marker < 0:
        return None
    relay_id = head[marker + len("/p2p/"):]
    relay_addr = head[:marker]
    try:
        return Libp2pPeerInfo(ID.from_base58(relay_id), [multiaddr.Multiaddr(relay_addr)] if relay_addr else [])
    except Exception:
        return None
