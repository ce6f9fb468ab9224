"""What the settlement rules cost a peer per receipt and per assignment, against the old checks in the same run.

    python benchmarks/settlement.py [--bidders 32] [--runs 50]

Prints the median time of:
  * booking a receipt (``settlement.book_receipt``: re-rank the signed bid set, i.e. verify every VRF proof,
    then tally) vs the tally alone (what booking cost before receipts carried the election);
  * the executor's assignment check (``evidence.assignment_problem``: the signed bid set, rank, failover
    evidence with a 256-token prefix) vs ``elect`` + ``check_won`` on the bids alone (the old check).
Pure CPU, no network; run it with ``nice`` on a shared machine and read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import time

from p2pinfer.election import check_won, elect, make_bid
from p2pinfer.identity import Identity
from p2pinfer.request.evidence import assignment_problem, ranking_of, token_chain
from p2pinfer.request.params import build_request
from p2pinfer.settlement import Outcome, Participation, book_receipt, tally
from p2pinfer.wire import Assignment, BidSet, Receipt, TokenChunk, Verdict, sign


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bidders", type=int, default=32)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    client = Identity.generate()
    peers = [Identity.generate() for _ in range(args.bidders)]
    by_key = {p.public_key: p for p in peers}
    request = build_request(model_digest=b"\x01" * 32, client_key=client.public_key, prompt="hi", max_tokens=512)
    rid = request.request_id()
    bids = tuple(make_bid(p.seed, rid) for p in peers)
    bid_set = sign(client, BidSet(request_id=rid, epoch_seed=b"", bids=bids, excluded=(), issued_at_ms=1))
    ranking = [r.public_key for r in ranking_of(bid_set.message).ranking]
    executor, verifiers = ranking[1], ranking[2:5]
    result_hash = b"\x42" * 32
    verdicts = [sign(by_key[k], Verdict(request_id=rid, result_hash=result_hash, accept=True, first_bad_position=None,
                                        reason="", max_deviation=0.0, issued_at_ms=1, executor=executor,
                                        output_tokens=300, inherited_tokens=256, election=bid_set.message_id))
                for k in verifiers]
    receipt = Receipt(request_id=rid, model=request.model, client=client.public_key, executor=executor,
                      verifiers=tuple(verifiers), result_hash=result_hash, output_tokens=300, outcome=Outcome.ACCEPTED,
                      issued_at_ms=1, inherited_tokens=256, verdicts=tuple(v.to_bytes() for v in verdicts),
                      bid_set=bid_set.to_bytes())
    seen = Participation(client.public_key, result_hash)
    assert book_receipt(receipt, verdicts, bid_set, me=executor, seen=seen, now_ms=2).accepted

    book = median_ms(lambda: book_receipt(receipt, verdicts, bid_set, me=executor, seen=seen, now_ms=2), args.runs)
    old_book = median_ms(lambda: tally(verdicts, verifiers=verifiers, request_id=rid, result_hash=result_hash),
                         args.runs)

    prefix = list(range(256))
    first = by_key[ranking[0]]
    chunk = sign(first, TokenChunk(request_id=rid, index=0, token_ids=tuple(prefix), text="",
                                   chain=token_chain(rid, prefix))).to_bytes()
    assignment = Assignment(request=request, epoch_seed=b"", bids=bids, prefix_ids=tuple(prefix), attempt=1,
                            bid_set=bid_set.to_bytes(), evidence=(chunk,))
    assert assignment_problem(assignment, rid, executor).problem is None
    check = median_ms(lambda: assignment_problem(assignment, rid, executor), args.runs)
    old_check = median_ms(lambda: check_won(elect(rid, b"", bids), executor, attempt=1), args.runs)

    print(f"{args.bidders} bidders, median of {args.runs}")
    print(f"receipt booking:    {book:7.2f} ms  (tally alone {old_book:.3f} ms; ratio {book / old_book:.0f}x)")
    print(f"assignment check:   {check:7.2f} ms  (old elect + check_won {old_check:.2f} ms; ratio {check / old_check:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
