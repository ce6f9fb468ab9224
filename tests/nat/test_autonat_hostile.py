"""AutoNAT dial-back requests from a real attacking host (its own key, real bytes on the wire): a node
never dials an address off the requester's observed IP (no amplification), proves the peer ID of every
address it reports as reachable, and a flood of requests neither queues nor mislabels honest requesters."""

from __future__ import annotations

from contextlib import AsyncExitStack

import multiaddr
import trio
from libp2p.host.autonat.pb.autonat_pb2 import Message

from p2pinfer.identity import Identity
from p2pinfer.net import Node, NodeConfig
from p2pinfer.net.keys import to_libp2p_id
from p2pinfer.net.nat import MAX_CONCURRENT_DIAL_BACKS

LOCAL = ("/ip4/127.0.0.1/tcp/0",)


async def start(stack: AsyncExitStack, **kwargs: object) -> Node:
    kwargs.setdefault("listen", LOCAL)
    return await stack.enter_async_context(Node(Identity.generate(), NodeConfig(**kwargs)))  # type: ignore[arg-type]


def raw(addr: str) -> bytes:
    return multiaddr.Multiaddr(addr).to_bytes()


async def test_dial_back_is_only_to_the_observed_ip_and_proves_the_peer() -> None:
    async with AsyncExitStack() as stack:
        server = await start(stack)
        attacker = await start(stack, bootstrap=server.addrs)
        bystander = await start(stack)
        server_id = to_libp2p_id(server.peer_id)
        before = server.nat.autonat.dial_backs  # the attacker's own join asked for one
        # A third party's address on another IP than the one the server sees the attacker on: refused.
        status, _ = await attacker.nat.autonat.query_server(server_id, [raw("/ip4/127.0.0.2/tcp/9")], timeout=30)
        assert status == int(Message.E_DIAL_REFUSED)
        # The bystander's real address (right IP): the server dials, but the Noise handshake proves the
        # address belongs to someone else than the requester, so it is not reported as reachable.
        bystander_addr = bystander.addrs[0].rsplit("/p2p/", 1)[0]
        status, _ = await attacker.nat.autonat.query_server(server_id, [raw(bystander_addr)], timeout=30)
        assert status == int(Message.E_DIAL_ERROR)
        # The attacker's own address: reachable, and the address is echoed back.
        own = attacker.addrs[0].rsplit("/p2p/", 1)[0]
        status, addr = await attacker.nat.autonat.query_server(server_id, [raw(own)], timeout=30)
        assert status == int(Message.OK) and addr == raw(own)
        # Not a dial of the existing connection: a fresh one was opened and closed for each request.
        assert server.nat.autonat.dial_backs - before == 2


async def test_a_flood_of_requests_is_refused_not_queued_and_never_mislabels() -> None:
    async with AsyncExitStack() as stack:
        server = await start(stack)
        attacker = await start(stack, bootstrap=server.addrs)
        server_id = to_libp2p_id(server.peer_id)
        before = server.nat.autonat.dial_backs + server.nat.autonat.refused_busy
        # A TCP listener on the attacker's IP that accepts and then says nothing: every dial-back to it
        # holds a slot until the handshake times out.
        tarpits = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = tarpits[0].socket.getsockname()[1]
        held: list[trio.SocketStream] = []
        answers: list[int] = []

        async def accept_forever() -> None:
            while True:
                held.append(await tarpits[0].accept())

        async def ask() -> None:
            status, _ = await attacker.nat.autonat.query_server(server_id, [raw(f"/ip4/127.0.0.1/tcp/{port}")],
                                                                timeout=60)
            answers.append(status)

        async with trio.open_nursery() as outer:
            outer.start_soon(accept_forever)
            async with trio.open_nursery() as nursery:
                for _ in range(MAX_CONCURRENT_DIAL_BACKS * 3):
                    nursery.start_soon(ask)
            outer.cancel_scope.cancel()
        for stream in held:
            await stream.aclose()
        await tarpits[0].aclose()
        autonat = server.nat.autonat
        assert len(answers) == MAX_CONCURRENT_DIAL_BACKS * 3
        assert set(answers) <= {int(Message.E_DIAL_ERROR), int(Message.E_DIAL_REFUSED)}  # never "reachable"
        assert autonat.dial_backs + autonat.refused_busy - before == len(answers)
        assert autonat.peak_in_flight <= MAX_CONCURRENT_DIAL_BACKS  # bounded work, nothing queued
        # Afterwards the server still serves an honest requester correctly.
        honest = await start(stack, bootstrap=server.addrs)
        assert honest.nat.status.state.value == "public", honest.nat.status
