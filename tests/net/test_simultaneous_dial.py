"""Two real peers that dial each other at the same moment end with one connection, the same one at both ends.

py-libp2p 0.8.1 alone left both connections up (each end counts two, against our limit of one per peer) for
its 20 s grace period, after which each end could close a different one; with the grace period at 0 both
connections died in every round. p2pinfer.net.connection_trim settles the pair by a rule both ends compute
alike (the connection dialled by the smaller peer ID stays), at once, and lets a request the race placed on
the losing connection finish before it is closed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from libp2p.abc import INetConn, INetStream, INetwork
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from p2pinfer.identity import Identity
from p2pinfer.net import Node
from p2pinfer.net.addrs import PeerInfo
from p2pinfer.net.duplicates import Dialer, duplicates_to_close, keeping_dialer
from p2pinfer.net.gossip import CAPACITY_TOPIC, build_pubsub
from p2pinfer.net.host import build_host
from p2pinfer.net.keys import to_libp2p_id
from p2pinfer.net.notifee import Notifee

from .helpers import LOCAL, offer, start, wait_until

ECHO = "/p2pinfer/test-echo/1"
WHICH = "/p2pinfer/test-which-connection/1"
ROUNDS = 4


# ---- the rule (pure) -------------------------------------------------------------------------------------

MIRROR = {Dialer.US: Dialer.THEM, Dialer.THEM: Dialer.US, Dialer.RELAYED: Dialer.RELAYED}


@given(a=st.binary(min_size=1, max_size=40), b=st.binary(min_size=1, max_size=40),
       conns=st.lists(st.sampled_from([Dialer.US, Dialer.THEM, Dialer.RELAYED]), max_size=6))
def test_both_ends_close_the_same_connections_and_keep_one(a: bytes, b: bytes, conns: list[Dialer]) -> None:
    if a == b:
        return
    seen_by_b = [MIRROR[d] for d in conns]  # the same connections, as the other end sees them
    closed_by_a = duplicates_to_close(a, b, conns)
    assert closed_by_a == duplicates_to_close(b, a, seen_by_b)
    direct = [i for i, d in enumerate(conns) if d is not Dialer.RELAYED]
    if direct:
        assert set(direct) - set(closed_by_a), "at least one direct connection stays"
    assert all(conns[i] is not Dialer.RELAYED for i in closed_by_a)
    assert keeping_dialer(a, b) is MIRROR[keeping_dialer(b, a)]


# ---- real hosts ------------------------------------------------------------------------------------------

class ConnectionLog(Notifee):
    """Every connection a host registered, to check afterwards that the losers really closed."""

    def __init__(self) -> None:
        self.conns: list[INetConn] = []

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self.conns.append(conn)


def ordered_identities() -> tuple[Identity, Identity]:
    """Two identities, the one with the smaller peer ID (as bytes) first."""
    pair = sorted((Identity.generate(), Identity.generate()), key=lambda i: to_libp2p_id(i.peer_id).to_bytes())
    return pair[0], pair[1]


def info(node: Node) -> PeerInfo:
    return PeerInfo(node.peer_id, tuple(a.rsplit("/p2p/", 1)[0] for a in node.addrs))


def table(node: Node, other: Node) -> list[INetConn]:
    """The open connections ``node``'s swarm would put a new stream to ``other`` on."""
    conns = node.host.get_network().get_connections(to_libp2p_id(other.peer_id))
    return [c for c in conns if not c.is_closed]


def open_extra(log: ConnectionLog, keep: INetConn) -> list[INetConn]:
    return [c for c in log.conns if c is not keep and not c.is_closed]


async def peers(stack: AsyncExitStack, first: Identity, second: Identity) -> tuple[Node, Node, ConnectionLog, ConnectionLog]:
    a = await start(stack, first, nat_traversal=False)
    b = await start(stack, second, nat_traversal=False)
    logs = ConnectionLog(), ConnectionLog()
    for node, log in zip((a, b), logs):
        node.host.get_network().register_notifee(log)
        node.register_request_handler(ECHO, echo)
        node.host.set_stream_handler(TProtocol(WHICH), answer_which)
    return a, b, logs[0], logs[1]


async def echo(peer_id: str, body: bytes) -> bytes:
    if body == b"wait":
        await RELEASE[0].wait()  # held until the duplicate connection has been settled at both ends
    return body.upper()


RELEASE: list[trio.Event] = []


async def answer_which(stream: INetStream) -> None:
    WHICH_SEEN.append(stream.muxed_conn)
    await stream.write(b"ok")
    await stream.close()


WHICH_SEEN: list[Any] = []


