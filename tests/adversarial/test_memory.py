"""Bounded memory: a peer that ignores Yamux flow control loses its connection, not our RAM.

The attacker negotiates a real protocol whose handler is busy (not reading, like a task stream while the
model generates), then writes raw Yamux DATA frames for that stream straight onto its Noise session,
ignoring the receive window. Before the fix py-libp2p buffered every byte (~1 GB of RSS per GiB sent).
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from net.helpers import start, wait_until
from p2pinfer.net import FrameStream

from .attacker import Attacker, rss_bytes

BUSY = "/test/busy/1"
ECHO = "/test/echo/1"
FLOOD_BYTES = 256 << 20      # benchmarks/hostile.py reports the 1 GiB figure
MAX_RSS_GROWTH = 64 << 20


async def test_yamux_window_overrun_closes_the_connection_and_bounds_memory() -> None:
    async with AsyncExitStack() as stack:
        target = await start(stack)
        release = trio.Event()

        async def busy(frames: FrameStream) -> None:
            await release.wait()

        async def echo(peer_id: str, body: bytes) -> bytes:
            return body

        target.register_handler(BUSY, busy)
        target.register_request_handler(ECHO, echo)
        honest = await start(stack, bootstrap=target.addrs)
        for _ in range(2):  # a second attacker (new key) after the first is banned
            attacker = await Attacker.start(stack)
            await attacker.connect(target.addrs[0])
            stream = await attacker.open(target.peer_id, BUSY)
            before = peak = rss_bytes()

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, rss_bytes())
                    await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                sent = await attacker.flood_past_window(stream, FLOOD_BYTES)
                await wait_until(lambda: target.guard.is_banned(attacker.peer_id), what="the flooder banned")
                nursery.cancel_scope.cancel()
            assert sent < FLOOD_BYTES, "the target never closed the flooding connection"
            assert peak - before <= MAX_RSS_GROWTH, f"RSS grew by {(peak - before) >> 20} MiB"
            await wait_until(lambda: attacker.peer_id not in target.connected_peers(), what="connection closed")
            assert target.counters["fault.window-overrun"] >= 1
        with trio.fail_after(30):
            assert await honest.request(target.peer_id, ECHO, b"ok", timeout=20) == b"ok"
        assert not target.guard.is_banned(honest.peer_id)
        release.set()


async def test_an_honest_fast_sender_to_a_slow_reader_is_never_a_window_overrun() -> None:
    async with AsyncExitStack() as stack:
        target = await start(stack)
        received = []

        async def slow_sink(frames: FrameStream) -> None:
            async for frame in frames:
                received.append(len(frame))
                await trio.sleep(0.05)  # reads slower than the sender writes: flow control must hold it back
            await frames.send(b"done")

        target.register_handler("/test/sink/1", slow_sink)
        honest = await start(stack, bootstrap=target.addrs)
        frame = b"\x5a" * ((1 << 20) - 16)
        async with await honest.open_stream(target.peer_id, "/test/sink/1", timeout=60) as stream:
            for _ in range(24):
                await stream.send(frame)
            await stream.close_write()
            assert await stream.receive_required() == b"done"
        assert received == [len(frame)] * 24
        assert "fault.window-overrun" not in target.counters and not target.guard.is_banned(honest.peer_id)


async def test_streams_per_peer_and_protocol_are_bounded() -> None:
    from p2pinfer.net.resources import DEFAULT_LIMITS

    limit = DEFAULT_LIMITS.inbound_streams_per_peer_protocol
    async with AsyncExitStack() as stack:
        target = await start(stack)
        release = trio.Event()
        held = []

        async def busy(frames: FrameStream) -> None:
            held.append(frames)
            await release.wait()

        target.register_handler(BUSY, busy)
        attacker = await Attacker.start(stack)
        await attacker.connect(target.addrs[0])
        opened = []

        async def open_one() -> None:
            try:
                stream = await attacker.open(target.peer_id, BUSY)
                await stream.write(b"\x01x")
                opened.append(stream)
            except Exception:
                pass

        async with trio.open_nursery() as nursery:
            for _ in range(limit + 20):
                nursery.start_soon(open_one)
        await wait_until(lambda: len(held) >= limit, what="the allowed streams to reach the handler")
        await wait_until(lambda: target.counters.get("refused.streams-per-protocol", 0) >= 20,
                         what="the streams beyond the limit to be refused")
        assert len(held) == limit
        release.set()
        # Refusing streams is not a fault: the peer is not banned and can use the protocol again.
        assert not target.guard.is_banned(attacker.peer_id)
        await wait_until(lambda: target.guard.scopes.streams_per_protocol.get(BUSY, 0) == 0, what="release")
