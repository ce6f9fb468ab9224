"""The peer side of the request path: answer offers with VRF bids, execute assignments we won.

A :class:`TaskServer` is installed on a running :class:`~p2pinfer.net.Node` and serves two protocols:

* ``/p2pinfer/bid/1``: a signed ``TaskOffer`` in, a signed ``VrfBid`` (or ``Refusal``) out. A peer that serves
  the model and has a free slot always bids: the VRF, not the peer, decides who wins.
* ``/p2pinfer/bid-set/1``: the client's signed ``BidSet`` (the final election) in; the peer checks that its own
  bid is in it, unaltered (:func:`~p2pinfer.request.evidence.bidder_problem`), and keeps a set that is not
  as signed evidence against the client (``unfair_bid_sets``: the client's signed offer, our signed bid and
  the client's signed set, which :func:`~p2pinfer.request.evidence.check_unfair_bid_set` re-checks).
* ``/p2pinfer/task/1``: a signed ``Assignment`` in; the peer re-runs the election on the client's signed
  ``BidSet`` and refuses (``not-winner``/``invalid``) unless it holds the rank the assignment names, with
  signed evidence that every lower rank failed and that ``prefix_ids`` are what they signed
  (:func:`~p2pinfer.request.evidence.assignment_problem`); a lower rank with no signed evidence must be
  asked by this peer itself on ``/p2pinfer/task-status/1``: a signed refusal or tokens, or no answer within
  :data:`~p2pinfer.request.protocol.FAILOVER_STATUS_TIMEOUT_S`, let it take over; a signed "never assigned"
  refuses the failover. Then it streams ``TokenChunk``s (each with its token chain) and ends with the signed
  ``InferenceResult``, which also signs the inherited token count, the election, the attempt and the lower
  ranks it asked itself (``witnessed``).
* ``/p2pinfer/task-status/1``: a higher rank of an election asks what became of a request; the peer answers
  its last signed ``TokenChunk`` or ``Refusal`` for it, or a signed ``TaskStatus`` (``not-assigned``,
  ``pending``). Only a higher rank of that election gets the tokens (they are the client's output).

Generation runs in worker threads (``TokenStream``), so one peer serves up to ``slots`` requests at once
without blocking its event loop; beyond that it answers ``busy``. It also answers ``busy`` to a remote peer
that sends offers faster than :data:`~p2pinfer.request.limits.OFFER_RATE` (see docs/limits.md).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Sequence

import trio

from .. import vrf
from ..election import make_bid
from ..identity import Identity, peer_id_from_public_key
from ..log import get_logger
from ..net import FrameStream, NetError, Node
from ..runtime import GeneratedToken, LoadedModel, SamplingParams, TokenStream, generate, sampling_seed
from ..wire import (
    Assignment,
    BidSet,
    TaskStatus,
    TaskStatusQuery,
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
    sign,
    tagged_hash,
)
from ..wire.messages import MAX_NEW_TOKENS
from ..errors import P2PInferError
from .evidence import (StatusAnswer, UnfairBidSet, assignment_problem, chain_start, check_unfair_bid_set,
                       classify_status_answer, decode_bid_set, extend_chain)
from .participation import Participations
from .limits import OFFER_RATE, STATUS_RATE, PeerRateLimiter
from .rate_gate import within_rate
from .protocol import (
    BID_PROTOCOL,
    BID_SET_PROTOCOL,
    FAILOVER_STATUS_TIMEOUT_S,
    HEARTBEAT_S,
    MAX_BID_SET_FRAME,
    MAX_OFFER_FRAME,
    MAX_TASK_FRAME,
    OFFER_TTL_MS,
    REQUEST_MAX_AGE_MS,
    REQUEST_MAX_SKEW_MS,
    TASK_PROTOCOL,
    TASK_STATUS,
)

log = get_logger("p2pinfer.server")

MAX_TOKENS_PER_CHUNK = 256  # the TokenChunk schema's limit
MAX_OPEN_BIDS = 4096        # bids remembered until their bid set arrives (oldest forgotten first)
MAX_UNFAIR_BID_SETS = 64    # signed bid sets that omitted or altered our bid, kept as evidence
MAX_TASK_STATES = 1024      # requests whose last signed word we keep for status queries (oldest forgotten)


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


@dataclass(frozen=True)
class SeenElection:
    """A client's signed election this peer received: as a bidder (the ``BidSet`` the client sent every bidder)
    or as the executor (the set inside the assignment). Its signature was checked; the network page re-checks
    every VRF proof in it."""

    bid_set: BidSet
    client: bytes  # the public key that signed the offer and the set
    model: bytes
    executed: bool  # we accepted an assignment of this request


@dataclass
class TaskState:
    """What this peer last signed for one assignment it received: for a failover candidate's status query."""

    election: bytes               # the BidSet's message ID the assignment was checked against
    ranking: tuple[bytes, ...]    # that election's ranking (who may ask: a higher rank)
    rank: int
    last_word: bytes = b""        # our last signed TokenChunk or Refusal for it; empty while still checking


