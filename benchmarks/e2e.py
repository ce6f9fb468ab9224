"""End-to-end cost of the network: a request through a local 5-peer network vs the same generation in-process.

    python benchmarks/e2e.py                       # the bundled default model (SmolLM2-135M-Instruct)
    python benchmarks/e2e.py --model DIR           # any model folder (e.g. ../shared/models/tiny-llama-trained)

Prints, for 64 generated tokens (greedy):
  * end-to-end time through the network / the same generation run directly in-process (goal <= 1.10);
  * the election's added time to first token: offers, VRF bids and proof checks (goal <= 50 ms on loopback);
  * time to first token, direct and end to end.
All nodes run in this process on 127.0.0.1 with real sockets, Noise and Yamux.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

from p2pinfer import AsyncClient, log
from p2pinfer.localnet import local_network
from p2pinfer.runtime import Generation, ModelStore, load_model


def load(args: argparse.Namespace):
    if args.model:
        path = Path(args.model)
        return load_model(path, name=path.name, providers=["CPUExecutionProvider"])
    from p2pinfer.config import default_data_dir
    from p2pinfer.gguf.default_model import ensure_default_model

    store = ModelStore(Path(args.data_dir or default_data_dir()) / "models")
    return ensure_default_model(store).load(providers=["CPUExecutionProvider"])


def direct_run(model, prompt_ids: list[int], tokens: int) -> tuple[float, float]:
    """(total seconds, seconds to first token) for generation in this process, no network."""
    started = time.perf_counter()
    gen = Generation(model, prompt_ids, tokens, stop_at_eos=False)
    gen.start()
    first = None
    while gen.step() is not None:
        if first is None:
            first = time.perf_counter() - started
    assert len(gen.output_ids) == tokens, len(gen.output_ids)
    return time.perf_counter() - started, first or 0.0


async def network_runs(model, prompt: str, tokens: int, runs: int, peers: int) -> list[dict[str, float]]:
    out = []
    async with local_network([model], peers=peers) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            await client.generate(model=model.name, prompt=prompt, max_tokens=4)  # warm connections
            for _ in range(runs):
                completion = await client.generate(model=model.name, prompt=prompt, max_tokens=tokens,
                                                   temperature=0.0)
                assert completion.election.recheck().executor is not None
                out.append(dict(completion.timings, tokens=len(completion.token_ids)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder [default: the bundled SmolLM2-135M-Instruct]")
    parser.add_argument("--data-dir", help="p2pinfer data dir holding the default model's store")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--peers", type=int, default=5)
    args = parser.parse_args()
    log.configure(level="warning")

    model = load(args)
    prompt = "The history of the printing press begins"
    prompt_ids = model.prompt_ids(prompt=prompt)
    direct_run(model, prompt_ids, 4)  # warm up
    direct = [direct_run(model, prompt_ids, args.tokens) for _ in range(args.runs)]
    network = trio.run(network_runs, model, prompt, args.tokens, args.runs, args.peers)
    if any(r["tokens"] != args.tokens for r in network):
        print("note: some network runs stopped early (EOS); ratios compare unequal work", file=sys.stderr)

    direct_total = statistics.median(t for t, _ in direct)
    direct_first = statistics.median(f for _, f in direct)
    e2e_total = statistics.median(r["total_s"] for r in network)
    e2e_first = statistics.median(r["first_token_s"] for r in network)
    election = statistics.median(r["election_s"] for r in network)
    print(f"model: {model.name} ({model.digest.hex()[:16]}), {args.tokens} tokens, {args.peers} peers, "
          f"median of {args.runs} runs")
    print(f"direct in-process:   total {direct_total * 1000:8.1f} ms   first token {direct_first * 1000:7.1f} ms")
    print(f"through the network: total {e2e_total * 1000:8.1f} ms   first token {e2e_first * 1000:7.1f} ms")
    print(f"end-to-end / direct: {e2e_total / direct_total:.3f}   (goal <= 1.10)")
    print(f"election (offers, bids, VRF checks) before assignment: {election * 1000:.1f} ms   (goal <= 50 ms)")
    print(f"added time to first token: {(e2e_first - direct_first) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
