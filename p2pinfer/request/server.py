"""The peer side of the request path: answer offers with VRF bids, execute assignments we won.

A :class:`TaskServer` is installed on a running :class:`~p2pinfer.net.Node` and serves two protocols:

* ``/p2pinfer/bid/1``: a signed ``TaskOffer`` in, a signed ``VrfBid`` (or ``Refusal``) out. A peer that serves
  the model and has a free slot always bids: the VRF, not the peer, decides who wins.
* ``/p2pinfer/task/1``: a signed ``Assignment`` in; the peer re-runs the election on the attached bids and
  refuses (``not-winner``) unless it holds the rank the assignment names. Then it streams ``TokenChunk``s
  and ends with the signed ``InferenceResult`` carrying the logit fingerprints.

Generation runs in worker threads (``TokenStream``), so one peer serves up to ``slots`` requests at once
without blocking its event loop; beyond that it answers ``busy``. It also answers ``busy`` to a remote peer
that sends offers faster than :data:`~p2pinfer.request.limits.OFFER_RATE` (see docs/limits.md).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Sequence

import trio

from .. import vrf
from ..election import NotElected, check_won, elect, make_bid
from ..identity import Identity
from ..log import get_logger
from ..net import FrameStream, NetError, Node
from ..runtime import GeneratedToken, LoadedModel, SamplingParams, TokenStream, generate, sampling_seed
from ..wire import (
    Assignment,
    InferenceResult,
    ModelOffer,
    Refusal,
    ReplayGuard,
    Request,
    TaskOffer,
    TokenChunk,
    VrfBid,
    WireError,
    decode_signed,
    encode_signed,
    now_ms,
    tagged_hash,
)
from ..wire.messages import MAX_NEW_TOKENS
from ..errors import P2PInferError
from .limits import OFFER_RATE, OVER_LIMIT_DELAY_S, PeerRateLimiter
from .protocol import (
    BID_PROTOCOL,
    MAX_OFFER_FRAME,
    MAX_TASK_FRAME,
    OFFER_TTL_MS,
    REQUEST_MAX_AGE_MS,
    REQUEST_MAX_SKEW_MS,
    TASK_PROTOCOL,
)

log = get_logger("p2pinfer.server")

MAX_TOKENS_PER_CHUNK = 256  # the TokenChunk schema's limit


class InvalidOffer(P2PInferError):
    """An offer that cannot be answered at all (its bytes are not a valid signed offer)."""


def measure_decode_speed(model: LoadedModel, tokens: int = 16) -> float:
    """Greedy decode tokens/s on this machine (blocking; run it in a worker thread)."""
    prompt = model.prompt_ids(prompt="The quick brown fox")
    started = time.perf_counter()
    result = generate(model, prompt, max_tokens=tokens, stop_at_eos=False)
    return len(result.output_ids) / max(time.perf_counter() - started, 1e-9)


def model_offer(model: LoadedModel, decode_tokens_per_s: float = 0.0) -> ModelOffer:
    return ModelOffer(
        digest=model.digest,
        name=model.name[:128] or model.digest.hex()[:16],
        numeric_class=model.numeric_class,
        context_length=model.context_length,
        max_new_tokens=min(MAX_NEW_TOKENS, max(1, model.context_length - 1)),
        decode_tokens_per_s=float(decode_tokens_per_s),
    )


RECENT_TASKS = 32


@dataclass(frozen=True)
class TaskRecord:
    """One task this peer executed (or started to): for ``p2pinfer status``."""

    request_id: str  # hex
    client: str  # peer ID
    model: str
    tokens: int
    outcome: str  # the finish reason ("stop", "length") or "failed:<reason>"
    started_at_ms: int
    finished_at_ms: int


class TaskServer:
    """Serves offers and assignments.

    ``counters`` (read by metrics and ``p2pinfer status``; plain integer updates, nothing else on the hot path):
    ``offers``, ``offers.rate_limited`` (refused busy: the sender exceeded its rate, see
    :mod:`p2pinfer.request.limits`), ``bids``, ``refused.<code>`` (offers and assignments we refused),
    ``elections.won`` (assignments accepted: we held the rank the assignment names), ``tasks.completed``,
    ``tasks.failed``, ``tokens.generated``. ``recent`` holds the last :data:`RECENT_TASKS` tasks.
    """

    def __init__(self, node: Node, identity: Identity, models: Sequence[LoadedModel], *, slots: int = 2,
                 decode_speeds: dict[bytes, float] | None = None) -> None:
        if slots < 1:
            raise ValueError("a peer needs at least one slot")
        self.node = node
        self.identity = identity
        self.models = {m.digest: m for m in models}
        self.slots = slots
        self.free_slots = slots
        self.decode_speeds = decode_speeds or {}
        self.completed = 0
        self.busy = 0
        self.max_busy = 0  # most requests ever run at once (observability; tests check concurrency)
        self.counters: Counter[str] = Counter()
        self.recent: deque[TaskRecord] = deque(maxlen=RECENT_TASKS)
        # request ID -> (epoch seed, bids) of the assignments we accepted: anyone can re-check those elections
        self.recent_elections: dict[bytes, tuple[bytes, tuple[Any, ...]]] = {}
        self._vrf_key = vrf.SecretKey(identity.seed)
        self._assignments = ReplayGuard()
        self._offer_rate = PeerRateLimiter(OFFER_RATE)

    def install(self) -> None:
        self.node.register_request_handler(BID_PROTOCOL, self._on_offer, max_frame=MAX_OFFER_FRAME)
        self.node.register_handler(TASK_PROTOCOL, self._on_task, max_frame=MAX_TASK_FRAME, timeout=30.0)
        self.node.update_capacity(
            models=[model_offer(m, self.decode_speeds.get(d, 0.0)) for d, m in self.models.items()],
            free_slots=self.free_slots, total_slots=self.slots)

    # ---- offers -> bids ---------------------------------------------------------------------------

    async def _on_offer(self, peer_id: str, body: bytes) -> bytes:
        # The rate is checked before any signature work; an over-limit offer is answered late (see limits.py).
        over_limit = peer_id != self.node.peer_id and not self._offer_rate.allow(peer_id, trio.current_time())
        if over_limit:
            await trio.sleep(OVER_LIMIT_DELAY_S)
        try:
            offer: TaskOffer = decode_signed(body, expect=TaskOffer, max_size=MAX_OFFER_FRAME).message
        except WireError as exc:
            log.info("offer.rejected", peer_id=peer_id, reason=exc.reason, error=str(exc)[:200])
            raise InvalidOffer(f"invalid offer: {exc}") from None
        self.counters["offers"] += 1
        if over_limit:
            self.counters["offers.rate_limited"] += 1
            log.debug("offer.rate_limited", peer_id=peer_id)
            return self._refusal(offer.request_id, "busy",
                                 f"more than {OFFER_RATE.per_second:g} offers/s (burst {OFFER_RATE.burst}) from "
                                 "this peer; back off and retry")
        now = now_ms()
        if not now < offer.expires_at_ms <= now + OFFER_TTL_MS + REQUEST_MAX_SKEW_MS:
            return self._refusal(offer.request_id, "expired", "the offer has expired or expires too far ahead")
        if offer.model not in self.models:
            return self._refusal(offer.request_id, "not-serving", "this peer does not serve that model")
        if self.free_slots <= 0:
            return self._refusal(offer.request_id, "busy", f"all {self.slots} slots are in use")
        bid = make_bid(self._vrf_key, offer.request_id, offer.epoch_seed)
        self.counters["bids"] += 1
        return encode_signed(self.identity, VrfBid(bid=bid, model=offer.model, free_slots=self.free_slots))

    def _refusal(self, request_id: bytes, code: str, message: str) -> bytes:
        self.counters[f"refused.{code}"] += 1
        return encode_signed(self.identity, Refusal(request_id=request_id, code=code, message=message[:512]))

    # ---- assignments -> tokens ----------------------------------------------------------------------

    async def _on_task(self, frames: FrameStream) -> None:
        body = await frames.receive(timeout=10.0)
        if body is None:
            return
        try:
            signed = decode_signed(body, expect=Assignment, max_size=MAX_TASK_FRAME)
        except WireError as exc:
            log.info("task.rejected", peer_id=frames.remote_peer_id, reason=exc.reason, error=str(exc)[:200])
            return  # the handler closes the stream; the client sees it closed without a result
        assignment: Assignment = signed.message
        request = assignment.request
        request_id = request.request_id()
        refusal = self._check_assignment(signed.signer, assignment, request_id)
        if refusal is not None:
            code, message = refusal
            log.info("task.refused", request_id=request_id.hex()[:16], code=code, message=message)
            await frames.send(self._refusal(request_id, code, message))
            return
        self.counters["elections.won"] += 1
        self.recent_elections[request_id] = (assignment.epoch_seed, tuple(assignment.bids))  # for the network page
        while len(self.recent_elections) > RECENT_TASKS:
            del self.recent_elections[next(iter(self.recent_elections))]
        model = self.models[request.model]
        try:
            prompt_ids = model.prompt_ids(
                prompt=request.prompt,
                messages=None if request.messages is None else [{"role": m.role, "content": m.content}
                                                                 for m in request.messages])
            stream = TokenStream(
                model, prompt_ids, max_tokens=request.max_tokens,
                params=SamplingParams(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p),
                seed_material=sampling_seed(request_id, request.seed), stop=request.stop,
                prefix_ids=assignment.prefix_ids)
        except (ValueError, P2PInferError) as exc:
            await frames.send(self._refusal(request_id, "invalid", f"cannot run this request: {exc}"))
            return
        self._take_slot()
        try:
            await self._execute(frames, request, request_id, model, stream)
        finally:
            self._release_slot()

    def _check_assignment(self, signer: bytes, assignment: Assignment, request_id: bytes) -> tuple[str, str] | None:
        request = assignment.request
        if signer != request.client:
            return "invalid", "the assignment must be signed by the client named in the request"
        now = now_ms()
        if request.created_at_ms < now - REQUEST_MAX_AGE_MS or request.created_at_ms > now + REQUEST_MAX_SKEW_MS:
            return "expired", "the request was created too long ago (or in the future)"
        if request.model not in self.models:
            return "not-serving", "this peer does not serve that model"
        try:
            check_won(elect(request_id, assignment.epoch_seed, assignment.bids), self.identity.public_key,
                      attempt=assignment.attempt)
        except NotElected as exc:
            return "not-winner", f"refusing the task: {exc}"
        if self.free_slots <= 0:  # before the replay check: the client may retry once a slot is free
            return "busy", f"all {self.slots} slots are in use"
        try:
            self._assignments.check_and_remember(
                tagged_hash("p2pinfer/v1/assignment-seen", request_id, len(assignment.prefix_ids).to_bytes(4, "big")),
                expires_at_ms=request.created_at_ms + REQUEST_MAX_AGE_MS + REQUEST_MAX_SKEW_MS, now=now)
        except WireError:
            return "invalid", "this assignment was already received (replay)"
        return None

    async def _execute(self, frames: FrameStream, request: Request, request_id: bytes, model: LoadedModel,
                       stream: TokenStream) -> None:
        started_at = now_ms()
        log.info("task.started", request_id=request_id.hex()[:16], client=frames.remote_peer_id,
                 max_tokens=request.max_tokens)
        sent = 0
        outcome = "failed:cancelled"
        try:
            # Generation runs ahead in its own task; each frame carries every token produced while the
            # previous frame was being signed and sent, so a slow link costs fewer frames, never added latency.
            send_tokens, receive_tokens = trio.open_memory_channel[GeneratedToken](MAX_NEW_TOKENS)

            async def produce() -> None:
                async with send_tokens:
                    async for token in stream:
                        await send_tokens.send(token)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                async with receive_tokens:
                    async for first in receive_tokens:
                        batch = [first]
                        while len(batch) < MAX_TOKENS_PER_CHUNK:
                            try:
                                batch.append(receive_tokens.receive_nowait())
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        chunk = TokenChunk(request_id=request_id, index=first.index,
                                           token_ids=tuple(t.token_id for t in batch),
                                           text="".join(t.text for t in batch))
                        await frames.send(encode_signed(self.identity, chunk))
                        sent += len(batch)
            outcome = await self._finish(frames, request_id, model, stream, started_at)
        except (NetError, WireError) as exc:
            outcome = f"failed:{exc.reason}"
            raise
        finally:
            self.counters["tokens.generated"] += sent
            self.counters["tasks.completed" if not outcome.startswith("failed") else "tasks.failed"] += 1
            self.recent.append(TaskRecord(request_id.hex(), frames.remote_peer_id, model.name, sent, outcome,
                                          started_at, now_ms()))

    async def _finish(self, frames: FrameStream, request_id: bytes, model: LoadedModel, stream: TokenStream,
                      started_at: int) -> str:
        result = stream.result
        assert result is not None
        message = InferenceResult(
            request_id=request_id,
            model=model.digest,
            numeric_class=model.numeric_class,
            executor=self.identity.public_key,
            prompt_ids=tuple(result.prompt_ids),
            output_ids=tuple(result.output_ids),
            finish_reason=result.finish_reason,
            fingerprint_format=result.fingerprint_format,
            fingerprint=result.fingerprint_bytes,
            commitment=result.commitment,
            started_at_ms=started_at,
            finished_at_ms=now_ms(),
        )
        await frames.send(encode_signed(self.identity, message))
        self.completed += 1
        log.info("task.completed", request_id=request_id.hex()[:16], tokens=len(result.output_ids),
                 finish_reason=result.finish_reason)
        return result.finish_reason

    # ---- slots ----------------------------------------------------------------------------------------

    def _take_slot(self) -> None:
        self.free_slots -= 1
        self.busy += 1
        self.max_busy = max(self.max_busy, self.busy)
        if self.free_slots == 0:  # announce only the transitions that change who may be offered work
            self.node.update_capacity(free_slots=0)

    def _release_slot(self) -> None:
        self.free_slots += 1
        self.busy -= 1
        if self.free_slots == 1:
            self.node.update_capacity(free_slots=self.free_slots)
