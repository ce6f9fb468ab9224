"""Settlement rules (p2pinfer.settlement), pure: property-based over signed elections, verdicts and receipts."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pinfer.identity import Identity
from p2pinfer.ledger import Ledger
from p2pinfer.request.evidence import (assignment_problem, bidder_problem, token_chain)
from p2pinfer.settlement import (EXCLUDING_FRAUD, Fault, FraudStatus, Outcome, Participation, ReceiptProblem,
                                 book_receipt, entries_for_failed_attempts, entries_for_tally,
                                 settle_fraud_recheck, tally)
from p2pinfer.wire import Assignment, BidSet, Receipt, Refusal, TokenChunk, Verdict, sign

from elections import BID_SET, BIDS, BY_KEY, CLIENT, OTHER_CLIENT, POOL, RANKING, REQUEST, RID

RESULT_HASH = b"\x42" * 32


def verdict(signer: Identity, accept: bool, *, executor: bytes, output: int = 10, inherited: int = 0,
            election: bytes = BID_SET.message_id, result_hash: bytes = RESULT_HASH, bad: int | None = None):
    return sign(signer, Verdict(request_id=RID, result_hash=result_hash, accept=accept,
                                first_bad_position=None if accept else bad, reason="", max_deviation=0.0,
                                issued_at_ms=5, executor=executor, output_tokens=output,
                                inherited_tokens=inherited, election=election))


def receipt(executor: bytes, verifiers, verdicts, outcome: str, *, issued_at_ms: int = 1, output: int = 10,
            inherited: int = 0, client: Identity = CLIENT) -> Receipt:
    return Receipt(request_id=RID, model=REQUEST.model, client=client.public_key, executor=executor,
                   verifiers=tuple(verifiers), result_hash=RESULT_HASH, output_tokens=output, outcome=outcome,
                   issued_at_ms=issued_at_ms, inherited_tokens=inherited,
                   verdicts=tuple(v.to_bytes() for v in verdicts), blamed=(), bid_set=BID_SET.to_bytes())


SEEN = Participation(CLIENT.public_key, RESULT_HASH)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rank=st.integers(0, 3), q=st.integers(1, 3), accepts=st.lists(st.booleans(), min_size=3, max_size=3),
       me=st.integers(0, 6), now=st.integers(0, 2**40), sent_at=st.integers(0, 2**53 - 1))
def test_an_honest_receipt_books_what_its_verdicts_decide_on_the_receivers_clock(rank, q, accepts, me, now,
                                                                                 sent_at):
    executor = RANKING[rank]
    verifiers = RANKING[rank + 1: rank + 1 + q]
    votes = [verdict(BY_KEY[k], a, executor=executor, bad=3) for k, a in zip(verifiers, accepts)]
    t = tally(votes, verifiers=verifiers, request_id=RID, result_hash=RESULT_HASH)
    r = receipt(executor, verifiers, votes, t.outcome, issued_at_ms=sent_at)
    me_key = POOL[me].public_key
    booking = book_receipt(r, votes, BID_SET, me=me_key, seen=SEEN, now_ms=now)
    assert booking.accepted
    expected = [e for e in entries_for_tally(t, executor=executor, output_tokens=10, inherited_tokens=0,
                                             request_id=RID, at_ms=now)
                if not (e.peer == me_key and e.is_penalty)]
    assert list(booking.entries) == expected
    assert all(e.at_ms == now for e in booking.entries)  # the receiver's clock, never the sender's
    assert not any(e.peer == me_key and e.is_penalty for e in booking.entries)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(executor=st.integers(0, 6), verifiers=st.lists(st.integers(0, 6), min_size=1, max_size=3, unique=True),
       accepts=st.lists(st.booleans(), min_size=3, max_size=3), outsiders=st.integers(0, 3))
def test_verifiers_that_are_not_the_elections_next_ranks_book_nothing(executor, verifiers, accepts, outsiders):
    executor_key = RANKING[executor]
    keys = [RANKING[v] for v in verifiers if v != executor]
    throwaway = [Identity.generate() for _ in range(outsiders)]
    keys += [t.public_key for t in throwaway]
    if not keys:
        return
    signers = {**BY_KEY, **{t.public_key: t for t in throwaway}}
    votes = [verdict(signers[k], a, executor=executor_key) for k, a in zip(keys, accepts)]
    t = tally(votes, verifiers=keys, request_id=RID, result_hash=RESULT_HASH)
    booking = book_receipt(receipt(executor_key, keys, votes, t.outcome), votes, BID_SET, me=POOL[0].public_key,
                           seen=SEEN, now_ms=9)
    honest = keys == RANKING[executor + 1: executor + 1 + len(keys)]
    assert booking.accepted == honest
    if not honest:
        assert booking.problem == ReceiptProblem.WRONG_VERIFIERS and booking.entries == ()


def test_a_client_moves_reputations_only_through_requests_the_receiver_took_part_in():
    executor, verifiers = RANKING[0], RANKING[1:4]
    votes = [verdict(BY_KEY[k], True, executor=executor) for k in verifiers]
    r = receipt(executor, verifiers, votes, Outcome.ACCEPTED)
    me = RANKING[1]
    assert book_receipt(r, votes, BID_SET, me=me, seen=SEEN, now_ms=1).accepted
    assert book_receipt(r, votes, BID_SET, me=me, seen=None, now_ms=1).problem == ReceiptProblem.NOT_A_PARTICIPANT
    other = Participation(OTHER_CLIENT.public_key, RESULT_HASH)
    assert book_receipt(r, votes, BID_SET, me=me, seen=other, now_ms=1).problem == ReceiptProblem.NOT_A_PARTICIPANT
    wrong = Participation(CLIENT.public_key, b"\x43" * 32)
    assert book_receipt(r, votes, BID_SET, me=me, seen=wrong, now_ms=1).problem == ReceiptProblem.OTHER_RESULT
    # the election must be the client's own signed bid set
    forged = sign(OTHER_CLIENT, BID_SET.message)
    assert book_receipt(r, votes, forged, me=me, seen=SEEN, now_ms=1).problem == ReceiptProblem.NO_ELECTION
    assert book_receipt(r, votes, None, me=me, seen=SEEN, now_ms=1).problem == ReceiptProblem.NO_ELECTION


def test_credit_rests_on_what_the_verifiers_attest_not_on_the_clients_claims():
    executor, verifiers = RANKING[0], RANKING[1:4]
    votes = [verdict(BY_KEY[k], True, executor=executor, output=10) for k in verifiers]
    inflated = receipt(executor, verifiers, votes, Outcome.ACCEPTED, output=4000)
    booking = book_receipt(inflated, votes, BID_SET, me=RANKING[1], seen=SEEN, now_ms=1)
    assert booking.problem == ReceiptProblem.OUTCOME_MISMATCH and booking.entries == ()  # no attested verdicts


def test_a_peer_never_books_a_penalty_against_itself():
    executor, verifiers = RANKING[0], RANKING[1:4]
    votes = [verdict(BY_KEY[k], False, executor=executor, bad=0) for k in verifiers]
    r = receipt(executor, verifiers, votes, Outcome.REJECTED)
    assert any(e.peer == executor and e.is_penalty
               for e in book_receipt(r, votes, BID_SET, me=RANKING[1], seen=SEEN, now_ms=1).entries)
    assert not any(e.peer == executor and e.is_penalty
                   for e in book_receipt(r, votes, BID_SET, me=executor, seen=SEEN, now_ms=1).entries)


@given(faults=st.lists(st.tuples(st.integers(0, 6), st.sampled_from(list(Fault))), max_size=8))
def test_only_a_peers_own_provable_fault_is_booked(faults):
    entries = entries_for_failed_attempts([(POOL[i].public_key, f) for i, f in faults], RID, 7)
    assert {e.peer for e in entries} == {POOL[i].public_key for i, f in faults if f == Fault.PEER}
    assert all(e.is_penalty and e.at_ms == 7 for e in entries)


@given(first_bad=st.integers(0, 20), inherited=st.integers(0, 20))
def test_fraud_blame_follows_the_executors_signed_inherited_count(first_bad, inherited):
    status, entries = settle_fraud_recheck(accept=False, first_bad_position=first_bad, executor=b"e" * 32,
                                           inherited_tokens=inherited, rejecting_verifiers=[b"v" * 32],
                                           request_id=RID, now_ms=1)
    if first_bad >= inherited:
        assert status == FraudStatus.PROVEN and [e.peer for e in entries] == [b"e" * 32]
    else:
        assert status == FraudStatus.PROVEN_INHERITED and entries == []
    status, entries = settle_fraud_recheck(accept=True, first_bad_position=None, executor=b"e" * 32,
                                           inherited_tokens=inherited, rejecting_verifiers=[b"v" * 32],
                                           request_id=RID, now_ms=1)
    assert status == FraudStatus.DISPROVEN and [e.peer for e in entries] == [b"v" * 32]


def test_a_quorum_rejection_excludes_at_once_whatever_the_history():
    """One rule (EXCLUDING_FRAUD): 30 verified results before do not keep a rejected executor eligible."""
    from p2pinfer.ledger import FraudRecord
    from p2pinfer.settlement import Entry, EntryKind

    key = POOL[0].public_key
    now = 10**12
    with Ledger(None) as ledger:
        ledger.add_entries([Entry(key, EntryKind.CREDIT_TOKENS, 10, i.to_bytes(32, "big"), now - 1000)
                            for i in range(30)])
        assert not ledger.excluded([key], now_ms=now)
        ledger.record_fraud(FraudRecord(b"h" * 32, key, RID, FraudStatus.QUORUM_REJECTED, now, b"proof"))
        assert ledger.excluded([key], now_ms=now) == {key}
    assert FraudStatus.QUORUM_REJECTED in EXCLUDING_FRAUD and FraudStatus.UNCHECKED not in EXCLUDING_FRAUD


# ---- the executor's checks on an assignment ------------------------------------------------------------


def assignment(attempt: int, prefix=(), evidence=(), bid_set=BID_SET, bids=BIDS) -> Assignment:
    return Assignment(request=REQUEST, epoch_seed=b"", bids=bids, prefix_ids=tuple(prefix), attempt=attempt,
                      bid_set=bid_set.to_bytes(), evidence=tuple(evidence))


def chunk(signer: Identity, tokens, index=0):
    return sign(signer, TokenChunk(request_id=RID, index=index, token_ids=tuple(tokens), text="",
                                   chain=token_chain(RID, list(tokens)))).to_bytes()


def test_the_executor_is_the_elections():
    winner, second, third = (BY_KEY[k] for k in RANKING[:3])
    assert assignment_problem(assignment(0), RID, winner.public_key).problem is None
    assert assignment_problem(assignment(0), RID, second.public_key).code == "not-winner"
    # no prefix at attempt 0: a client cannot make the winner "inherit" junk tokens
    assert "attempt 0" in assignment_problem(assignment(0, prefix=[5, 6]), RID, winner.public_key).problem
    # a bid set signed by someone else, or bids that differ from the signed set
    forged = sign(OTHER_CLIENT, BID_SET.message)
    assert "client" in assignment_problem(assignment(0, bid_set=forged), RID, winner.public_key).problem
    assert assignment_problem(assignment(0, bids=BIDS[1:]), RID, winner.public_key).problem is not None
    # attempt 2 without evidence: the executor asks both lower ranks for their status itself
    check = assignment_problem(assignment(2), RID, third.public_key)
    assert check.problem is None and check.unanswered == tuple(RANKING[:2])
    refusal = sign(winner, Refusal(request_id=RID, code="busy", message="")).to_bytes()
    check = assignment_problem(assignment(2, prefix=[1, 2, 3], evidence=[refusal, chunk(second, [1, 2, 3])]),
                               RID, third.public_key)
    assert check.problem is None and check.unanswered == ()
    # a prefix the earlier executor did not sign, or evidence from a rank that is not lower
    assert "signed" in assignment_problem(assignment(2, prefix=[1, 2, 9], evidence=[chunk(second, [1, 2, 3])]),
                                          RID, third.public_key).problem
    assert "lower rank" in assignment_problem(assignment(1, prefix=[1], evidence=[chunk(third, [1])]), RID,
                                              second.public_key).problem
    assert "prefix" in assignment_problem(assignment(1, prefix=[1, 2]), RID, second.public_key).problem


def test_a_bidder_sees_its_bid_omitted_or_altered():
    mine = BIDS[0]
    owner = POOL[0]
    fair = BID_SET
    assert bidder_problem(fair, offer_signer=CLIENT.public_key, my_bid=mine, epoch_seed=b"") is None
    omitted = sign(CLIENT, BidSet(request_id=RID, epoch_seed=b"", bids=BIDS[1:], excluded=(), issued_at_ms=1))
    assert bidder_problem(omitted, offer_signer=CLIENT.public_key, my_bid=mine, epoch_seed=b"") == "our bid was omitted"
    altered_bid = type(mine)(request_id=RID, public_key=owner.public_key, proof=bytes(80))
    altered = sign(CLIENT, BidSet(request_id=RID, epoch_seed=b"", bids=(altered_bid,) + BIDS[1:], excluded=(),
                                  issued_at_ms=1))
    assert bidder_problem(altered, offer_signer=CLIENT.public_key, my_bid=mine, epoch_seed=b"") == "our bid was altered"
    excluded = sign(CLIENT, BidSet(request_id=RID, epoch_seed=b"", bids=BIDS[1:], excluded=(owner.public_key,),
                                   issued_at_ms=1))
    assert bidder_problem(excluded, offer_signer=CLIENT.public_key, my_bid=mine, epoch_seed=b"") is None


@given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=40), cut=st.integers(0, 40))
def test_one_signed_chunk_commits_to_the_whole_prefix_before_it(tokens, cut):
    from p2pinfer.request.evidence import chain_start, extend_chain

    cut = min(cut, len(tokens))
    assert extend_chain(token_chain(RID, tokens[:cut]), tokens[cut:]) == token_chain(RID, tokens)
    assert token_chain(RID, []) == chain_start(RID)
    if tokens:  # changing any earlier token changes the chain value at the end
        changed = list(tokens)
        changed[cut % len(tokens)] ^= 1
        assert token_chain(RID, changed) != token_chain(RID, tokens)


def test_unfair_bid_set_evidence_is_rechecked_from_its_signatures_alone():
    from p2pinfer.request.evidence import UnfairBidSet, check_unfair_bid_set
    from p2pinfer.wire import TaskOffer, VrfBid, encode_signed

    owner = POOL[0]
    offer = encode_signed(CLIENT, TaskOffer(request_id=RID, model=REQUEST.model, max_tokens=8, epoch_seed=b"",
                                            expires_at_ms=2))
    bid = encode_signed(owner, VrfBid(bid=BIDS[0], model=REQUEST.model, free_slots=1))
    omitted = sign(CLIENT, BidSet(request_id=RID, epoch_seed=b"", bids=BIDS[1:], excluded=(), issued_at_ms=1))
    assert check_unfair_bid_set(UnfairBidSet(offer, bid, omitted.to_bytes())) == "our bid was omitted"
    assert check_unfair_bid_set(UnfairBidSet(offer, bid, BID_SET.to_bytes())) is None  # fair
    # a set signed by someone else than the offer's client makes no case against that client
    other = sign(OTHER_CLIENT, omitted.message)
    assert check_unfair_bid_set(UnfairBidSet(offer, bid, other.to_bytes())) is None
    # nor does a "bid" that is not a valid VRF proof, or one signed by another key than the bidder's
    bogus = encode_signed(owner, VrfBid(bid=type(BIDS[0])(request_id=RID, public_key=owner.public_key,
                                                          proof=bytes(80)), model=REQUEST.model, free_slots=1))
    assert check_unfair_bid_set(UnfairBidSet(offer, bogus, omitted.to_bytes())) is None
    stolen = encode_signed(POOL[1], VrfBid(bid=BIDS[0], model=REQUEST.model, free_slots=1))
    assert check_unfair_bid_set(UnfairBidSet(offer, stolen, omitted.to_bytes())) is None
    assert check_unfair_bid_set(UnfairBidSet(b"junk", bid, omitted.to_bytes())) is None
