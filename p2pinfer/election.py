"""Executor election: rank the peers that bid for a request by their VRF outputs. Pure logic, no I/O.

Every candidate peer computes ``prove(seed, election_input(request_id, epoch_seed))`` and sends it as a
:class:`~p2pinfer.wire.messages.Bid`. Whoever holds the same bids (client, executor, verifiers, anybody
auditing a receipt) computes the same :class:`ElectionResult` with :func:`elect`:

* every bid is checked (right request, eligible key, valid ECVRF proof); bad ones are dropped with a
  reason, never raised;
* the accepted peers are ranked by VRF output (64 bytes, compared as big-endian unsigned integers, i.e.
  bytewise), ties (which would need a SHA-512 collision) broken by public key;
* rank 0 executes, ranks ``1 .. q`` verify. On failover the client assigns ``attempt`` k to rank k.

The model is bound to the election through the request ID: ``Request.request_id()`` hashes the whole
canonical request, model digest included, so a different model is a different election. Which peers may
bid (those that serve the model, are not banned, ...) is the caller's ``eligible`` set.

Duplicate keys: ECVRF outputs are unique per (key, input) (RFC 9381 full uniqueness, which key validation
gives us), so several bids with the same key can never carry different outputs. :func:`elect` keeps a key
if any of its bids is valid (the copy with the smallest proof bytes, so the choice does not depend on
arrival order) and rejects the others as ``duplicate-key`` (or with their own reason if invalid). Dropping
the key altogether would let anyone who can slip a garbage bid into the set knock an honest peer out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import vrf
from .wire.hashing import tagged_hash
from .wire.messages import EPOCH_SEED, Bid, Request

__all__ = [
    "ELECTION_DOMAIN",
    "DEFAULT_VERIFIERS",
    "Ranked",
    "Rejection",
    "ElectionResult",
    "NotElected",
    "election_input",
    "make_bid",
    "elect",
    "elect_for_request",
    "rank_of",
    "check_won",
]

ELECTION_DOMAIN = "p2pinfer/election/v1"
DEFAULT_VERIFIERS = 2
REQUEST_ID_SIZE = 32
MAX_EPOCH_SEED = EPOCH_SEED.max_len

# Rejection reasons (stable codes, for logs and metrics).
MALFORMED = "malformed"
WRONG_REQUEST = "wrong-request"
NOT_ELIGIBLE = "not-eligible"
DUPLICATE_KEY = "duplicate-key"
INVALID_PROOF = "invalid-proof"


class Ranked(NamedTuple):
    public_key: bytes
    output: bytes  # the 64-byte VRF output (beta)


class Rejection(NamedTuple):
    bid: Any  # normally a Bid; whatever the caller passed when it was not one
    reason: str  # one of the codes above
    detail: str  # human-readable, e.g. the VRF error


@dataclass(frozen=True)
class ElectionResult:
    request_id: bytes
    epoch_seed: bytes
    alpha: bytes  # the VRF input every bid was checked against
    ranking: tuple[Ranked, ...]  # ascending output; ranking[0] is the executor
    accepted: tuple[Bid, ...]  # the bid kept for each ranked key, in ranking order
    rejected: tuple[Rejection, ...]
    verifier_count: int  # q, as asked

    @property
    def executor(self) -> bytes | None:
        return self.ranking[0].public_key if self.ranking else None

    @property
    def verifiers(self) -> tuple[bytes, ...]:
        return tuple(r.public_key for r in self.ranking[1 : 1 + self.verifier_count])

    @property
    def complete(self) -> bool:
        """True when there is an executor and all ``q`` verifiers."""
        return len(self.ranking) >= 1 + self.verifier_count


class NotElected(ValueError):
    """This peer is not the one the election picked for this attempt (Refusal code ``not-winner``)."""

    reason = "not-winner"


def election_input(request_id: bytes, epoch_seed: bytes = b"") -> bytes:
    """The VRF input (alpha) of a request's election, domain-separated from every other use of the keys."""
    request_id, epoch_seed = bytes(request_id), bytes(epoch_seed)
    if len(request_id) != REQUEST_ID_SIZE:
        raise ValueError(f"a request ID is {REQUEST_ID_SIZE} bytes, got {len(request_id)}")
    if len(epoch_seed) > MAX_EPOCH_SEED:
        raise ValueError(f"an epoch seed is at most {MAX_EPOCH_SEED} bytes, got {len(epoch_seed)}")
    return tagged_hash(ELECTION_DOMAIN, request_id, epoch_seed)


def make_bid(secret_key: vrf.SecretKey | bytes, request_id: bytes, epoch_seed: bytes = b"") -> Bid:
    """A candidate's bid for a request (what it sends to the client); ``secret_key`` may be a bare seed."""
    key = secret_key if isinstance(secret_key, vrf.SecretKey) else vrf.SecretKey(secret_key)
    proof = key.prove(election_input(request_id, epoch_seed))
    return Bid(request_id=bytes(request_id), public_key=key.public_key, proof=proof)


