"""Signed evidence of an election and of a failover, as pure checks (no I/O).

* **Token chain.** Every ``TokenChunk`` carries ``chain``, a hash chain over all output tokens up to the end
  of the chunk. One signed chunk therefore commits its executor to the whole prefix before it, so a failover
  assignment proves what the next executor inherits with the last chunk of each earlier executor.
* **Bid set.** The client signs the final, complete set of bids (``BidSet``) and sends it to every bidder
  before execution. :func:`bidder_problem` is what a bidder checks (its bid is in it, or its key is listed
  as excluded); :func:`assignment_problem` is what the executor checks before running anything: the same
  signed set, its own rank equal to the attempt, no ``prefix_ids`` at attempt 0, and for attempt k signed
  evidence from every lower rank that answered.
* **Failover past a silent rank.** For a lower rank the client holds no signed word from, the candidate asks
  that rank itself (``/p2pinfer/task-status/1``); :func:`classify_status_answer` says what the answer proves.
* **Verify tasks.** :func:`verify_task_problem` is what a verifier checks before it runs any prefill: the
  client's signed BidSet, the result naming that election, the executor at rank ``attempt`` with the failover
  evidence above, and the verifier itself among the ``quorum`` ranks right after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Sequence

from ..election import ElectionResult, elect
from ..wire import (Assignment, Bid, BidSet, InferenceResult, Refusal, Signed, TaskOffer, TaskStatus, TokenChunk,
                    VerifyTask, VrfBid, WireError, decode_signed, tagged_hash)
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


def failover_evidence_problem(evidence: Sequence[bytes], lower: set[bytes], request_id: bytes,
                              prefix: Sequence[int]) -> tuple[str | None, set[bytes]]:
    """Check a failover's signed evidence: each item is a signed ``Refusal`` or ``TokenChunk`` of a lower rank
    for this request, and the chunks' token chains prove every token of ``prefix``.

    Returns (what is wrong or None, the lower ranks that left evidence).
    """
    answered: set[bytes] = set()
    covered = 0  # how many prefix tokens the earlier executors' signed chains prove
    chains = [chain_start(request_id)]  # chains[n]: the chain after the first n prefix tokens (computed once)
    for token in prefix:
        chains.append(extend_chain(chains[-1], (token,)))
    for data in evidence:
        try:
            signed = decode_signed(data, expect=(Refusal, TokenChunk), max_size=MAX_EVIDENCE_BYTES)
        except WireError as exc:
            return f"failover evidence is not a valid signed message: {exc.reason}", answered
        if signed.signer not in lower or signed.message.request_id != request_id:
            return "failover evidence is not from a lower rank of this election", answered
        if isinstance(signed.message, TokenChunk):
            chunk = signed.message
            end = chunk.index + len(chunk.token_ids)
            if end > len(prefix) or chunk.chain != chains[end]:
                return "prefix_ids are not what the earlier executor signed", answered
            covered = max(covered, end)
        answered.add(signed.signer)
    if covered != len(prefix):
        return f"only {covered} of the {len(prefix)} prefix tokens are signed by an earlier executor", answered
    return None, answered


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
    problem, answered = failover_evidence_problem(assignment.evidence, set(ranking[:rank]), request_id,
                                                  assignment.prefix_ids)
    if problem is not None:
        return AssignmentCheck(problem)
    return AssignmentCheck(None, "", election, signed_set.message_id,
                           tuple(k for k in ranking[:rank] if k not in answered))


# ---- failover past a silent rank ------------------------------------------------------------------------


class StatusAnswer(StrEnum):
    """What a lower rank's answer to a failover candidate's status query proves."""

    FAILED = "failed"          # its signed Refusal or TokenChunk for the request: it refused or took the task
    NOT_FAILED = "not-failed"  # its signed TaskStatus: never assigned, or still checking: the failover is refused
    SILENT = "silent"          # nothing within the bound, or junk: the candidate signs that it asked and got nothing


def classify_status_answer(body: bytes | None, *, lower: bytes, request_id: bytes,
                           election: bytes) -> tuple[StatusAnswer, bytes | None]:
    """Classify a lower rank's answer (``None``: none came within the bound, or the stream failed).

    Returns the class and, for ``FAILED``, the signed evidence itself. Anything that is not a well-formed
    answer signed by that rank for this request (and election) counts as no answer: junk cannot hold up a
    failover, and it is never booked against anyone (nobody else can check what came over the stream).
    """
    if body is None:
        return StatusAnswer.SILENT, None
    try:
        signed = decode_signed(body, expect=(TokenChunk, Refusal, TaskStatus), max_size=MAX_EVIDENCE_BYTES)
    except WireError:
        return StatusAnswer.SILENT, None
    message = signed.message
    if signed.signer != lower or message.request_id != request_id:
        return StatusAnswer.SILENT, None
    if isinstance(message, TaskStatus):
        if message.election != election:
            return StatusAnswer.SILENT, None
        return StatusAnswer.NOT_FAILED, None
    return StatusAnswer.FAILED, body


# ---- verify tasks ---------------------------------------------------------------------------------------


class VerifyRefusal(StrEnum):
    """Why a verifier refuses a verify task without running anything (the reason code it logs and signs)."""

    NO_ELECTION = "no-election"                      # the task carries no signed bid set
    BAD_ELECTION = "bad-election"                    # not a valid BidSet signed by the request's client for it
    RESULT_NOT_OF_ELECTION = "result-not-of-election"  # the signed result names another election
    EXECUTOR_NOT_AT_RANK = "executor-not-at-rank"    # the result's signer is not rank `attempt` of the election
    NOT_A_VERIFIER = "not-a-verifier"                # this peer is not one of the `quorum` ranks after it
    NO_FAILOVER_EVIDENCE = "no-failover-evidence"    # attempt k, and a lower rank with no signed word at all
    BAD_FAILOVER_EVIDENCE = "bad-failover-evidence"  # evidence that is not a lower rank's, or a prefix unsigned


@dataclass(frozen=True)
class VerifyTaskCheck:
    problem: VerifyRefusal | None
    detail: str = ""


def verify_task_problem(task: VerifyTask, result: Signed[InferenceResult], me: bytes) -> VerifyTaskCheck:
    """What a verifier checks before judging (the task's and the result's signatures already checked).

    The verifier judges only a result of an election it is a verifier of: the client's signed BidSet for the
    request, the result signed by rank ``attempt`` of it and naming that set, every lower rank covered by
    signed evidence (the client's, as in the Assignment) or by the executor's own signed testimony
    (``InferenceResult.witnessed``), and this peer among the ``quorum`` ranks right after the executor.
    """
    r = result.message
    if not task.bid_set:
        return VerifyTaskCheck(VerifyRefusal.NO_ELECTION, "the verify task carries no signed bid set")
    try:
        signed_set = decode_bid_set(task.bid_set)
    except WireError as exc:
        return VerifyTaskCheck(VerifyRefusal.BAD_ELECTION, f"the bid set is not a valid signed BidSet: {exc.reason}")
    if signed_set.signer != task.request.client:
        return VerifyTaskCheck(VerifyRefusal.BAD_ELECTION, "the bid set is not signed by the request's client")
    if signed_set.message.request_id != r.request_id:
        return VerifyTaskCheck(VerifyRefusal.BAD_ELECTION, "the bid set is for another request")
    if r.election != signed_set.message_id:
        return VerifyTaskCheck(VerifyRefusal.RESULT_NOT_OF_ELECTION, "the result names another election")
    ranking = [x.public_key for x in ranking_of(signed_set.message).ranking]
    if r.attempt >= len(ranking) or ranking[r.attempt] != result.signer:
        return VerifyTaskCheck(VerifyRefusal.EXECUTOR_NOT_AT_RANK,
                               f"the result's executor is not rank {r.attempt} of the election")
    if me not in ranking[r.attempt + 1: r.attempt + 1 + task.quorum]:
        return VerifyTaskCheck(VerifyRefusal.NOT_A_VERIFIER,
                               f"this peer is not one of the {task.quorum} ranks after the executor's")
    if task.inherited_tokens != r.inherited_tokens or (r.attempt == 0 and r.inherited_tokens):
        return VerifyTaskCheck(VerifyRefusal.BAD_FAILOVER_EVIDENCE,
                               "the inherited count is not the executor's signed one, or inherited at attempt 0")
    if r.attempt == 0:
        return VerifyTaskCheck(None)
    lower = ranking[:r.attempt]
    problem, answered = failover_evidence_problem(task.evidence, set(lower), r.request_id,
                                                  r.output_ids[:r.inherited_tokens])
    if problem is not None:
        return VerifyTaskCheck(VerifyRefusal.BAD_FAILOVER_EVIDENCE, problem)
    missing = [k for k in lower if k not in answered and k not in r.witnessed]
    if missing:
        return VerifyTaskCheck(VerifyRefusal.NO_FAILOVER_EVIDENCE,
                               f"{len(missing)} lower rank(s) left no signed refusal or tokens and the executor "
                               "did not sign that it asked them")
    return VerifyTaskCheck(None)
