"""Sybils must cost something: a peer is offered work only after answering a model-possession challenge.

Serving side (:class:`PossessionService`, registered by every serving peer): answer a signed
:class:`~p2pinfer.wire.PossessionChallenge` with a signed :class:`~p2pinfer.wire.PossessionProof`, the
top-k log-probs of an 8-token prefill over tokens derived from the challenger's nonce (a few milliseconds
on the fixture models, in a worker thread). Challenges run one at a time, at most one per second per
challenger and at most 16 queued; beyond that the answer is a ``busy`` refusal.

Challenger side (:class:`PossessionVetting`, one per node, shared by the peer and any client on it such
as the gateway): before offering work, each candidate without a fresh cached result is challenged over a
direct stream (this also shows it is reachable at its announced address). Outcomes
(:class:`~p2pinfer.request.possession_rules.Possession`) are cached per (peer, model): ``proven`` and
``answered`` for 10 min, ``wrong`` for 30 min, ``unreachable`` for 1 min. Offers go only to ``proven``
and ``answered`` peers (and to ourselves).

What it proves, and its limits (also in docs/network.md):

* a challenger that holds the model (every serving peer, the gateway on a peer) checks the answer against
  its own prefill: a peer without the real weights fails (``wrong``) and is never offered work;
* a challenger without the model (a bare SDK client) can check only that the peer is reachable, holds its
  key and returns a well-formed signed proof (``answered``); a reachable Sybil that runs *some* model still
  passes there, and is then caught by the verification quorum (verifiers hold the model) and excluded;
* announcements that point nowhere (the cheap Sybil: 300 keys, no machines) cost nothing to make but
  no longer crowd honest peers out of the offer slots, since they never answer.
"""

from __future__ import annotations

import hashlib
import secrets
import weakref
from typing import Iterable, Sequence

import numpy as np
import trio

from ..identity import Identity
from ..log import get_logger
from ..net import Node, PeerInfo
from ..net.errors import NetError
from ..net.host import MAX_CONCURRENT_DIALS
from ..net.protocol import Exchange, Protocol
from ..runtime.fingerprint import FingerprintBuilder
from ..runtime.model import LoadedModel
from ..runtime.verify import recompute_logprobs
from ..wire import PossessionChallenge, PossessionProof, Refusal, WireError, encode_signed, now_ms
from ..errors import P2PInferError
from .bid_window import BidWindow
from .possession_rules import CHALLENGE_POSITIONS, Possession, challenge_tokens, check_proof, parse_proof

log = get_logger("p2pinfer.request.possession")

POSSESSION = Protocol("/p2pinfer/possession/1", 32 * 1024, (PossessionChallenge,), (PossessionProof, Refusal),
                      Exchange.ONE_SHOT, "signed PossessionChallenge -> signed PossessionProof | Refusal")
CHALLENGE_TTL_MS = 30_000
CHALLENGE_TIMEOUT_S = 10.0
VET_BUDGET_S = 12.0                # at most this long challenging unknown candidates before one request
# Each challenge of an unknown candidate may be a dial, and a tarpit's dial holds the node's dial slot for the
# whole challenge timeout: challenges take at most half the node's dial slots, so they never queue behind
# each other's tarpits in the swarm (every unknown candidate up to this many is dialled at once) and never
# make the node's other dials (bids, tasks, verification, DHT) wait behind them. Beyond it, random order.
MAX_CONCURRENT_CHALLENGES = MAX_CONCURRENT_DIALS // 2
CACHE_S = {Possession.PROVEN: 600.0, Possession.ANSWERED: 600.0, Possession.WRONG: 1800.0,
           Possession.UNREACHABLE: 60.0}
ACCEPTABLE = frozenset({Possession.PROVEN, Possession.ANSWERED})
MIN_CHALLENGE_INTERVAL_S = 1.0     # per challenger, on the serving side
MAX_QUEUED = 16                    # challenges waiting for the prefill lock before "busy"
MAX_TRACKED = 10_000


def prove(model: LoadedModel, tokens: Sequence[int]) -> bytes:
    """The packed top-k fingerprint of the rows after each challenge token but the last (blocking)."""
    rows = recompute_logprobs(model, list(tokens[:1]), list(tokens[1:]))
    builder = FingerprintBuilder()
    for row in rows:
        builder.add(row)
    return builder.build().pack()


def vocab_size(model: LoadedModel) -> int:
    return int(model.info.vocab_size or model.tokenizer.get_vocab_size())


