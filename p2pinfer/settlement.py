"""Settlement: what a request's signed evidence decides, in one pure module (no I/O, no clock of its own).

The request path is a pipeline (docs/architecture.md): offer and election -> execution and failover ->
settlement. Everything settlement decides is decided here, once, for every party that decides it (the
client after its quorum answered, a peer that receives a receipt, a peer that re-checks a fraud proof):

* the quorum: who verifies (:func:`pick_verifiers`), how signed verdicts are counted (:func:`tally`), whose
  fault a rejection is (:func:`executor_to_blame`);
* the entries each decision books (:func:`entries_for_tally`), with the numbers below;
* which failed attempts are a peer's own fault (:class:`Fault`, :func:`entries_for_failed_attempts`);
* when a received receipt may be booked at all (:func:`book_receipt`): the rules that make bookings rest on
  evidence anyone can re-check;
* what a re-checked fraud proof books (:func:`settle_fraud_recheck`);
* which fraud records exclude an executor from elections (:data:`EXCLUDING_FRAUD`).

Units are abstract *credits*: one credit is one verified output token (docs/incentives.md explains each
number). Outcomes, entry kinds and fraud statuses are string enums: they compare equal to the strings the
ledger stores and the wire carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Iterable, Sequence

from .election import elect
from .wire import BidSet, Receipt, Signed, Verdict
from .wording import plural


class Outcome(StrEnum):
    """The quorum's decision on one result (``Verification.outcome``, ``Receipt.outcome``)."""

    ACCEPTED = "accepted"      # a strict majority of the verifiers asked accepted
    REJECTED = "rejected"      # a strict majority rejected
    UNVERIFIED = "unverified"  # no majority either way
    SKIPPED = "skipped"        # the client asked for no verification (verify="off")
    FAILED = "failed"          # no result at all


class EntryKind(StrEnum):
    CREDIT_TOKENS = "credit.tokens"
    CREDIT_VERIFICATION = "credit.verification"
    PENALTY_REJECTED = "penalty.rejected-result"
    PENALTY_OUTVOTED = "penalty.outvoted"
    PENALTY_NO_ANSWER = "penalty.no-answer"
    PENALTY_FRAMING = "penalty.false-accusation"


class FraudStatus(StrEnum):
    PROVEN = "proven"                      # re-checked with the model: the executor cheated
    PROVEN_INHERITED = "proven-inherited"  # the result is bad, but in tokens inherited from an earlier executor
    QUORUM_REJECTED = "quorum-rejected"    # a quorum this client asked rejected it (client view, not re-checked)
    DISPROVEN = "disproven"                # re-checked: the result is fine, the rejecting verifiers lied
    UNCHECKED = "unchecked"                # heard of, not re-checked (we do not hold the model): no action


class Fault(StrEnum):
    """Whose fault a failed attempt is. Only :attr:`PEER` is ever booked against anyone."""

    PEER = "peer"        # the peer's own signed or authenticated bytes show it (bad frame, token gap, ...)
    CLIENT = "client"    # ours: a frame we could not send, our cancellation, a local error
    UNPROVEN = "unproven"  # a closed connection, a stall, a failed dial: the network or either side


class ReceiptProblem(StrEnum):
    """Why a received receipt books nothing (logged as the reason code)."""

    NOT_A_PARTICIPANT = "not-a-participant"    # we took no part in this request with this client
    OTHER_RESULT = "other-result"              # it names another result than the one we saw
    NO_ELECTION = "no-election"                # no BidSet signed by the receipt's client for this request
    EXECUTOR_NOT_RANKED = "executor-not-ranked"
    WRONG_VERIFIERS = "wrong-verifiers"        # the verifiers are not the ranks right after the executor
    OUTCOME_MISMATCH = "outcome-mismatch"      # the stated outcome is not what the signed verdicts decide


# ---- numbers -------------------------------------------------------------------------------------------

CREDIT_PER_VERIFIED_TOKEN = 1        # the executor, per output token it generated, when a majority accepts
CREDIT_PER_VERIFICATION = 4          # each verifier whose verdict was counted and agrees with the decision
                                     # (or answered when no majority formed); a prefill costs ~1/8 of decoding
                                     # 32 tokens, so 4 keeps verifying attractive without beating executing
PENALTY_REJECTED_RESULT = -500       # the executor of a result a majority rejected (plus proven fraud)
PENALTY_OUTVOTED = -100              # a verifier whose verdict goes against the quorum's decision
PENALTY_NO_ANSWER = -20              # an executor whose own bytes broke the request (malformed or inconsistent)
PENALTY_FALSE_ACCUSATION = -500      # signed a rejecting verdict that a re-check proves false (framing)

