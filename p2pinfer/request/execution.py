"""Pipeline stage 2, execution and failover: assign, stream the executor's signed tokens, fail over.

The winner gets a signed ``Assignment`` (request, the signed bid set, attempt 0, no prefix) over
``/p2pinfer/task/1``; ``TokenChunk`` frames stream back, then the ``InferenceResult``. If the executor
disconnects, stalls or misbehaves, the next-ranked bidder gets attempt k with the tokens received so far as
``prefix_ids`` and, as evidence, the last signed chunk or signed refusal of each lower rank that answered.
Seeded sampling makes the continuation identical.

Every failed attempt says whose fault it was (:class:`~p2pinfer.settlement.Fault`): only a peer's own
provable fault (bytes it sent on its authenticated stream that break the protocol, or signed tokens that
contradict each other) is ever booked; our own failures (an assignment too large to send, our
cancellation) and unattributable ones (closed connection, stall, failed dial) never are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Sequence

import trio

from ..identity import Identity, peer_id_from_public_key
from ..log import get_logger
from ..net import NetError, Node
from ..net.errors import FrameTooLargeError, MalformedFrameError, RemoteError
from ..settlement import Fault
from ..wire import (Assignment, InferenceResult, Refusal, Request, Signed, TokenChunk, WireError, decode_signed,
                    encode_signed)
from .evidence import chain_start, extend_chain
from .offers import ElectionEvidence
from .text import VerifiedText
from .protocol import ACCEPT_TIMEOUT_S, FAILOVER_STATUS_TIMEOUT_S, MAX_TASK_FRAME, TASK_PROTOCOL

log = get_logger("p2pinfer.client")


@dataclass(frozen=True)
class StreamChunk:
    """Newly generated text, as it arrives."""

    text: str
    token_ids: tuple[int, ...]
    index: int
    executor: str


@dataclass(frozen=True)
class Attempt:
    peer_id: str
    outcome: str  # "completed", "refused:<code>", "failed:<reason>"
    tokens: int
    key: bytes | None = None  # the executor's public key (from its bid)
    fault: Fault | None = None  # for failures: whose fault (only Fault.PEER is ever booked)
    delivered: bool = True  # False when the task stream never opened: the peer never saw the assignment


@dataclass
class Progress:
    """What the client has received so far for one request (survives failover)."""

    token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    first_token_at: float | None = None
    inherited_tokens: int = 0  # tokens the final executor continued from earlier executors
    evidence: dict[bytes, bytes] = field(default_factory=dict)  # lower rank's key -> its last signed word
    text: VerifiedText | None = None  # decodes the verified token IDs (the executor's text is never shown)


class _Failed(Exception):
    def __init__(self, outcome: str, fault: Fault) -> None:
        self.outcome, self.fault = outcome, fault


def attempt_order(ranking: Sequence[str], progress: Progress, round_start: int) -> Iterator[tuple[int, str]]:
    """The ranks to assign, in order: each once, then once more from the lowest rank whose assignment was
    never delivered (its task stream did not open, e.g. a protocol negotiation that timed out under load)
    if a higher rank then refused as ``not-winner``. That rank is reachable enough to answer the higher
    rank's status query with a signed "not assigned", which is true: without a second try nobody could
    take the request and it would fail although every peer is honest. The retry only happens while no
    tokens have come, since attempt 0 takes no prefix."""
    yield from enumerate(ranking)
    this_round = progress.attempts[round_start:]
    undelivered = [i for i, a in enumerate(this_round) if not a.delivered]
    if (undelivered and not progress.token_ids
            and any(a.outcome == "refused:not-winner" for a in this_round[undelivered[0] + 1:])):
        log.info("task.redeliver", peer_id=ranking[undelivered[0]], attempt=undelivered[0])
        progress.evidence.clear()  # the higher ranks' refusals are no evidence for a lower attempt
        yield from ((i, ranking[i]) for i in range(undelivered[0], len(ranking)))


async def run_attempt(node: Node, identity: Identity, request: Request, request_id: bytes,
                      election: ElectionEvidence, attempt: int, peer_id: str, progress: Progress, *,
                      stall_timeout: float, accept_timeout: float = ACCEPT_TIMEOUT_S,
                      before_assigning: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[Any]:
    """Run attempt ``attempt`` on ``peer_id``: yields StreamChunks, then the signed result if it completed.

    ``before_assigning`` is awaited once the stream is open and before the assignment is sent (the client
    waits there for the signed bid set to reach every bidder).
    """
    executor_key = next((b.public_key for b in election.bids if peer_id_from_public_key(b.public_key) == peer_id),
                        None)
    assignment = Assignment(request=request, epoch_seed=election.epoch_seed, bids=election.bids,
                            prefix_ids=tuple(progress.token_ids), attempt=attempt,
                            bid_set=election.bid_set.to_bytes() if election.bid_set is not None else b"",
                            evidence=tuple(progress.evidence.values()))
    received_before = len(progress.token_ids)
    chain = extend_chain(chain_start(request_id), progress.token_ids)
    try:
        assignment_bytes = encode_signed(identity, assignment)
    except ValueError as exc:  # our own request does not fit the protocol: nobody else's fault
        progress.attempts.append(Attempt(peer_id, "failed:assignment-invalid", 0, executor_key, Fault.CLIENT))
        log.info("task.not_sent", peer_id=peer_id, reason=str(exc)[:200])
        return
    if len(assignment_bytes) > MAX_TASK_FRAME:
        progress.attempts.append(Attempt(peer_id, "failed:assignment-too-large", 0, executor_key, Fault.CLIENT))
        log.info("task.not_sent", peer_id=peer_id, reason="assignment exceeds the task frame limit",
                 size=len(assignment_bytes), limit=MAX_TASK_FRAME)
        return
    try:
        frames = await node.open_stream(peer_id, TASK_PROTOCOL, timeout=stall_timeout, max_frame=MAX_TASK_FRAME)
    except NetError as exc:
        progress.attempts.append(Attempt(peer_id, f"failed:{exc.reason}", 0, executor_key, Fault.UNPROVEN,
                                         delivered=False))
        log.info("task.failover", peer_id=peer_id, attempt=attempt, reason=str(exc)[:200])
        return
    outcome, fault = "failed:cancelled", Fault.CLIENT  # what a cancellation (ours) leaves behind
    try:
        if before_assigning is not None:
            await before_assigning()
        await frames.send(assignment_bytes)
        # The first frame is the executor's signed acceptance (or refusal), sent right after its checks; at
        # attempt k > 0 it may first ask lower ranks that left no signed word for their status (each within
        # FAILOVER_STATUS_TIMEOUT_S, at once), so it may come that much later.
        wait = min(accept_timeout, stall_timeout)
        if attempt > 0 and len(progress.evidence) < attempt:
            wait += FAILOVER_STATUS_TIMEOUT_S
        while True:
            body = await frames.receive(timeout=wait)
            wait = stall_timeout
            if body is None:
                raise _Failed("failed:closed-before-result", Fault.UNPROVEN)
            # The stream is authenticated (Noise): bytes on it are the peer's own.
            signed = decode_signed(body, expect=(TokenChunk, InferenceResult, Refusal), max_size=MAX_TASK_FRAME)
            if signed.signer != executor_key:
                raise _Failed("failed:wrong-signer", Fault.PEER)
            message = signed.message
            if message.request_id != request_id:
                raise _Failed("failed:wrong-request", Fault.PEER)
            if isinstance(message, Refusal):
                outcome, fault = f"refused:{message.code}", None
                progress.evidence[signed.signer] = body
                log.info("task.refused", peer_id=peer_id, code=message.code, message=message.message)
                break
            if isinstance(message, TokenChunk):
                if not message.token_ids and message.text:
                    raise _Failed("failed:text-without-tokens", Fault.PEER)
                if message.index != len(progress.token_ids):
                    raise _Failed("failed:token-gap", Fault.PEER)
                chain = extend_chain(chain, message.token_ids)
                if message.chain != chain:
                    raise _Failed("failed:token-chain", Fault.PEER)
                progress.token_ids.extend(message.token_ids)
                progress.evidence[signed.signer] = body  # its signature on every token so far
                if message.token_ids:  # the first chunk has none: the executor's signed acceptance
                    text = _shown_text(progress, message.token_ids)  # from the IDs; message.text is never shown
                    progress.text_parts.append(text)
                    yield StreamChunk(text, message.token_ids, message.index, peer_id)
                continue
            if (tuple(message.output_ids) != tuple(progress.token_ids)
                    or message.inherited_tokens != received_before or message.attempt != attempt
                    or message.election != (election.bid_set.message_id if election.bid_set else b"")):
                raise _Failed("failed:result-mismatch", Fault.PEER)
            outcome, fault = "completed", None
            progress.inherited_tokens = received_before
            tail = progress.text.finish() if progress.text is not None else ""  # held back for stop strings
            if tail:
                progress.text_parts.append(tail)
                yield StreamChunk(tail, (), len(progress.token_ids), peer_id)
            yield signed
            break
    except _Failed as failed:
        outcome, fault = failed.outcome, failed.fault
        log.info("task.failover", peer_id=peer_id, attempt=attempt, reason=outcome)
    except (NetError, WireError) as exc:
        outcome, fault = f"failed:{exc.reason}", _fault_of(exc)
        log.info("task.failover", peer_id=peer_id, attempt=attempt, reason=str(exc)[:200])
    finally:
        progress.attempts.append(Attempt(peer_id, outcome, len(progress.token_ids) - received_before,
                                         executor_key, fault))
        with trio.CancelScope(shield=True):
            if outcome == "completed":
                await frames.aclose()
            else:
                await frames.reset()


def _shown_text(progress: Progress, token_ids: Sequence[int]) -> str:
    """What the user sees of new tokens: decoded with the model's own (digest-checked) tokenizer."""
    if progress.text is None:
        raise RuntimeError("a request runs without its verified tokenizer")  # a bug of ours, never shown text
    return progress.text.push(token_ids)


def _fault_of(exc: Exception) -> Fault:
    """Malformed or oversized frames and unparsable messages on the peer's authenticated stream are its own;
    a closed, reset or silent stream could be anybody's."""
    if isinstance(exc, WireError | MalformedFrameError | FrameTooLargeError | RemoteError):
        return Fault.PEER
    return Fault.UNPROVEN