async def carried_by(opener: Node, other: Node) -> tuple[Any, Any]:
    """The muxed connection a new stream from ``opener`` to ``other`` used, at each end."""
    WHICH_SEEN.clear()
    stream = await opener.host.new_stream(to_libp2p_id(other.peer_id), [TProtocol(WHICH)])
    assert await stream.read(2) == b"ok"
    await stream.close()
    await wait_until(lambda: len(WHICH_SEEN) == 1, what="the stream to arrive")
    return stream.muxed_conn, WHICH_SEEN[0]


def outcome(a: Node, b: Node, log_a: ConnectionLog, log_b: ConnectionLog) -> str:
    ta, tb = table(a, b), table(b, a)
    open_a = len({id(c) for c in log_a.conns if not c.is_closed})  # a restored connection is announced again
    open_b = len({id(c) for c in log_b.conns if not c.is_closed})
    return f"a holds {open_a} (uses {len(ta)}), b holds {open_b} (uses {len(tb)})"


SETTLED = "a holds 1 (uses 1), b holds 1 (uses 1)"


@pytest.mark.parametrize("grace_s", [None, 0.0], ids=["py-libp2p-grace", "no-grace"])
async def test_simultaneous_dials_settle_on_one_shared_connection(grace_s: float | None) -> None:
    """Rounds of two fresh peers dialling each other at once; every round must end with exactly one open
    connection at each end, the same one (dialled by the smaller peer ID), carrying requests and gossip both
    ways. ``no-grace`` sets py-libp2p's grace period to 0, the setting under which its own trim closed both."""
    outcomes: Counter[str] = Counter()
    for round_ in range(ROUNDS):
        async with AsyncExitStack() as stack:
            first, second = ordered_identities()
            a, b, log_a, log_b = await peers(stack, first, second)
            if grace_s is not None:
                for node in (a, b):
                    node.host.get_network().connection_config.grace_period = grace_s
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.connect, info(b))
                nursery.start_soon(b.connect, info(a))
            with trio.move_on_after(5):
                while outcome(a, b, log_a, log_b) != SETTLED:
                    await trio.sleep(0.05)
            outcomes[outcome(a, b, log_a, log_b)] += 1
            if outcome(a, b, log_a, log_b) != SETTLED:
                continue
            kept_a, kept_b = table(a, b)[0], table(b, a)[0]
            # The same TCP connection at both ends: a stream either end opens arrives on the other's kept one,
            # and it is the one the smaller peer ID (a) dialled.
            assert await carried_by(a, b) == (kept_a.muxed_conn, kept_b.muxed_conn)
            assert await carried_by(b, a) == (kept_b.muxed_conn, kept_a.muxed_conn)
            assert (kept_a.direction.name, kept_b.direction.name) == ("OUTBOUND", "INBOUND")
            assert await a.request(b.peer_id, ECHO, b"hi", timeout=30) == b"HI"
            assert await b.request(a.peer_id, ECHO, b"ho", timeout=30) == b"HO"
            await gossip_flows_both_ways(a, b, round_)
    assert outcomes == Counter({SETTLED: ROUNDS}), dict(outcomes)


async def gossip_flows_both_ways(a: Node, b: Node, round_: int) -> None:
    """Pubsub's streams may have been on the closed connection: announcements must still get through."""
    digest_a, digest_b = bytes([round_ + 1]) * 32, bytes([round_ + 101]) * 32
    a.update_capacity(models=[offer(digest_a)], free_slots=1, total_slots=1)
    b.update_capacity(models=[offer(digest_b)], free_slots=1, total_slots=1)
    await wait_until(lambda: [s.peer_id for s in b.serving(digest_a)] == [a.peer_id], what="a's announcement at b")
    await wait_until(lambda: [s.peer_id for s in a.serving(digest_b)] == [b.peer_id], what="b's announcement at a")
    for node, other in ((a, b), (b, a)):
        assert other.host.get_id() in node.pubsub.peer_topics.get(CAPACITY_TOPIC, ())


@dataclass
class HeldRequest:
    a: Node
    b: Node
    log_a: ConnectionLog
    log_b: ConnectionLog
    losing: INetConn
    replies: list[bytes] = field(default_factory=list)


