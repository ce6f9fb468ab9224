"""A target node in a process of its own, so a test can measure the target's memory and nothing else.

Run as ``python flood_target.py``. It starts a real :class:`~p2pinfer.net.Node` on 127.0.0.1 with a busy
handler (accepts a stream and never reads it) and an echo handler, writes one JSON line with its peer ID
and addresses to stdout, then answers one JSON line per command line read from stdin:

- ``reset-peak``: reset this process's peak resident set size (``VmHWM``) to its current RSS;
- ``state <peer_id>``: whether that peer is banned and connected, the node's counters, RSS and peak RSS;
- end of input: stop.

The peak comes from the kernel (``/proc/self/status``), so no spike between two samples is missed.
Logs go to stderr; stdout carries only the answers.
"""

from __future__ import annotations

import json
import os
import sys

import trio

BUSY = "/test/busy/1"
ECHO = "/test/echo/1"


def memory_kib() -> dict[str, int]:
    """Current and peak resident set size of this process, in KiB (Linux)."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return {"rss_kib": found["VmRSS"], "peak_kib": found["VmHWM"]}


def reset_peak() -> None:
    # "5" resets VmHWM to the current VmRSS (proc(5), Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


async def serve() -> None:
    from p2pinfer import log
    from p2pinfer.identity import Identity
    from p2pinfer.net import FrameStream, Node, NodeConfig

    log.configure(level="warning", stream=sys.stderr)
    release = trio.Event()

    async def busy(frames: FrameStream) -> None:
        await release.wait()

    async def echo(peer_id: str, body: bytes) -> bytes:
        return body

    config = NodeConfig(listen=("/ip4/127.0.0.1/tcp/0",), dht_refresh_interval_s=5.0)
    async with Node(Identity.generate(), config) as node:
        node.register_handler(BUSY, busy)
        node.register_request_handler(ECHO, echo)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))

        async def answer(message: dict[str, object]) -> None:
            await stdout.send_all(json.dumps(message).encode() + b"\n")

        await answer({"peer_id": node.peer_id, "addrs": list(node.addrs)})
        pending = b""
        while True:
            chunk = await stdin.receive_some()
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                command, _, argument = line.decode().strip().partition(" ")
                if command == "reset-peak":
                    reset_peak()
                    await answer(memory_kib())
                elif command == "state":
                    await answer({"banned": node.guard.is_banned(argument),
                                  "connected": argument in node.connected_peers(),
                                  "counters": dict(node.counters), **memory_kib()})
                else:
                    await answer({"error": f"unknown command {command!r}"})
        release.set()


if __name__ == "__main__":
    trio.run(serve)