class NotEntitled(P2PInferError):
    """A status query from a peer that is no higher rank of the election it names."""


class TaskServer:
    """Serves offers and assignments.

    ``counters`` (read by metrics and ``p2pinfer status``; plain integer updates, nothing else on the hot path):
    ``offers``, ``offers.rate_limited`` (refused busy: the sender exceeded its rate, see
    :mod:`p2pinfer.request.limits`), ``bids``, ``refused.<code>`` (offers and assignments we refused),
    ``elections.won`` (assignments accepted: we held the rank the assignment names), ``tasks.completed``,
    ``tasks.failed``, ``tokens.generated``. ``recent`` holds the last :data:`RECENT_TASKS` tasks.
    """

    def __init__(self, node: Node, identity: Identity, models: Sequence[LoadedModel], *, slots: int = 2,
                 decode_speeds: dict[bytes, float] | None = None,
                 participation: Participations | None = None) -> None:
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
        # request ID -> the client's signed election as we received it (as a bidder, or in an assignment we
        # accepted): the network page re-checks every VRF proof in it
        self.recent_elections: OrderedDict[bytes, SeenElection] = OrderedDict()
        self._vrf_key = vrf.SecretKey(identity.seed)
        self._assignments = ReplayGuard()
        self.participation = participation if participation is not None else Participations()
        self._open_bids: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()  # request ID -> (offer, our bid)
        self.unfair_bid_sets: deque[UnfairBidSet] = deque(maxlen=MAX_UNFAIR_BID_SETS)
        self._offer_rate = PeerRateLimiter(OFFER_RATE)
        self._status_rate = PeerRateLimiter(STATUS_RATE)
        self._task_states: OrderedDict[bytes, TaskState] = OrderedDict()  # request ID -> our last signed word

    def install(self) -> None:
        self.node.register_request_handler(BID_PROTOCOL, self._on_offer, max_frame=MAX_OFFER_FRAME)
        self.node.register_handler(TASK_PROTOCOL, self._on_task, max_frame=MAX_TASK_FRAME, timeout=30.0)
        self.node.register_request_handler(BID_SET_PROTOCOL, self._on_bid_set, max_frame=MAX_BID_SET_FRAME)
        self.node.register_request_handler(TASK_STATUS, self._on_status)
        self.node.update_capacity(
            models=[model_offer(m, self.decode_speeds.get(d, 0.0)) for d, m in self.models.items()],
            free_slots=self.free_slots, total_slots=self.slots)

    # ---- offers -> bids ---------------------------------------------------------------------------

    async def _on_offer(self, peer_id: str, body: bytes) -> bytes:
        # The rate is checked before any signature work; an over-limit offer is answered late (see limits.py).
        over_limit = not await within_rate(self._offer_rate, peer_id, self.node.peer_id)
        try:
            signed_offer = decode_signed(body, expect=TaskOffer, max_size=MAX_OFFER_FRAME)
            offer: TaskOffer = signed_offer.message
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
        reply = encode_signed(self.identity, VrfBid(bid=bid, model=offer.model, free_slots=self.free_slots))
        self._open_bids[offer.request_id] = (body, reply)  # kept until the bid set comes: evidence if unfair
        while len(self._open_bids) > MAX_OPEN_BIDS:
            self._open_bids.popitem(last=False)
        return reply

    def _refusal(self, request_id: bytes, code: str, message: str) -> bytes:
        self.counters[f"refused.{code}"] += 1
        return encode_signed(self.identity, Refusal(request_id=request_id, code=code, message=message[:512]))

    # ---- the client's signed bid set ----------------------------------------------------------------

    async def _on_bid_set(self, peer_id: str, body: bytes) -> bytes:
        try:
            signed = decode_bid_set(body)
        except WireError as exc:
            log.info("bid_set.rejected", peer_id=peer_id, reason=exc.reason)
            raise InvalidOffer(f"invalid bid set: {exc}") from None
        known = self._open_bids.get(signed.message.request_id)
        if known is None:
            self.counters["bid_set.unknown"] += 1
            return b""
        client = decode_signed(known[0], expect=TaskOffer, max_size=MAX_OFFER_FRAME)
        if signed.signer != client.signer:
            self.counters["bid_set.foreign"] += 1  # not the offering client's: proves nothing about anyone
            return b""
        if peer_id != client.signer_peer_id:
            # Forwarded by someone else (an executor's failover probe, or anyone): an honest client sends its
            # set only to the bidders in it, so only a set the client itself delivered can accuse it.
            self.counters["bid_set.forwarded"] += 1
            return b""
        # the election as its client told us (for the network page; a forwarded copy proves and shows nothing)
        self._remember_election(signed.message, client.signer, client.message.model, executed=False)
        evidence = UnfairBidSet(offer=known[0], bid=known[1], bid_set=body)
        problem = check_unfair_bid_set(evidence)
        if problem is None:
            self.counters["bid_set.fair"] += 1
            return b""
        # The client's signed offer, our signed bid and the client's signed set without it: anyone re-checks it.
        self.counters["bid_set.unfair"] += 1
        self.unfair_bid_sets.append(evidence)
        log.warning("bid_set.unfair", request_id=signed.message.request_id.hex()[:16], client=peer_id,
                    reason=problem)
        return b""

    def _remember_election(self, bid_set: BidSet, client: bytes, model: bytes, *, executed: bool) -> None:
        """Keep a client-signed election for the network page (bounded: the oldest are forgotten)."""
        self.recent_elections[bid_set.request_id] = SeenElection(bid_set, client, model, executed)
        self.recent_elections.move_to_end(bid_set.request_id)
        while len(self.recent_elections) > RECENT_TASKS:
            self.recent_elections.popitem(last=False)

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
        election_id, witnessed = b"", ()
        state: TaskState | None = None
        if refusal is None:
            refusal, election_id, witnessed, state = await self._check_election(assignment, request_id)
        if refusal is None:  # no await from here to taking the slot
            refusal = self._claim(assignment, request_id)
        if refusal is not None:
            code, message = refusal
            log.info("task.refused", request_id=request_id.hex()[:16], code=code, message=message)
            body = self._refusal(request_id, code, message)
            if state is not None and not state.last_word:
                state.last_word = body  # a failover candidate asking us later gets this signed refusal
            await frames.send(body)
            return
        self.counters["elections.won"] += 1
        self._remember_election(decode_bid_set(assignment.bid_set).message, request.client, request.model,
                                executed=True)
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
            body = self._refusal(request_id, "invalid", f"cannot run this request: {exc}")
            if state is not None:
                state.last_word = body
            await frames.send(body)
            return
        assert state is not None  # the election check passed
        self._take_slot()
        try:
            await self._execute(frames, request, request_id, model, stream, assignment, election_id, witnessed,
                                state)
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
        return None

    def _claim(self, assignment: Assignment, request_id: bytes) -> tuple[str, str] | None:
        """A free slot, and this assignment seen for the first time (called right before taking the slot)."""
        request = assignment.request
        now = now_ms()
        if self.free_slots <= 0:  # before the replay check: the client may retry once a slot is free
            return "busy", f"all {self.slots} slots are in use"
        try:
            self._assignments.check_and_remember(
                tagged_hash("p2pinfer/v1/assignment-seen", request_id, len(assignment.prefix_ids).to_bytes(4, "big")),
                expires_at_ms=request.created_at_ms + REQUEST_MAX_AGE_MS + REQUEST_MAX_SKEW_MS, now=now)
        except WireError:
            return "invalid", "this assignment was already received (replay)"
        return None

    async def _check_election(self, assignment: Assignment, request_id: bytes
                              ) -> tuple[tuple[str, str] | None, bytes, tuple[bytes, ...], TaskState | None]:
        """The executor is the election's: the client's signed bid set, our rank, the failover evidence.

        Returns (refusal or None, the bid set's message ID, the lower ranks we asked ourselves, our task state).
        """
        # ranking the bid set verifies every VRF proof in it (~0.35 ms each): off the event loop
        check = await trio.to_thread.run_sync(assignment_problem, assignment, request_id, self.identity.public_key)
        if check.problem is not None:
            return (check.code, f"refusing the task: {check.problem}"), b"", (), None
        assert check.election is not None
        ranking = tuple(r.public_key for r in check.election.ranking)
        state = self._task_states.get(request_id)
        if state is None or state.election != check.bid_set_id:  # a replayed assignment keeps what we signed
            state = self._task_state(request_id, TaskState(check.bid_set_id, ranking, assignment.attempt))
        if not check.unanswered:
            return None, check.bid_set_id, (), state
        # A lower rank the client holds no signed word from: we ask it ourselves what became of the request.
        try:
            answers = await self._ask_lower_ranks(check.unanswered, request_id, check.bid_set_id)
        except BaseException:
            if not state.last_word:  # abandoned while asking: never "pending" for good (that would block rank k+1)
                state.last_word = self._refusal(request_id, "invalid", "the assignment was abandoned before this "
                                                                       "peer answered; it did not run it")
            raise
        alive = [k for k, a in answers.items() if a is StatusAnswer.NOT_FAILED]
        if alive:
            self.counters["refused.skipped-rank"] += 1
            peer_id = peer_id_from_public_key(alive[0])
            return ("not-winner", f"refusing the task: lower rank {peer_id} is reachable and says it was not "
                                  "assigned this request or is still checking it (failover needs evidence "
                                  "that lower ranks failed)"), b"", (), state
        silent = [k for k, a in answers.items() if a is StatusAnswer.SILENT]
        self.counters["failover.witnessed_silent"] += len(silent)
        log.info("task.failover_witnessed", request_id=request_id.hex()[:16], attempt=assignment.attempt,
                 silent=[peer_id_from_public_key(k) for k in silent], failed=len(answers) - len(silent))
        # Our result signs that we asked these ranks (they refused, took the task, or stayed silent).
        return None, check.bid_set_id, tuple(answers), state

    async def _ask_lower_ranks(self, keys: Sequence[bytes], request_id: bytes,
                               election: bytes) -> dict[bytes, StatusAnswer]:
        """Ask each lower rank for its status at once, each within FAILOVER_STATUS_TIMEOUT_S."""
        query = encode_signed(self.identity, TaskStatusQuery(request_id=request_id, election=election))
        answers: dict[bytes, StatusAnswer] = {}

        async def ask(key: bytes) -> None:
            body: bytes | None = None
            try:
                body = await self.node.request(peer_id_from_public_key(key), TASK_STATUS, query,
                                               timeout=FAILOVER_STATUS_TIMEOUT_S)
            except NetError as exc:  # unreachable, no such protocol, an error answer, or nothing in time
                log.debug("task.status_unanswered", peer_id=peer_id_from_public_key(key), reason=exc.reason)
            answers[key] = classify_status_answer(body, lower=key, request_id=request_id, election=election)[0]

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(ask, key)
        return {k: answers[k] for k in keys}  # in ranking order

    def _task_state(self, request_id: bytes, state: TaskState) -> TaskState:
        """Remember an assignment we hold a valid election for (bounded: the oldest are forgotten)."""
        self._task_states[request_id] = state
        self._task_states.move_to_end(request_id)
        while len(self._task_states) > MAX_TASK_STATES:
            self._task_states.popitem(last=False)
        return state

    # ---- a failover candidate's status query ---------------------------------------------------------

    async def _on_status(self, peer_id: str, body: bytes) -> bytes:
        if not await within_rate(self._status_rate, peer_id, self.node.peer_id):
            self.counters["status.rate_limited"] += 1
            raise InvalidOffer(f"busy: more than {STATUS_RATE.per_second:g} status queries/s (burst "
                               f"{STATUS_RATE.burst}) from this peer; back off and ask again")
        try:
            signed = TASK_STATUS.decode_request(body)
        except WireError as exc:
            self.counters["status.invalid"] += 1
            log.info("status.rejected", peer_id=peer_id, reason=exc.reason)
            raise InvalidOffer(f"invalid status query: {exc}") from None
        query: TaskStatusQuery = signed.message
        state = self._task_states.get(query.request_id)
        if state is None or state.election != query.election:
            self.counters["status.not-assigned"] += 1
            return encode_signed(self.identity, TaskStatus(request_id=query.request_id, election=query.election,
                                                           state="not-assigned"))
        asker = state.ranking.index(signed.signer) if signed.signer in state.ranking else -1
        if asker <= state.rank or signed.signer_peer_id != peer_id:
            # our tokens are the client's output: only a higher rank of that election, asking itself, gets them
            self.counters["status.not-entitled"] += 1
            raise NotEntitled("only a higher rank of that election may ask for this request's status")
        if not state.last_word:
            self.counters["status.pending"] += 1
            return encode_signed(self.identity, TaskStatus(request_id=query.request_id, election=query.election,
                                                           state="pending"))
        self.counters["status.answered"] += 1
        return state.last_word

    async def _execute(self, frames: FrameStream, request: Request, request_id: bytes, model: LoadedModel,
                       stream: TokenStream, assignment: Assignment, election_id: bytes,
                       witnessed: tuple[bytes, ...], state: TaskState) -> None:
        started_at = now_ms()
        log.info("task.started", request_id=request_id.hex()[:16], client=frames.remote_peer_id,
                 max_tokens=request.max_tokens)
        sent = 0
        outcome = "failed:cancelled"
        # Each chunk signs the chain over every output token so far, inherited ones included.
        chain = extend_chain(chain_start(request_id), assignment.prefix_ids)
        try:
            # First a chunk with no tokens: our signed acceptance, so that if we fail from here on, the client
            # holds evidence for a failover that we took the task (an executor that answers probes but left no
            # signed word would block it; see docs/election.md).
            state.last_word = encode_signed(self.identity, TokenChunk(
                request_id=request_id, index=len(assignment.prefix_ids), token_ids=(), text="", chain=chain))
            await frames.send(state.last_word)
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
                    while True:
                        with trio.move_on_after(HEARTBEAT_S) as quiet:
                            try:
                                first = await receive_tokens.receive()
                            except trio.EndOfChannel:
                                break
                        if quiet.cancelled_caught:
                            # A step can take seconds (a near tie runs the float64 reference pass): a chunk
                            # with no tokens re-signs what we sent so far and keeps the client's stall timer
                            # from failing over an executor that is working.
                            state.last_word = encode_signed(self.identity, TokenChunk(
                                request_id=request_id, index=len(assignment.prefix_ids) + sent, token_ids=(),
                                text="", chain=chain))
                            await frames.send(state.last_word)
                            continue
                        batch = [first]
                        while len(batch) < MAX_TOKENS_PER_CHUNK:
                            try:
                                batch.append(receive_tokens.receive_nowait())
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        token_ids = tuple(t.token_id for t in batch)
                        chain = extend_chain(chain, token_ids)
                        chunk = TokenChunk(request_id=request_id, index=first.index, token_ids=token_ids,
                                           text="".join(t.text for t in batch), chain=chain)
                        state.last_word = encode_signed(self.identity, chunk)
                        await frames.send(state.last_word)
                        sent += len(batch)
            outcome = await self._finish(frames, request, request_id, model, stream, started_at, assignment,
                                         election_id, witnessed)
        except (NetError, WireError) as exc:
            outcome = f"failed:{exc.reason}"
            raise
        finally:
            self.counters["tokens.generated"] += sent
            self.counters["tasks.completed" if not outcome.startswith("failed") else "tasks.failed"] += 1
            self.recent.append(TaskRecord(request_id.hex(), frames.remote_peer_id, model.name, sent, outcome,
                                          started_at, now_ms()))

    async def _finish(self, frames: FrameStream, request: Request, request_id: bytes, model: LoadedModel,
                      stream: TokenStream, started_at: int, assignment: Assignment, election_id: bytes,
                      witnessed: tuple[bytes, ...]) -> str:
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
            inherited_tokens=len(assignment.prefix_ids),
            election=election_id,
            attempt=assignment.attempt,
            witnessed=witnessed,
        )
        signed = sign(self.identity, message)
        self.participation.remember(request_id, request.client, signed.message_id)
        await frames.send(signed.to_bytes())
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
