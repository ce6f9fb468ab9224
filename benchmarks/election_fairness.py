"""Fairness and speed of executor election.

Runs N elections (default 100,000) among P peers with fixed keys (default 20) and distinct request IDs,
each one exactly as the network runs it: every peer proves, ``elect`` verifies every bid and ranks them.
Prints each peer's share of executor wins, the largest deviation from 1/P in percentage points, the
chi-square statistic against uniform with its p-value, the same for verifier seats, and the time per
prove and per verify call (measured in a single process before the parallel run, and as CPU time per
call during the run), with a breakdown of what a call spends its time on.

    python benchmarks/election_fairness.py                 # the full 100,000 elections
    python benchmarks/election_fairness.py --elections 5000 --workers 2
    python benchmarks/election_fairness.py --elections 0        # prove/verify timings only

Everything is deterministic (keys and request IDs are hashes of their index), so two runs with the same
arguments give the same counts.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import sys
import time
from collections.abc import Callable

from p2pinfer import election, vrf
from p2pinfer.stats import chi_square_uniform


def _digest(label: str, i: int) -> bytes:
    return hashlib.sha256(f"{label}/{i}".encode()).digest()


def _run_chunk(args: tuple[int, int, int, int]) -> tuple[list[int], list[int], int, float, float]:
    """Elections [start, stop): executor wins, verifier seats, elections done, prove CPU s, verify CPU s."""
    start, stop, peers, verifiers = args
    keys = [vrf.SecretKey(_digest("bench-peer", i)) for i in range(peers)]
    index = {k.public_key: i for i, k in enumerate(keys)}
    wins, seats = [0] * peers, [0] * peers
    prove_s = elect_s = 0.0
    for j in range(start, stop):
        request_id = _digest("bench-request", j)
        t0 = time.process_time()
        bids = [election.make_bid(k, request_id) for k in keys]
        t1 = time.process_time()
        result = election.elect(request_id, b"", bids, verifiers=verifiers)
        t2 = time.process_time()
        prove_s += t1 - t0
        elect_s += t2 - t1
        if len(result.ranking) != peers:  # every bid here is honest
            raise AssertionError(f"election {j}: rejected {result.rejected}")
        wins[index[result.executor]] += 1
        for key in result.verifiers:
            seats[index[key]] += 1
    return wins, seats, stop - start, prove_s, elect_s


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def _timings(calls: int) -> None:
    seed = _digest("timing-peer", 0)
    key = vrf.SecretKey(seed)
    pk = key.public_key
    alphas = [election.election_input(_digest("timing-request", i)) for i in range(calls)]
    proofs = [vrf.prove(seed, a) for a in alphas]
    it = iter(range(10**9))

    def prove_next() -> None:
        i = next(it) % calls
        key.prove(alphas[i])

    def verify_next() -> None:
        i = next(it) % calls
        vrf.verify(pk, proofs[i], alphas[i])

    prove_us = _per_call_us(prove_next, calls)
    verify_us = _per_call_us(verify_next, calls)
    prove_seed_us = _per_call_us(lambda: vrf.prove(seed, alphas[next(it) % calls]), calls)
    print(f"prove : {prove_us:8.1f} us/call   (SecretKey.prove; single process, {calls} calls, distinct inputs)")
    print(f"prove : {prove_seed_us:8.1f} us/call   (vrf.prove(seed, alpha): derives the key each call)")
    print(f"verify: {verify_us:8.1f} us/call")

    # What the time goes to (the components each call makes; see p2pinfer/vrf.py).
    import nacl.bindings as sodium

    h = vrf._encode_to_curve(pk, alphas[0])
    k = 12345678901234567890123456789
    gamma = proofs[0][:32]
    parts = {
        "encode_to_curve (try-and-increment, mean over inputs)": _per_call_us(
            lambda: vrf._encode_to_curve(pk, alphas[next(it) % calls]), calls
        ),
        "variable-base scalar mult (libsodium)": _per_call_us(lambda: vrf._prime_order_mult(k, h), calls),
        "fixed-base scalar mult (libsodium)": _per_call_us(lambda: vrf._base_mult(k), calls),
        "point add/sub (libsodium)": _per_call_us(lambda: sodium.crypto_core_ed25519_add(h, gamma), calls),
        "public key validation (is_valid_point)": _per_call_us(
            lambda: sodium.crypto_core_ed25519_is_valid_point(pk), calls
        ),
        "SHA-512 of 200 bytes": _per_call_us(lambda: hashlib.sha512(bytes(200)).digest(), calls),
        "secret scalar + public key from seed": _per_call_us(lambda: vrf.public_key(seed), calls),
    }
    print("breakdown (prove = encode + 3 scalar mults [+ key derivation for vrf.prove];")
    print("           verify = key check + encode + 4 scalar mults + 2 subs + 3 doublings for 8*Gamma):")
    for name, us in parts.items():
        print(f"  {name:55s} {us:7.1f} us")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elections", type=int, default=100_000)
    parser.add_argument("--peers", type=int, default=20)
    parser.add_argument("--verifiers", type=int, default=election.DEFAULT_VERIFIERS)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk", type=int, default=500, help="elections per work item")
    parser.add_argument("--timing-calls", type=int, default=2000)
    args = parser.parse_args(argv)

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (shared machines slow this down)")
    _timings(args.timing_calls)
    if args.elections <= 0:
        return 0

    chunks = [
        (start, min(start + args.chunk, args.elections), args.peers, args.verifiers)
        for start in range(0, args.elections, args.chunk)
    ]
    wins, seats = [0] * args.peers, [0] * args.peers
    done, prove_cpu, elect_cpu = 0, 0.0, 0.0
    t0 = time.perf_counter()
    with multiprocessing.Pool(args.workers) as pool:
        for w, s, n, p_s, e_s in pool.imap_unordered(_run_chunk, chunks):
            wins = [a + b for a, b in zip(wins, w)]
            seats = [a + b for a, b in zip(seats, s)]
            done, prove_cpu, elect_cpu = done + n, prove_cpu + p_s, elect_cpu + e_s
            elapsed = time.perf_counter() - t0
            print(f"  {done}/{args.elections} elections, {elapsed:.0f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0

    calls = done * args.peers
    print(f"\n{done} elections among {args.peers} peers, {args.workers} worker processes: {wall:.1f} s wall")
    print(f"during the run: prove {prove_cpu / calls * 1e6:.1f} us CPU/call (incl. building the Bid), "
          f"verify+rank {elect_cpu / calls * 1e6:.1f} us CPU/bid")
    expected_share = 1 / args.peers
    print(f"\nexecutor share per peer (expected {100 * expected_share:.3f} %):")
    for i, w in enumerate(wins):
        print(f"  peer {i:2d}: {w:7d}  {100 * w / done:7.3f} %  ({100 * (w / done - expected_share):+.3f} pp)")
    max_dev = max(abs(w / done - expected_share) for w in wins) * 100
    statistic, p_value = chi_square_uniform(wins)
    print(f"max deviation from 1/{args.peers}: {max_dev:.3f} percentage points (goal: within 0.5)")
    print(f"chi-square vs uniform: {statistic:.2f} with {args.peers - 1} dof, p = {p_value:.4f}")

    if args.verifiers:
        seat_total = sum(seats)
        seat_dev = max(abs(s / seat_total - expected_share) for s in seats) * 100
        seat_stat, seat_p = chi_square_uniform(seats)
        print(f"verifier seats ({args.verifiers} per election): max deviation {seat_dev:.3f} pp, "
              f"chi-square {seat_stat:.2f}, p = {seat_p:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
