"""How well can a client colluding with one peer grind request nonces to make that peer win?

Without an epoch beacon the client chooses the request nonce, hence the request ID, hence the VRF input.
The colluding peer can evaluate its own VRF for any candidate request offline (one prove, ~0.2-0.3 ms),
but not anybody else's. Its best strategy: try T candidate nonces, keep the one where its own output is
lowest, then run that election for real against the n - 1 honest peers. Since all outputs are independent
and uniform, it wins exactly when its best of T outputs is below all n - 1 honest ones, i.e. with
probability T / (T + n - 1). This script measures that with real proofs and elect():

    python benchmarks/election_grinding.py --peers 20 --trials 300 --tries 1 19 171
"""

from __future__ import annotations

import argparse
import hashlib
import time

from p2pinfer import election, vrf


def _digest(label: str, *ints: int) -> bytes:
    return hashlib.sha256((label + "/" + "/".join(map(str, ints))).encode()).digest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=20)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--tries", type=int, nargs="+", default=[1, 19, 171])
    args = parser.parse_args(argv)

    colluder = vrf.SecretKey(_digest("grind-colluder", 0))
    honest = [vrf.SecretKey(_digest("grind-honest", i)) for i in range(args.peers - 1)]
    print(f"{args.peers} peers (1 colluding), {args.trials} trials per setting")
    for tries in args.tries:
        wins, t0 = 0, time.perf_counter()
        grind_s = 0.0
        for trial in range(args.trials):
            g0 = time.process_time()
            candidates = [_digest("grind-request", tries, trial, t) for t in range(tries)]
            outputs = [vrf.proof_to_hash(colluder.prove(election.election_input(r))) for r in candidates]
            request_id = candidates[min(range(tries), key=outputs.__getitem__)]
            grind_s += time.process_time() - g0
            bids = [election.make_bid(k, request_id) for k in [colluder, *honest]]
            result = election.elect(request_id, b"", bids)
            wins += result.executor == colluder.public_key
        elapsed = time.perf_counter() - t0
        expected = tries / (tries + args.peers - 1)
        print(
            f"T = {tries:5d} tries: colluder won {wins}/{args.trials} = {wins / args.trials:.3f}"
            f" (predicted T/(T+n-1) = {expected:.3f}); grinding cost {grind_s / args.trials * 1e3:.1f} ms CPU"
            f" per request; {elapsed:.1f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
