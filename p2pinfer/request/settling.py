"""Pipeline stage 3, settlement (the client's I/O): ask the verifiers, then book, receipt and gossip.

What the evidence decides (tally, blame, entries, fraud status) is decided in :mod:`p2pinfer.settlement`;
this module only moves signed bytes: :func:`ask_verifiers` sends the signed result to the election's next
ranks over ``/p2pinfer/verify/1``, :func:`build_receipt` and :func:`build_fraud_proof` sign what the
settlement decided, :func:`deliver_receipt` sends the receipt to the executor and every verifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import trio

from ..identity import Identity, peer_id_from_public_key
from ..log import get_logger
from ..net import NetError, Node
from ..settlement import Entry, Outcome, Settlement, Tally
from ..wire import (BidSet, FraudProof, InferenceResult, Receipt, Refusal, Request, Signed, Verdict, VerifyTask,
                    WireError, decode_signed, encode_signed, now_ms, sign)
from ..wire.messages import MAX_VERDICT_BYTES
from .fanout import send_to_each
from .protocol import MAX_RECEIPT_FRAME, MAX_VERIFY_FRAME, RECEIPT_PROTOCOL, VERIFY_PROTOCOL

log = get_logger("p2pinfer.verification")

MAX_FRAUD_PROOF_BYTES = 200 * 1024   # larger proofs are not gossiped (the pubsub RPC limit is 256 KiB)
BUSY_BACKOFF_S = 0.1                  # a client asks a busy verifier again after this, doubling ...
BUSY_BACKOFF_MAX_S = 2.0              # ... up to this, until its verification timeout


@dataclass
class Verification:
    """The outcome of the verification quorum for one completion."""

    outcome: str                               # an Outcome: accepted | rejected | unverified | skipped
    verifiers: tuple[str, ...] = ()            # peer IDs asked, in ranking order
    verdicts: tuple[Signed[Verdict], ...] = ()  # the valid verdicts counted
    refusals: tuple[tuple[str, str], ...] = ()  # (peer ID, reason) of verifiers that did not judge
    tally: Tally | None = None
    receipt: Signed[Receipt] | None = None
    fraud_proof: bytes | None = None           # the signed FraudProof, when the result was rejected
    inherited_tokens: int = 0
    executor_blamed: bool = False
    seconds: float = 0.0
    entries: tuple[Entry, ...] = ()            # what this client booked in its own ledger

    @property
    def verified(self) -> bool:
        """True only when a strict majority of the verifiers asked accepted the result."""
        return self.outcome == Outcome.ACCEPTED


async def ask_verifiers(node: Node, identity: Identity, request: Request, result: Signed[InferenceResult],
                        verifiers: Sequence[bytes], inherited_tokens: int,
                        timeout: float, *, bid_set: Signed[BidSet] | None = None, evidence: Sequence[bytes] = (),
                        quorum: int | None = None) -> tuple[list[Signed[Verdict]], list[tuple[str, str]]]:
    """Send the signed result to each verifier at once; collect signed verdicts until ``timeout``.

    The task carries the election (``bid_set``), the failover evidence of the ranks below the executor and
    the quorum size (default: ``len(verifiers)``): a verifier judges only a result of an election whose
    verifier ranks it holds (:func:`p2pinfer.request.evidence.verify_task_problem`).
    """
    verdicts: list[Signed[Verdict]] = []
    refusals: list[tuple[str, str]] = []
    pending = {peer_id_from_public_key(k): k for k in verifiers}
    try:
        task = encode_signed(identity, VerifyTask(request=request, result=result.to_bytes(),
                                                  inherited_tokens=inherited_tokens, issued_at_ms=now_ms(),
                                                  bid_set=bid_set.to_bytes() if bid_set is not None else b"",
                                                  evidence=tuple(evidence),
                                                  quorum=len(verifiers) if quorum is None else quorum))
    except ValueError as exc:  # e.g. more failover evidence than a task carries: our own limit, nobody's fault
        log.info("verify.not_sent", reason=str(exc)[:200])
        return [], [(p, f"no verdict: the verify task could not be built ({str(exc)[:120]})") for p in pending]

    give_up_at = trio.current_time() + timeout

    async def ask(peer_id: str, key: bytes) -> None:
        backoff = BUSY_BACKOFF_S
        while True:
            try:
                reply = await node.request(peer_id, VERIFY_PROTOCOL, task, max_frame=MAX_VERIFY_FRAME,
                                           timeout=max(give_up_at - trio.current_time(), 0.1))
                signed = decode_signed(reply, expect=(Verdict, Refusal), max_size=MAX_VERDICT_BYTES)
            except (NetError, WireError) as exc:
                refusals.append((peer_id, f"no verdict: {str(exc)[:120]}"))
                return
            # A busy verifier refuses instead of queueing: ask again after a back-off while time is left.
            busy = signed.signer == key and isinstance(signed.message, Refusal) and signed.message.code == "busy"
            if not busy or trio.current_time() + backoff >= give_up_at:
                break
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BUSY_BACKOFF_MAX_S)
        if signed.signer != key:
            refusals.append((peer_id, "answer signed by another key"))
        elif isinstance(signed.message, Refusal):
            refusals.append((peer_id, f"refused ({signed.message.code}): {signed.message.message[:120]}"))
        else:
            verdicts.append(signed)  # type: ignore[arg-type]

    with trio.move_on_after(timeout + 1.0):
        async with trio.open_nursery() as nursery:
            for peer_id, key in pending.items():
                nursery.start_soon(ask, peer_id, key)
    answered = {peer_id_from_public_key(v.signer) for v in verdicts} | {p for p, _ in refusals}
    refusals += [(p, f"no answer within {timeout} s") for p in pending if p not in answered]
    return verdicts, refusals


def build_receipt(identity: Identity, request: Request, result: Signed[InferenceResult], s: Settlement,
                  inherited_tokens: int, bid_set: Signed[BidSet] | None) -> Signed[Receipt]:
    r = result.message
    t = s.tally
    return sign(identity, Receipt(
        request_id=r.request_id, model=r.model, client=identity.public_key, executor=r.executor,
        verifiers=t.verifiers, result_hash=result.message_id, output_tokens=len(r.output_ids),
        outcome=t.outcome, issued_at_ms=now_ms(), inherited_tokens=inherited_tokens,
        verdicts=tuple(v.to_bytes() for v in t.counted), blamed=s.blamed,
        bid_set=bid_set.to_bytes() if bid_set is not None else b""))


def build_fraud_proof(identity: Identity, request: Request, result: Signed[InferenceResult], t: Tally,
                      inherited_tokens: int) -> bytes:
    return encode_signed(identity, FraudProof(
        request=request, result=result.to_bytes(), verdicts=tuple(v.to_bytes() for v in t.rejecting()),
        inherited_tokens=inherited_tokens, issued_at_ms=now_ms()))


async def deliver_receipt(node: Node, receipt: Signed[Receipt], timeout: float = 5.0) -> int:
    """Send the signed receipt to the executor and every verifier; returns how many took it."""
    return await send_to_each(node, RECEIPT_PROTOCOL, receipt.to_bytes(),
                              [receipt.message.executor, *receipt.message.verifiers], timeout=timeout,
                              max_frame=MAX_RECEIPT_FRAME, grace=1.0, undelivered_event="receipt.undelivered")


def fraud_proof_size_ok(data: bytes) -> bool:
    return len(data) <= MAX_FRAUD_PROOF_BYTES
