"""What the OpenAI gateway adds to a request: the p2pinfer SDK directly vs the `openai` client via a peer's gateway.

Starts a local network (a bootstrap node, N serving peers and one gateway peer, all on 127.0.0.1, with the
`tiny-llama-trained` fixture model), then runs the same seeded requests R times each way and prints the
median and p90 of the whole request and of the time to first token (streamed), and the gateway's overhead.

    python benchmarks/gateway.py                       # 2 serving peers, 30 requests of 32 tokens each way
    python benchmarks/gateway.py --requests 100 --tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import find_shared_models  # noqa: E402

from p2pinfer import log  # noqa: E402
from p2pinfer.identity import Identity  # noqa: E402
from p2pinfer.localnet import LOOPBACK, local_network  # noqa: E402
from p2pinfer.net import NodeConfig  # noqa: E402
from p2pinfer.peer import ServingPeer  # noqa: E402
from p2pinfer.request.client import AsyncClient, StreamChunk  # noqa: E402
from p2pinfer.runtime import load_model  # noqa: E402
from p2pinfer.wire import now_ms  # noqa: E402

MODEL = "tiny-llama-trained"


def summary(name: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"{name:<34} median {statistics.median(ordered) * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms"


async def main(args: argparse.Namespace) -> None:
    import openai

    log.configure(level="warning")
    model = load_model(find_shared_models() / MODEL, name=MODEL, providers=["CPUExecutionProvider"])
    params = dict(prompt="import os\nimport sys", max_tokens=args.tokens, temperature=0.8, seed=7)
    async with local_network([model], peers=args.peers) as net:
        config = NodeConfig(listen=LOOPBACK, bootstrap=tuple(net.bootstrap_addrs), role="peer")
        async with ServingPeer(Identity.generate(), config, [], measure_speed=False,
                               gateway=("127.0.0.1", 0)) as peer:
            with trio.fail_after(20):
                while len(peer.node.table.live(now_ms())) < args.peers:
                    await trio.sleep(0.02)
            sdk_total, sdk_first = [], []
            async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
                await client.generate(model=MODEL, **params)  # warm-up
                for _ in range(args.requests):
                    started = time.perf_counter()
                    first = None
                    async for item in client.stream_with_result(model=MODEL, **params):
                        if first is None and isinstance(item, StreamChunk):
                            first = time.perf_counter() - started
                    sdk_total.append(time.perf_counter() - started)
                    sdk_first.append(first or 0.0)

            def via_gateway() -> tuple[list[float], list[float]]:
                api = openai.OpenAI(base_url=f"{peer.gateway_url}/v1", api_key="-", max_retries=0)
                api.completions.create(model=MODEL, **params)  # warm-up (connection, SDK)
                totals, firsts = [], []
                for _ in range(args.requests):
                    started = time.perf_counter()
                    first = None
                    for _chunk in api.completions.create(model=MODEL, stream=True, **params):
                        if first is None:
                            first = time.perf_counter() - started
                    totals.append(time.perf_counter() - started)
                    firsts.append(first or 0.0)
                return totals, firsts

            gw_total, gw_first = await trio.to_thread.run_sync(via_gateway)
    print(f"{args.requests} streamed requests of {args.tokens} tokens each way, {args.peers} serving peers")
    print(summary("p2pinfer SDK: whole request", sdk_total))
    print(summary("openai via gateway: whole request", gw_total))
    print(summary("p2pinfer SDK: first token", sdk_first))
    print(summary("openai via gateway: first token", gw_first))
    overhead = statistics.median(gw_total) - statistics.median(sdk_total)
    print(f"gateway overhead (median, whole request): {overhead * 1000:+.1f} ms "
          f"({statistics.median(gw_total) / statistics.median(sdk_total):.2f}x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=32)
    trio.run(main, parser.parse_args())
