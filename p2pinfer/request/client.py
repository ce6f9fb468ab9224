"""The client side of the request path: offer, collect VRF bids, elect, assign, stream, fail over.

One request, step by step (see docs/architecture.md for the message flow):

1. candidates: live capacity announcements for the model (plus DHT providers), capped by rendezvous hashing;
2. a signed ``TaskOffer`` to each candidate over ``/p2pinfer/bid/1``; each answers ``VrfBid`` or ``Refusal``;
3. :func:`p2pinfer.election.elect` verifies every proof and ranks the bidders;
4. a signed ``Assignment`` (request + all bids) to the winner over ``/p2pinfer/task/1``; ``TokenChunk`` frames
   stream back, then the ``InferenceResult``;
5. if the executor disconnects, stalls or misbehaves, the next-ranked bidder gets the same assignment with
   the tokens received so far as ``prefix_ids``; seeded sampling makes its continuation identical;
6. after the stream, the next ``q`` ranked bidders that executed nothing verify the signed result
   (``/p2pinfer/verify/1``); a strict majority decides; the client books the outcome in its ledger, signs a
   ``Receipt`` for the executor and verifiers, and gossips a fraud proof when the result was rejected
   (see ``p2pinfer.request.verification`` and docs/incentives.md).

Verification modes (``verify=`` on generate/stream): ``"async"`` (default) streams tokens as they come and
delivers the :class:`Completion` (with ``.verification``) once the quorum is in; ``"wait"`` holds every token
back until a majority accepted and raises :class:`ResultRejected` / :class:`QuorumNotReached` otherwise;
``"off"`` skips verification (``.verification.outcome == "skipped"``, never verified).

Honest clients leave peers out of elections when their ledger shows proven fraud or a reputation below the
threshold (:mod:`p2pinfer.reputation`): their bids are passed to ``elect`` as not eligible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Mapping, Sequence

import trio

from ..catalog import did_you_mean
from ..election import ElectionResult, elect
from ..identity import Identity, peer_id_from_public_key
from ..ledger import QUORUM_REJECTED, FraudRecord, Ledger, entries_for_receipt, entry_for_no_show
from ..log import get_logger
from ..net.gossip import FRAUD_TOPIC
from ..quorum import ACCEPTED, DEFAULT_QUORUM, REJECTED, executor_to_blame, pick_verifiers, tally
from ..net import NetError, Node, NodeConfig
from ..wire import (
    Assignment,
    Bid,
    InferenceResult,
    Refusal,
    Request,
    Signed,
    TaskOffer,
    TokenChunk,
    VrfBid,
    WireError,
    decode_signed,
    encode_signed,
    now_ms,
)
from .candidates import DEFAULT_MAX_CANDIDATES, select_candidates
from .possession import vet_candidates
from .errors import (AllCandidatesFailed, BadParameters, NoBidsInTime, NoPeerServesModel, NotConnected,
                     QuorumNotReached, ResultRejected)
from .params import build_request
from .text import TokenizerCache, VerifiedText
from .protocol import BID_PROTOCOL, MAX_OFFER_FRAME, MAX_TASK_FRAME, OFFER_TTL_MS, TASK_PROTOCOL, VERIFY_TIMEOUT_S
from .verification import (Verification, ask_verifiers, build_fraud_proof, build_receipt, deliver_receipt,
                           fraud_proof_size_ok)

VERIFY_MODES = ("async", "wait", "off")

log = get_logger("p2pinfer.client")


@dataclass(frozen=True)
class StreamChunk:
    """Newly generated text, as it arrives."""

    text: str
    token_ids: tuple[int, ...]
    index: int
    executor: str


@dataclass(frozen=True)
class ElectionEvidence:
    """Everything needed to re-check who should have executed: anyone can recompute the ranking."""

    request_id: bytes
    epoch_seed: bytes
    bids: tuple[Bid, ...]
    ranking: tuple[str, ...]  # peer IDs, executor first
    excluded: tuple[str, ...] = ()  # bidders this client left out (proven fraud or low reputation)

    def recheck(self) -> ElectionResult:
        return elect(self.request_id, self.epoch_seed, self.bids)


@dataclass(frozen=True)
class Attempt:
    peer_id: str
    outcome: str  # "completed", "refused:<code>", "failed:<reason>"
    tokens: int
    key: bytes | None = None  # the executor's public key (from its bid)


@dataclass
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    executor: str
    model: bytes
    request_id: bytes
    election: ElectionEvidence
    result: Signed[InferenceResult]
    attempts: tuple[Attempt, ...]
    timings: dict[str, float] = field(default_factory=dict)
    verification: Verification | None = None  # the quorum's outcome (see Verification.verified)
    request: Request | None = None  # the request as sent (its hash is request_id)

    @property
    def verified(self) -> bool:
        """True only when a strict majority of the verifiers accepted this result."""
        return self.verification is not None and self.verification.verified


class _Progress:
    """What the client has received so far for one request (survives failover)."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text_parts: list[str] = []
        self.attempts: list[Attempt] = []
        self.first_token_at: float | None = None
        self.inherited_tokens = 0  # tokens the final executor continued from earlier executors
        self.text: VerifiedText | None = None  # decodes the verified token IDs (the executor's text is never shown)


