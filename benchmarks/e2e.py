"""End-to-end cost of the network: a request through a local 5-peer network vs the same generation in-process.

    python benchmarks/e2e.py                       # the bundled default model (SmolLM2-135M-Instruct)
    python benchmarks/e2e.py --model DIR           # any model folder (e.g. ../shared/models/tiny-llama-trained)

Prints, for 64 generated tokens (greedy):
  * end-to-end time through the network / the same generation run directly in-process (goal <= 1.10);
  * the election's added time to first token: offers, VRF bids and proof checks (goal <= 50 ms on loopback),
    and the round that sends the signed bid set to every bidder before the assignment;
  * time to first token, direct and end to end;
  * verification cost: one teacher-forced prefill plus the fingerprint check, divided by the generation of
    128 tokens with fingerprints (both greedy, EOS ignored), and the fingerprint size per token.
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
from p2pinfer.runtime import GREEDY, Generation, ModelStore, ensure_tolerance, generate, load_model, verify_result

VERIFY_PROMPT = [{"role": "user", "content": "Explain in detail how a peer-to-peer network shares work fairly."}]


def load(args: argparse.Namespace):
    if args.model:
        path = Path(args.model)
        model = load_model(path, name=path.name, providers=["CPUExecutionProvider"])
        ensure_tolerance(model)  # it verifies: only with a measured tolerance
        return model
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


def verification_cost(model, tokens: int, repeats: int) -> tuple[float, float, int, int]:
    """(generation s, verification s, output tokens, fingerprint bytes), medians over ``repeats``."""
    prompt_ids = model.prompt_ids(messages=VERIFY_PROMPT)
    gen_s, ver_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        result = generate(model, prompt_ids, max_tokens=tokens, params=GREEDY, seed_material=bytes(32),
                          stop_at_eos=False)
        gen_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        verdict = verify_result(model, prompt_ids=prompt_ids, output_ids=result.output_ids,
                                fingerprint=result.fingerprint_bytes, params=GREEDY, seed_material=bytes(32),
                                max_tokens=tokens, finish_reason=result.finish_reason,
                                commitment=result.commitment, stop_at_eos=False)
        ver_s.append(time.perf_counter() - started)
        assert verdict.accept, verdict.reason
    return (statistics.median(gen_s), statistics.median(ver_s), len(result.output_ids),
            len(result.fingerprint_bytes))


async def network_runs(model, prompt: str, tokens: int, runs: int, peers: int) -> list[dict[str, float]]:
    out = []
    async with local_network([model], peers=peers) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            await client.generate(model=model.name, prompt=prompt, max_tokens=4)  # warm connections
            for _ in range(runs):
                # The ratio compares generation with generation: verification runs after the stream
                # and is measured separately (with the quorum, below).
                completion = await client.generate(model=model.name, prompt=prompt, max_tokens=tokens,
                                                   temperature=0.0, verify="off")
                assert completion.election.recheck().executor is not None
                out.append(dict(completion.timings, tokens=len(completion.token_ids)))
            started = time.perf_counter()
            verified = await client.generate(model=model.name, prompt=prompt, max_tokens=tokens, temperature=0.0)
            out.append(dict(quorum_total_s=time.perf_counter() - started, outcome=verified.verification.outcome,
                            verifiers=len(verified.verification.verifiers)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder [default: the bundled SmolLM2-135M-Instruct]")
    parser.add_argument("--data-dir", help="p2pinfer data dir holding the default model's store")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--peers", type=int, default=5)
    parser.add_argument("--verify-tokens", type=int, default=128)
    args = parser.parse_args()
    log.configure(level="warning")

    model = load(args)
    prompt = "The history of the printing press begins"
    prompt_ids = model.prompt_ids(prompt=prompt)
    direct_run(model, prompt_ids, 4)  # warm up
    direct = [direct_run(model, prompt_ids, args.tokens) for _ in range(args.runs)]
    network = trio.run(network_runs, model, prompt, args.tokens, args.runs, args.peers)
    quorum = network.pop()
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
    bid_set = statistics.median(r["bid_set_s"] for r in network)
    print(f"election (offers, bids, VRF checks) before assignment: {election * 1000:.1f} ms   (goal <= 50 ms)")
    print(f"signed bid set to every bidder (overlaps opening the executor's stream; the assignment waits for "
          f"it): {bid_set * 1000:.1f} ms")
    print(f"added time to first token: {(e2e_first - direct_first) * 1000:.1f} ms")
    print(f"with the verification quorum ({quorum['verifiers']} verifiers, outcome {quorum['outcome']}): "
          f"{quorum['quorum_total_s'] * 1000:.1f} ms until the verified Completion")
    gen_s, ver_s, n, fp_bytes = verification_cost(model, args.verify_tokens, min(args.runs, 3))
    print(f"verification: generate {n} tokens {gen_s:.3f} s, verify {ver_s:.3f} s, "
          f"verification / generation = {ver_s / gen_s:.3f}")
    print(f"fingerprint: {fp_bytes} bytes = {fp_bytes / n:.1f} bytes/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
