"""The verifier's one-pass sampler check equals the two-pass rule it replaced (hypothesis).

``sampling.judge_rows`` gives, per row, the verdict of :func:`~p2pinfer.runtime.sampling.is_acceptable` and
the near-tie flag of :func:`~p2pinfer.runtime.tiebreak.is_ambiguous` from one computation of the candidate
bounds and the noise (and, under top-k/top-p, from the float32 logits sorted instead of the float64
values). It is pure speed: here both flags are compared with the two separate functions, row for row, on
rows shaped like a language model's — greedy, plain T, top-k, top-p, exact ties, ``-inf`` tokens, flat rows,
and tolerances wide enough to make near ties common.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from p2pinfer.runtime.sampling import (
    LogProbRows, SamplingParams, acceptable_rows, candidate_bounds, is_acceptable, judge_rows, log_softmax, sample,
    sampling_seed,
)
from p2pinfer.runtime.tiebreak import check_rows, is_ambiguous

SEED = sampling_seed(bytes(32), 11)


@st.composite
def logit_rows(draw: st.DrawFn) -> np.ndarray:
    """float32 logits ``[n, vocab]``: a few strong tokens over a long tail, or flat, with ties and -inf."""
    vocab = draw(st.sampled_from([2, 9, 300, 5000, 49152]))
    n = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from([0.01, 0.5, 2.0, 4.0]))
    logits = rng.normal(0.0, spread, (n, vocab))
    for r in range(n):
        peaks = draw(st.integers(0, min(vocab, 5)))
        logits[r, rng.choice(vocab, peaks, replace=False)] += rng.uniform(0, 12, peaks)
        if draw(st.booleans()):  # exact ties, and a value repeated across the nucleus edge
            logits[r, rng.choice(vocab, vocab // 3, replace=True)] = logits[r, 0]
        if vocab > 9 and draw(st.booleans()):
            logits[r, rng.choice(vocab, 3, replace=False)] = -np.inf
    return logits.astype(np.float32)


params = st.builds(SamplingParams, temperature=st.sampled_from([0.0, 0.3, 0.8, 1.0, 1.5]),
                   top_k=st.sampled_from([0, 1, 40]), top_p=st.sampled_from([0.1, 0.5, 0.95, 0.999, 1.0]))
tolerances = st.sampled_from([0.0, 1e-4, 6.41e-4, 0.05, 0.5])


def _tokens(rows: LogProbRows, p: SamplingParams, start: int, tol: float, rng: np.random.Generator) -> np.ndarray:
    """Per row the honest pick, a runner-up, or any token (the rule must agree on rejections too)."""
    out = []
    for r in range(rows.n):
        lp = rows.row(r)
        choice = rng.integers(0, 3)
        if choice == 0:
            out.append(sample(lp, p, SEED, start + r))
        elif choice == 1:
            out.append(int(np.argsort(lp, kind="stable")[-2 if lp.shape[0] > 1 else -1]))
        else:
            out.append(int(rng.integers(0, lp.shape[0])))
    return np.array(out, dtype=np.int64)


@settings(max_examples=200, deadline=None)
@given(logit_rows(), params, tolerances, st.integers(0, 10_000), st.integers(0, 2**32 - 1))
def test_one_pass_equals_is_acceptable_and_is_ambiguous(logits, p, tol, start, seed) -> None:
    rows = LogProbRows.from_logits(logits)
    tokens = _tokens(rows, p, start, tol, np.random.default_rng(seed))
    ok, near = judge_rows(rows, p, SEED, start, tokens, tol)
    for r in range(rows.n):
        lp = rows.row(r)
        assert ok[r] == is_acceptable(lp, p, SEED, start + r, int(tokens[r]), tol)[0], r
        assert near[r] == is_ambiguous(lp, p, SEED, start + r, tol), r
    np.testing.assert_array_equal(acceptable_rows(rows, p, SEED, start, tokens, tol), ok)


@settings(max_examples=60, deadline=None)
@given(logit_rows(), params, tolerances, st.integers(0, 10_000))
def test_dense_rows_and_out_of_vocabulary_tokens(logits, p, tol, start) -> None:
    """Float64 log-prob rows (no logits) take the same path, and a token outside the vocabulary is rejected."""
    lp = log_softmax(logits)
    vocab = lp.shape[1]
    tokens = np.array([vocab if r % 2 else sample(lp[r], p, SEED, start + r) for r in range(lp.shape[0])])
    ok, near = judge_rows(lp, p, SEED, start, tokens, tol)
    for r in range(lp.shape[0]):
        if tokens[r] >= vocab:
            assert not ok[r]
        else:
            assert ok[r] == is_acceptable(lp[r], p, SEED, start + r, int(tokens[r]), tol)[0]
            assert near[r] == is_ambiguous(lp[r], p, SEED, start + r, tol)


@settings(max_examples=80, deadline=None)
@given(logit_rows(), params.filter(lambda p: not p.greedy), tolerances)
def test_sorting_the_logits_gives_the_sorted_scaled_values(logits, p, tol) -> None:
    rows = LogProbRows.from_logits(logits)
    for r in range(rows.n):
        lp = rows.row(r)
        mapped = ((np.sort(logits[r]).astype(np.float64) - rows.shift[r]) - rows.log_norm[r]) / p.temperature
        np.testing.assert_array_equal(mapped, np.sort(lp / p.temperature))
        for a, b in zip(candidate_bounds(lp, p, tol, mapped), candidate_bounds(lp, p, tol)):
            np.testing.assert_array_equal(a, b)


def test_check_rows_settles_near_ties_from_the_one_pass_flags() -> None:
    """tiebreak.check_rows asks the reference exactly at the rows is_ambiguous calls near ties."""
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 0.05, (12, 300)).astype(np.float32)  # flat: near ties everywhere at tol 0.05
    lp = log_softmax(logits)
    p = SamplingParams(temperature=0.8, top_p=0.95)
    tokens = np.array([sample(lp[r], p, SEED, r) for r in range(12)])
    asked = []

    def reference_row(i: int) -> np.ndarray:
        asked.append(i)
        return lp[i]

    ok = check_rows(lp, p, SEED, 0, tokens, 0.05, reference_row)
    assert ok.all()
    expected = [r for r in range(12) if is_ambiguous(lp[r], p, SEED, r, 0.05)]
    assert asked == expected and expected  # some near ties, each settled once


def test_greedy_near_tie_at_exactly_twice_the_tolerance() -> None:
    """The boundary is inclusive in both: a runner-up exactly ``2 * tolerance`` below the best is a near tie."""
    tol = 2.0**-12
    lp = np.array([[-1.0, -1.0 - 2 * tol, -9.0], [-1.0, -1.0 - 2 * tol - 2.0**-40, -9.0]])
    ok, near = judge_rows(lp, SamplingParams(), SEED, 0, np.array([1, 1]), tol)
    assert ok.tolist() == [True, False]
    assert near.tolist() == [True, False]
    assert near.tolist() == [is_ambiguous(lp[r], SamplingParams(), SEED, r, tol) for r in range(2)]


def test_the_unsorted_nucleus_serves_peaked_rows_and_declines_what_it_cannot_prove() -> None:
    """Top-p without top-k: the head-only computation answers for a language-model-like row, declines a flat
    49,152-token row (its head would be the whole vocabulary) and a row whose verdict sits exactly on top_p
    (only the exact z_max decides it); candidate_bounds gives the sorted computation's masks in every case."""
    from p2pinfer.runtime.sampling import _nucleus_unsorted

    from test_sampling_check_speed import plain_candidate_bounds

    rng = np.random.default_rng(8)
    peaked = rng.normal(0.0, 2.0, 49152)  # a few strong tokens over a long tail, as at most LM positions
    peaked[:4] += 16.0
    flat = rng.normal(0.0, 0.01, 49152)
    # masses 1, 1/2, 1/2 with no drift: the mass above each 1/2 is exactly top_p of the total (1/2 of 2)
    on_the_edge = np.array([0.0, -np.log(2.0), -np.log(2.0)])
    cases = [(log_softmax(peaked.astype(np.float32)), SamplingParams(temperature=0.8, top_p=0.95), 6.41e-4, True),
             (log_softmax(flat.astype(np.float32)), SamplingParams(temperature=0.8, top_p=0.95), 6.41e-4, False),
             (on_the_edge, SamplingParams(temperature=1.0, top_p=0.5), 0.0, False)]
    for lp, p, tol, served in cases:
        d = tol / p.temperature
        assert (_nucleus_unsorted(lp / p.temperature, d, 2 * d, p.top_p) is not None) == served
        for a, b in zip(candidate_bounds(lp, p, tol), plain_candidate_bounds(lp, p, tol)):
            np.testing.assert_array_equal(a, b)


