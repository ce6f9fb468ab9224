"""The verification quorum, as pure logic: who verifies, how signed verdicts are tallied, who is outvoted.

Nothing here does I/O. The client (``p2pinfer.request.verification``) asks the verifiers, then calls
:func:`tally` on the verdicts it got back.

Rules (docs/incentives.md states them with their numbers):

* The verifiers are the first ``q`` bidders in the election ranking that did not execute any part of the
  request (neither the final executor nor an executor that failed over): :func:`pick_verifiers`.
* A verdict counts only if it is signed by one of those verifiers, names this request and this exact
  result (its ``result_hash`` is the result envelope's message ID), and is the first verdict from its signer.
* The decision needs a strict majority of the verifiers *asked*, not of those that answered:
  ``accepted`` when more than half accept, ``rejected`` when more than half reject, else ``unverified``.
  So a silent verifier can never turn a minority into a decision, and a result is never called verified
  on the word of fewer than a majority of its verifiers.
* Verifiers whose verdict disagrees with a decision are *outvoted*; verifiers asked who sent no valid
  verdict are *silent*. Neither exists when the outcome is ``unverified``... except the silent ones.
* Blame for a rejected result lands on the final executor only if the first bad position the rejecting
  verifiers report is at or after ``inherited_tokens`` (the tokens it continued from an earlier executor
  after a failover). An earlier bad position means the inherited tokens are wrong: the earlier executor
  produced them, and the final executor is not blamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .wire import Signed, Verdict

DEFAULT_QUORUM = 3
ACCEPTED = "accepted"
REJECTED = "rejected"
UNVERIFIED = "unverified"


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
    outcome: str                          # accepted | rejected | unverified
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
        return self.outcome == ACCEPTED

    def rejecting(self) -> tuple[Signed[Verdict], ...]:
        return tuple(v for v in self.counted if not v.message.accept)


def tally(verdicts: Iterable[Signed[Verdict]], *, verifiers: Sequence[bytes], request_id: bytes,
          result_hash: bytes) -> Tally:
    """Count the valid verdicts of ``verifiers`` on one result and decide by strict majority."""
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
        outcome = ACCEPTED
    elif rejects >= need:
        outcome = REJECTED
    else:
        outcome = UNVERIFIED
    if outcome == UNVERIFIED:
        outvoted: tuple[bytes, ...] = ()
    else:
        winning = outcome == ACCEPTED
        outvoted = tuple(v.signer for v in counted if v.message.accept != winning)
    silent = tuple(k for k in asked if k not in by_signer)
    bad_positions = [v.message.first_bad_position for v in counted
                     if not v.message.accept and v.message.first_bad_position is not None]
    first_bad = min(bad_positions) if outcome == REJECTED and bad_positions else None
    return Tally(outcome, asked, counted, tuple(ignored), accepts, rejects, outvoted, silent, first_bad)


def executor_to_blame(outcome: str, first_bad_position: int | None, inherited_tokens: int) -> bool:
    """Whether a rejection is the final executor's fault (see the module docstring)."""
    if outcome != REJECTED:
        return False
    if inherited_tokens <= 0 or first_bad_position is None:
        return True
    return first_bad_position >= inherited_tokens
