"""A slow dial-back handshake is not a NAT: reachability flips only on evidence a NAT gives.

A home NAT drops the dial-back's SYN, so no TCP connection comes up. A loaded machine accepts the connection
at once (its kernel does) and answers the Noise handshake late. One 3 s limit over both told a public peer on
a loaded machine that it was behind NAT; now the connection and the handshake have limits of their own
(3 s and 10 s more by default, ``NatTiming``).

Real nodes on 127.0.0.1; the requester's slowness is a real TCP relay in front of its listener that passes
the bytes on only after a delay longer than the server's connect limit. The server here has a short connect
limit and a long handshake limit, so the delay is a lower bound the test needs (any extra delay of a loaded
machine only makes it longer) and nothing has to finish within a margin a loaded machine could miss.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from functools import partial

import multiaddr
import trio
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage

from p2pinfer.net import NatTiming
from p2pinfer.net.keys import to_libp2p_id

from .helpers import start

SERVER = NatTiming(dial_back_connect_s=1.0, dial_back_handshake_s=120.0)
SLOWER_THAN_THE_CONNECT_LIMIT_S = SERVER.dial_back_connect_s + 1.0
VERDICT_WAIT_S = 180.0  # only bounds how long a broken test hangs


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some():
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        with trio.move_on_after(1):
            await sink.aclose()


async def _slow_relay(target_port: int, stream: trio.SocketStream) -> None:
    """Accept at once, then connect on to the real listener and pass bytes both ways only after the delay."""
    async with stream:
        await trio.sleep(SLOWER_THAN_THE_CONNECT_LIMIT_S)
        upstream = await trio.open_tcp_stream("127.0.0.1", target_port)
        async with upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pipe, stream, upstream)
            nursery.start_soon(_pipe, upstream, stream)


def _port(addr: str) -> int:
    return int(multiaddr.Multiaddr(addr).value_for_protocol("tcp"))


async def test_a_dial_back_whose_handshake_is_slow_still_proves_the_requester_reachable() -> None:
    async with AsyncExitStack() as stack:
        server = await start(stack, nat_traversal=False, nat_timing=SERVER)
        requester = await start(stack, nat_traversal=False)
        await requester.connect(server.addrs[0], timeout=60)
        relays = await stack.enter_async_context(trio.open_nursery())
        listeners = await relays.start(partial(trio.serve_tcp, partial(_slow_relay, _port(requester.addrs[0])), 0,
                                               host="127.0.0.1"))
        slow_addr = f"/ip4/127.0.0.1/tcp/{listeners[0].socket.getsockname()[1]}"
        code, reached = await requester.nat.autonat.query_server(
            to_libp2p_id(server.peer_id), [multiaddr.Multiaddr(slow_addr).to_bytes()], timeout=VERDICT_WAIT_S)
        assert code == AutoNATMessage.OK, f"dial-back verdict {code}, not OK"
        assert reached is not None and str(multiaddr.Multiaddr(reached)) == slow_addr
        relays.cancel_scope.cancel()


async def test_a_dial_back_to_an_address_nobody_listens_on_still_says_unreachable() -> None:
    async with AsyncExitStack() as stack:
        server = await start(stack, nat_traversal=False, nat_timing=SERVER)
        requester = await start(stack, nat_traversal=False)
        await requester.connect(server.addrs[0], timeout=60)
        with trio.socket.socket() as probe:  # a port that was free a moment ago: the dial is refused
            await probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        code, _ = await requester.nat.autonat.query_server(
            to_libp2p_id(server.peer_id), [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{closed_port}").to_bytes()],
            timeout=VERDICT_WAIT_S)
        assert code == AutoNATMessage.E_DIAL_ERROR, f"dial-back verdict {code}, not E_DIAL_ERROR"
