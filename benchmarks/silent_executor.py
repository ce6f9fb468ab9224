"""What an elected executor that reads the assignment and never answers costs a request now.

    nice -n 5 python benchmarks/silent_executor.py                 # fixture model tiny-llama-trained
    nice -n 5 python benchmarks/silent_executor.py --hits 3

One process on 127.0.0.1 (real sockets, Noise, Yamux, real model): bootstrap + 4 honest serving peers and
an attacker peer (its own key, the real model: it passes the possession challenge, bids honestly and
verifies honestly) that, when it is elected executor, reads the assignment and says nothing. Its answer to
the next rank's status query (``/p2pinfer/task-status/1``) is, per phase: nothing at all (the stream stays
open: the next rank waits FAILOVER_STATUS_TIMEOUT_S), or junk bytes (answered at once). The client uses its
default timeouts (acceptance ACCEPT_TIMEOUT_S, stall 20 s).

Sequential requests of 4 tokens with verification; a request counts for a phase when the attacker held rank
0 of its election (1 in 5 elections), others are the honest baseline. Prints the median latency of each, the
ratio against the baseline, and whether every attacked request completed verified through rank 1. Before the
status query such a request failed after the 20 s stall timeout (every higher rank refused to take over), and
a retry was a new election the attacker won again with probability 1/5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2pinfer import AsyncClient, log  # noqa: E402
from p2pinfer.localnet import local_network  # noqa: E402
from p2pinfer.request.protocol import (ACCEPT_TIMEOUT_S, FAILOVER_STATUS_TIMEOUT_S, MAX_TASK_FRAME,  # noqa: E402
                                       TASK_PROTOCOL, TASK_STATUS)
from p2pinfer.runtime import load_model  # noqa: E402

HONEST = 4


async def run(model_name: str, hits: int, max_requests: int) -> None:
    from tests.conftest import find_shared_models

    model = load_model(find_shared_models() / model_name, name=model_name, providers=["CPUExecutionProvider"])
    mode = {"answer": "silent"}

    async def take_and_stay_silent(frames) -> None:  # type: ignore[no-untyped-def]
        await frames.receive(timeout=30.0)
        await trio.sleep_forever()

    async def status(peer_id: str, body: bytes) -> bytes:
        if mode["answer"] == "junk":
            return b"\x93junk"
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    rows = []
    async with local_network([model], peers=HONEST) as net:
        attacker = await net.add_peer([model])
        attacker.node.register_handler(TASK_PROTOCOL, take_and_stay_silent, max_frame=MAX_TASK_FRAME, timeout=None)
        attacker.node.register_request_handler(TASK_STATUS, status)
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            await client.generate(model=model_name, prompt="warm up", max_tokens=2, verify="off")  # not timed
            baseline: list[float] = []
            for answer in ("silent", "junk"):
                mode["answer"] = answer
                attacked: list[float] = []
                completed = 0
                for i in range(max_requests):
                    if len(attacked) >= hits:
                        break
                    started = time.perf_counter()
                    completion = await client.generate(model=model_name, prompt=f"def f{answer}{i}(", max_tokens=4)
                    seconds = time.perf_counter() - started
                    if completion.election.ranking[0] == attacker.peer_id:
                        attacked.append(seconds)
                        completed += completion.verified and completion.result.message.attempt == 1
                    else:
                        baseline.append(seconds)
                rows.append((answer, attacked, completed))
    b = statistics.median(baseline)
    print(f"{HONEST} honest peers + 1 silent executor, quorum 3; acceptance timeout {ACCEPT_TIMEOUT_S:g} s, "
          f"status timeout {FAILOVER_STATUS_TIMEOUT_S:g} s, stall timeout 20 s")
    print(f"{'phase':44} {'n':>3} {'median':>9} {'x base':>8}  completed via rank 1, verified")
    print(f"{'baseline (attacker not rank 0)':44} {len(baseline):3} {b * 1000:8.0f}ms {1.0:8.2f}")
    for answer, attacked, completed in rows:
        name = f"attacker rank 0, status query: {answer}"
        med = statistics.median(attacked) if attacked else float("nan")
        print(f"{name:44} {len(attacked):3} {med * 1000:8.0f}ms {med / b:8.2f}  {completed} of {len(attacked)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama-trained")
    parser.add_argument("--hits", type=int, default=3, help="attacked requests per phase")
    parser.add_argument("--max-requests", type=int, default=80, help="requests per phase at most")
    args = parser.parse_args()
    log.configure(level="warning")
    trio.run(run, args.model, args.hits, args.max_requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
