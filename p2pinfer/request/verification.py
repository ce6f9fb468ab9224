"""The verifier service: what every serving peer answers on ``/p2pinfer/verify/1``,
``/p2pinfer/receipt/1`` and the fraud topic. (The client's side of settlement is
:mod:`p2pinfer.request.settling`; every decision is :mod:`p2pinfer.settlement`'s.)

* ``/p2pinfer/verify/1``: a ``VerifyTask`` signed by the request's client in; the peer checks that it holds
  the result's model in the same numeric class and did not execute it, that the task is bound to the
  election (:func:`~p2pinfer.request.evidence.verify_task_problem`: the client's signed bid set, the result
  naming it, its executor at rank ``attempt`` with the failover evidence, this peer among the ``quorum`` ranks
  right after it; otherwise a signed refusal whose message starts with the
  :class:`~p2pinfer.request.evidence.VerifyRefusal` code, logged once as ``verify.unbound``, and no prefill),
  re-checks the result with one
  prefill in a worker thread (:func:`p2pinfer.fraud.recheck_result`), records and answers a signed
  ``Verdict``. It answers ``Refusal`` when it cannot judge (another model or numeric class), when all its
  verification slots are in use or the sender exceeds its rate (``busy``: it never queues; the client asks
  again after a back-off), and when it has already judged that result (``invalid``: a replayed task costs
  no second prefill and no second ledger row). When its own check fails unexpectedly it answers ``Refusal``
  with code ``internal`` (logged ``verify.internal_error``): that is this peer's own problem, never a verdict
  on the executor, and it is an answer, not silence.
* ``/p2pinfer/receipt/1``: a ``Receipt`` signed by its client, naming this peer; the peer books what
  :func:`p2pinfer.settlement.book_receipt` allows: only for a request it took part in for that client, with
  the election (signed bid set) inside, verdicts from the election's next ranks, its own clock, and never a
  penalty against itself. Receipts beyond the sender's rate (:data:`~p2pinfer.request.limits.RECEIPT_RATE`)
  are refused with an error.
* fraud topic: a proof that passes :func:`~p2pinfer.fraud.check_proof_shape` is forwarded; a peer holding
  the model re-checks it in a worker thread and books *proven* (executor penalized) or *disproven* (the
  rejecting verifiers penalized for framing), judging blame on the executor's own signed inherited count.
  Without the model it records the proof as unchecked.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Sequence

import trio

from ..fraud import InvalidProof, ProofParts, check_proof_shape, decode_result, recheck_result
from ..runtime.memory import release_freed_memory
from ..identity import Identity, peer_id_from_public_key
from ..ledger import UNCHECKED, FraudRecord, Ledger
from ..log import get_logger
from ..net import Node
from ..net.gossip import FRAUD_TOPIC
from ..settlement import book_receipt, settle_fraud_recheck, tally
from ..runtime import LoadedModel
from ..wire import (
    BidSet,
    FraudProof,
    Receipt,
    Refusal,
    ReplayGuard,
    Verdict,
    VerifyTask,
    WireError,
    codec,
    decode_signed,
    encode_signed,
    now_ms,
    sign,
    tagged_hash,
)
from ..wire.messages import MAX_BID_SET_BYTES, MAX_VERDICT_BYTES
from .evidence import VerifyRefusal, verify_task_problem
from .participation import Participations
from ..errors import P2PInferError
from .limits import RECEIPT_RATE, VERIFY_RATE, PeerRateLimiter
from .rate_gate import within_rate
from .protocol import (
    MAX_RECEIPT_FRAME,
    MAX_VERIFY_FRAME,
    RECEIPT_PROTOCOL,
    REQUEST_MAX_AGE_MS,
    REQUEST_MAX_SKEW_MS,
    VERIFY_PROTOCOL,
)

log = get_logger("p2pinfer.verification")

from .settling import BUSY_BACKOFF_MAX_S, BUSY_BACKOFF_S, MAX_FRAUD_PROOF_BYTES  # noqa: E402
FRAUD_PER_SOURCE_PER_MIN = 6          # proofs accepted from one gossip source per minute (fraud is rare)
FRAUD_RECHECK_QUEUE = 16              # re-checks waiting at once; beyond that new proofs wait for gossip again


def recheck_and_release(model, request, result):
    """:func:`~p2pinfer.fraud.recheck_result`, then the memory its prefill freed handed back to the OS: glibc
    keeps tens of MB of a 512-token verification's freed buffers otherwise (docs/models.md, "Memory")."""
    try:
        return recheck_result(model, request, result)
    finally:
        release_freed_memory()


