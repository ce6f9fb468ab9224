"""Model-possession challenge rules (pure): token derivation, proof parsing and checking."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from p2pinfer.request.possession_rules import CHALLENGE_POSITIONS, challenge_tokens, check_proof, parse_proof
from p2pinfer.runtime.fingerprint import FingerprintBuilder, unpack

VOCAB = 500


def rows(seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(CHALLENGE_POSITIONS - 1, VOCAB)) * 3
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def proof_of(lp: np.ndarray) -> bytes:
    builder = FingerprintBuilder()
    for row in lp:
        builder.add(row)
    return builder.build().pack()


@given(st.binary(min_size=32, max_size=32), st.integers(2, 1 << 20))
def test_tokens_are_deterministic_and_in_range(nonce: bytes, vocab: int) -> None:
    tokens = challenge_tokens(nonce, vocab)
    assert tokens == challenge_tokens(nonce, vocab) and len(tokens) == CHALLENGE_POSITIONS
    assert all(0 <= t < vocab for t in tokens)


def test_the_real_rows_pass_and_other_rows_fail() -> None:
    lp = rows(1)
    claimed = parse_proof(proof_of(lp), CHALLENGE_POSITIONS)
    assert not isinstance(claimed, str)
    assert check_proof(claimed, lp, tolerance=1e-3) is None
    assert check_proof(claimed, lp + np.random.default_rng(2).normal(size=lp.shape) * 0.01, tolerance=1e-3)
    assert check_proof(claimed, rows(3), tolerance=1e-3)  # another model altogether


def test_malformed_proofs_are_refused() -> None:
    assert isinstance(parse_proof(b"", CHALLENGE_POSITIONS), str)
    assert isinstance(parse_proof(proof_of(rows(1)[:3]), CHALLENGE_POSITIONS), str)  # too few rows
    fp = unpack(proof_of(rows(1)))
    fp.ids[0, 1] = fp.ids[0, 0]  # duplicate token ID
    assert "duplicate" in (check_proof(fp, rows(1), tolerance=1e-3) or "")
