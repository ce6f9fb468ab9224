"""Signed evidence of an election and of a failover, as pure checks (no I/O).

* **Token chain.** Every ``TokenChunk`` carries ``chain``, a hash chain over all output tokens up to the end
  of the chunk. One signed chunk therefore commits its executor to the whole prefix before it, so a failover
  assignment proves what the next executor inherits with the last chunk of each earlier executor.
* **Bid set.** The client signs the final, complete set of bids (``BidSet``) and sends it to every bidder
  before execution. :func:`bidder_problem` is what a bidder checks (its bid is in it, or its key is listed
  as excluded); :func:`assignment_problem` is what the executor checks before running anything: the same
  signed set, its own rank equal to the attempt, no ``prefix_ids`` at attempt 0, and for attempt k signed
  evidence from every lower rank that answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..election import ElectionResult, elect
from ..wire import (Assignment, Bid, BidSet, Refusal, Signed, TaskOffer, TokenChunk, VrfBid, WireError, decode_signed,
                    tagged_hash)
from ..wire.messages import MAX_BID_SET_BYTES, MAX_EVIDENCE_BYTES

MAX_OFFER_BYTES = 4 * 1024  # a signed TaskOffer or VrfBid (request.protocol.MAX_OFFER_FRAME)

TOKEN_CHAIN_DOMAIN = "p2pinfer/v1/token-chain"


def chain_start(request_id: bytes) -> bytes:
    return tagged_hash(TOKEN_CHAIN_DOMAIN, request_id)


def extend_chain(chain: bytes, token_ids: Sequence[int]) -> bytes:
    for token in token_ids:
        chain = tagged_hash(TOKEN_CHAIN_DOMAIN, chain, int(token).to_bytes(4, "big"))
    return chain


def token_chain(request_id: bytes, token_ids: Sequence[int]) -> bytes:
    """The chain value after ``token_ids`` (the first output tokens of ``request_id``)."""
    return extend_chain(chain_start(request_id), token_ids)


def ranking_of(bid_set: BidSet) -> ElectionResult:
    """The election a BidSet states: its bids ranked, its excluded keys left out."""
    eligible = {b.public_key for b in bid_set.bids} - set(bid_set.excluded)
    return elect(bid_set.request_id, bid_set.epoch_seed, bid_set.bids, eligible=eligible)


def decode_bid_set(data: bytes) -> Signed[BidSet]:
    return decode_signed(data, expect=BidSet, max_size=MAX_BID_SET_BYTES)


def bidder_problem(bid_set: Signed[BidSet], *, offer_signer: bytes, my_bid: Bid, epoch_seed: bytes) -> str | None:
    """None when a bidder's own bid is fairly represented in the client's signed BidSet, else what is wrong.

    A set with a problem is kept as signed evidence against its client (docs/election.md).
    """
    s = bid_set.message
    if bid_set.signer != offer_signer:
        return "not signed by the client that made the offer"
    if s.request_id != my_bid.request_id or s.epoch_seed != epoch_seed:
        return "names another request or epoch seed than the offer"
    if my_bid.public_key in s.excluded:
        return None  # left out openly, by the client's own ledger: signed, and not an omission
    if my_bid not in s.bids:
        if any(b.public_key == my_bid.public_key for b in s.bids):
            return "our bid was altered"
        return "our bid was omitted"
    return None


@dataclass(frozen=True)
class UnfairBidSet:
    """A bidder's evidence against a client, three signed envelopes anyone can re-check: the client's
    ``TaskOffer``, the bidder's ``VrfBid`` answering it, and the client's ``BidSet`` for that request."""

    offer: bytes
    bid: bytes
    bid_set: bytes


def check_unfair_bid_set(evidence: UnfairBidSet) -> str | None:
    """What the bid set did to the bid (``"our bid was omitted"``, ``"... altered"``), or None when the set is
    fair or the three envelopes do not make a case (unsigned, mismatched, or a bid that was not valid)."""
    try:
        offer = decode_signed(evidence.offer, expect=TaskOffer, max_size=MAX_OFFER_BYTES)
        bid = decode_signed(evidence.bid, expect=VrfBid, max_size=MAX_OFFER_BYTES)
        bid_set = decode_bid_set(evidence.bid_set)
    except WireError:
        return None
    my_bid = bid.message.bid
    if my_bid.public_key != bid.signer or my_bid.request_id != offer.message.request_id:
        return None
    if not elect(my_bid.request_id, offer.message.epoch_seed, [my_bid]).ranking:
        return None  # not a valid bid: nothing to complain about
    s = bid_set.message
    if bid_set.signer != offer.signer or s.request_id != my_bid.request_id or s.epoch_seed != offer.message.epoch_seed:
        return None  # not the offering client's set for this election: no case against that client
    return bidder_problem(bid_set, offer_signer=offer.signer, my_bid=my_bid, epoch_seed=offer.message.epoch_seed)


@dataclass(frozen=True)
class AssignmentCheck:
    """The outcome of :func:`assignment_problem`: a refusal reason, or the election and what is unproven."""

    problem: str | None
    code: str = "invalid"  # the Refusal code for a problem: "not-winner" when this peer is not the one
    election: ElectionResult | None = None
    bid_set_id: bytes = b""
    unanswered: tuple[bytes, ...] = ()  # lower ranks with no signed evidence: the executor probes them


def assignment_problem(assignment: Assignment, request_id: bytes, me: bytes) -> AssignmentCheck:
    """What the executor checks on a signed assignment before running anything (its signer checked apart)."""
    request = assignment.request
    if not assignment.bid_set:
        return AssignmentCheck("the assignment carries no signed bid set")
    try:
        signed_set = decode_bid_set(assignment.bid_set)
    except WireError as exc:
        return AssignmentCheck(f"the bid set is not a valid signed BidSet: {exc.reason}")
    bid_set = signed_set.message
    if signed_set.signer != request.client:
        return AssignmentCheck("the bid set is not signed by the request's client")
    if bid_set.request_id != request_id or bid_set.epoch_seed != assignment.epoch_seed:
        return AssignmentCheck("the bid set is for another request or epoch seed")
    if set(bid_set.bids) != set(assignment.bids):
        return AssignmentCheck("the assignment's bids are not the signed bid set's")
    election = ranking_of(bid_set)
    ranking = [r.public_key for r in election.ranking]
    if me not in ranking:
        return AssignmentCheck("this peer has no valid, eligible bid in the signed bid set", "not-winner")
    rank = ranking.index(me)
    if rank != assignment.attempt:
        return AssignmentCheck(f"this peer ranks {rank} in the election, but the assignment is attempt "
                               f"{assignment.attempt}", "not-winner")
    if assignment.attempt == 0 and assignment.prefix_ids:
        return AssignmentCheck("prefix_ids at attempt 0: only a failover inherits tokens")
    answered: set[bytes] = set()
    covered = 0  # how many prefix tokens the earlier executors' signed chains prove
    lower = set(ranking[:rank])
    prefix = list(assignment.prefix_ids)
    chains = [chain_start(request_id)]  # chains[n]: the chain after the first n prefix tokens (computed once)
    for token in prefix:
        chains.append(extend_chain(chains[-1], (token,)))
    for data in assignment.evidence:
        try:
            signed = decode_signed(data, expect=(Refusal, TokenChunk), max_size=MAX_EVIDENCE_BYTES)
        except WireError as exc:
            return AssignmentCheck(f"failover evidence is not a valid signed message: {exc.reason}")
        if signed.signer not in lower or signed.message.request_id != request_id:
            return AssignmentCheck("failover evidence is not from a lower rank of this election")
        if isinstance(signed.message, TokenChunk):
            chunk = signed.message
            end = chunk.index + len(chunk.token_ids)
            if end > len(prefix) or chunk.chain != chains[end]:
                return AssignmentCheck("prefix_ids are not what the earlier executor signed")
            covered = max(covered, end)
        answered.add(signed.signer)
    if covered != len(prefix):
        return AssignmentCheck(f"only {covered} of the {len(prefix)} prefix tokens are signed by an earlier executor")
    return AssignmentCheck(None, "", election, signed_set.message_id,
                           tuple(k for k in ranking[:rank] if k not in answered))
