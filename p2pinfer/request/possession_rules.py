"""Model-possession challenge: pure rules (token derivation, proof check, outcomes). No I/O, no model.

A challenger sends a fresh 32-byte nonce. Both sides derive the same ``positions`` token IDs from it
(:func:`challenge_tokens`); the challenged peer prefills them with the announced model and answers with
the top-k log-probs of the rows after each token but the last (a ``runtime.fingerprint`` fingerprint),
signed. Only the real weights give those rows: the tokens are unpredictable, so nothing can be
precomputed, and a different model, quantization or a random answer misses the recomputed log-probs by
far more than the model's measured tolerance. A challenger that holds the model recomputes the rows and
checks them with :func:`check_proof` (the fingerprint rules a verifier applies, minus the sampler rule:
the challenge tokens were not sampled).
"""

from __future__ import annotations

import enum

import numpy as np

from ..runtime.fingerprint import QUANTUM, Fingerprint, FingerprintFormatError, unpack
from ..wire.hashing import tagged_hash

CHALLENGE_POSITIONS = 8
CHALLENGE_DOMAIN = "p2pinfer/v1/possession-tokens"


class Possession(enum.Enum):
    """What a challenge showed about a peer (cached per peer and model)."""

    PROVEN = "proven"              # the answer matches our own recomputation
    ANSWERED = "answered"          # a well-formed signed answer; we hold no model to check it against
    WRONG = "wrong"                # the answer does not match the real weights (or is malformed)
    UNREACHABLE = "unreachable"    # no answer: dial failed, timeout, refused, not serving


def challenge_tokens(nonce: bytes, vocab_size: int, positions: int = CHALLENGE_POSITIONS) -> list[int]:
    """``positions`` token IDs in ``[0, vocab_size)`` derived from ``nonce`` (both sides compute the same)."""
    if vocab_size < 2:
        raise ValueError("vocabulary too small for a challenge")
    out = []
    for i in range(positions):
        h = tagged_hash(CHALLENGE_DOMAIN, nonce, i.to_bytes(4, "big"))
        out.append(int.from_bytes(h[:8], "big") % vocab_size)
    return out


def parse_proof(data: bytes, positions: int) -> Fingerprint | str:
    """The fingerprint of a proof, or why it is malformed (wrong row count, bad encoding)."""
    try:
        fp = unpack(data)
    except FingerprintFormatError as exc:
        return f"malformed fingerprint: {exc}"
    if len(fp) != positions - 1:
        return f"fingerprint has {len(fp)} rows, expected {positions - 1}"
    return fp


def check_proof(claimed: Fingerprint, logprobs: np.ndarray, tolerance: float) -> str | None:
    """``None`` when ``claimed`` matches recomputed rows ``logprobs`` [n, vocab]; else the first reason."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.shape[0] != len(claimed):
        return f"{len(claimed)} rows claimed, {lp.shape[0]} recomputed"
    allowance = tolerance + QUANTUM
    vocab = lp.shape[1]
    for i in range(len(claimed)):
        ids = claimed.ids[i]
        values = claimed.logprobs[i]
        if ids.min() < 0 or ids.max() >= vocab or len(set(ids.tolist())) != len(ids):
            return f"row {i}: duplicate or out-of-vocabulary token IDs"
        if np.any(np.diff(values) > 0):
            return f"row {i}: log-probs not in descending order"
        deviation = float(np.max(np.abs(lp[i, ids] - values)))
        if deviation > allowance:
            return f"row {i}: log-probs off by {deviation:.3g} (tolerance {tolerance:.3g})"
        rest = lp[i].copy()
        rest[ids] = -np.inf
        if float(rest.max()) - float(values[-1]) > allowance:
            return f"row {i}: an unclaimed token outranks the claimed top-k"
    return None