AMOUNTS: dict[EntryKind, int] = {
    EntryKind.CREDIT_TOKENS: CREDIT_PER_VERIFIED_TOKEN,
    EntryKind.CREDIT_VERIFICATION: CREDIT_PER_VERIFICATION,
    EntryKind.PENALTY_REJECTED: PENALTY_REJECTED_RESULT,
    EntryKind.PENALTY_OUTVOTED: PENALTY_OUTVOTED,
    EntryKind.PENALTY_NO_ANSWER: PENALTY_NO_ANSWER,
    EntryKind.PENALTY_FRAMING: PENALTY_FALSE_ACCUSATION,
}

DEFAULT_QUORUM = 3

# A client leaves an executor out of its elections at once, whatever its history, when it holds one of these
# records about it: fraud proven by a re-check, or a result a quorum this client asked rejected (the same
# rule in docs/incentives.md, the demo and the tests; see p2pinfer.reputation).
EXCLUDING_FRAUD = frozenset({FraudStatus.PROVEN, FraudStatus.QUORUM_REJECTED})


@dataclass(frozen=True)
class Entry:
    """One credit (amount > 0) or penalty (amount < 0) for ``peer`` (an Ed25519 public key)."""

    peer: bytes
    kind: str
    amount: int
    request_id: bytes
    at_ms: int
    note: str = ""

    @property
    def is_penalty(self) -> bool:
        return self.amount < 0


def _entry(peer: bytes, kind: EntryKind, request_id: bytes, at_ms: int, note: str, amount: int | None = None) -> Entry:
    return Entry(peer, kind, AMOUNTS[kind] if amount is None else amount, request_id, at_ms, note)


# ---- the quorum ----------------------------------------------------------------------------------------


def pick_verifiers(ranking: Sequence[bytes], executed: Iterable[bytes], q: int = DEFAULT_QUORUM) -> tuple[bytes, ...]:
    """The first ``q`` keys of ``ranking`` that executed no part of the request."""
    if q < 0:
        raise ValueError("the quorum size cannot be negative")
    skip = set(executed)
    return tuple(k for k in ranking if k not in skip)[:q]


def majority(n: int) -> int:
    """Votes needed for a decision among ``n`` verifiers asked: a strict majority."""
    return n // 2 + 1


@dataclass(frozen=True)
class Tally:
    outcome: Outcome                      # accepted | rejected | unverified
    verifiers: tuple[bytes, ...]          # asked, in ranking order
    counted: tuple[Signed[Verdict], ...]  # one valid verdict per answering verifier, in verifier order
    ignored: tuple[tuple[bytes, str], ...]  # (signer, why) for verdicts that did not count
    accepts: int
    rejects: int
    outvoted: tuple[bytes, ...]           # verifiers whose verdict disagrees with the decision
    silent: tuple[bytes, ...]             # verifiers asked that sent no valid verdict
    first_bad_position: int | None        # the smallest bad position reported by the rejecting majority

    @property
    def verified(self) -> bool:
        return self.outcome == Outcome.ACCEPTED

    def rejecting(self) -> tuple[Signed[Verdict], ...]:
        return tuple(v for v in self.counted if not v.message.accept)


def tally(verdicts: Iterable[Signed[Verdict]], *, verifiers: Sequence[bytes], request_id: bytes,
          result_hash: bytes) -> Tally:
    """Count the valid verdicts of ``verifiers`` on one result and decide by strict majority.

    A verdict counts only if it is signed by one of ``verifiers``, names this request and this exact result,
    and is the first verdict from its signer. The decision needs a strict majority of the verifiers *asked*,
    so a silent verifier can never turn a minority into a decision.
    """
    asked = tuple(verifiers)
    by_signer: dict[bytes, Signed[Verdict]] = {}
    ignored: list[tuple[bytes, str]] = []
    for signed in verdicts:
        v = signed.message
        if signed.signer not in asked:
            ignored.append((signed.signer, "not a verifier of this request"))
        elif v.request_id != request_id or v.result_hash != result_hash:
            ignored.append((signed.signer, "verdict on another request or result"))
        elif signed.signer in by_signer:
            ignored.append((signed.signer, "second verdict from the same verifier"))
        else:
            by_signer[signed.signer] = signed
    counted = tuple(by_signer[k] for k in asked if k in by_signer)
    accepts = sum(1 for v in counted if v.message.accept)
    rejects = len(counted) - accepts
    need = majority(len(asked)) if asked else 1
    if accepts >= need:
        outcome = Outcome.ACCEPTED
    elif rejects >= need:
        outcome = Outcome.REJECTED
    else:
        outcome = Outcome.UNVERIFIED
    if outcome == Outcome.UNVERIFIED:
        outvoted: tuple[bytes, ...] = ()
    else:
        winning = outcome == Outcome.ACCEPTED
        outvoted = tuple(v.signer for v in counted if v.message.accept != winning)
    silent = tuple(k for k in asked if k not in by_signer)
    bad_positions = [v.message.first_bad_position for v in counted
                     if not v.message.accept and v.message.first_bad_position is not None]
    first_bad = min(bad_positions) if outcome == Outcome.REJECTED and bad_positions else None
    return Tally(outcome, asked, counted, tuple(ignored), accepts, rejects, outvoted, silent, first_bad)


