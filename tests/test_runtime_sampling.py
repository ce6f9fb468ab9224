"""Seeded sampling: determinism, and that the tolerance check accepts honest drift (pure, hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from p2pinfer.runtime.sampling import (
    GREEDY, SamplingParams, acceptable_rows, candidates, is_acceptable, log_softmax, sample, sampling_seed, uniform,
)

SEED = sampling_seed(bytes(range(32)), None)


def test_seed_material_defaults_to_request_id_and_explicit_seed_overrides() -> None:
    rid = bytes(range(32))
    assert sampling_seed(rid, None) == rid
    assert sampling_seed(rid, 7) == sampling_seed(bytes(32), 7) != sampling_seed(rid, 8)
    assert len(sampling_seed(rid, 7)) == 32
    with pytest.raises(ValueError):
        sampling_seed(rid, -1)
    with pytest.raises(ValueError):
        sampling_seed(b"short", None)


def test_uniform_is_deterministic_per_index() -> None:
    values = [uniform(SEED, i) for i in range(200)]
    assert values == [uniform(SEED, i) for i in range(200)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert len(set(values)) == 200
    assert uniform(sampling_seed(bytes(32), 1), 0) != uniform(sampling_seed(bytes(32), 2), 0)


def test_params_are_validated() -> None:
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(top_k=-1)


logit_rows = hnp.arrays(np.float32, st.integers(2, 64), elements=st.floats(-20, 20, width=32))
params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5]),
    top_k=st.sampled_from([0, 1, 2, 5, 40]),
    top_p=st.sampled_from([1.0, 0.9, 0.5, 0.1]),
)


@given(logit_rows)
def test_greedy_is_argmax_lowest_id(logits: np.ndarray) -> None:
    lp = log_softmax(logits)
    assert sample(lp, GREEDY, SEED, 0) == int(np.flatnonzero(lp == lp.max())[0])


@given(logit_rows, params_strategy, st.integers(0, 10_000))
def test_sampled_token_is_a_candidate_and_acceptable(logits: np.ndarray, params: SamplingParams, index: int) -> None:
    lp = log_softmax(logits)
    token = sample(lp, params, SEED, index)
    if not params.greedy:
        assert token in set(candidates(lp, params).tolist())
    ok, why = is_acceptable(lp, params, SEED, index, token, 0.0)
    assert ok, why
    assert acceptable_rows(lp[None], params, SEED, index, np.array([token]), 0.0)[0]


@settings(max_examples=200)
@given(logit_rows, params_strategy, st.integers(0, 10_000), st.sampled_from([1e-3, 1e-4, 1e-2]),
       st.integers(0, 2**32 - 1))
def test_honest_drift_within_tolerance_is_accepted(logits: np.ndarray, params: SamplingParams, index: int,
                                                   tol: float, noise_seed: int) -> None:
    """The executor samples from its log-probs; the verifier's differ by at most ``tol`` each."""
    executor = log_softmax(logits)
    rng = np.random.default_rng(noise_seed)
    # log_softmax of logits moved by at most tol/2 moves every log-prob by at most tol
    verifier = log_softmax(logits.astype(np.float64) + rng.uniform(-tol / 2, tol / 2, logits.shape))
    assert np.max(np.abs(verifier - executor)) <= tol + 1e-12
    token = sample(executor, params, SEED, index)
    ok, why = is_acceptable(verifier, params, SEED, index, token, tol)
    assert ok, why
    if params.top_p == 1.0:
        assert acceptable_rows(verifier[None], params, SEED, index, np.array([token]), tol)[0]


@given(hnp.arrays(np.float32, (6, 32), elements=st.floats(-10, 10, width=32)),
       st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([0, 1, 3, 31]), st.sampled_from([0.0, 1e-3, 0.05]),
       st.lists(st.integers(0, 31), min_size=6, max_size=6))
def test_vectorized_check_agrees_with_row_check(logits: np.ndarray, temperature: float, top_k: int, tol: float,
                                                tokens: list[int]) -> None:
    params = SamplingParams(temperature=temperature, top_k=top_k)
    lp = log_softmax(logits)
    rows = acceptable_rows(lp, params, SEED, 5, np.array(tokens), tol)
    single = [is_acceptable(lp[i], params, SEED, 5 + i, tokens[i], tol)[0] for i in range(6)]
    assert rows.tolist() == single


def test_a_token_the_sampler_would_not_pick_is_rejected() -> None:
    logits = np.array([5.0, 4.0, 3.0, 0.0, -3.0], dtype=np.float32)
    lp = log_softmax(logits)
    params = SamplingParams(temperature=1.0)
    for index in range(20):
        chosen = sample(lp, params, SEED, index)
        for other in range(5):
            ok, why = is_acceptable(lp, params, SEED, index, other, 1e-3)
            assert ok == (other == chosen), (index, other, chosen, why)
    assert not is_acceptable(lp, GREEDY, SEED, 0, 1, 1e-3)[0]
    assert not is_acceptable(lp, SamplingParams(temperature=1.0, top_k=2), SEED, 0, 3, 1e-3)[0]
    assert is_acceptable(lp, GREEDY, SEED, 0, 5, 1e-3) == (False, "token 5 outside the vocabulary")


def test_greedy_near_tie_within_tolerance_is_accepted() -> None:
    lp = np.log(np.array([0.5, 0.5 - 1e-5, 1e-5]))
    assert is_acceptable(lp, GREEDY, SEED, 0, 1, 1e-4)[0]
    assert not is_acceptable(lp, GREEDY, SEED, 0, 1, 1e-6)[0]
