"""Seeded sampling: determinism, the distribution it draws from, that the check accepts honest drift and that it
leaves an executor no choice beyond that drift (pure, hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from p2pinfer.runtime.sampling import (
    GREEDY, GREEDY_BELOW, SamplingParams, acceptable_rows, admissible_tokens, candidates, is_acceptable,
    log_softmax, noise_key, sample, sampler_slack, sampling_seed, uniforms,
)
from p2pinfer.stats import chi_square_sf

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


_MASK = (1 << 64) - 1


def _philox4x64_10(key128: int, n: int) -> list[int]:
    """Philox4x64-10 from its published definition (Random123), counters 1, 2, ... as numpy numbers them."""
    out: list[int] = []
    counter = 1
    while len(out) < n:
        c, k = [counter, 0, 0, 0], [key128 & _MASK, key128 >> 64]
        for r in range(10):
            if r:
                k = [(k[0] + 0x9E3779B97F4A7C15) & _MASK, (k[1] + 0xBB67AE8584CAA73B) & _MASK]
            p0, p1 = 0xD2E7470EE14C6C93 * c[0], 0xCA5A826395121157 * c[2]
            c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & _MASK, (p0 >> 64) ^ c[3] ^ k[1], p0 & _MASK]
        out += c
        counter += 1
    return out[:n]


def test_noise_is_philox_of_the_tagged_key_and_deterministic() -> None:
    """The noise is a published function of (seed, index), not whatever this numpy happens to do."""
    for index in (0, 1, 12345):
        raw = _philox4x64_10(noise_key(SEED, index), 9)
        expected = [((r >> 11) + 0.5) * 2.0**-53 for r in raw]
        assert uniforms(SEED, index, 9).tolist() == expected
    values = uniforms(SEED, 3, 50_000)
    assert np.all((values > 0.0) & (values < 1.0))
    assert uniforms(SEED, 3, 10).tolist() == values[:10].tolist()  # a prefix of the same stream
    assert uniforms(sampling_seed(bytes(32), 1), 0, 4).tolist() != uniforms(sampling_seed(bytes(32), 2), 0, 4).tolist()


def test_sampler_draws_from_the_softmax_of_the_candidates() -> None:
    """Gumbel-max is exact sampling: 6,000 seeded draws over 6 tokens fit softmax(lp/T) (chi-square, fixed seed)."""
    lp = log_softmax(np.array([2.0, 1.5, 1.0, 0.0, -1.0, -3.0]))
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=3)):
        allowed = candidates(lp, params)
        p = np.exp(lp[allowed] / params.temperature)
        p /= p.sum()
        draws = [sample(lp, params, SEED, i) for i in range(6000)]
        assert set(draws) <= set(allowed.tolist())
        counts = np.array([draws.count(int(t)) for t in allowed])
        statistic = float(np.sum((counts - 6000 * p) ** 2 / (6000 * p)))
        assert chi_square_sf(statistic, len(allowed) - 1) > 1e-4, (counts, 6000 * p)


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


@settings(deadline=None)
@given(logit_rows)
def test_greedy_is_argmax_lowest_id(logits: np.ndarray) -> None:
    lp = log_softmax(logits)
    assert sample(lp, GREEDY, SEED, 0) == int(np.flatnonzero(lp == lp.max())[0])


@settings(deadline=None)
@given(logit_rows, params_strategy, st.integers(0, 10_000))
def test_sampled_token_is_a_candidate_and_acceptable(logits: np.ndarray, params: SamplingParams, index: int) -> None:
    lp = log_softmax(logits)
    token = sample(lp, params, SEED, index)
    if not params.greedy:
        assert token in set(candidates(lp, params).tolist())
    ok, why = is_acceptable(lp, params, SEED, index, token, 0.0)
    assert ok, why
    assert acceptable_rows(lp[None], params, SEED, index, np.array([token]), 0.0)[0]


@settings(max_examples=200, deadline=None)
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


@settings(deadline=None)
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


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-7, GREEDY_BELOW / 2, 0.0])
def test_tiny_temperatures_are_greedy_and_never_overflow(temperature: float) -> None:
    lp = log_softmax(np.array([1.0, 3.0, 3.0 - 1e-9, -2.0]))
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    assert sample(lp, params, SEED, 0) == 1
    assert is_acceptable(lp, params, SEED, 0, 1, 1e-3)[0]
    assert is_acceptable(lp, params, SEED, 0, 2, 1e-3)[0]  # a near-tie within drift
    assert not is_acceptable(lp, params, SEED, 0, 0, 1e-3)[0]
    assert acceptable_rows(lp[None], params, SEED, 0, np.array([3]), 1e-3).tolist() == [False]
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.float32, st.integers(2, 300), elements=st.floats(-12, 12, width=32)), params_strategy,
       st.integers(0, 10_000), st.sampled_from([0.0, 1e-4, 1e-3]))
def test_admissible_set_is_what_the_check_accepts(logits: np.ndarray, params: SamplingParams, index: int,
                                                  tol: float) -> None:
    lp = log_softmax(logits)
    admitted = set(admissible_tokens(lp, params, SEED, index, tol).tolist())
    assert sample(lp, params, SEED, index) in admitted
    for token in range(lp.shape[0]):
        assert (token in admitted) == is_acceptable(lp, params, SEED, index, token, tol)[0]


def test_flat_distribution_leaves_no_choice_beyond_the_drift() -> None:
    """A flat 20,000-token position (the ID-ordered inverse CDF admitted up to 1,744 tokens at such positions):
    over 400 seeded positions the check admits a second token only where the runner-up's key lies within
    the slack (expected about slack x 400 = 0.1 positions), and never more than two tokens."""
    rng = np.random.default_rng(7)
    lp = log_softmax(rng.normal(0.0, 1.0, 20_000))
    params, tol = SamplingParams(temperature=0.8), 1e-4
    sizes = [len(admissible_tokens(lp, params, SEED, i, tol)) for i in range(400)]
    assert min(sizes) == 1
    assert sum(s > 1 for s in sizes) <= 2 and max(sizes) <= 2
    assert sampler_slack(params, tol) == pytest.approx(2.5e-4)
