"""Capacity gossip benchmark: 1 bootstrap + N peers (default 30) spread over several processes.

Measures, on 127.0.0.1:
  * propagation: the time from a peer publishing a new announcement until *every* other node (all peers and
    the bootstrap node) has verified and accepted it (median and p99 over the rounds);
  * gossip traffic: bytes each node writes on pubsub streams per second, idle (heartbeats, IHAVE/IWANT,
    no announcements) and per announcement, and from those the steady state at the default announcement
    interval of 60 s.

Clocks: all processes run on one machine and use time.time(), so cross-process timestamps are comparable.

    python benchmarks/gossip.py [--peers 30] [--procs 3] [--rounds 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pinfer.identity import Identity  # noqa: E402
from p2pinfer.net import Node, NodeConfig  # noqa: E402
from p2pinfer.wire import ModelOffer  # noqa: E402

LOCAL = ("/ip4/127.0.0.1/tcp/0",)
DEFAULT_INTERVAL_S = 60.0


def instrument(node: Node, received: list, sent_bytes: list) -> None:
    """Record (peer, seq, time) of every accepted announcement and count bytes written by pubsub."""
    offer = node.table.offer

    def recording_offer(data, *, source_peer_id, now_ms):
        signed = offer(data, source_peer_id=source_peer_id, now_ms=now_ms)
        received.append((node.peer_id, signed.message.peer_id, signed.message.seq, time.time()))
        return signed

    node.table.offer = recording_offer  # type: ignore[method-assign]
    write_msg = node.pubsub.write_msg

    async def counting_write(stream, rpc_msg):
        sent_bytes.append((time.time(), rpc_msg.ByteSize()))
        return await write_msg(stream, rpc_msg)

    node.pubsub.write_msg = counting_write  # type: ignore[method-assign]


async def worker(args: argparse.Namespace) -> None:
    received: list = []
    sent: list = []
    published: list = []
    indices = [int(i) for i in args.indices.split(",")]
    offer = ModelOffer(digest=b"\x07" * 32, name="bench", numeric_class="fp32-cpu", context_length=2048,
                       max_new_tokens=256, decode_tokens_per_s=10.0)
    async with AsyncExitStack() as stack:
        nodes = {}
        for i in indices:
            # Periodic re-announcement pushed past the run: rounds and the idle window are controlled below.
            node = Node(Identity.generate(), NodeConfig(listen=LOCAL, bootstrap=[args.bootstrap],
                                                        announce_interval_s=3600))
            instrument(node, received, sent)
            nodes[i] = await stack.enter_async_context(node)
            node.update_capacity(models=[offer], free_slots=1, total_slots=1)
        print("ready", flush=True)
        t0 = args.start
        for r in range(args.rounds):
            publisher = r % args.peers
            at = t0 + r * args.round_s
            if publisher in nodes:
                await trio.sleep(max(at - time.time(), 0))
                a = await nodes[publisher].announce_now()
                published.append((nodes[publisher].peer_id, a.seq, time.time()))
        await trio.sleep(max(t0 + args.rounds * args.round_s + args.idle_s + 1 - time.time(), 0))
        Path(args.out).write_text(json.dumps({"received": received, "sent": sent, "published": published,
                                              "nodes": [n.peer_id for n in nodes.values()]}))


async def coordinator(args: argparse.Namespace) -> None:
    received: list = []
    sent: list = []
    tmp = Path(tempfile.mkdtemp(prefix="p2pinfer-bench-"))
    boot = Node(Identity.generate(), NodeConfig(listen=LOCAL, role="bootstrap"))
    instrument(boot, received, sent)
    async with boot:
        groups = [list(range(args.peers))[p::args.procs] for p in range(args.procs)]
        warmup_s = 10.0 + args.peers * 0.3
        start = time.time() + warmup_s
        procs = []
        for p, group in enumerate(groups):
            cmd = [sys.executable, __file__, "--worker", "--bootstrap", boot.addrs[0], "--indices",
                   ",".join(map(str, group)), "--start", str(start), "--out", str(tmp / f"w{p}.json"),
                   "--peers", str(args.peers), "--rounds", str(args.rounds), "--round-s", str(args.round_s),
                   "--idle-s", str(args.idle_s)]
            procs.append(await trio.lowlevel.open_process(cmd, stdout=subprocess.DEVNULL))
        for proc in procs:
            await proc.wait()
        results = [json.loads((tmp / f"w{p}.json").read_text()) for p in range(len(groups))]
    rounds_end = start + args.rounds * args.round_s
    all_nodes = [boot.peer_id] + [n for r in results for n in r["nodes"]]
    for r in results:
        received += r["received"]
        sent += r["sent"]
    published = [p for r in results for p in r["published"]]
    arrival: dict = {}
    for node, peer, seq, t in received:
        arrival.setdefault((peer, seq), {})[node] = t
    latencies, incomplete = [], 0
    for peer, seq, t_pub in published:
        got = arrival.get((peer, seq), {})
        others = [n for n in all_nodes if n != peer]
        if all(n in got for n in others):
            latencies.append(max(got[n] for n in others) - t_pub)
        else:
            incomplete += 1
    latencies.sort()
    n_nodes = len(all_nodes)
    round_bytes = sum(b for t, b in sent if start <= t < rounds_end + 1)
    idle_bytes = sum(b for t, b in sent if rounds_end + 2 <= t < rounds_end + 2 + args.idle_s - 2)
    idle_per_node_s = idle_bytes / n_nodes / (args.idle_s - 2)
    per_announcement_per_node = max(round_bytes / n_nodes - idle_per_node_s * (args.rounds * args.round_s + 1), 0) \
        / max(len(published), 1)
    steady = idle_per_node_s + per_announcement_per_node * args.peers / DEFAULT_INTERVAL_S

    def pct(q: float) -> float:
        return latencies[min(int(q * len(latencies)), len(latencies) - 1)] * 1000 if latencies else float("nan")

    print(f"nodes: 1 bootstrap + {args.peers} peers in {args.procs} worker processes (+1 for the bootstrap)")
    print(f"announcements: {len(published)} published, {len(latencies)} reached all {n_nodes - 1} other nodes, "
          f"{incomplete} did not")
    print(f"time to reach all nodes: median {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {pct(0.99):.1f} ms, max {latencies[-1] * 1000:.1f} ms" if latencies else "no complete rounds")
    print(f"gossip bytes written per node: idle {idle_per_node_s:.0f} B/s; "
          f"{per_announcement_per_node:.0f} B per announcement")
    print(f"steady state ({args.peers} peers announcing every {DEFAULT_INTERVAL_S:.0f} s): "
          f"{steady:.0f} B/s per node")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=30)
    parser.add_argument("--procs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--round-s", type=float, default=0.5)
    parser.add_argument("--idle-s", type=float, default=15.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--indices", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from p2pinfer import log
    log.configure(level="warning")
    trio.run(worker if args.worker else coordinator, args)


if __name__ == "__main__":
    main()
