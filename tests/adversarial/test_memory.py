"""Bounded memory: a peer that ignores Yamux flow control loses its connection, not our RAM.

The attacker negotiates a real protocol whose handler is busy (not reading, like a task stream while the
model generates), then writes raw Yamux DATA frames for that stream straight onto its Noise session,
ignoring the receive window. Before the fix py-libp2p buffered every byte (~1 GB of RSS per GiB sent).

The flooded target runs in a process of its own (``flood_target.py``), so its memory is measured alone: the
attacker's buffers, the rest of the test suite and the garbage other tests leave behind are not in it.
The kernel's peak-RSS counter is reset before each flood and read after it, so no spike is missed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import trio

from net.helpers import start, wait_until
from p2pinfer.net import FrameStream

from .attacker import Attacker

BUSY = "/test/busy/1"
ECHO = "/test/echo/1"
FLOOD_BYTES = 1 << 30        # what each flooder tries to send past the window
FLOODERS = 16                # one after another, each with a new key (each is banned)
MAX_ACCEPTED = 16 << 20      # what a flooder gets onto the wire before the close reaches it (TCP buffers)
MAX_RSS_GROWTH = 64 << 20
TARGET_SCRIPT = Path(__file__).with_name("flood_target.py")


class TargetProcess:
    """The control side of ``flood_target.py``: one JSON command line out, one JSON answer line back."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._pending = b""

    async def _read_line(self) -> dict:
        assert self.process.stdout is not None
        while b"\n" not in self._pending:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                raise AssertionError(f"the target process exited (code {self.process.poll()})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    async def ask(self, command: str) -> dict:
        assert self.process.stdin is not None
        with trio.fail_after(120):  # generous: only a hung target process gets this far
            await self.process.stdin.send_all(command.encode() + b"\n")
            return await self._read_line()

    async def state(self, peer_id: str) -> dict:
        return await self.ask(f"state {peer_id}")

    async def wait_for(self, peer_id: str, predicate, what: str, timeout: float = 120.0) -> dict:
        """Ask for ``peer_id``'s state until ``predicate(state)`` holds; fail with ``what`` after ``timeout``."""
        with trio.move_on_after(timeout):
            while not predicate(state := await self.state(peer_id)):
                await trio.sleep(0.05)
            return state
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@asynccontextmanager
async def target_process() -> AsyncIterator[tuple[TargetProcess, dict]]:
    process = await trio.lowlevel.open_process([sys.executable, str(TARGET_SCRIPT)],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    target = TargetProcess(process)
    try:
        with trio.fail_after(120):
            hello = await target._read_line()
        yield target, hello
    finally:
        assert process.stdin is not None
        with trio.CancelScope(shield=True):
            await process.stdin.aclose()  # end of input: the target stops
            with trio.move_on_after(30):
                await process.wait()
            if process.poll() is None:
                process.kill()
                await process.wait()


async def test_yamux_window_overrun_closes_the_connection_and_bounds_memory() -> None:
    async with AsyncExitStack() as stack:
        target, hello = await stack.enter_async_context(target_process())
        target_id, target_addr = hello["peer_id"], hello["addrs"][0]
        honest = await start(stack, bootstrap=[target_addr])
        before = (await target.ask("reset-peak"))["rss_kib"] << 10
        sent = 0
        for _ in range(FLOODERS):  # each flooder is banned, so the next one comes with a new key
            async with AsyncExitStack() as attack:
                attacker = await Attacker.start(attack)
                await attacker.connect(target_addr)
                stream = await attacker.open(target_id, BUSY)
                got = await attacker.flood_past_window(stream, FLOOD_BYTES)
                assert got < MAX_ACCEPTED, f"the target took {got >> 20} MiB past the window before closing"
                await target.wait_for(attacker.peer_id, lambda s: s["banned"], "the flooder banned")
                await target.wait_for(attacker.peer_id, lambda s: not s["connected"], "connection closed")
            sent += got
        state = await target.state(honest.peer_id)
        growth = (state["peak_kib"] << 10) - before
        assert growth <= MAX_RSS_GROWTH, f"the target's RSS grew by {growth >> 20} MiB for {sent >> 20} MiB sent"
        assert state["counters"]["fault.window-overrun"] >= FLOODERS
        with trio.fail_after(60):
            assert await honest.request(target_id, ECHO, b"ok", timeout=45) == b"ok"
        assert not (await target.state(honest.peer_id))["banned"]


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