def test_noise_read_on_demand_is_the_noise() -> None:
    from p2pinfer.runtime.sampling import _LazyUniforms, uniforms

    for index, vocab in ((0, 1), (3, 7), (12345, 49152)):
        u, lazy = uniforms(SEED, index, vocab), _LazyUniforms(SEED, index, vocab)
        ids = np.arange(vocab)[::3]
        np.testing.assert_array_equal(lazy[ids], u[ids])
        np.testing.assert_array_equal(lazy[vocab - 1:vocab], u[vocab - 1:vocab])
        assert lazy.max() == u.max()


# --- the head-only paths (judge_rows without a float64 row) against the whole-row reference ---------------------

@st.composite
def lm_rows(draw: st.DrawFn) -> np.ndarray:
    """float32 logits at the real vocabulary size, shaped like a language model's rows: a few strong tokens over
    a long tail of many hundreds within ~10 nats (as SmolLM2's), sometimes flat, sometimes with -inf tokens."""
    vocab = draw(st.sampled_from([4096, 49152]))
    n = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from([0.05, 1.0, 2.5, 4.0]))
    logits = rng.normal(0.0, spread, (n, vocab)) + rng.gumbel(0.0, spread / 2, (n, vocab))
    for r in range(n):
        peaks = draw(st.integers(0, 8))
        logits[r, rng.choice(vocab, peaks, replace=False)] += rng.uniform(0, 16, peaks)
        if draw(st.booleans()):
            logits[r, rng.choice(vocab, 5, replace=False)] = -np.inf
    return (logits + draw(st.sampled_from([0.0, -30.0, 17.0]))).astype(np.float32)