@asynccontextmanager
async def request_held_on_the_losing_connection(stack: AsyncExitStack) -> AsyncIterator[HeldRequest]:
    """b (the larger peer ID) dials a and starts a request on that connection, held by the echo handler; a
    then dials b (a duplicate that wins). Yields once both ends use only a's connection, the request still
    running on the losing one; on leaving, releases the request and checks that it completed."""
    first, second = ordered_identities()
    a, b, log_a, log_b = await peers(stack, first, second)
    await b.connect(info(a))
    losing = table(b, a)[0]
    # Both pubsub streams are up, so on the only connection there is: the one that will lose; and both
    # start-up announcements have arrived, so nothing is written on them until the next one (60 s).
    await wait_until(lambda: pubsub_conn(a, b) is not None and pubsub_conn(b, a) is losing.muxed_conn,
                     what="both pubsub streams")
    await wait_until(lambda: a.peer_id in b.table and b.peer_id in a.table, what="the start-up announcements")
    RELEASE[:] = [trio.Event()]
    held = HeldRequest(a, b, log_a, log_b, losing)
    async with trio.open_nursery() as nursery:

        async def held_request() -> None:
            held.replies.append(await b.request(a.peer_id, ECHO, b"wait", timeout=600))

        nursery.start_soon(held_request)
        await wait_until(lambda: len(losing.get_streams()) >= 1, what="b's request stream")
        # a's own dial, although it is already connected (as a simultaneous dial would have raced it)
        await a.host.get_network().dial_addr(multiaddr.Multiaddr(info(b).addrs[0]), to_libp2p_id(b.peer_id))
        await wait_until(lambda: dialers(a, b) == ["OUTBOUND"] and dialers(b, a) == ["INBOUND"],
                         what="both ends to use only the connection a dialled")
        yield held
        RELEASE[0].set()
    assert held.replies == [b"WAIT"]


async def test_a_request_on_the_losing_connection_completes_before_it_closes() -> None:
    """The request on the losing connection still completes; then only a's connection is left, and both
    ends use it."""
    async with AsyncExitStack() as stack:
        async with request_held_on_the_losing_connection(stack) as held:
            assert not held.losing.is_closed and not held.replies  # the request on it is still running
        a, b, losing = held.a, held.b, held.losing
        await wait_until(lambda: outcome(a, b, held.log_a, held.log_b) == SETTLED,
                         what="one connection left at each end")
        assert losing.is_closed
        kept_a, kept_b = table(a, b)[0], table(b, a)[0]
        assert (kept_a.direction.name, kept_b.direction.name) == ("OUTBOUND", "INBOUND")
        assert await b.request(a.peer_id, ECHO, b"after", timeout=30) == b"AFTER"
        # Both pubsub streams were on the losing connection; each end moved its own once both ends agreed on
        # the kept one, before the loser closed (a stream left on it would only fail, and lose a message, at
        # the next write; under load one such write failed while the loser closed, and the stream was opened
        # again instead of moved: streams_moved == 0).
        for node, other, kept in ((a, b, kept_a), (b, a, kept_b)):
            await wait_until(lambda: pubsub_conn(node, other) is kept.muxed_conn, what="pubsub on the kept connection")
            assert node.pubsub.streams_moved == 1  # moved before the loser closed, not after a failed write
        await gossip_flows_both_ways(a, b, 50)


def dialers(node: Node, other: Node) -> list[str]:
    return [c.direction.name for c in table(node, other)]


def pubsub_conn(node: Node, other: Node) -> Any:
    stream = node.pubsub.peers.get(other.host.get_id())
    return None if stream is None else stream.muxed_conn


async def test_a_peer_whose_stream_from_us_died_keeps_its_subscriptions() -> None:
    """When our pubsub stream to a peer dies while the peer stays connected (a connection closing under it,
    a reset), py-libp2p forgot the peer's subscriptions, although they came on the peer's own stream to us,
    still alive: we never sent that peer an announcement again. Here a real GossipSub host resets the first
    pubsub stream our node opens to it and keeps its own stream to us."""
    async with AsyncExitStack() as stack:
        node = await start(stack, nat_traversal=False)
        other = build_host(Identity.generate(), LOCAL)
        await stack.enter_async_context(other.run([multiaddr.Multiaddr(LOCAL[0])]))
        pubsub, router = build_pubsub(other)
        await stack.enter_async_context(background_trio_service(pubsub))
        await stack.enter_async_context(background_trio_service(router))
        await pubsub.wait_until_ready()
        received: list[bytes] = []
        subscription = await pubsub.subscribe(CAPACITY_TOPIC)
        streams_from_node: list[INetStream] = []
        handlers = other.multiselect.handlers  # type: ignore[attr-defined]
        for protocol in [p for p in handlers if str(p).startswith("/meshsub/")]:
            handlers[protocol] = reset_the_first(handlers[protocol], streams_from_node)

        async def collect() -> None:
            while True:
                received.append(bytes((await subscription.get()).data))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            await other.connect(info_from_p2p_addr(multiaddr.Multiaddr(node.addrs[0])))
            await wait_until(lambda: other.get_id() in node.pubsub.peer_topics.get(CAPACITY_TOPIC, ()),
                             what="our node to learn the other's subscription")
            await wait_until(lambda: len(streams_from_node) == 1, what="our node's first stream (reset)")
            node.update_capacity(models=[offer(b"\x11" * 32)], free_slots=1, total_slots=1)  # finds it reset
            await wait_until(lambda: len(streams_from_node) == 2, what="our node to open its stream again")
            node.update_capacity(models=[offer(b"\x22" * 32)], free_slots=1, total_slots=1)
            await wait_until(lambda: any(b"\x22" * 32 in data for data in received),
                             what="our next announcement at the other host")
            nursery.cancel_scope.cancel()