class PossessionService:
    """Answers possession challenges for the models this peer serves."""

    def __init__(self, node: Node, identity: Identity, models: Sequence[LoadedModel]) -> None:
        self.node = node
        self.identity = identity
        self.models = {m.digest: m for m in models}
        self._last_challenge: dict[str, float] = {}
        self._one_at_a_time = trio.Lock()
        self._waiting = 0

    def register(self) -> None:
        self.node.register_request_handler(POSSESSION, self._on_challenge)

    async def _on_challenge(self, peer_id: str, body: bytes) -> bytes:
        try:
            challenge: PossessionChallenge = POSSESSION.decode_request(body).message
        except WireError as exc:
            raise P2PInferError(f"invalid possession challenge: {exc}") from None
        reference = hashlib.sha256(body).digest()
        if not now_ms() <= challenge.expires_at_ms <= now_ms() + CHALLENGE_TTL_MS * 2:
            return self._refuse(reference, "expired", "challenge expired or expires too far ahead")
        model = self.models.get(challenge.model)
        if model is None:
            return self._refuse(reference, "not-serving", "this peer does not serve that model")
        now = trio.current_time()
        if now - self._last_challenge.get(peer_id, -1e9) < MIN_CHALLENGE_INTERVAL_S or self._waiting >= MAX_QUEUED:
            return self._refuse(reference, "busy", "too many possession challenges; retry shortly")
        if len(self._last_challenge) >= MAX_TRACKED:
            self._last_challenge.clear()
        self._last_challenge[peer_id] = now
        tokens = challenge_tokens(challenge.nonce, vocab_size(model), challenge.positions)
        self._waiting += 1
        try:
            async with self._one_at_a_time:  # prefills run one at a time; a short queue, then busy
                fingerprint = await trio.to_thread.run_sync(prove, model, tokens)
        finally:
            self._waiting -= 1
        return encode_signed(self.identity, PossessionProof(challenge=reference, model=challenge.model,
                                                            fingerprint=fingerprint))

    def _refuse(self, reference: bytes, code: str, message: str) -> bytes:
        return encode_signed(self.identity, Refusal(request_id=reference, code=code, message=message))