head_params = st.builds(SamplingParams, temperature=st.sampled_from([0.3, 0.8, 1.0, 1.3]),
                        top_k=st.sampled_from([0, 0, 1, 5, 40, 300]),
                        top_p=st.sampled_from([0.5, 0.9, 0.95, 0.99, 1.0]))


@settings(max_examples=60, deadline=None)
@given(lm_rows(), head_params, st.sampled_from([0.0, 1.79e-3, 0.05, 0.5]), st.integers(0, 10_000),
       st.integers(0, 2**32 - 1))
def test_head_paths_give_the_whole_row_verdicts(logits, p, tol, start, seed) -> None:
    """judge_rows (the head of each row, the float32 mass bracket, plain keys for the near tokens only) against
    judge_row over the whole float64 row, and against is_acceptable / is_ambiguous."""
    from p2pinfer.runtime.sampling import judge_row

    rows = LogProbRows.from_logits(logits)
    tokens = _tokens(rows, p, start, tol, np.random.default_rng(seed))
    ok, near = judge_rows(rows, p, SEED, start, tokens, tol)
    for r in range(rows.n):
        lp = rows.row(r)
        assert (ok[r], near[r]) == judge_row(lp, p, SEED, start + r, int(tokens[r]), tol), r
        assert ok[r] == is_acceptable(lp, p, SEED, start + r, int(tokens[r]), tol)[0], r
        assert near[r] == is_ambiguous(lp, p, SEED, start + r, tol), r


def test_head_paths_decline_what_they_cannot_prove() -> None:
    """The head path answers for a peaked row and declines (the whole row decides) a flat 49,152-token row, a
    verdict exactly on top_p, NaN and +inf rows, and a top-k larger than the few-candidate limit; judge_rows
    gives the whole-row verdicts in every case."""
    from p2pinfer.runtime.sampling import _Head, _head_candidates, judge_row

    rng = np.random.default_rng(9)
    peaked = rng.normal(0.0, 2.0, 49152)
    peaked[:4] += 16.0
    flat = rng.normal(0.0, 0.01, 49152)
    edge = np.full(49152, -np.inf)
    edge[:3] = [0.0, -np.log(2.0), -np.log(2.0)]  # the mass above each 1/2 is exactly half of the total
    nan_row, inf_row = peaked.copy(), peaked.copy()
    nan_row[7], inf_row[7] = np.nan, np.inf
    p95 = SamplingParams(temperature=0.8, top_p=0.95)
    cases = [(peaked, p95, 6.41e-4, True), (flat, p95, 6.41e-4, False),
             (edge, SamplingParams(temperature=1.0, top_p=0.5), 0.0, False), (nan_row, p95, 6.41e-4, False),
             (inf_row, p95, 6.41e-4, False), (peaked, SamplingParams(temperature=0.8, top_k=5000), 6.41e-4, False),
             (peaked, SamplingParams(temperature=0.8, top_k=40, top_p=0.9), 6.41e-4, True)]
    for logits, p, tol, served in cases:
        with np.errstate(invalid="ignore"):
            rows = LogProbRows.from_logits(logits.astype(np.float32)[None, :])
            top_ids, top_lp = rows.best()
            top = float(top_lp[0] / p.temperature)
            token = int(top_ids[0])
            if np.isfinite(top):
                found = _head_candidates(_Head(rows, 0, p.temperature), p, tol, token, token, top, True)
                assert (found is not None) == served, (p, tol)
            else:
                assert not served
            ok, near = judge_rows(rows, p, SEED, 3, np.array([token]), tol)
            assert (ok[0], near[0]) == judge_row(rows.row(0), p, SEED, 3, token, tol)


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e4, 1e4), st.floats(0.0, 12.0), st.sampled_from([1e-3, 0.3, 0.8, 1.0, 1.7]),
       st.floats(-2e4, 1e4), st.sampled_from([np.float32, np.float64]))
def test_a_heads_floor_keeps_every_token_at_or_above_the_threshold(shift, log_norm, temperature, thr, kind) -> None:
    """_Head.floor(thr): every value below it maps below thr (checked at the value just under it), and it is
    not far below the exact inverse (a superset of a few values, not the row)."""
    from p2pinfer.runtime.sampling import _Head

    x = np.array([kind(shift)], dtype=kind)
    rows = LogProbRows(x[None, :], np.array([float(kind(shift))]), np.array([log_norm]))
    head = _Head(rows, 0, temperature)
    c = head.floor(thr)
    below = np.nextafter(c, kind(-np.inf))
    assert not ((float(below) - rows.shift[0]) - log_norm) / temperature >= thr
    exact = rows.shift[0] + log_norm + thr * temperature
    assert float(c) >= exact - 1e-3 * (1.0 + abs(exact))