def reset_the_first(handler: Any, seen: list[INetStream]) -> Any:
    async def handle(stream: INetStream) -> None:
        seen.append(stream)
        if len(seen) > 1:
            return await handler(stream)
        await stream.read(1024)  # our node's hello (its subscriptions)
        await stream.reset()

    return handle


async def test_when_the_kept_connection_dies_first_the_losing_one_is_used_again() -> None:
    """The other end may never complete the connection the rule keeps (its inbound upgrade timed out on a
    loaded machine), or the network drops it: a losing connection still open then goes back into use, at
    both ends, instead of leaving the pair with no connection in use."""
    async with AsyncExitStack() as stack:
        async with request_held_on_the_losing_connection(stack) as held:
            a, b, losing = held.a, held.b, held.losing
            await table(a, b)[0].close()  # the kept connection dies while the losing one still drains
            await wait_until(lambda: dialers(a, b) == ["INBOUND"] and dialers(b, a) == ["OUTBOUND"],
                             what="both ends to use the losing connection again")
            assert table(b, a)[0] is losing
        assert outcome(a, b, held.log_a, held.log_b) == SETTLED and not losing.is_closed
        assert await a.request(b.peer_id, ECHO, b"back", timeout=30) == b"BACK"
        await gossip_flows_both_ways(a, b, 60)


async def test_a_duplicate_is_not_closed_before_the_other_end_has_the_kept_connection() -> None:
    """A loaded peer may still be setting up (upgrading) the connection the rule keeps while it dials the
    other way. Closing its connection then left it with none in use: each new stream made it dial again, and
    each new dial was closed as a duplicate (seen as connections closed over and over in loaded runs). Here
    b, the larger peer ID, completes a's connection only when the test lets it (a real slow end: its inbound
    connection waits before it is registered), and meanwhile sends requests that need a connection."""
    async with AsyncExitStack() as stack:
        first, second = ordered_identities()
        a, b, log_a, log_b = await peers(stack, first, second)
        swarm_b: Any = b.host.get_network()
        upstream_add_conn = swarm_b.add_conn
        b_ready = trio.Event()
        held: list[Any] = []

        async def slow_inbound(muxed_conn: Any, direction: str = "unknown") -> Any:
            if direction == "inbound" and not b_ready.is_set():
                held.append(muxed_conn)
                await b_ready.wait()
            return await upstream_add_conn(muxed_conn, direction=direction)

        swarm_b.add_conn = slow_inbound
        await a.connect(info(b))  # a's side is up; b's is held
        assert held and dialers(a, b) == ["OUTBOUND"] and table(b, a) == []
        await b.connect(info(a))  # b dials a as well: a duplicate at a, where a's own connection wins
        for word in (b"one", b"two", b"three"):  # b needs a connection to a for each
            assert await b.request(a.peer_id, ECHO, word, timeout=60) == word.upper()
            await trio.sleep(0.5)  # time for a close (and b's redial) to happen, if either would
        assert dialers(b, a) == ["OUTBOUND"], "b lost its only usable connection"
        outbound_b = {id(c) for c in log_b.conns if c.direction.name == "OUTBOUND"}
        assert len(outbound_b) == 1, f"b dialled a {len(outbound_b)} times"
        b_ready.set()  # b completes a's connection: both ends settle on it
        await wait_until(lambda: outcome(a, b, log_a, log_b) == SETTLED, what="one connection left at each end")
        kept_a, kept_b = table(a, b)[0], table(b, a)[0]
        assert (kept_a.direction.name, kept_b.direction.name) == ("OUTBOUND", "INBOUND")
        assert await b.request(a.peer_id, ECHO, b"after", timeout=30) == b"AFTER"
        await gossip_flows_both_ways(a, b, 70)
