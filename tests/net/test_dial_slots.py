"""A node's dials never queue behind tarpits: dial slots left over while possession vetting dials its maximum.

A tarpit accepts TCP and then says nothing, so a dial to it holds one of the swarm's dial slots until the
caller gives up (the Noise handshake has no timeout of its own). py-libp2p's swarm lets 32 dials run at once
and queues the rest first come, first served; possession vetting challenged up to 64 unknown candidates at
once, so 32 tarpit Sybils among them made every later dial of the node wait, and an honest candidate whose
dial was queued there timed out unanswered (the flake of tests/adversarial/test_sybil.py's tarpit test).

Real nodes and a real tarpit on 127.0.0.1; each tarpit dial names its own fresh key, as 64 Sybils would.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from functools import partial

import trio

from p2pinfer.identity import Identity
from p2pinfer.net import Node
from p2pinfer.net.addrs import PeerInfo
from p2pinfer.net.errors import DialError
from p2pinfer.request.possession import MAX_CONCURRENT_CHALLENGES

from .helpers import start, wait_until


async def test_a_dial_goes_through_while_vetting_holds_its_maximum_of_tarpit_dials() -> None:
    open_now = [0]
    peak = [0]  # most tarpit connections open at once: the tarpit dials in flight together

    async def tarpit(stream: trio.SocketStream) -> None:
        open_now[0] += 1
        peak[0] = max(peak[0], open_now[0])
        try:
            while await stream.receive_some():  # read what the dialler says, never answer, until it hangs up
                pass
        except trio.BrokenResourceError:
            pass
        finally:
            open_now[0] -= 1

    async def dial_tarpit(client: Node, sybil: PeerInfo) -> None:
        try:
            await client.connect(sybil, timeout=3600)  # held until the test ends ...
        except DialError:
            pass  # ... or py-libp2p's own negotiation timeout (30 s) gives up on it: what a tarpit costs

    async with AsyncExitStack() as stack:
        servers = await stack.enter_async_context(trio.open_nursery())
        listeners = await servers.start(partial(trio.serve_tcp, tarpit, 0, host="127.0.0.1"))
        tarpit_addr = f"/ip4/127.0.0.1/tcp/{listeners[0].socket.getsockname()[1]}"
        client = await start(stack)
        honest = await start(stack)
        async with trio.open_nursery() as dials:
            for _ in range(MAX_CONCURRENT_CHALLENGES):
                dials.start_soon(dial_tarpit, client, PeerInfo(Identity.generate().peer_id, (tarpit_addr,)))
            # Every tarpit dial holds its slot at once (py-libp2p's default of 32 let half of them in, and the
            # rest only after those gave up) ...
            await wait_until(lambda: peak[0] >= MAX_CONCURRENT_CHALLENGES,
                             what=f"all {MAX_CONCURRENT_CHALLENGES} tarpit dials to be in flight at once")
            # ... and the node still has slots for everything else.
            await client.connect(honest.addrs[0], timeout=60)
            assert client.nat.is_connected(honest.peer_id)
            dials.cancel_scope.cancel()
        servers.cancel_scope.cancel()
