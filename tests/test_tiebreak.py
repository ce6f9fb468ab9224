"""The tie-break rule (runtime/tiebreak.py), as pure functions: property tests of its proof sketch.

An "exact" row ``E`` stands for the exact-arithmetic log-probs, the reference row is ``E`` plus float64-sized
noise, and honest executor and verifier rows are ``E`` plus drift of at most their own tolerances. Then the
executor's pick is accepted by the verifier, and no other token is — at every position, near tie or not.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.runtime.sampling import SamplingParams, acceptable_rows, admissible_tokens, sample
from p2pinfer.runtime.tiebreak import check_rows, is_ambiguous, resolve

VOCAB = 40
SEED = bytes(range(32))


def _row(rng: np.random.Generator, spread: float) -> np.ndarray:
    logits = rng.normal(0.0, spread, VOCAB)
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


def _drift(rng: np.random.Generator, row: np.ndarray, tol: float) -> np.ndarray:
    return row + rng.uniform(-tol, tol, row.shape)


params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.05, 0.3, 0.8, 1.5]),
    top_k=st.sampled_from([0, 5]),
    top_p=st.sampled_from([1.0, 0.9]),
)


@settings(max_examples=300, deadline=None)
@given(params=params_strategy, seed=st.integers(0, 2**32 - 1), index=st.integers(0, 500),
       spread=st.sampled_from([0.05, 0.5, 2.0]), tol_e=st.sampled_from([1e-3, 0.05, 0.2]),
       tol_v=st.sampled_from([1e-3, 0.05, 0.2]))
def test_honest_parties_agree_and_nothing_else_passes(params, seed, index, spread, tol_e, tol_v) -> None:
    rng = np.random.default_rng(seed)
    exact = _row(rng, spread)
    reference = exact + rng.uniform(-1e-13, 1e-13, VOCAB)
    calls = []

    def reference_row(i: int) -> np.ndarray:
        calls.append(i)
        return reference

    executor, verifier = _drift(rng, exact, tol_e), _drift(rng, exact, tol_v)
    token = resolve(executor, params, SEED, index, tol_e, reference_row)
    assert calls == ([index] if is_ambiguous(executor, params, SEED, index, tol_e) else [])
    assert token == sample(exact, params, SEED, index)  # the exact pick (no true gap below 1e-10 here)
    accepted = [t for t in range(VOCAB)
                if check_rows(verifier[None], params, SEED, index, np.array([t]), tol_v, reference_row)[0]]
    assert accepted == [token]


@settings(max_examples=200, deadline=None)
@given(params=params_strategy, seed=st.integers(0, 2**32 - 1), start=st.integers(0, 500),
       spread=st.sampled_from([0.05, 0.5, 2.0]), tol=st.sampled_from([1e-3, 0.05, 0.2]))
def test_the_check_and_the_near_tie_test_match_the_admissible_set(params, seed, start, spread, tol) -> None:
    rng = np.random.default_rng(seed)
    rows = np.stack([_row(rng, spread) for _ in range(4)])
    tokens = np.array([int(rng.integers(0, VOCAB)) if r % 2 else sample(rows[r], params, SEED, start + r)
                       for r in range(4)])
    ok = acceptable_rows(rows, params, SEED, start, tokens, tol)
    admitted = [admissible_tokens(rows[r], params, SEED, start + r, tol) for r in range(4)]
    np.testing.assert_array_equal(ok, [int(tokens[r]) in admitted[r] for r in range(4)])
    near = [is_ambiguous(rows[r], params, SEED, start + r, tol) for r in range(4)]
    np.testing.assert_array_equal(near, [len(admitted[r]) > 1 for r in range(4)])