class PossessionVetting:
    """Challenges candidates and caches the outcome per (peer, model)."""

    def __init__(self, node: Node, identity: Identity) -> None:
        self.node = node
        self.identity = identity
        self.local_models: dict[bytes, LoadedModel] = {}
        self._cache: dict[tuple[str, bytes], tuple[Possession, float]] = {}
        self._inflight: dict[tuple[str, bytes], trio.Event] = {}
        self._limiter = trio.Semaphore(MAX_CONCURRENT_CHALLENGES)
        self.counters: dict[str, int] = {}

    def add_local_models(self, models: Iterable[LoadedModel]) -> None:
        for m in models:
            self.local_models[m.digest] = m

    def status(self, peer_id: str, digest: bytes) -> Possession | None:
        entry = self._cache.get((peer_id, digest))
        if entry is None or entry[1] <= trio.current_time():
            return None
        return entry[0]

    def _record(self, peer_id: str, digest: bytes, outcome: Possession, why: str = "") -> Possession:
        if len(self._cache) >= MAX_TRACKED:
            now = trio.current_time()
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            if len(self._cache) >= MAX_TRACKED:
                self._cache.clear()
        self._cache[(peer_id, digest)] = (outcome, trio.current_time() + CACHE_S[outcome])
        self.counters[outcome.value] = self.counters.get(outcome.value, 0) + 1
        if outcome is Possession.WRONG:
            log.info("possession.wrong", peer=peer_id, model=digest.hex()[:16], reason=why[:200])
        else:
            log.debug("possession.checked", peer=peer_id, model=digest.hex()[:16], outcome=outcome.value,
                      reason=why[:200])
        return outcome

    async def challenge(self, peer_id: str, digest: bytes, *, timeout: float = CHALLENGE_TIMEOUT_S) -> Possession:
        """Challenge ``peer_id`` now (whatever the cache says) and record the outcome."""
        nonce = secrets.token_bytes(32)
        challenge = encode_signed(self.identity, PossessionChallenge(
            model=digest, nonce=nonce, positions=CHALLENGE_POSITIONS, expires_at_ms=now_ms() + CHALLENGE_TTL_MS))
        try:
            with trio.fail_after(timeout + 1):
                reply = await self.node.request(peer_id, POSSESSION, challenge, timeout=timeout)
            signed = POSSESSION.decode_response(reply)
        except (NetError, WireError, trio.TooSlowError) as exc:
            return self._record(peer_id, digest, Possession.UNREACHABLE, str(exc))
        if signed.signer_peer_id != peer_id:
            return self._record(peer_id, digest, Possession.WRONG, "answer signed by another key")
        answer = signed.message
        if isinstance(answer, Refusal):
            if answer.code == "busy":  # reachable and honest about it: not cached, asked again next time
                self.counters["busy"] = self.counters.get("busy", 0) + 1
                return Possession.UNREACHABLE
            return self._record(peer_id, digest, Possession.UNREACHABLE, f"refused: {answer.code}")
        if answer.challenge != hashlib.sha256(challenge).digest() or answer.model != digest:
            return self._record(peer_id, digest, Possession.WRONG, "answer is for another challenge or model")
        claimed = parse_proof(answer.fingerprint, CHALLENGE_POSITIONS)
        if isinstance(claimed, str):
            return self._record(peer_id, digest, Possession.WRONG, claimed)
        model = self.local_models.get(digest)
        if model is None:
            return self._record(peer_id, digest, Possession.ANSWERED)
        tokens = challenge_tokens(nonce, vocab_size(model), CHALLENGE_POSITIONS)
        rows: np.ndarray = await trio.to_thread.run_sync(recompute_logprobs, model, tokens[:1], tokens[1:])
        why = check_proof(claimed, rows, model.measured_tolerance())
        return self._record(peer_id, digest, Possession.WRONG if why else Possession.PROVEN, why or "")

    async def vet(self, digest: bytes, candidates: Sequence[PeerInfo], *, enough: int = 1) -> list[PeerInfo]:
        """The candidates that may be offered work: ourselves, and peers with an acceptable (cached or
        fresh) challenge outcome.

        Unknown candidates are challenged concurrently (bounded), in the node's own nursery when it runs,
        so a challenge outlives the request that started it and its outcome is cached (a peer that never
        answers is cached ``unreachable`` once its challenge times out). The request itself waits by the
        election's closing rule (:mod:`p2pinfer.request.bid_window`): until every challenge is answered, or
        the grace period after ``enough`` candidates (executor + verifiers) are acceptable, or
        :data:`VET_BUDGET_S`, whichever is first. An honest peer whose answer came after that is not lost:
        its outcome is cached and the next request offers it work.
        """
        def acceptable(c: PeerInfo) -> bool:
            return c.peer_id == self.node.peer_id or self.status(c.peer_id, digest) in ACCEPTABLE

        unknown = [c.peer_id for c in candidates
                   if c.peer_id != self.node.peer_id and self.status(c.peer_id, digest) is None]
        if unknown:
            # Random order, so that when more are unknown than are challenged at once, fakes cannot make
            # sure honest peers come last.
            secrets.SystemRandom().shuffle(unknown)
            window = BidWindow(candidates=len(unknown), enough=enough - sum(map(acceptable, candidates)),
                               opened_at=trio.current_time(), timeout_s=VET_BUDGET_S)
            wake = [trio.Event()]

            async def watch(peer_id: str) -> None:
                await self._challenge_started(peer_id, digest).wait()
                window.record(trio.current_time(), valid=self.status(peer_id, digest) in ACCEPTABLE)
                wake[0].set()

            async with trio.open_nursery() as nursery:
                for peer_id in unknown:
                    nursery.start_soon(watch, peer_id)
                while trio.current_time() < window.close_at():
                    wake[0] = trio.Event()
                    with trio.move_on_at(window.close_at()):
                        await wake[0].wait()
                nursery.cancel_scope.cancel()  # the watchers only; the challenges go on in the background
            closed = window.reason(trio.current_time())
            self.counters[f"vet.{closed.value}"] = self.counters.get(f"vet.{closed.value}", 0) + 1
        return [c for c in candidates if acceptable(c)]

    def _challenge_started(self, peer_id: str, digest: bytes) -> trio.Event:
        """The event set when the challenge of ``peer_id`` ends (starting it unless one is in flight)."""
        key = (peer_id, digest)
        running = self._inflight.get(key)
        if running is not None:  # another request is challenging this peer right now: share it
            return running
        done = self._inflight[key] = trio.Event()

        async def run() -> None:
            try:
                async with self._limiter:
                    if self.status(peer_id, digest) is None:
                        await self.challenge(peer_id, digest)
            except Exception as exc:  # in the node's nursery: whatever a peer sends must not stop the node
                self._record(peer_id, digest, Possession.UNREACHABLE, f"challenge failed: {exc!r}")
                log.warning("possession.challenge_failed", peer=peer_id, error=repr(exc)[:200])
            finally:
                del self._inflight[key]
                done.set()

        if not self.node.start_background(run):
            self._inflight.pop(key)
            done.set()  # the node is stopping: nothing to challenge with
        return done


_VETTING: "weakref.WeakKeyDictionary[Node, PossessionVetting]" = weakref.WeakKeyDictionary()


def vetting_for(node: Node, identity: Identity | None = None) -> PossessionVetting:
    """The node's one vetting cache (a serving peer and the gateway client on it share it)."""
    vetting = _VETTING.get(node)
    if vetting is None:
        vetting = _VETTING[node] = PossessionVetting(node, identity or node.identity)
    return vetting


def install_possession(node: Node, identity: Identity, models: Sequence[LoadedModel]) -> PossessionService:
    """Serving-peer hook: answer possession challenges, and check other peers' answers with our models."""
    service = PossessionService(node, identity, models)
    service.register()
    vetting_for(node, identity).add_local_models(models)
    return service


async def vet_candidates(node: Node, identity: Identity, digest: bytes, infos: Sequence[PeerInfo], *,
                         enough: int = 1) -> list[PeerInfo]:
    """Client hook: the candidates of ``infos`` that have shown they hold ``digest`` (see module docs)."""
    return await vetting_for(node, identity).vet(digest, infos, enough=enough)
