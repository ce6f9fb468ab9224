"""The sampler check's fast paths compute exactly what the plain formulas compute (hypothesis).

``candidate_bounds`` tests nucleus membership only for the head of the distribution and proves the tail out;
``gumbel_keys`` bounds the noise by the position's largest draw instead of ``G_MAX``. Both are pure speed:
here they are compared, mask for mask and key for key, with a transcription of the plain formulas.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings, strategies as st

from p2pinfer.runtime.sampling import (
    G_MAX, SamplingParams, _nucleus_head, candidate_bounds, gumbel_keys, is_acceptable, log_softmax, sampling_seed, uniforms,
)

SEED = sampling_seed(bytes(32), 7)


def plain_candidate_bounds(lp: np.ndarray, params: SamplingParams, tolerance: float):
    """candidate_bounds as first written: every token through both binary searches."""
    vocab = lp.shape[0]
    d = tolerance / params.temperature
    eps = 2.0 * d
    scaled = lp / params.temperature
    sorted_desc = np.sort(scaled)[::-1]
    if params.top_k == 0 or params.top_k >= vocab:
        surely = np.ones(vocab, dtype=bool)
        maybe = np.ones(vocab, dtype=bool)
        if params.top_p >= 1.0:
            return maybe, surely
    else:
        k = params.top_k
        maybe = scaled >= sorted_desc[k - 1] - eps
        surely = scaled > sorted_desc[k] + eps
    if params.top_p < 1.0:
        top = float(sorted_desc[0])
        m_ids = np.flatnonzero(maybe)
        m_vals = scaled[m_ids]
        desc = np.sort(m_vals)[::-1]
        cum = np.cumsum(np.exp(desc - top))
        neg = -desc
        n_surely_above = np.searchsorted(neg, -(m_vals + eps), side="left")
        n_maybe_above = np.searchsorted(neg, -(m_vals - eps), side="right")
        cum0 = np.concatenate(([0.0], cum))
        q = np.exp(m_vals - top)
        above_min = cum0[n_surely_above] * math.exp(-d)
        above_max = np.maximum(cum0[n_maybe_above] - q, 0.0) * math.exp(d)
        z_min = float(np.sum(np.exp(scaled[surely] - top))) * math.exp(-d)
        z_max = float(cum[-1]) * math.exp(d)
        nucleus_maybe = above_min / z_max < params.top_p
        nucleus_surely = above_max / z_min < params.top_p if z_min > 0 else np.zeros_like(nucleus_maybe)
        maybe = np.zeros(vocab, dtype=bool)
        maybe[m_ids] = nucleus_maybe
        new_surely = np.zeros(vocab, dtype=bool)
        new_surely[m_ids] = nucleus_surely
        surely &= new_surely
    return maybe, surely


@st.composite
def rows(draw: st.DrawFn) -> np.ndarray:
    """Log-prob rows shaped like a language model's: a few strong tokens over a long tail, or flat."""
    vocab = draw(st.sampled_from([2, 9, 300, 5000, 49152]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from([0.01, 0.5, 2.0, 4.0]))
    logits = rng.normal(0.0, spread, vocab)
    peaks = draw(st.integers(0, min(vocab, 5)))
    logits[rng.choice(vocab, peaks, replace=False)] += rng.uniform(0, 12, peaks)
    if draw(st.booleans()):  # exact ties, and a value repeated across the nucleus edge
        logits[rng.choice(vocab, vocab // 3, replace=True)] = logits[0]
    if vocab > 9 and draw(st.booleans()):
        logits[rng.choice(vocab, 3, replace=False)] = -np.inf
    return log_softmax(logits.astype(np.float32))


params = st.builds(SamplingParams, temperature=st.sampled_from([0.3, 0.8, 1.0, 1.5]),
                   top_k=st.sampled_from([0, 1, 40]), top_p=st.sampled_from([0.1, 0.5, 0.9, 0.95, 0.999, 1.0]))


@settings(max_examples=150, deadline=None)
@given(rows(), params, st.sampled_from([0.0, 1e-4, 2.85e-4, 1e-3, 0.05, 1.0]))
def test_candidate_bounds_are_the_plain_formulas(lp: np.ndarray, p: SamplingParams, tol: float) -> None:
    maybe, surely = candidate_bounds(lp, p, tol)
    plain_maybe, plain_surely = plain_candidate_bounds(lp, p, tol)
    assert np.array_equal(maybe, plain_maybe)
    assert np.array_equal(surely, plain_surely)


@settings(max_examples=100, deadline=None)
@given(rows(), st.sampled_from([0.3, 0.8, 1.0]), st.integers(0, 10_000), st.sampled_from([0.0, 1e-3, 0.5, 30.0]))
def test_gumbel_keys_keep_every_key_that_can_come_within_the_margin(lp: np.ndarray, temperature: float,
                                                                     index: int, margin: float) -> None:
    scaled = lp / temperature
    u = uniforms(SEED, index, lp.shape[0])
    full = np.where(np.isfinite(scaled), scaled - np.log(-np.log(u)), -np.inf)
    keys = gumbel_keys(scaled, SEED, index, margin, u)
    best = float(np.max(full))
    near = full >= best - margin
    assert np.array_equal(keys[near], full[near])  # the same bits wherever it matters
    assert np.all((keys == full) | (keys == -np.inf))
    assert np.all(full[keys == -np.inf] < best - margin)
    assert -np.log(-np.log(u.max())) <= G_MAX


def test_a_nucleus_check_over_the_real_vocabulary_size_agrees_with_the_plain_one() -> None:
    rng = np.random.default_rng(3)
    lp = log_softmax(rng.normal(0.0, 3.0, 49152).astype(np.float32))
    p = SamplingParams(temperature=0.8, top_p=0.95)
    maybe, surely = candidate_bounds(lp, p, 2.85e-4)
    plain = plain_candidate_bounds(lp, p, 2.85e-4)
    assert np.array_equal(maybe, plain[0]) and np.array_equal(surely, plain[1])
    assert 0 < surely.sum() <= maybe.sum() < 49152
    # the tail was proven out, not tested token by token: only a head goes through the binary searches
    scaled = lp / p.temperature
    desc = np.sort(scaled)[::-1]
    d = 2.85e-4 / p.temperature
    q_desc = np.exp(desc - desc[0])
    cum0 = np.concatenate(([0.0], np.cumsum(q_desc)))
    z = float(cum0[-1])
    head = _nucleus_head(scaled, desc, q_desc, cum0, 2 * d, d, z * math.exp(-d), z * math.exp(d), p.top_p)
    assert maybe.sum() <= head.size < 49152 // 2
    token = int(np.flatnonzero(maybe)[0])
    assert isinstance(is_acceptable(lp, p, SEED, 0, token, 2.85e-4)[0], bool)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([SamplingParams(temperature=0.8, top_p=0.95),
                                                   SamplingParams(temperature=1.0, top_k=40),
                                                   SamplingParams(temperature=0.5, top_k=3, top_p=0.9)]),
       st.integers(0, 10_000))
def test_few_rivals_at_full_vocabulary_give_the_admissible_set(seed: int, p: SamplingParams, index: int) -> None:
    """With top-k/top-p is_acceptable keys only the few rivals (noise up to the largest ID needed); its
    verdicts must be admissible_tokens' (which keys the whole vocabulary)."""
    from p2pinfer.runtime.sampling import admissible_tokens, sample

    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, 49152)
    logits[rng.choice(49152, 3, replace=False)] += 8.0
    lp = log_softmax(logits.astype(np.float32))
    admitted = set(admissible_tokens(lp, p, SEED, index, 1e-3).tolist())
    assert sample(lp, p, SEED, index) in admitted
    for token in {*admitted, *np.argsort(lp)[-60:].tolist(), *rng.integers(0, 49152, 20).tolist()}:
        assert is_acceptable(lp, p, SEED, index, int(token), 1e-3)[0] == (token in admitted)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.05, 1.0, 2.5, 4.0, 8.0]),
       st.sampled_from([1e-3, 0.01, 0.3, 0.8, 1.0, 1.5]),
       st.sampled_from([300, 49152]), st.sampled_from([0.0, -40.0, 25.0]))
