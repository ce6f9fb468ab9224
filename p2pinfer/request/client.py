"""The SDK's client: :class:`AsyncClient` owns the lifecycle (node, nursery, ledger) and runs each request
through the request path's three stages, the way httpx's ``send`` chains its steps:

1. **offer and election** (:mod:`p2pinfer.request.offers`): offers, VRF bids, the ranking, the client's
   signed bid set sent to every bidder;
2. **execution and failover** (:mod:`p2pinfer.request.execution`): the assignment, the executor's signed
   token stream, failover to the next rank with signed evidence;
3. **settlement** (:mod:`p2pinfer.request.settling` for the I/O, :mod:`p2pinfer.settlement` for every
   decision): the verification quorum, tally, blame, the client's own bookings, the receipt, the fraud proof.

Verification modes (``verify=`` on generate/stream): ``"async"`` (default) streams tokens as they come and
delivers the :class:`Completion` (with ``.verification``) once the quorum is in; ``"wait"`` holds every token
back until a majority accepted and raises :class:`ResultRejected` / :class:`QuorumNotReached` otherwise;
``"off"`` skips verification (``.verification.outcome == "skipped"``, never verified).

Honest clients leave peers out of elections when their ledger shows proven fraud, a result their own quorum
rejected, or a reputation below the threshold (:mod:`p2pinfer.reputation`); the signed bid set lists them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Mapping, Sequence

import trio

from ..catalog import did_you_mean
from ..election import ElectionResult
from ..identity import Identity, peer_id_from_public_key
from ..ledger import FraudRecord, Ledger
from ..log import get_logger
from ..net import NetError, Node, NodeConfig
from ..net.gossip import FRAUD_TOPIC
from ..settlement import (DEFAULT_QUORUM, Outcome, Settlement, entries_for_failed_attempts, pick_verifiers,
                          settle, tally)
from ..wire import InferenceResult, Request, Signed, codec, now_ms
from .candidates import DEFAULT_MAX_CANDIDATES
from .errors import (AllCandidatesFailed, BadParameters, NoBidsInTime, NoPeerServesModel, NotConnected,
                     QuorumNotReached, ResultRejected)
from .execution import Attempt, Progress, StreamChunk, attempt_order, run_attempt
from .bid_window import GRACE_S
from .offers import ElectionEvidence, announce_bid_set, collect_bids, hold_election
from .params import build_request
from .possession import vet_candidates
from .text import TokenizerCache, VerifiedText
from .protocol import ACCEPT_TIMEOUT_S, MAX_TASK_FRAME, VERIFY_TIMEOUT_S
from .settling import (Verification, ask_verifiers, build_fraud_proof, build_receipt, deliver_receipt,
                       fraud_proof_size_ok)
from ..wording import plural

VERIFY_MODES = ("async", "wait", "off")
# What an assignment adds to the request: bids, the signed bid set, failover evidence (generous bound), so a
# request that cannot fit its task frame is refused here, before any peer is asked (the client's own fault).
ASSIGNMENT_OVERHEAD = 160 * 1024
MAX_REQUEST_BYTES = MAX_TASK_FRAME - ASSIGNMENT_OVERHEAD

log = get_logger("p2pinfer.client")

__all__ = ["AsyncClient", "Attempt", "Completion", "ElectionEvidence", "StreamChunk", "Verification",
           "VERIFY_MODES", "MAX_REQUEST_BYTES"]


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
        bid_grace: float = GRACE_S,
        stall_timeout: float = 20.0,
        accept_timeout: float = ACCEPT_TIMEOUT_S,
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
        self.bid_grace = bid_grace  # bids are awaited this long after the quorum-sized set (bid_window.py)
        self.stall_timeout = stall_timeout
        self.accept_timeout = accept_timeout  # an executor's signed acceptance must come within this
        self.discovery_timeout = discovery_timeout
        self.max_candidates = max_candidates
        self.epoch_seed = epoch_seed
        self.busy_timeout = busy_timeout
        if verifiers < 0:
            raise BadParameters("verifiers (the quorum size) cannot be negative")
        if not 0 <= bid_grace <= bid_timeout:
            raise BadParameters(f"bid_grace must be between 0 and bid_timeout ({bid_timeout} s), got {bid_grace}")
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
        size = len(codec.encode(request.to_wire()))
        if size > MAX_REQUEST_BYTES:
            raise BadParameters(f"the request is {size} bytes encoded; the limit is {MAX_REQUEST_BYTES} bytes "
                                "(the task frame): shorten the prompt or messages")
        request_id = request.request_id()
        progress = Progress()
        progress.text = VerifiedText(await self._model_text(digest), request.stop)
        held: list[StreamChunk] = []  # verify="wait": nothing leaves before the quorum accepts
        give_up_at = trio.current_time() + self.busy_timeout
        backoff = 0.05
        excluded_keys: set[bytes] = set()
        try:
            while True:
                # ---- stage 1: offer and election
                offered = await self._offer(request, request_id)
                excluded_keys = await trio.to_thread.run_sync(
                    lambda: self.ledger.excluded([b.public_key for b in offered.bids], now_ms=now_ms()))
                election, evidence = hold_election(self.identity, request_id, self.epoch_seed, offered.bids,
                                                   excluded_keys, verifiers=self.quorum)
                busy = offered.any_busy
                if evidence.ranking:
                    elected_at = time.perf_counter()
                    announced = await self._announce(evidence)
                    log.debug("election.done", request_id=request_id.hex()[:16], executor=evidence.ranking[0],
                              bidders=len(evidence.ranking), excluded=len(excluded_keys),
                              election_ms=round((elected_at - started) * 1000, 1))
                    round_start = len(progress.attempts)
                    progress.evidence.clear()  # evidence is per election
                    # ---- stage 2: execution and failover
                    for attempt, peer_id in attempt_order(evidence.ranking, progress, round_start):
                        result: Signed[InferenceResult] | None = None
                        async for item in run_attempt(self.node, self.identity, request, request_id, evidence,
                                                      attempt, peer_id, progress, stall_timeout=self.stall_timeout,
                                                      accept_timeout=self.accept_timeout,
                                                      before_assigning=announced.wait):
                            if isinstance(item, StreamChunk):
                                if progress.first_token_at is None:
                                    progress.first_token_at = time.perf_counter()
                                if verify == "wait":
                                    held.append(item)
                                else:
                                    yield item
                            else:
                                result = item
                        if result is None:
                            if progress.attempts[-1].outcome.startswith("failed:assignment"):
                                break  # our own request cannot be sent: no other rank can take it either
                            continue
                        # ---- stage 3: settlement
                        completion = self._completion(progress, result, peer_id, digest, request_id, evidence,
                                                      started, elected_at)
                        completion.request = request
                        # the signed bid set's round to every bidder (overlaps opening the executor's stream)
                        completion.timings["bid_set_s"] = announced.seconds
                        if verify == "off":
                            completion.verification = Verification(Outcome.SKIPPED,
                                                                   inherited_tokens=progress.inherited_tokens)
                        else:
                            verify_started = time.perf_counter()
                            completion.verification = await self._settle(request, result, election, progress,
                                                                         evidence)
                            completion.timings["verify_s"] = time.perf_counter() - verify_started
                            completion.timings["total_s"] = time.perf_counter() - started
                        if verify == "wait":
                            self._raise_unless_verified(completion)
                            for chunk in held:
                                yield chunk
                        yield completion
                        return
                    busy = all(a.outcome == "refused:busy" for a in progress.attempts[round_start:])
                    if progress.attempts and progress.attempts[-1].outcome.startswith("failed:assignment"):
                        busy = False
                if not busy or trio.current_time() + backoff > give_up_at:
                    break
                log.debug("request.all_busy_retrying", request_id=request_id.hex()[:16], backoff_s=backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        finally:
            with trio.CancelScope(shield=True):
                await self._book_failed_attempts(progress, request_id)
        if not progress.attempts:
            hint = (f" ({len(excluded_keys)} bidder(s) left out for fraud, a rejected result or low reputation)"
                    if excluded_keys else "")
            raise NoBidsInTime(f"no valid bid for model {model!r} within {self.bid_timeout} s "
                               f"(all candidates busy, unreachable or sent invalid proofs){hint}")
        summary = "; ".join(f"{a.peer_id[-8:]}: {a.outcome}" for a in progress.attempts[-8:])
        raise AllCandidatesFailed(f"all elected candidates failed ({summary})")

    async def _model_text(self, digest: bytes) -> Any:
        """The model's verified tokenizer: cached, or fetched by digest from the peers serving it."""
        infos = await self.node.candidates(digest, timeout=min(self.discovery_timeout, 5.0), include_self=True,
                                           min_free_slots=0)
        if not infos:
            raise NoPeerServesModel(f"no peer serves model {digest.hex()[:16]}…")
        peers = [i.peer_id for i in infos]
        if not self.tokenizers.has(digest):
            # Peers that answered a possession challenge first (the outcomes are cached for the offer that
            # follows): a tarpit Sybil holds a fetch for its whole timeout, and fakes announce the most free
            # slots, so in table order every one of them would be tried before any honest peer.
            vetted = {i.peer_id for i in await vet_candidates(self.node, self.identity, digest, infos, enough=1)}
            peers = [p for p in peers if p in vetted] + [p for p in peers if p not in vetted]
        return await self.tokenizers.get(self.node, self.identity, digest, peers)

    async def _announce(self, evidence: ElectionEvidence) -> "_Announcement":
        """Send the signed bid set to every bidder; the first assignment waits for it (see run_attempt), so
        bidders hold the final set before anything runs, while the executor's stream opens meanwhile."""
        announcement = _Announcement()
        if self.nursery is None:  # on_node() used without `async with`: no nursery to overlap in
            await announcement.run(self.node, evidence)
        else:
            self.nursery.start_soon(announcement.run, self.node, evidence)
        return announcement

    async def _offer(self, request: Request, request_id: bytes):  # type: ignore[no-untyped-def]
        """Stage 1's network half (a seam: candidate filters hook in here)."""
        return await collect_bids(self.node, self.identity, request, request_id, epoch_seed=self.epoch_seed,
                                  max_candidates=self.max_candidates, bid_timeout=self.bid_timeout,
                                  discovery_timeout=self.discovery_timeout, enough=1 + self.quorum,
                                  grace_s=self.bid_grace)

    @staticmethod
    def _raise_unless_verified(completion: Completion) -> None:
        v = completion.verification
        assert v is not None
        if v.outcome == Outcome.REJECTED:
            raise ResultRejected(
                f"the result of {completion.executor} was rejected by {v.tally.rejects} of "
                f"{plural(len(v.verifiers), 'verifier')}; its output is withheld and the executor is "
                f"now excluded by this client: retry to get another executor", v)
        if v.outcome != Outcome.ACCEPTED:
            raise QuorumNotReached(
                f"no majority of the {plural(len(v.verifiers), 'verifier')} accepted the result "
                f"({v.tally.accepts if v.tally else 0} accepted, "
                f"{len(v.refusals)} did not judge); the output is withheld as unverified: "
                "retry, or use verify='async' to accept unverified output", v)

    async def _book_failed_attempts(self, progress: Progress, request_id: bytes) -> None:
        """Penalize executors whose attempt failed by their own provable fault (never ours, never the network's)."""
        entries = entries_for_failed_attempts(
            [(a.key, a.fault) for a in progress.attempts if a.key is not None and a.fault is not None],
            request_id, now_ms())
        if entries:
            await trio.to_thread.run_sync(self.ledger.add_entries, entries)

    async def _settle(self, request: Request, result: Signed[InferenceResult], election: ElectionResult,
                      progress: Progress, evidence: ElectionEvidence) -> Verification:
        """Stage 3: the verifiers are the election's next ranks after every executor that took part."""
        started = time.perf_counter()
        inherited = progress.inherited_tokens
        # Every rank up to the executor's took part (it executed, failed or refused), so the verifiers are
        # exactly the q ranks after the executor: the rule receivers of the receipt check.
        ranking = [r.public_key for r in election.ranking]
        executed = ranking[:ranking.index(result.signer) + 1]
        verifier_keys = pick_verifiers(ranking, executed, self.quorum)
        # the lower ranks' last signed words: the verifiers re-check the failover as the executor did
        lower = set(ranking[:ranking.index(result.signer)])
        verdicts, refusals = await ask_verifiers(self.node, self.identity, request, result, verifier_keys,
                                                 inherited, self.verify_timeout, bid_set=evidence.bid_set,
                                                 evidence=[e for k, e in progress.evidence.items() if k in lower],
                                                 quorum=self.quorum)
        t = tally(verdicts, verifiers=verifier_keys, request_id=result.message.request_id,
                  result_hash=result.message_id)
        s: Settlement = settle(t, executor=result.signer, output_tokens=len(result.message.output_ids),
                               inherited_tokens=inherited, request_id=result.message.request_id, now_ms=now_ms())
        receipt = build_receipt(self.identity, request, result, s, inherited, evidence.bid_set)
        proof = build_fraud_proof(self.identity, request, result, t, inherited) if t.outcome == Outcome.REJECTED else None
        await trio.to_thread.run_sync(self.ledger.record_receipt, receipt, list(s.entries))
        if proof is not None and s.fraud_status is not None:
            record = FraudRecord(result.message_id, result.signer, result.message.request_id, s.fraud_status,
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
            inherited_tokens=inherited, executor_blamed=s.executor_blamed, seconds=time.perf_counter() - started,
            entries=s.entries)

    @staticmethod
    def _completion(progress: Progress, result: Signed[InferenceResult], peer_id: str, digest: bytes,
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


class _Announcement:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.seconds = 0.0

    async def run(self, node: Node, evidence: ElectionEvidence) -> None:
        started = time.perf_counter()
        try:
            if evidence.bid_set is not None:
                await announce_bid_set(node, evidence.bid_set)
        finally:
            self.seconds = time.perf_counter() - started
            self.done.set()

    async def wait(self) -> None:
        await self.done.wait()


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text if len(text) % 2 == 0 else text + "0")
    except ValueError:
        return False
    return True
