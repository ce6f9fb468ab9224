"""No byte sequence crashes a node: junk on every protocol it speaks, and below them (TCP, Noise, Yamux,
multistream), from a real attacking host on 127.0.0.1.

After each round the target must still answer an honest peer's request and still accept gossip; a crash
would end the target's ``async with Node`` block and fail the test with the escaped exception.
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack

import pytest
import trio

from p2pinfer.net import Node
from p2pinfer.net.addrs import parse_peer_multiaddr
from p2pinfer.net.capacity_sync import CAPACITY_SYNC

from net.helpers import start, wait_until
from .attacker import Attacker

ECHO = "/test/echo/1"

JUNK = {
    "meshsub-decode-error": b"\x04\xff\xff\xff\xff",         # the five bytes that used to end any node
    "long-varint": b"\xff" * 11,
    "truncated-varint": b"\x80\x80",
    "huge-length": b"\xff\xff\xff\xff\x0f" + b"x" * 64,
    "truncated-body": b"\x40" + b"\x0a" * 10,
    "zeros": b"\x10" + b"\x00" * 16,
    "random": bytes(range(256)) * 4,
}


async def _echo(peer_id: str, body: bytes) -> bytes:
    return body


async def _honest_round_trip(honest: Node, target: Node) -> None:
    with trio.fail_after(30):
        assert await honest.request(target.peer_id, ECHO, b"still here", timeout=20) == b"still here"


@pytest.mark.parametrize("role", ["peer", "bootstrap", "client"])
async def test_junk_on_every_protocol_the_node_speaks_never_crashes_it(role: str) -> None:
    async with AsyncExitStack() as stack:
        target = await start(stack, role=role)
        target.register_request_handler(ECHO, _echo)
        honest = await start(stack, bootstrap=target.addrs)
        protocols = sorted(str(p) for p in target.host.multiselect.handlers if p is not None)
        # py-libp2p's own protocols and ours, as the target actually serves them.
        expected = {"/meshsub/1.1.0", "/meshsub/1.2.0", "/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0",
                    "/ipfs/ping/1.0.0", CAPACITY_SYNC.id, ECHO}
        if role != "client":  # SDK clients run the DHT in client mode: they do not serve it
            expected.add("/p2pinfer/kad/1.0.0")
        assert expected <= set(protocols), protocols
        attacker: Attacker | None = None
        sent = 0
        for protocol in protocols:
            for name, junk in JUNK.items():
                # A fresh key whenever the last one got banned (which is the point of the fault book).
                if attacker is None or target.guard.is_banned(attacker.peer_id):
                    attacker = await Attacker.start(stack)
                    await attacker.connect(target.addrs[0])
                await attacker.send_junk(target.peer_id, protocol, junk, linger=0.05)
                sent += 1
            await _honest_round_trip(honest, target)
        assert sent == len(protocols) * len(JUNK)
        await _honest_round_trip(honest, target)
        assert not target.guard.is_banned(honest.peer_id)
        assert target.counters.get("fault.malformed-stream", 0) >= 2  # at least both meshsub versions


async def test_junk_below_the_protocols_never_crashes_it() -> None:
    async with AsyncExitStack() as stack:
        target = await start(stack, role="peer")
        target.register_request_handler(ECHO, _echo)
        honest = await start(stack, bootstrap=target.addrs)
        host, port = _tcp_endpoint(target)
        # Raw TCP: junk before the multistream header, a bad multistream header, junk in place of Noise.
        for raw in (os.urandom(512), b"\x13/multistream/1.0.0\n\xff\xff\xff\xff\x0f",
                    b"\x13/multistream/1.0.0\n\x07/noise\n" + b"\x00\x20" + os.urandom(32),
                    b"\x13/multistream/1.0.0\n\x07/noise\n" + b"\xff\xff" + os.urandom(100), b""):
            with trio.fail_after(20):
                stream = await trio.open_tcp_stream(host, port)
                try:
                    await stream.send_all(raw)
                    with trio.move_on_after(0.5):
                        await stream.receive_some(4096)
                except (trio.BrokenResourceError, OSError):
                    pass
                finally:
                    await stream.aclose()
        await _honest_round_trip(honest, target)
        # Inside an authenticated Noise session: junk Yamux frames (bad version, unknown type, a GO_AWAY,
        # a frame announcing more than 16 MiB, a truncated header).
        import struct
        for frame in (b"\x07" * 12, struct.pack("!BBHII", 0, 9, 0, 1, 0),
                      struct.pack("!BBHII", 0, 3, 0, 0, 2), struct.pack("!BBHII", 0, 0, 1, 1, 1 << 30),
                      b"\x00\x00"):
            attacker = await Attacker.start(stack)
            await attacker.connect(target.addrs[0])
            conn = attacker.host.get_network().get_connections(
                parse_peer_multiaddr(target.addrs[0]).to_libp2p().peer_id)[0]
            try:
                await conn.muxed_conn.secured_conn.write(frame)
            except Exception:
                pass
            await trio.sleep(0.1)
        # A Yamux stream opened properly but with junk instead of multistream negotiation.
        attacker = await Attacker.start(stack)
        await attacker.connect(target.addrs[0])
        conn = attacker.host.get_network().get_connections(
            parse_peer_multiaddr(target.addrs[0]).to_libp2p().peer_id)[0]
        for junk in (b"\xff\xff\xff\xff\x0f", b"\x05hello", b"\x13/multistream/1.0.0\n\x7f" + b"a" * 127):
            try:
                muxed = await conn.muxed_conn.open_stream()
                await muxed.write(junk)
                await trio.sleep(0.05)
                await muxed.close()
            except Exception:
                pass
        await _honest_round_trip(honest, target)
        await wait_until(lambda: honest.peer_id in target.table or True, what="target alive")


def _tcp_endpoint(node: Node) -> tuple[str, int]:
    parts = parse_peer_multiaddr(node.addrs[0]).addrs[0].split("/")
    return parts[2], int(parts[4])