def test_the_float32_mass_bracket_holds_the_float64_total(seed, spread, temperature, vocab, offset) -> None:
    """_mass_bracket's (lo, hi) holds sum(exp(scaled - top)) as the sorted top-p computation takes it (float64 over
    the whole row), and its float32 sum over the kept tokens is within a tenth of the relative pad of their float64
    sum (the proof's margin), on rows from flat to peaked."""
    from p2pinfer.runtime.sampling import _MASS_NATS, _MASS_REL, LogProbRows, _Head, _mass_bracket

    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, spread, vocab) + offset
    logits[rng.choice(vocab, 3, replace=False)] += rng.uniform(0, 14, 3)
    rows = LogProbRows.from_logits(logits.astype(np.float32)[None, :])
    top_ids, top_lp = rows.best()
    top = float(top_lp[0] / temperature)
    scaled = rows.row(0) / temperature
    total = float(np.sum(np.exp(scaled - top)))
    lo, hi = _mass_bracket(_Head(rows, 0, temperature), int(top_ids[0]), top)
    assert lo <= total <= hi
    kept = scaled >= top - _MASS_NATS
    kept64 = float(np.sum(np.exp(scaled[kept] - top)))
    kept32 = lo / (1.0 - _MASS_REL)  # the float32 sum (over a superset whose extra tokens are within float32 rounding)
    assert abs(kept32 - kept64) <= 0.1 * _MASS_REL * kept64 + float(np.sum(np.exp(scaled[~kept] - top)))


def test_the_mass_bracket_counts_the_tokens_below_its_reach() -> None:
    """49,151 tokens just below the 22 nats the float32 sum reads carry more mass than its relative pad: only the
    bound on them (each at most exp(-22)) keeps the float64 total inside the bracket."""
    from p2pinfer.runtime.sampling import _MASS_REL, LogProbRows, _Head, _mass_bracket

    logits = np.full(49152, -22.05 * 0.8, dtype=np.float32)
    logits[0] = 0.0
    rows = LogProbRows.from_logits(logits[None, :])
    scaled = rows.row(0) / 0.8
    top = float(scaled.max())
    total = float(np.sum(np.exp(scaled - top)))
    assert total - 1.0 > 1.2 * _MASS_REL  # the tail outweighs the pad
    lo, hi = _mass_bracket(_Head(rows, 0, 0.8), 0, top)
    assert lo <= total <= hi
