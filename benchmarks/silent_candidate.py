"""What one silent or unreachable candidate costs a request, and what the closing rule costs slow bidders.

    nice -n 5 python benchmarks/silent_candidate.py                # fixture model tiny-llama-trained
    nice -n 5 python benchmarks/silent_candidate.py --requests 20

One process on 127.0.0.1 (real sockets, Noise, Yamux, real model): bootstrap + 5 honest serving peers, then
a tarpit peer (its own key, the real model: it passes the possession challenge, then never answers an
offer) and a peer that is killed (its dials fail). Sequential requests of 4 tokens, default quorum
(executor + 3 verifiers = 4 bids are "enough"). Phases, each with a fresh client:

1. **baseline**: the 5 honest peers only.
2. **silent, grace 0.5 s** (the rule): the tarpit and the dead peer are candidates too.
3. **silent, old rule**: the same, with the grace period equal to the bid timeout (3 s), i.e. the client
   waits for every candidate up to its bid timeout, as before the closing rule.

Prints median/p99 latency per phase, the ratios against the baseline, how each election closed, and the
fairness cost: how many honest bidders (over all elections of phases 1-2) were still silent when the
election closed, i.e. lost their chance because they were slower than 4 others by more than the grace.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2pinfer import log  # noqa: E402
from p2pinfer.localnet import local_network  # noqa: E402
from p2pinfer.request.bid_window import GRACE_S  # noqa: E402
from p2pinfer.request.protocol import BID_PROTOCOL  # noqa: E402
from p2pinfer.runtime import load_model  # noqa: E402
from tests.adversarial.watched_client import WatchedClient  # noqa: E402

HONEST = 5


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def phase(net, model: str, n: int, grace: float, honest: set[str]):  # type: ignore[no-untyped-def]
    async with WatchedClient(bootstrap=net.bootstrap_addrs, bid_grace=grace) as client:
        await client.generate(model=model, prompt="warm up", max_tokens=2)  # vetting + tokenizer, not timed
        client.rounds.clear()
        latencies = []
        for i in range(n):
            started = time.perf_counter()
            await client.generate(model=model, prompt=f"def f{i}(", max_tokens=4)
            latencies.append(time.perf_counter() - started)
        closes = Counter(b.closed.value for b in client.rounds)
        honest_silent = sum(len(set(b.silent) & honest) for b in client.rounds)
        honest_offered = sum(len(honest) for _ in client.rounds)
        return latencies, closes, honest_silent, honest_offered


async def run(model_name: str, n: int) -> None:
    from tests.conftest import find_shared_models

    model = load_model(find_shared_models() / model_name, name=model_name, providers=["CPUExecutionProvider"])

    async def never_bid(peer_id: str, body: bytes) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with local_network([model], peers=HONEST) as net:
        honest = {p.peer_id for p in net.peers}
        base = await phase(net, model_name, n, GRACE_S, honest)
        tarpit = await net.add_peer([model])
        tarpit.node.register_request_handler(BID_PROTOCOL, never_bid)
        dead = await net.add_peer([model])
        async with WatchedClient(bootstrap=net.bootstrap_addrs) as primer:  # the dead peer is announced...
            await primer.generate(model=model_name, prompt="prime", max_tokens=2)
        await net.kill(dead.peer_id)  # ...then gone: its announcement lives on, its dials fail
        rule = await phase(net, model_name, n, GRACE_S, honest)
        old = await phase(net, model_name, n, 3.0, honest)
    b = statistics.median(base[0])
    print(f"{n} requests per phase, {HONEST} honest peers, quorum 3 (4 bids are enough), bid timeout 3 s")
    print(f"{'phase':32} {'median':>9} {'p99':>9} {'x median':>9}  closes")
    for name, (lat, closes, _, _) in (("baseline", base), (f"tarpit+dead, grace {GRACE_S} s", rule),
                                      ("tarpit+dead, old rule (3 s)", old)):
        med = statistics.median(lat)
        print(f"{name:32} {med * 1000:8.0f}ms {percentile(lat, 0.99) * 1000:8.0f}ms {med / b:9.2f}  {dict(closes)}")
    silent = base[2] + rule[2]
    offered = base[3] + rule[3]
    print(f"fairness: honest bidders still silent at the close (grace {GRACE_S} s): {silent} of {offered} "
          f"({100 * silent / max(1, offered):.1f} %)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama-trained")
    parser.add_argument("--requests", type=int, default=10)
    args = parser.parse_args()
    log.configure(level="warning")
    trio.run(run, args.model, args.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