def executor_to_blame(outcome: str, first_bad_position: int | None, inherited_tokens: int) -> bool:
    """Whether a rejection is the final executor's fault.

    Only if the first bad position lies at or after the tokens it inherited (signed by itself in its result):
    an earlier bad position means the inherited tokens are wrong, and an earlier executor produced them.
    """
    if outcome != Outcome.REJECTED:
        return False
    if inherited_tokens <= 0 or first_bad_position is None:
        return True
    return first_bad_position >= inherited_tokens


def entries_for_tally(t: Tally, *, executor: bytes, output_tokens: int, inherited_tokens: int,
                      request_id: bytes, at_ms: int) -> list[Entry]:
    """What one quorum decision books: the executor's credit or penalty, each counted verifier's.

    Silent verifiers book nothing: a missing answer does not show whose fault it was (the verifier's, the
    network's or the client's), and a verifier that does not answer already forgoes its credit.
    """
    out: list[Entry] = []
    if t.outcome == Outcome.ACCEPTED:
        generated = max(output_tokens - inherited_tokens, 0)
        if generated:
            out.append(_entry(executor, EntryKind.CREDIT_TOKENS, request_id, at_ms, f"{generated} verified tokens",
                              CREDIT_PER_VERIFIED_TOKEN * generated))
    elif executor_to_blame(t.outcome, t.first_bad_position, inherited_tokens):
        out.append(_entry(executor, EntryKind.PENALTY_REJECTED, request_id, at_ms,
                          f"result rejected by {t.rejects} of {plural(len(t.verifiers), 'verifier')}"))
    outvoted = set(t.outvoted)
    for signed in t.counted:
        if signed.signer in outvoted:
            out.append(_entry(signed.signer, EntryKind.PENALTY_OUTVOTED, request_id, at_ms,
                              f"verdict {'accept' if signed.message.accept else 'reject'} against a {t.outcome} quorum"))
        else:
            out.append(_entry(signed.signer, EntryKind.CREDIT_VERIFICATION, request_id, at_ms, "verification"))
    return out


def blamed_keys(t: Tally, executor: bytes, inherited_tokens: int) -> tuple[bytes, ...]:
    """The keys a decision penalizes (the receipt's ``blamed``): the executor at fault, outvoted verifiers."""
    blamed = list(t.outvoted)
    if executor_to_blame(t.outcome, t.first_bad_position, inherited_tokens):
        blamed.insert(0, executor)
    return tuple(dict.fromkeys(blamed))[:16]


# ---- the client's own settlement ------------------------------------------------------------------------


@dataclass(frozen=True)
class Settlement:
    """What the client decides once its quorum answered: entries for its ledger, fraud record, blame."""

    tally: Tally
    entries: tuple[Entry, ...]
    executor_blamed: bool
    blamed: tuple[bytes, ...]
    fraud_status: FraudStatus | None  # QUORUM_REJECTED when the executor is to blame: excluded at once

    @property
    def outcome(self) -> Outcome:
        return self.tally.outcome


def settle(t: Tally, *, executor: bytes, output_tokens: int, inherited_tokens: int, request_id: bytes,
           now_ms: int) -> Settlement:
    blamed = executor_to_blame(t.outcome, t.first_bad_position, inherited_tokens)
    return Settlement(
        tally=t,
        entries=tuple(entries_for_tally(t, executor=executor, output_tokens=output_tokens,
                                        inherited_tokens=inherited_tokens, request_id=request_id, at_ms=now_ms)),
        executor_blamed=blamed,
        blamed=blamed_keys(t, executor, inherited_tokens),
        fraud_status=FraudStatus.QUORUM_REJECTED if blamed else None,
    )


def entries_for_failed_attempts(failures: Iterable[tuple[bytes, Fault]], request_id: bytes,
                                now_ms: int) -> list[Entry]:
    """Penalties for executors whose attempt failed by their own provable fault; nothing for anything else."""
    keys = dict.fromkeys(key for key, fault in failures if fault == Fault.PEER)
    return [_entry(k, EntryKind.PENALTY_NO_ANSWER, request_id, now_ms, "executor broke the request (its own bytes)")
            for k in keys]


def entry_for_no_show(peer: bytes, request_id: bytes, at_ms: int, role: str = "executor") -> Entry:
    """The elected ``role`` broke the request by its own provable fault."""
    return _entry(peer, EntryKind.PENALTY_NO_ANSWER, request_id, at_ms, f"{role} did not deliver")