class InvalidTask(P2PInferError):
    """A verify task or receipt that cannot be answered at all."""


# ---- peer side ----------------------------------------------------------------------------------------


class VerificationService:
    def __init__(self, node: Node, identity: Identity, models: Sequence[LoadedModel], ledger: Ledger, *,
                 slots: int = 2, participation: Participations | None = None) -> None:
        self.node = node
        self.identity = identity
        self.models = {m.digest: m for m in models}
        self.ledger = ledger
        self.slots = trio.Semaphore(max(1, slots))
        # requests this peer executed or verified (shared with the TaskServer): receipts need one
        self.participation = participation if participation is not None else Participations()
        self.slot_count = max(1, slots)
        self.counters: Counter[str] = Counter()
        self._verify_rate = PeerRateLimiter(VERIFY_RATE)
        self._receipt_rate = PeerRateLimiter(RECEIPT_RATE)
        self._verified = ReplayGuard()  # results this peer has judged: each is judged (and booked) once
        self._fraud_seen: set[bytes] = set()
        self._fraud_rate: dict[str, deque[float]] = {}
        self._fraud_queue_send, self._fraud_queue = trio.open_memory_channel[tuple[ProofParts, bytes]](
            FRAUD_RECHECK_QUEUE)

    async def start(self, nursery: trio.Nursery) -> None:
        self.node.register_request_handler(VERIFY_PROTOCOL, self._on_verify, max_frame=MAX_VERIFY_FRAME)
        self.node.register_request_handler(RECEIPT_PROTOCOL, self._on_receipt, max_frame=MAX_RECEIPT_FRAME)
        await self.node.subscribe_topic(FRAUD_TOPIC, self._validate_fraud, self._on_fraud)
        nursery.start_soon(self._recheck_loop)

    # ---- verify ---------------------------------------------------------------------------------------

    async def _on_verify(self, peer_id: str, body: bytes) -> bytes:
        # The rate is checked before any signature work; an over-limit task is answered late (see limits.py).
        over_limit = not await within_rate(self._verify_rate, peer_id, self.node.peer_id)
        try:
            signed = decode_signed(body, expect=VerifyTask, max_size=MAX_VERIFY_FRAME)
            task: VerifyTask = signed.message
            result = decode_result(task.request, task.result)
        except (WireError, InvalidProof) as exc:
            log.info("verify.invalid", peer_id=peer_id, error=str(exc)[:200])
            raise InvalidTask(f"invalid verify task: {exc}") from None
        request_id = result.message.request_id
        if signed.signer != task.request.client:
            return self._refusal(request_id, "invalid", "a verify task must be signed by the request's client")
        now = now_ms()
        if not now - REQUEST_MAX_AGE_MS <= task.issued_at_ms <= now + REQUEST_MAX_SKEW_MS:
            return self._refusal(request_id, "expired", "the verify task is too old or from the future")
        model = self.models.get(result.message.model)
        if model is None:
            return self._refusal(request_id, "not-serving", "this peer does not hold that model")
        if result.message.numeric_class != model.numeric_class:
            return self._refusal(request_id, "not-serving",
                                 f"this peer runs the model as {model.numeric_class}, not "
                                 f"{result.message.numeric_class}; it cannot judge the fingerprints")
        if result.signer == self.identity.public_key:
            return self._refusal(request_id, "invalid", "a peer never verifies its own result")
        if over_limit:
            log.debug("verify.rate_limited", peer_id=peer_id)
            return self._refusal(request_id, "busy", f"more than {VERIFY_RATE.per_second:g} verify tasks/s (burst "
                                                     f"{VERIFY_RATE.burst}) from this peer; back off and retry")
        # Only a verifier of the result's election judges it (ranking the bid set verifies its VRF proofs,
        # ~0.35 ms each: off the event loop). Nothing is run or booked otherwise.
        check = await trio.to_thread.run_sync(verify_task_problem, task, result, self.identity.public_key)
        if check.problem is not None:
            self.counters[f"verify.unbound.{check.problem}"] += 1
            log.info("verify.unbound", peer_id=peer_id, request_id=request_id.hex()[:16], reason=check.problem,
                     detail=check.detail[:200])
            unsigned = check.problem in (VerifyRefusal.NO_ELECTION, VerifyRefusal.BAD_ELECTION)
            code = "invalid" if unsigned else "not-winner"
            return self._refusal(request_id, code, f"{check.problem}: {check.detail}; a verify task must carry the "
                                                   "client's signed bid set and go to the ranks right after the "
                                                   "executor's")
        try:  # refuse rather than queue: a queue of prefills is work nobody bounded
            self.slots.acquire_nowait()
        except trio.WouldBlock:
            return self._refusal(request_id, "busy", f"all {self.slot_count} verification slots are in use")
        try:
            # After the busy checks, so that a task refused busy may be sent again once a slot is free.
            self._verified.check_and_remember(
                tagged_hash("p2pinfer/v1/verify-seen", result.message_id),
                expires_at_ms=task.issued_at_ms + REQUEST_MAX_AGE_MS + REQUEST_MAX_SKEW_MS, now=now)
        except WireError:
            self.slots.release()
            return self._refusal(request_id, "invalid", "this peer has already judged this result (replay); "
                                                        "its verdict was sent once")
        try:
            started = time.perf_counter()
            try:
                verdict = await trio.to_thread.run_sync(recheck_and_release, model, task.request, result)
            except Exception as exc:  # noqa: BLE001 - our own bug or resource failure, never the executor's fault
                # A verifier that cannot finish its own check says so, signed, as an "internal" refusal: it is
                # neither a verdict (the executor did nothing provably wrong) nor silence (this peer answered).
                log.warning("verify.internal_error", request_id=request_id.hex()[:16], error=type(exc).__name__,
                            detail=str(exc)[:200])
                return self._refusal(request_id, "internal",
                                     "this verifier could not finish its check (internal error); ask another")
            seconds = time.perf_counter() - started
        finally:
            self.slots.release()
        r = result.message
        message = Verdict(request_id=request_id, result_hash=result.message_id, accept=verdict.accept,
                          first_bad_position=verdict.first_bad_position, reason=verdict.reason[:200],
                          max_deviation=min(float(verdict.max_deviation), 1e9), issued_at_ms=now_ms(),
                          executor=r.executor, output_tokens=len(r.output_ids), inherited_tokens=r.inherited_tokens,
                          election=r.election)
        signed_verdict = sign(self.identity, message)
        self.participation.remember(request_id, task.request.client, result.message_id)
        await trio.to_thread.run_sync(self.ledger.record_verdict, signed_verdict)
        self.counters["verify.accept" if verdict.accept else "verify.reject"] += 1
        log.info("verify.answered", request_id=request_id.hex()[:16], accept=verdict.accept,
                 first_bad=verdict.first_bad_position, reason=verdict.reason[:120] or None,
                 tokens=len(result.message.output_ids), seconds=round(seconds, 3))
        return signed_verdict.to_bytes()

    def _refusal(self, request_id: bytes, code: str, message: str) -> bytes:
        self.counters[f"verify.refused.{code}"] += 1
        return encode_signed(self.identity, Refusal(request_id=request_id, code=code, message=message[:512]))

    # ---- receipts -------------------------------------------------------------------------------------

    async def _on_receipt(self, peer_id: str, body: bytes) -> bytes:
        if not await within_rate(self._receipt_rate, peer_id, self.node.peer_id):
            self.counters["receipt.rate_limited"] += 1
            raise InvalidTask(f"busy: more than {RECEIPT_RATE.per_second:g} receipts/s (burst {RECEIPT_RATE.burst}) "
                              "from this peer; back off and send it again")
        try:
            signed = decode_signed(body, expect=Receipt, max_size=MAX_RECEIPT_FRAME)
            verdicts = [decode_signed(v, expect=Verdict, max_size=MAX_VERDICT_BYTES) for v in signed.message.verdicts]
        except WireError as exc:
            raise InvalidTask(f"invalid receipt: {exc}") from None
        receipt = signed.message
        me = self.identity.public_key
        if signed.signer != receipt.client:
            raise InvalidTask("a receipt must be signed by the client it names")
        if me != receipt.executor and me not in receipt.verifiers:
            raise InvalidTask("this receipt does not name this peer")
        bid_set = None
        if receipt.bid_set:
            try:
                bid_set = decode_signed(receipt.bid_set, expect=BidSet, max_size=MAX_BID_SET_BYTES)
            except WireError as exc:
                raise InvalidTask(f"invalid receipt: its bid set: {exc}") from None
        seen = self.participation.lookup(receipt.request_id, receipt.result_hash)
        # re-ranking the bid set verifies every VRF proof in it (~0.35 ms each): off the event loop
        booking = await trio.to_thread.run_sync(
            lambda: book_receipt(receipt, verdicts, bid_set, me=me, now_ms=now_ms(), seen=seen))
        if not booking.accepted:
            self.counters[f"receipt.refused.{booking.problem}"] += 1
            log.info("receipt.refused", request_id=receipt.request_id.hex()[:16], peer_id=peer_id,
                     reason=booking.problem)
            raise InvalidTask(f"receipt not booked: {booking.problem}")
        stored = await trio.to_thread.run_sync(self.ledger.record_receipt, signed, list(booking.entries))
        self.counters["receipt.stored" if stored else "receipt.duplicate"] += 1
        log.info("receipt.recorded", request_id=receipt.request_id.hex()[:16], outcome=receipt.outcome,
                 entries=len(booking.entries), duplicate=not stored)
        return b""

    # ---- fraud proofs ---------------------------------------------------------------------------------

    def _validate_fraud(self, data: bytes, source: str | None) -> bool:
        """Runs before a proof is accepted or forwarded: size, rate, signatures, consistency."""
        if len(data) > MAX_FRAUD_PROOF_BYTES:
            self.counters["fraud.dropped.oversized"] += 1
            return False
        now = trio.current_time()
        if source is not None and source != self.node.peer_id:
            window = self._fraud_rate.setdefault(source, deque())
            while window and window[0] < now - 60:
                window.popleft()
            if len(window) >= FRAUD_PER_SOURCE_PER_MIN:
                self.counters["fraud.dropped.rate"] += 1
                return False
            window.append(now)
        try:
            check_proof_shape(decode_signed(data, expect=FraudProof, max_size=MAX_FRAUD_PROOF_BYTES).message)
        except (WireError, InvalidProof) as exc:
            self.counters["fraud.dropped.invalid"] += 1
            log.info("fraud.invalid", source=source, error=str(exc)[:200])
            return False
        return True

    async def _on_fraud(self, data: bytes) -> None:
        proof = decode_signed(data, expect=FraudProof, max_size=MAX_FRAUD_PROOF_BYTES).message
        parts = check_proof_shape(proof)
        await self.handle_fraud_proof(parts, data)

    async def handle_fraud_proof(self, parts: ProofParts, data: bytes) -> None:
        if parts.result_hash in self._fraud_seen:
            return
        self._fraud_seen.add(parts.result_hash)
        self.counters["fraud.received"] += 1
        model = self.models.get(parts.result.message.model)
        if model is None or model.numeric_class != parts.result.message.numeric_class:
            record = FraudRecord(parts.result_hash, parts.executor, parts.result.message.request_id, UNCHECKED,
                                 now_ms(), data)
            await trio.to_thread.run_sync(self.ledger.record_fraud, record)
            self.counters["fraud.unchecked"] += 1
            return
        try:
            self._fraud_queue_send.send_nowait((parts, data))
        except trio.WouldBlock:
            self._fraud_seen.discard(parts.result_hash)
            self.counters["fraud.dropped.queue-full"] += 1

    async def _recheck_loop(self) -> None:
        async for parts, data in self._fraud_queue:
            model = self.models[parts.result.message.model]
            request_id = parts.result.message.request_id
            try:
                verdict = await trio.to_thread.run_sync(recheck_and_release, model, parts.request, parts.result)
            except Exception as exc:  # noqa: BLE001 - our own failure: book nothing, keep the loop alive
                self.counters["fraud.recheck-failed"] += 1
                log.warning("fraud.recheck_failed", request_id=request_id.hex()[:16], error=type(exc).__name__,
                            detail=str(exc)[:200])
                continue
            at = now_ms()
            # Blame rests on what the executor signed (its inherited count), never on the proof's sender.
            status, entries = settle_fraud_recheck(
                accept=verdict.accept, first_bad_position=verdict.first_bad_position, executor=parts.executor,
                inherited_tokens=parts.result.message.inherited_tokens,
                rejecting_verifiers=parts.rejecting_verifiers, request_id=request_id, now_ms=at)
            record = FraudRecord(parts.result_hash, parts.executor, request_id, status, at, data)
            await trio.to_thread.run_sync(self.ledger.record_fraud, record, entries)
            self.counters[f"fraud.{status}"] += 1
            log.info("fraud.rechecked", request_id=request_id.hex()[:16], status=status,
                     executor=peer_id_from_public_key(parts.executor), reason=verdict.reason[:120] or None,
                     penalized=[peer_id_from_public_key(e.peer) for e in entries])


# ---- client side (moved: p2pinfer.request.settling; these names stay importable from here) -------------

from .settling import (Verification, ask_verifiers, build_fraud_proof, build_receipt,  # noqa: E402
                       deliver_receipt, fraud_proof_size_ok)

__all__ = ["VerificationService", "Verification", "ask_verifiers", "build_receipt", "build_fraud_proof",
           "deliver_receipt", "fraud_proof_size_ok", "tally", "codec"]