class AsyncClient:
    """A trio-native client. Use ``async with AsyncClient(bootstrap=[...]) as client:``.

    :meth:`on_node` makes one that sends its requests through a node that is already running (a serving
    peer's own node, e.g. for its OpenAI gateway) instead of starting a libp2p host of its own.
    """

    def __init__(
        self,
        bootstrap: Sequence[str] = (),
        *,
        identity: Identity | None = None,
        listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        bid_timeout: float = 3.0,
        stall_timeout: float = 20.0,
        discovery_timeout: float = 10.0,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        epoch_seed: bytes = b"",
        busy_timeout: float = 30.0,
        config: Any = None,
        verifiers: int = DEFAULT_QUORUM,
        verify_timeout: float = VERIFY_TIMEOUT_S,
        ledger: Ledger | str | Path | None = None,
        tokenizer_cache: str | Path | None = None,
    ) -> None:
        if config is not None and not bootstrap:
            bootstrap = tuple(config.bootstrap)
        self.identity = identity or Identity.generate()
        self.bootstrap = tuple(bootstrap)
        self.listen = tuple(listen)
        self.bid_timeout = bid_timeout
        self.stall_timeout = stall_timeout
        self.discovery_timeout = discovery_timeout
        self.max_candidates = max_candidates
        self.epoch_seed = epoch_seed
        self.busy_timeout = busy_timeout
        if verifiers < 0:
            raise BadParameters("verifiers (the quorum size) cannot be negative")
        self.quorum = verifiers
        self.verify_timeout = verify_timeout
        self.ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger)
        self._owns_ledger = not isinstance(ledger, Ledger)
        self.tokenizers = TokenizerCache(Path(tokenizer_cache) if tokenizer_cache is not None else None)
        self._node: Node | None = None
        self._node_cm: Node | None = None
        self._owns_node = True
        self.nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None

    @classmethod
    def on_node(cls, node: Node, identity: Identity | None = None, **options: Any) -> "AsyncClient":
        """A client using ``node``, which the caller keeps running (and closes): no second libp2p host.

        Requests are signed with ``identity`` (default: the node's own). Usable at once, or in ``async with``
        (which then only scopes the client's nursery; leaving it does not close the node).
        """
        client = cls(identity=identity or node.identity, **options)
        client._node = node
        client._owns_node = False
        return client

    async def __aenter__(self) -> "AsyncClient":
        if self._owns_node:
            node = Node(self.identity, NodeConfig(listen=self.listen, bootstrap=self.bootstrap, role="client"))
            try:
                self._node = await node.__aenter__()
            except NetError as exc:
                raise NotConnected(f"could not join the network: {exc}") from None
        self._nursery_cm = trio.open_nursery()
        self.nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool:
        try:
            if self.nursery is not None:
                self.nursery.cancel_scope.cancel()
                await self._nursery_cm.__aexit__(None, None, None)
        finally:
            try:
                if self._owns_node:
                    node, self._node = self._node, None
                    if node is not None:
                        await node.__aexit__(*exc_info)
            finally:
                if self._owns_ledger:
                    self.ledger.close()
        return False

    @property
    def node(self) -> Node:
        if self._node is None:
            raise RuntimeError("AsyncClient is not running; use `async with AsyncClient(...) as client:`")
        return self._node

    # ---- public API ------------------------------------------------------------------------------

    async def generate(self, *, model: str, prompt: str | None = None,
                       messages: Iterable[Mapping[str, Any]] | None = None, **params: Any) -> Completion:
        """Run one request to completion and return its text, executor and election evidence."""
        completion: Completion | None = None
        async for item in self._run(model=model, prompt=prompt, messages=messages, **params):
            if isinstance(item, Completion):
                completion = item
        assert completion is not None
        return completion

    async def stream(self, *, model: str, prompt: str | None = None,
                     messages: Iterable[Mapping[str, Any]] | None = None,
                     **params: Any) -> AsyncIterator[StreamChunk]:
        """Yield text as it is generated. (Use :meth:`stream_with_result` to get the final Completion.)"""
        async for item in self._run(model=model, prompt=prompt, messages=messages, **params):
            if isinstance(item, StreamChunk):
                yield item

    async def stream_with_result(self, *, model: str, prompt: str | None = None,
                                 messages: Iterable[Mapping[str, Any]] | None = None,
                                 **params: Any) -> AsyncIterator[StreamChunk | Completion]:
        """Like :meth:`stream`, then the :class:`Completion` as the last item."""
        async for item in self._run(model=model, prompt=prompt, messages=messages, **params):
            yield item

    async def models(self) -> dict[str, bytes]:
        """Names and digests of the models live announcements offer right now."""
        out: dict[str, bytes] = {}
        for announcement in self.node.table.live(now_ms()):
            for offer in announcement.models:
                out.setdefault(offer.name, offer.digest)
        return out

    # ---- the request path ------------------------------------------------------------------------

    async def resolve_model(self, model: str) -> bytes:
        """A model name or hex digest (or unique digest prefix of 8+ hex digits) -> digest."""
        if not isinstance(model, str) or not model:
            raise BadParameters("model must be a model name or a hex digest")
        deadline = trio.current_time() + self.discovery_timeout
        while True:
            digest = self._lookup_model(model)
            if digest is not None:
                return digest
            if len(model) == 64 and _is_hex(model):
                return bytes.fromhex(model)  # not announced (yet): DHT providers may still know it
            if trio.current_time() >= deadline:
                known = sorted(await self.models())
                hint = f"; models on offer: {', '.join(known)}" if known else "; no peer has announced any model"
                raise NoPeerServesModel(f"no peer serves model {model!r}{did_you_mean(model, known)}{hint}")
            await trio.sleep(0.1)

    def _lookup_model(self, model: str) -> bytes | None:
        needle = model.lower()
        for announcement in self.node.table.live(now_ms()):
            for offer in announcement.models:
                if offer.name == model or (len(needle) >= 8 and _is_hex(needle) and offer.digest.hex().startswith(needle)):
                    return offer.digest
        return None

    async def _run(self, *, model: str, prompt: str | None, messages: Any, verify: str = "async",
                   **params: Any) -> AsyncIterator[Any]:
        if verify not in VERIFY_MODES:
            raise BadParameters(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        started = time.perf_counter()
        digest = await self.resolve_model(model)
        request = build_request(model_digest=digest, client_key=self.identity.public_key, prompt=prompt,
                                messages=messages, **params)
        request_id = request.request_id()
        progress = _Progress()
        progress.text = VerifiedText(await self._model_text(digest), request.stop)
        held: list[StreamChunk] = []  # verify="wait": nothing leaves before the quorum accepts
        give_up_at = trio.current_time() + self.busy_timeout
        backoff = 0.05
        excluded_keys: set[bytes] = set()
        while True:
            bids, busy = await self._collect_bids(request, request_id)
            excluded_keys = await trio.to_thread.run_sync(
                lambda: self.ledger.excluded([b.public_key for b in bids], now_ms=now_ms()))
            eligible = {b.public_key for b in bids} - excluded_keys
            election = elect(request_id, self.epoch_seed, bids, verifiers=self.quorum, eligible=eligible)
            for rejection in election.rejected:
                log.info("election.bid_rejected", request_id=request_id.hex()[:16], reason=rejection.reason,
                         detail=rejection.detail)
            ranking = [peer_id_from_public_key(r.public_key) for r in election.ranking]
            if ranking:
                evidence = ElectionEvidence(request_id, self.epoch_seed, election.accepted, tuple(ranking),
                                            tuple(sorted(peer_id_from_public_key(k) for k in excluded_keys)))
                elected_at = time.perf_counter()
                log.debug("election.done", request_id=request_id.hex()[:16], executor=ranking[0],
                          bidders=len(ranking), excluded=len(excluded_keys),
                          election_ms=round((elected_at - started) * 1000, 1))
                round_start = len(progress.attempts)
                for attempt, peer_id in enumerate(ranking):
                    result: Signed[InferenceResult] | None = None
                    async for item in self._attempt(request, request_id, evidence, attempt, peer_id, progress):
                        if isinstance(item, StreamChunk):
                            if progress.first_token_at is None:
                                progress.first_token_at = time.perf_counter()
                            if verify == "wait":
                                held.append(item)
                            else:
                                yield item
                        else:
                            result = item
                    if result is not None:
                        completion = self._completion(progress, result, peer_id, digest, request_id, evidence,
                                                      started, elected_at)
                        completion.request = request
                        await self._book_no_shows(progress, request_id)
                        if verify == "off":
                            completion.verification = Verification("skipped",
                                                                   inherited_tokens=progress.inherited_tokens)
                        else:
                            verify_started = time.perf_counter()
                            executed = {r.public_key for r in election.ranking
                                        if peer_id_from_public_key(r.public_key) in
                                        {a.peer_id for a in progress.attempts}}
                            verifier_keys = pick_verifiers([r.public_key for r in election.ranking], executed,
                                                           self.quorum)
                            completion.verification = await self._verify(request, result, verifier_keys,
                                                                         progress.inherited_tokens)
                            completion.timings["verify_s"] = time.perf_counter() - verify_started
                            completion.timings["total_s"] = time.perf_counter() - started
                        if verify == "wait":
                            v = completion.verification
                            if v.outcome == REJECTED:
                                raise ResultRejected(
                                    f"the result of {completion.executor} was rejected by {v.tally.rejects} of "
                                    f"{len(v.verifiers)} verifiers; its output is withheld and the executor is "
                                    f"now excluded by this client: retry to get another executor", v)
                            if v.outcome != ACCEPTED:
                                raise QuorumNotReached(
                                    f"no majority of the {len(v.verifiers)} verifiers accepted the result "
                                    f"({v.tally.accepts if v.tally else 0} accepted, "
                                    f"{len(v.refusals)} did not judge); the output is withheld as unverified: "
                                    "retry, or use verify='async' to accept unverified output", v)
                            for chunk in held:
                                yield chunk
                        yield completion
                        return
                busy = all(a.outcome == "refused:busy" for a in progress.attempts[round_start:])
            if not busy or trio.current_time() + backoff > give_up_at:
                break
            log.debug("request.all_busy_retrying", request_id=request_id.hex()[:16], backoff_s=backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
        await self._book_no_shows(progress, request_id)
        if not progress.attempts:
            hint = (f" ({len(excluded_keys)} bidder(s) left out for proven fraud or low reputation)"
                    if excluded_keys else "")
            raise NoBidsInTime(f"no valid bid for model {model!r} within {self.bid_timeout} s "
                               f"(all candidates busy, unreachable or sent invalid proofs){hint}")
        summary = "; ".join(f"{a.peer_id[-8:]}: {a.outcome}" for a in progress.attempts[-8:])
        raise AllCandidatesFailed(f"all elected candidates failed ({summary})")

    async def _model_text(self, digest: bytes):
        """The model's verified tokenizer: cached, or fetched by digest from the peers serving it."""
        infos = await self.node.candidates(digest, timeout=min(self.discovery_timeout, 5.0), include_self=True,
                                           min_free_slots=0)
        if not infos:
            raise NoPeerServesModel(f"no peer serves model {digest.hex()[:16]}…")
        return await self.tokenizers.get(self.node, self.identity, digest, [i.peer_id for i in infos])

    async def _book_no_shows(self, progress: _Progress, request_id: bytes) -> None:
        """Penalize elected executors that took the assignment and then did not deliver (not refusals)."""
        keys = {}
        for a in progress.attempts:
            if a.outcome.startswith("failed:") and a.key is not None:
                keys[a.key] = a
        if keys:
            at = now_ms()
            entries = [entry_for_no_show(k, request_id, at) for k in keys]
            await trio.to_thread.run_sync(self.ledger.add_entries, entries)

    async def _verify(self, request: Request, result: Signed[InferenceResult], verifier_keys: Sequence[bytes],
                      inherited_tokens: int) -> Verification:
        started = time.perf_counter()
        verdicts, refusals = await ask_verifiers(self.node, self.identity, request, result, verifier_keys,
                                                 inherited_tokens, self.verify_timeout)
        t = tally(verdicts, verifiers=verifier_keys, request_id=result.message.request_id,
                  result_hash=result.message_id)
        receipt = build_receipt(self.identity, request, result, t, inherited_tokens)
        entries = entries_for_receipt(receipt.message, list(t.counted))
        blamed = executor_to_blame(t.outcome, t.first_bad_position, inherited_tokens)
        proof = None
        if t.outcome == REJECTED:
            proof = build_fraud_proof(self.identity, request, result, t, inherited_tokens)
        await trio.to_thread.run_sync(self.ledger.record_receipt, receipt, entries)
        if proof is not None and blamed:
            record = FraudRecord(result.message_id, result.signer, result.message.request_id, QUORUM_REJECTED,
                                 now_ms(), proof)
            await trio.to_thread.run_sync(self.ledger.record_fraud, record)
        delivered = await deliver_receipt(self.node, receipt)
        if proof is not None and fraud_proof_size_ok(proof):
            try:
                await self.node.publish(FRAUD_TOPIC, proof)
            except Exception as exc:  # gossip is best effort; the receipt already carries the verdicts
                log.warning("fraud.publish_failed", error=repr(exc)[:200])
        log.info("verification.done", request_id=result.message.request_id.hex()[:16], outcome=t.outcome,
                 accepts=t.accepts, rejects=t.rejects, verifiers=len(verifier_keys),
                 receipt_delivered=delivered, seconds=round(time.perf_counter() - started, 3))
        return Verification(
            outcome=t.outcome, verifiers=tuple(peer_id_from_public_key(k) for k in verifier_keys),
            verdicts=t.counted, refusals=tuple(refusals), tally=t, receipt=receipt, fraud_proof=proof,
            inherited_tokens=inherited_tokens, executor_blamed=blamed, seconds=time.perf_counter() - started,
            entries=tuple(entries))

    @staticmethod
    def _completion(progress: _Progress, result: Signed[InferenceResult], peer_id: str, digest: bytes,
                    request_id: bytes, evidence: ElectionEvidence, started: float, elected_at: float) -> Completion:
        finished = time.perf_counter()
        return Completion(
            text="".join(progress.text_parts),
            token_ids=tuple(progress.token_ids),
            finish_reason=result.message.finish_reason,
            executor=peer_id,
            model=digest,
            request_id=request_id,
            election=evidence,
            result=result,
            attempts=tuple(progress.attempts),
            timings={
                "election_s": elected_at - started,
                "first_token_s": (progress.first_token_at or finished) - started,
                "total_s": finished - started,
            },
        )

    async def _collect_bids(self, request: Request, request_id: bytes) -> tuple[list[Bid], bool]:
        """Offer the request to the candidates; returns the bids and whether any candidate said busy."""
        # include_self: a client running on a serving peer's node (the gateway) offers work to that peer too,
        # over a loopback stream; it gets the same equal chance as every other bidder.
        infos = await self.node.candidates(request.model, timeout=min(self.discovery_timeout, 5.0),
                                           include_self=True)
        infos = await vet_candidates(self.node, self.identity, request.model, infos)  # possession (Sybils)
        if not infos:
            raise NoPeerServesModel(f"no peer with free capacity serves model {request.model.hex()[:16]}…")
        chosen = select_candidates(request_id, [i.peer_id for i in infos], self.max_candidates)
        offer = TaskOffer(request_id=request_id, model=request.model, max_tokens=request.max_tokens,
                          epoch_seed=self.epoch_seed, expires_at_ms=now_ms() + OFFER_TTL_MS)
        offer_bytes = encode_signed(self.identity, offer)
        bids: list[Bid] = []
        busy: list[str] = []

        async def ask(peer_id: str) -> None:
            try:
                reply = await self.node.request(peer_id, BID_PROTOCOL, offer_bytes, timeout=self.bid_timeout,
                                                max_frame=MAX_OFFER_FRAME)
                signed = decode_signed(reply, expect=(VrfBid, Refusal), max_size=MAX_OFFER_FRAME)
            except (NetError, WireError) as exc:
                log.info("bid.failed", peer_id=peer_id, error=str(exc)[:200])
                return
            if signed.signer_peer_id != peer_id:
                log.warning("bid.rejected", peer_id=peer_id, reason="signer is not the peer we asked")
                return
            message = signed.message
            if isinstance(message, Refusal):
                log.debug("bid.refused", peer_id=peer_id, code=message.code, message=message.message)
                if message.code == "busy":
                    busy.append(peer_id)
                return
            if message.bid.public_key != signed.signer or message.bid.request_id != request_id:
                log.warning("bid.rejected", peer_id=peer_id, reason="bid names another key or request")
                return
            bids.append(message.bid)

        with trio.move_on_after(self.bid_timeout + 1.0):
            async with trio.open_nursery() as nursery:
                for peer_id in chosen:
                    nursery.start_soon(ask, peer_id)
        return bids, bool(busy)

    async def _attempt(self, request: Request, request_id: bytes, evidence: ElectionEvidence, attempt: int,
                       peer_id: str, progress: _Progress) -> AsyncIterator[Any]:
        assignment = Assignment(request=request, epoch_seed=evidence.epoch_seed, bids=evidence.bids,
                                prefix_ids=tuple(progress.token_ids), attempt=attempt)
        received_before = len(progress.token_ids)
        executor_key = None
        for bid in evidence.bids:
            if peer_id_from_public_key(bid.public_key) == peer_id:
                executor_key = bid.public_key
        try:
            frames = await self.node.open_stream(peer_id, TASK_PROTOCOL, timeout=self.stall_timeout,
                                                 max_frame=MAX_TASK_FRAME)
        except NetError as exc:
            progress.attempts.append(Attempt(peer_id, f"failed:{exc.reason}", 0, executor_key))
            log.info("task.failover", peer_id=peer_id, attempt=attempt, reason=str(exc)[:200])
            return
        outcome = "failed:closed"
        try:
            await frames.send(encode_signed(self.identity, assignment))
            while True:
                body = await frames.receive(timeout=self.stall_timeout)
                if body is None:
                    outcome = "failed:closed-before-result"
                    break
                signed = decode_signed(body, expect=(TokenChunk, InferenceResult, Refusal), max_size=MAX_TASK_FRAME)
                if signed.signer != executor_key:
                    outcome = "failed:wrong-signer"
                    break
                message = signed.message
                if message.request_id != request_id:
                    outcome = "failed:wrong-request"
                    break
                if isinstance(message, Refusal):
                    outcome = f"refused:{message.code}"
                    log.info("task.refused", peer_id=peer_id, code=message.code, message=message.message)
                    break
                if isinstance(message, TokenChunk):
                    if message.index != len(progress.token_ids):
                        outcome = "failed:token-gap"
                        break
                    progress.token_ids.extend(message.token_ids)
                    text = progress.text.push(message.token_ids)  # from the IDs; message.text is never shown
                    progress.text_parts.append(text)
                    yield StreamChunk(text, message.token_ids, message.index, peer_id)
                    continue
                if tuple(message.output_ids) != tuple(progress.token_ids):
                    outcome = "failed:result-mismatch"
                    break
                outcome = "completed"
                progress.inherited_tokens = received_before
                tail = progress.text.finish()  # text held back for stop strings or an unfinished character
                if tail:
                    progress.text_parts.append(tail)
                    yield StreamChunk(tail, (), len(progress.token_ids), peer_id)
                yield signed
                break
        except (NetError, WireError) as exc:
            outcome = f"failed:{exc.reason}"
            log.info("task.failover", peer_id=peer_id, attempt=attempt, reason=str(exc)[:200])
        finally:
            progress.attempts.append(Attempt(peer_id, outcome, len(progress.token_ids) - received_before,
                                             executor_key))
            with trio.CancelScope(shield=True):
                if outcome == "completed":
                    await frames.aclose()
                else:
                    await frames.reset()


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text if len(text) % 2 == 0 else text + "0")
    except ValueError:
        return False
    return True
