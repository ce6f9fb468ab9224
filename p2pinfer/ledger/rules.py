"""Credit and penalty rules, as pure functions of signed receipts and verdicts. The numbers live here.

Units are abstract *credits*: one credit is one verified output token. A ledger is a local record; these
rules are what every honest peer computes from the same signed evidence, so two honest ledgers agree on
everything the evidence shows (see docs/incentives.md for the rationale of each number).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..quorum import ACCEPTED, REJECTED, Tally, executor_to_blame, tally
from ..wire import Receipt, Signed, Verdict

# Credits.
CREDIT_PER_VERIFIED_TOKEN = 1        # the executor, per output token it generated, when a majority accepts
CREDIT_PER_VERIFICATION = 4          # each verifier whose verdict was counted and agrees with the decision
                                     # (or answered when no majority formed); a prefill costs ~1/8 of decoding
                                     # 32 tokens, so 4 keeps verifying attractive without beating executing
# Penalties (negative amounts).
PENALTY_REJECTED_RESULT = -500       # the executor of a result a majority rejected (plus proven fraud)
PENALTY_OUTVOTED = -100              # a verifier whose verdict goes against the quorum's decision
PENALTY_NO_ANSWER = -20              # won an election (as executor or verifier) and then did not answer
PENALTY_FALSE_ACCUSATION = -500      # signed a rejecting verdict that a re-check proves false (framing)

CREDIT_TOKENS = "credit.tokens"
CREDIT_VERIFICATION = "credit.verification"
PENALTY_REJECTED = "penalty.rejected-result"
PENALTY_AGAINST_QUORUM = "penalty.outvoted"
PENALTY_SILENT = "penalty.no-answer"
PENALTY_FRAMING = "penalty.false-accusation"

KINDS = {
    CREDIT_TOKENS: CREDIT_PER_VERIFIED_TOKEN,
    CREDIT_VERIFICATION: CREDIT_PER_VERIFICATION,
    PENALTY_REJECTED: PENALTY_REJECTED_RESULT,
    PENALTY_AGAINST_QUORUM: PENALTY_OUTVOTED,
    PENALTY_SILENT: PENALTY_NO_ANSWER,
    PENALTY_FRAMING: PENALTY_FALSE_ACCUSATION,
}


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


def receipt_tally(receipt: Receipt, verdicts: Sequence[Signed[Verdict]]) -> Tally:
    """Re-derive the quorum's decision from the signed verdicts a receipt carries (never trust ``outcome``)."""
    return tally(verdicts, verifiers=receipt.verifiers, request_id=receipt.request_id,
                 result_hash=receipt.result_hash)


def entries_for_receipt(receipt: Receipt, verdicts: Sequence[Signed[Verdict]]) -> list[Entry]:
    """Credits and penalties that a receipt and its signed verdicts justify.

    The outcome is recomputed from the verdicts; a receipt whose stated outcome disagrees gets no entries
    (its client is lying or broken), except the silent-verifier penalties, which rest on the client's word.
    """
    t = receipt_tally(receipt, verdicts)
    if receipt.outcome in (ACCEPTED, REJECTED) and t.outcome != receipt.outcome:
        return []
    at, rid = receipt.issued_at_ms, receipt.request_id
    out: list[Entry] = []
    if t.outcome == ACCEPTED:
        generated = max(receipt.output_tokens - receipt.inherited_tokens, 0)
        if generated:
            out.append(Entry(receipt.executor, CREDIT_TOKENS, CREDIT_PER_VERIFIED_TOKEN * generated, rid, at,
                             f"{generated} verified tokens"))
    elif t.outcome == REJECTED and executor_to_blame(t.outcome, t.first_bad_position, receipt.inherited_tokens):
        out.append(Entry(receipt.executor, PENALTY_REJECTED, PENALTY_REJECTED_RESULT, rid, at,
                         f"result rejected by {t.rejects} of {len(t.verifiers)} verifiers"))
    outvoted = set(t.outvoted)
    for signed in t.counted:
        if signed.signer in outvoted:
            out.append(Entry(signed.signer, PENALTY_AGAINST_QUORUM, PENALTY_OUTVOTED, rid, at,
                             f"verdict {'accept' if signed.message.accept else 'reject'} against a {t.outcome} quorum"))
        else:
            out.append(Entry(signed.signer, CREDIT_VERIFICATION, CREDIT_PER_VERIFICATION, rid, at, "verification"))
    for key in t.silent:
        out.append(Entry(key, PENALTY_SILENT, PENALTY_NO_ANSWER, rid, at, "verifier did not answer"))
    return out


def entry_for_no_show(peer: bytes, request_id: bytes, at_ms: int, role: str = "executor") -> Entry:
    """The elected ``role`` did not answer (closed, stalled, or never delivered a result)."""
    return Entry(peer, PENALTY_SILENT, PENALTY_NO_ANSWER, request_id, at_ms, f"{role} did not answer")


def entries_for_false_accusation(framers: Sequence[bytes], request_id: bytes, at_ms: int) -> list[Entry]:
    """Verifiers whose signed rejection a re-check with the model found false."""
    return [Entry(k, PENALTY_FRAMING, PENALTY_FALSE_ACCUSATION, request_id, at_ms,
                  "signed a rejection that re-verification disproves") for k in framers]
