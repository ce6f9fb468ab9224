"""Offer flood benchmark: what one attacking peer's offer flood costs honest clients.

A local network (1 bootstrap node, 2 serving peers with tiny-llama-trained, on 127.0.0.1 with real Noise and
Yamux) serves an honest client that runs requests one after another (8 greedy tokens, no verification).
Phase 1: nobody else. Phase 2: an attacker host with its own key opens 8 streams (spread over the serving
peers) and sends signed offers on each as fast as they are answered. Printed: the honest median and p99 request
latency in both phases and their ratio, and the offers per second the peers answered to the attacker
(bids and refusals separately).

    python benchmarks/request_flood.py [--requests 30] [--streams 8]

Runs against the code of the repository it sits in; to measure another version, copy this file into that
version's benchmarks/ folder (it uses only APIs that predate the per-peer limits).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2pinfer.identity import Identity  # noqa: E402
from p2pinfer.localnet import LOOPBACK, local_network  # noqa: E402
from p2pinfer.net import NetError, Node, NodeConfig  # noqa: E402
from p2pinfer.request.client import AsyncClient  # noqa: E402
from p2pinfer.request.params import build_request  # noqa: E402
from p2pinfer.request.protocol import BID_PROTOCOL, MAX_OFFER_FRAME, OFFER_TTL_MS  # noqa: E402
from p2pinfer.runtime import load_model  # noqa: E402
from p2pinfer.wire import Refusal, TaskOffer, VrfBid, decode_signed, encode_signed, now_ms  # noqa: E402

MODEL = "tiny-llama-trained"


def shared_models() -> Path:
    env = os.environ.get("P2PINFER_SHARED_MODELS")
    for candidate in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "models", ROOT / "shared" / "models",
                                                       Path("/work/shared/models")]:
        if (candidate / "README.md").exists():
            return candidate
    raise SystemExit("fixture models not found: set P2PINFER_SHARED_MODELS")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def honest_requests(client: AsyncClient, count: int) -> list[float]:
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        await client.generate(model=MODEL, prompt=f"def f{i}(", max_tokens=8, verify="off")
        latencies.append(time.perf_counter() - started)
    return latencies


async def flood(node: Node, peer_ids: list[str], digest: bytes, streams: int, counts: dict[str, int]) -> None:
    async def one_stream(peer_id: str) -> None:
        frames = await node.open_stream(peer_id, BID_PROTOCOL, timeout=30.0, max_frame=MAX_OFFER_FRAME)
        async with frames:
            while True:
                request = build_request(model_digest=digest, client_key=node.identity.public_key, prompt="x",
                                        max_tokens=4)
                offer = encode_signed(node.identity, TaskOffer(
                    request_id=request.request_id(), model=digest, max_tokens=4, epoch_seed=b"",
                    expires_at_ms=now_ms() + OFFER_TTL_MS // 2))
                try:
                    reply = await frames.call(offer, timeout=60.0)
                except NetError:
                    counts["errors"] += 1
                    return
                message = decode_signed(reply, expect=(VrfBid, Refusal), max_size=MAX_OFFER_FRAME).message
                counts["bids" if isinstance(message, VrfBid) else "refusals"] += 1

    async with trio.open_nursery() as nursery:
        for i in range(streams):  # spread over the serving peers
            nursery.start_soon(one_stream, peer_ids[i % len(peer_ids)])


async def main(requests: int, streams: int) -> None:
    model = load_model(shared_models() / MODEL, name=MODEL, providers=["CPUExecutionProvider"])
    async with local_network([model], peers=2) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            await honest_requests(client, 3)  # warm-up: connections, sessions
            baseline = await honest_requests(client, requests)
            attacker = Node(Identity.generate(), NodeConfig(listen=LOOPBACK, bootstrap=tuple(net.bootstrap_addrs),
                                                            role="client"))
            async with attacker:
                counts = {"bids": 0, "refusals": 0, "errors": 0}
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(flood, attacker, [p.peer_id for p in net.peers], model.digest, streams,
                                       counts)
                    await trio.sleep(2.0)  # the flood is under way (and past any burst allowance)
                    at_start = dict(counts)
                    started = time.perf_counter()
                    flooded = await honest_requests(client, requests)
                    seconds = time.perf_counter() - started
                    nursery.cancel_scope.cancel()
    bids = (counts["bids"] - at_start["bids"]) / seconds
    refusals = (counts["refusals"] - at_start["refusals"]) / seconds
    base_median, base_p99 = statistics.median(baseline), percentile(baseline, 0.99)
    flood_median, flood_p99 = statistics.median(flooded), percentile(flooded, 0.99)
    print(f"code: {ROOT}")
    print(f"honest requests: {requests} per phase, 8 tokens, 2 serving peers; attacker: {streams} streams")
    print(f"no attacker:   median {base_median * 1000:7.1f} ms   p99 {base_p99 * 1000:7.1f} ms")
    print(f"offer flood:   median {flood_median * 1000:7.1f} ms   p99 {flood_p99 * 1000:7.1f} ms")
    print(f"ratio (flood / none): median {flood_median / base_median:.2f}   p99 {flood_p99 / base_p99:.2f}")
    print(f"attacker's offers answered: {bids + refusals:.1f}/s ({bids:.1f} bids/s, {refusals:.1f} refusals/s), "
          f"stream errors {counts['errors']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args()
    trio.run(main, args.requests, args.streams)