def entries_for_false_accusation(framers: Sequence[bytes], request_id: bytes, at_ms: int) -> list[Entry]:
    """Verifiers whose signed rejection a re-check with the model found false."""
    return [_entry(k, EntryKind.PENALTY_FRAMING, request_id, at_ms, "signed a rejection that re-verification disproves")
            for k in framers]


def settle_fraud_recheck(*, accept: bool, first_bad_position: int | None, executor: bytes,
                         inherited_tokens: int, rejecting_verifiers: Sequence[bytes], request_id: bytes,
                         now_ms: int) -> tuple[FraudStatus, list[Entry]]:
    """A fraud proof re-checked with the model. ``inherited_tokens`` must come from the executor's signed
    result, never from the proof's sender (who could otherwise frame an executor for tokens it inherited)."""
    if accept:
        return FraudStatus.DISPROVEN, entries_for_false_accusation(rejecting_verifiers, request_id, now_ms)
    if executor_to_blame(Outcome.REJECTED, first_bad_position, inherited_tokens):
        return FraudStatus.PROVEN, [_entry(executor, EntryKind.PENALTY_REJECTED, request_id, now_ms,
                                           "fraud proof re-checked")]
    return FraudStatus.PROVEN_INHERITED, []


# ---- receipts other parties send us ---------------------------------------------------------------------


@dataclass(frozen=True)
class Participation:
    """What a peer itself saw of a request: it executed or verified ``result_hash`` for ``client``."""

    client: bytes
    result_hash: bytes


@dataclass(frozen=True)
class Booking:
    entries: tuple[Entry, ...]
    problem: ReceiptProblem | None = None

    @property
    def accepted(self) -> bool:
        return self.problem is None


def receipt_verifiers_ok(receipt: Receipt, bid_set: BidSet) -> ReceiptProblem | None:
    """The receipt's verifiers must be exactly the ranks right after its executor in the signed election."""
    eligible = {b.public_key for b in bid_set.bids} - set(bid_set.excluded)
    ranking = [r.public_key for r in elect(bid_set.request_id, bid_set.epoch_seed, bid_set.bids,
                                           eligible=eligible).ranking]
    if receipt.executor not in ranking:
        return ReceiptProblem.EXECUTOR_NOT_RANKED
    rank = ranking.index(receipt.executor)
    expected = tuple(ranking[rank + 1: rank + 1 + len(receipt.verifiers)])
    if not receipt.verifiers or tuple(receipt.verifiers) != expected:
        return ReceiptProblem.WRONG_VERIFIERS
    return None


def book_receipt(receipt: Receipt, verdicts: Sequence[Signed[Verdict]], bid_set: Signed[BidSet] | None, *,
                 me: bytes, seen: Participation | None, now_ms: int) -> Booking:
    """The entries a peer books from a receipt its client sent it (the receipt's signature already checked).

    Rules (each a :class:`ReceiptProblem` when broken):

    * a client moves reputations only through requests it really made: the receiving peer itself executed or
      verified this request for this client (``seen``), and the receipt names that very result;
    * the receipt carries the election (the client's signed BidSet), and its verifiers are provably the
      election's next ranks after the executor;
    * a verdict counts only if signed by one of them and if it attests this executor, result and election
      (so what is credited is what the verifiers saw, not what the client says);
    * the outcome is recomputed from those verdicts;
    * booking time is the receiver's clock (``now_ms``), never the sender's;
    * a peer never books a penalty against itself from someone else's receipt.
    """
    if seen is None or seen.client != receipt.client:
        return Booking((), ReceiptProblem.NOT_A_PARTICIPANT)
    if seen.result_hash != receipt.result_hash:
        return Booking((), ReceiptProblem.OTHER_RESULT)
    if bid_set is None or bid_set.signer != receipt.client or bid_set.message.request_id != receipt.request_id:
        return Booking((), ReceiptProblem.NO_ELECTION)
    problem = receipt_verifiers_ok(receipt, bid_set.message)
    if problem is not None:
        return Booking((), problem)
    election = bid_set.message_id
    attested = [v for v in verdicts
                if v.message.executor == receipt.executor and v.message.election == election
                and v.message.output_tokens == receipt.output_tokens
                and v.message.inherited_tokens == receipt.inherited_tokens]
    t = tally(attested, verifiers=receipt.verifiers, request_id=receipt.request_id,
              result_hash=receipt.result_hash)
    if receipt.outcome != t.outcome:
        return Booking((), ReceiptProblem.OUTCOME_MISMATCH)
    entries = entries_for_tally(t, executor=receipt.executor, output_tokens=receipt.output_tokens,
                                inherited_tokens=receipt.inherited_tokens, request_id=receipt.request_id,
                                at_ms=now_ms)
    return Booking(tuple(e for e in entries if not (e.peer == me and e.is_penalty)))
