"""Relay, AutoNAT and the relay limits with real hosts on 127.0.0.1 (no namespaces needed): a peer reserves
a slot on a bootstrap node, another dials it through the relayed address, a full relay refuses more
reservations than its volunteer allowed, and a loopback peer is told it is public by a real dial-back."""

from __future__ import annotations

from contextlib import AsyncExitStack

from p2pinfer.cli.common import AppContext
from p2pinfer.cli.net import relay_limits
from p2pinfer.config import Config
from p2pinfer.errors import P2PInferError
from p2pinfer.net import PeerInfo, Reachability, RelayLimits
from p2pinfer.net.addrs import parse_peer_multiaddr, strip_p2p
from p2pinfer.net.keys import to_libp2p_id
from p2pinfer.net.nat import ReachabilityStatus, _relay_info, is_circuit

import pytest

from p2pinfer.identity import Identity
from p2pinfer.net import Node, NodeConfig

ECHO = "/p2pinfer/test-echo/1"


async def start(stack: AsyncExitStack, **kwargs: object) -> Node:
    kwargs.setdefault("listen", ("/ip4/127.0.0.1/tcp/0",))
    return await stack.enter_async_context(Node(Identity.generate(), NodeConfig(**kwargs)))  # type: ignore[arg-type]


async def echo(peer_id: str, body: bytes) -> bytes:
    return b"echo:" + body


async def test_request_reaches_a_peer_through_its_relay_reservation() -> None:
    async with AsyncExitStack() as stack:
        boot = await start(stack, role="bootstrap")
        target = await start(stack, bootstrap=boot.addrs, hole_punch=False)
        target.register_request_handler(ECHO, echo)
        assert target.nat.status.state is Reachability.PUBLIC  # the dial-back really reached it
        assert "dialled back at /ip4/127.0.0.1/tcp/" in target.nat.status.reason
        relayed = await target.nat.reserve(PeerInfo(boot.peer_id, tuple(strip_p2p(a) for a in boot.addrs)))
        assert relayed == [f"{strip_p2p(boot.addrs[0])}/p2p/{boot.peer_id}/p2p-circuit"]
        # On loopback the target is also directly reachable (a DHT lookup through the relay node may find and
        # dial it); what is asserted is that the relayed address alone yields a working relayed connection.
        caller = await start(stack, role="client", hole_punch=False)
        assert not caller.nat.is_connected(target.peer_id)
        stream = await caller.open_stream(target.peer_id, ECHO, timeout=30, addrs=relayed)
        assert await stream.call(b"hi") == b"echo:hi"
        await stream.aclose()
        conns = caller.host.get_network().get_connections(to_libp2p_id(target.peer_id))
        assert any("/p2p-circuit/" in str(a) for c in conns for a in c.get_transport_addresses())


async def test_relay_refuses_reservations_beyond_its_limit() -> None:
    async with AsyncExitStack() as stack:
        boot = await start(stack, role="bootstrap", relay_limits=RelayLimits(max_reservations=1))
        relay = PeerInfo(boot.peer_id, tuple(strip_p2p(a) for a in boot.addrs))
        first = await start(stack, bootstrap=boot.addrs)
        second = await start(stack, bootstrap=boot.addrs)
        assert await first.nat.reserve(relay)
        assert await second.nat.reserve(relay) == []
        # A relay that is switched off refuses every reservation.
        plain = await start(stack, role="bootstrap", relay_hop=False)
        assert await first.nat.reserve(PeerInfo(plain.peer_id, tuple(strip_p2p(a) for a in plain.addrs))) == []


def test_relayed_addresses_keep_their_relay() -> None:
    relay_id = "12D3KooWH6m3miAi8jpijSu4WZiKX28yG2fmFxJEk71Ga88CLSAo"
    peer_id = "12D3KooWP1EswKT27LkggnaWe6awXpSDmsWB8cvoXVLZCKLc6vMf"
    circuit = f"/ip4/198.51.100.10/tcp/4001/p2p/{relay_id}/p2p-circuit"
    assert is_circuit(circuit) and not is_circuit("/ip4/1.2.3.4/tcp/1")
    assert strip_p2p(f"{circuit}/p2p/{peer_id}") == circuit
    assert parse_peer_multiaddr(f"{circuit}/p2p/{peer_id}") == PeerInfo(peer_id, (circuit,))
    info = _relay_info(circuit)
    assert info is not None and info.peer_id.to_base58() == relay_id
    assert [str(a) for a in info.addrs] == ["/ip4/198.51.100.10/tcp/4001"]
    assert _relay_info("/ip4/1.2.3.4/tcp/1/p2p-circuit") is None  # no relay named


def test_reachability_line_and_relay_limits() -> None:
    line = ReachabilityStatus(Reachability.RELAYED, "behind NAT; reachable through relay X").line()
    assert line == "reachability: relayed (behind NAT; reachable through relay X)"
    limits = RelayLimits(max_reservations=3, circuit_duration_s=60, circuit_bytes=1000).to_libp2p()
    assert (limits.max_reservations, limits.duration, limits.data) == (3, 60, 1000)
    app = AppContext(Config(extra={"relay": {"max_reservations": 0}}))
    with pytest.raises(P2PInferError, match="max_reservations must be a positive whole number"):
        relay_limits(app, None, None, None)
    with pytest.raises(P2PInferError, match=r"config \[relay\]: only"):
        relay_limits(AppContext(Config(extra={"relay": {"typo": 1}})), None, None, None)