def _check_shape(bid: Any) -> str | None:
    """None when ``bid`` is a schema-valid Bid, else why not."""
    if not isinstance(bid, Bid):
        return f"expected a Bid, got {type(bid).__name__}"
    try:
        bid.validate()
    except (TypeError, ValueError) as exc:  # SchemaError is a ValueError
        return str(exc)
    return None


def elect(
    request_id: bytes,
    epoch_seed: bytes,
    bids: Iterable[Any],
    *,
    verifiers: int = DEFAULT_VERIFIERS,
    eligible: Collection[bytes] | None = None,
) -> ElectionResult:
    """Check every bid and rank the valid ones. Deterministic and independent of the order of ``bids``.

    ``eligible``, if given, is the set of public keys allowed to take part (e.g. the peers announcing the
    model); bids from other keys are rejected without verifying their proofs. Bad bids never raise.
    """
    if verifiers < 0:
        raise ValueError("the number of verifiers cannot be negative")
    alpha = election_input(request_id, epoch_seed)
    request_id = bytes(request_id)
    eligible_keys = None if eligible is None else frozenset(bytes(k) for k in eligible)

    rejected: list[Rejection] = []
    malformed: list[Rejection] = []
    by_key: dict[bytes, list[Bid]] = {}
    for bid in bids:
        problem = _check_shape(bid)
        if problem is not None:
            malformed.append(Rejection(bid, MALFORMED, problem))
        elif bid.request_id != request_id:
            rejected.append(Rejection(bid, WRONG_REQUEST, "bid is for another request"))
        elif eligible_keys is not None and bid.public_key not in eligible_keys:
            rejected.append(Rejection(bid, NOT_ELIGIBLE, "key is not eligible for this election"))
        else:
            by_key.setdefault(bid.public_key, []).append(bid)

    ranked: list[tuple[Ranked, Bid]] = []
    for key, key_bids in by_key.items():
        kept: tuple[bytes, Bid] | None = None  # (output, bid)
        checked: dict[bytes, bytes | vrf.VRFError] = {}  # proof -> output or error, so resent copies cost nothing
        for bid in sorted(key_bids, key=lambda b: b.proof):
            if bid.proof not in checked:
                try:
                    checked[bid.proof] = vrf.verify(key, bid.proof, alpha)
                except vrf.VRFError as exc:
                    checked[bid.proof] = exc
            output = checked[bid.proof]
            if isinstance(output, vrf.VRFError):
                rejected.append(Rejection(bid, INVALID_PROOF, str(output)))
                continue
            if kept is None:
                kept = (output, bid)
            else:  # uniqueness: the output is the same; keep the first in proof order
                rejected.append(Rejection(bid, DUPLICATE_KEY, "another bid from this key was kept"))
        if kept is not None:
            ranked.append((Ranked(key, kept[0]), kept[1]))

    ranked.sort(key=lambda item: (item[0].output, item[0].public_key))
    rejected.sort(key=lambda r: (r.bid.public_key, r.bid.proof, r.bid.request_id, r.reason))
    return ElectionResult(
        request_id=request_id,
        epoch_seed=bytes(epoch_seed),
        alpha=alpha,
        ranking=tuple(r for r, _ in ranked),
        accepted=tuple(b for _, b in ranked),
        rejected=tuple(rejected) + tuple(malformed),
        verifier_count=verifiers,
    )


def elect_for_request(
    request: Request,
    epoch_seed: bytes,
    bids: Iterable[Any],
    *,
    verifiers: int = DEFAULT_VERIFIERS,
    eligible: Collection[bytes] | None = None,
) -> ElectionResult:
    """:func:`elect` for a full request (its ID binds the model digest and every other request field)."""
    return elect(request.request_id(), epoch_seed, bids, verifiers=verifiers, eligible=eligible)


def rank_of(result: ElectionResult, public_key: bytes) -> int | None:
    """0 for the executor, 1.. for the following ranks, None when the key is not ranked."""
    for index, ranked in enumerate(result.ranking):
        if ranked.public_key == public_key:
            return index
    return None


def check_won(result: ElectionResult, my_public_key: bytes, *, attempt: int = 0) -> None:
    """Raise NotElected unless ``my_public_key`` holds rank ``attempt`` (0: the winner; k: k-th fallback).

    The executor calls this on the bids of an Assignment before doing any work, and refuses otherwise.
    """
    rank = rank_of(result, my_public_key)
    if rank is None:
        raise NotElected("this peer has no valid bid in the assignment's election")
    if rank != attempt:
        raise NotElected(f"this peer ranks {rank} in the election, but the assignment is attempt {attempt}")
