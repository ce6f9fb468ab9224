"""The sampler's Philox words: C (``kernels/philox.c``: AVX-512 and scalar paths) against numpy, interleaved, in one
process, best of N.

    python benchmarks/philox.py [--rounds 30] [--vocab 49152] [--ids 20000]

Whole streams (``philox.stream``: what a plain-sampling (T=1) row of the check draws, ``--vocab`` words) from numpy's
``random_raw`` (a re-keyed generator, as the sampler keeps one per thread), the C AVX-512 path (where the library has
it) and the C scalar path; and words at chosen indices for many keys (``philox.draws``: what top-k/top-p rows of
the check draw, ``--ids`` words at random indices below ``--vocab``) from numpy's vectorized blocks and both C paths.
Every path's words are compared with numpy's first. Printed: nanoseconds a word, and numpy / path. On a shared
machine only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pinfer.runtime import philox  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--ids", type=int, default=20_000)
    args = ap.parse_args(argv)
    if philox._functions() is None:
        sys.exit("the kernel library is unavailable here (no compiler or P2PINFER_DECODE_KERNEL=0): nothing to compare")
    rng = np.random.default_rng(0)
    keys = [int.from_bytes(rng.bytes(16), "big") for _ in range(args.rounds)]
    pairs = rng.integers(0, 2**64, size=(args.ids, 2), dtype=np.uint64)
    ids = rng.integers(0, args.vocab, size=args.ids).astype(np.uint64)

    streams = {"numpy": lambda key: philox.stream_numpy(key, args.vocab),
               "C avx-512": lambda key: philox.stream(key, args.vocab),
               "C scalar": lambda key: philox.stream(key, args.vocab, scalar=True)}
    picks = {"numpy": lambda: philox.draws_numpy(pairs, ids),
             "C avx-512": lambda: philox.draws(pairs, ids),
             "C scalar": lambda: philox.draws(pairs, ids, scalar=True)}
    for name, run in streams.items():
        words, largest = run(keys[0])
        if not np.array_equal(words, np.random.Philox(key=keys[0]).random_raw(args.vocab)) or largest != words.max():
            sys.exit(f"{name}: not numpy's stream")
    want = philox.draws_numpy(pairs, ids)
    for name, run in picks.items():
        if not np.array_equal(run(), want):
            sys.exit(f"{name}: not numpy's words")

    best = {("stream", name): math.inf for name in streams} | {("draws", name): math.inf for name in picks}
    for round_, key in enumerate(keys):
        order = list(streams) if round_ % 2 == 0 else list(reversed(streams))
        for name in order:
            t = time.perf_counter()
            streams[name](key)
            best["stream", name] = min(best["stream", name], time.perf_counter() - t)
        for name in order:
            t = time.perf_counter()
            picks[name]()
            best["draws", name] = min(best["draws", name], time.perf_counter() - t)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; best of {args.rounds}; "
          "the avx-512 path is the scalar one where the library was built without AVX-512")
    print("\n| words | path | ns a word | numpy / path |\n|---|---|---|---|")
    for (kind, name), seconds in best.items():
        count = args.vocab if kind == "stream" else args.ids
        label = f"stream of {args.vocab}" if kind == "stream" else f"{args.ids} at chosen indices"
        print(f"| {label} | {name} | {seconds / count * 1e9:.2f} | {best[kind, 'numpy'] / seconds:.2f} |")


if __name__ == "__main__":
    main()
