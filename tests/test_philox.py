"""The Philox words of the sampler's noise (runtime/philox: C in kernels/philox.c, numpy where it cannot run) are
numpy's Philox stream word for word, on every path: the C library's AVX-512 and scalar paths, and numpy's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from p2pinfer.runtime import philox
from p2pinfer.runtime.philox import blocks, draws, draws_numpy, stream, stream_numpy
from p2pinfer.runtime.sampling import _philox_draws, noise_key

# Where the kernel library cannot run (no compiler, P2PINFER_DECODE_KERNEL=0) both functions take numpy's path,
# which these tests then check alone.
RUNS = philox._functions() is not None
PATHS = [{"scalar": False}, {"scalar": True}]  # where C runs: AVX-512 where the library has it, and the scalar path
KEYS = st.integers(0, 2**128 - 1)
# lengths around the C paths' chunks: 4 words a block, 32 a register of 8 blocks, 128 four registers; and SmolLM2's
# vocabulary
LENGTHS = st.sampled_from([0, 1, 3, 4, 5, 31, 32, 33, 127, 128, 129, 161, 49_152]) | st.integers(0, 3000)


def _numpy_stream(key: int, n: int) -> np.ndarray:
    g = np.random.Philox(key=0)
    g.state = {"bit_generator": "Philox",
               "state": {"counter": np.zeros(4, np.uint64), "key": np.array([key & (2**64 - 1), key >> 64], np.uint64)},
               "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
    return g.random_raw(n)


def _pairs(keys: list[int]) -> np.ndarray:
    return np.array([[k & (2**64 - 1), k >> 64] for k in keys], dtype=np.uint64).reshape(-1, 2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**128 - 1), min_size=1, max_size=4), st.integers(1, 60_000), st.integers(0, 2**32))
def test_draws_are_the_numpy_stream(keys, n, seed) -> None:
    rng = np.random.default_rng(seed)
    pairs, ids, expected = [], [], []
    for key in keys:
        stream_ = _numpy_stream(key, n)
        picked = rng.choice(n, size=min(n, 50), replace=False)
        pairs += [[key & (2**64 - 1), key >> 64]] * picked.size
        ids += picked.tolist()
        expected += stream_[picked].tolist()
    want = np.array(expected, dtype=np.uint64)
    pairs, ids = np.array(pairs, dtype=np.uint64), np.array(ids)
    for path in PATHS:
        np.testing.assert_array_equal(draws(pairs, ids, **path), want)
    np.testing.assert_array_equal(draws_numpy(pairs, ids.astype(np.uint64)), want)


@settings(max_examples=60, deadline=None)
@given(st.lists(KEYS, min_size=0, max_size=70), st.integers(0, 2**32))
def test_draws_at_any_index_and_count_are_the_numpy_blocks(keys, seed) -> None:
    """Any number of keys (the C paths take 8 and 32 at a time, the rest one by one) and any 64-bit index: the
    words of :func:`philox.blocks` (numpy integer arithmetic), which the test above ties to numpy's stream."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2**64, size=len(keys), dtype=np.uint64) if seed % 2 else \
        rng.integers(0, 49_152, size=len(keys)).astype(np.uint64)
    pairs = _pairs(keys)
    words = blocks(pairs[:, 0], pairs[:, 1], ids // np.uint64(4) + np.uint64(1))
    want = words[np.arange(len(keys)), (ids % np.uint64(4)).astype(np.intp)]
    for path in PATHS:
        got = draws(pairs, ids, **path)
        assert got.dtype == np.uint64 and got.shape == (len(keys),)
        np.testing.assert_array_equal(got, want)


def test_extreme_keys_and_the_first_and_last_words_of_a_block() -> None:
    for key in (0, 1, 2**64 - 1, 2**64, 2**128 - 1):
        want = _numpy_stream(key, 12)
        for path in PATHS:
            np.testing.assert_array_equal(draws(_pairs([key] * 12), np.arange(12), **path), want)
            got, largest = stream(key, 12, **path)
            np.testing.assert_array_equal(got, want)
            assert largest == int(want.max())


@settings(max_examples=60, deadline=None)
@given(KEYS, LENGTHS)
def test_stream_is_numpys_random_raw_and_its_largest_word(key, n) -> None:
    want = _numpy_stream(key, n)
    for path in [*PATHS, None]:
        got, largest = stream(key, n, **path) if path is not None else stream_numpy(key, n)
        assert got.dtype == np.uint64 and got.shape == (n,)
        np.testing.assert_array_equal(got, want)
        assert largest == (int(want.max()) if n else 0)


def test_the_sampler_draws_one_stream_per_output_index() -> None:
    seed = bytes(range(32))
    for index in (0, 1, 511):
        np.testing.assert_array_equal(_philox_draws(seed, index, 49_152), _numpy_stream(noise_key(seed, index), 49_152))


def test_without_the_kernel_library_numpy_computes_the_same_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PINFER_DECODE_KERNEL", "0")
    assert philox._functions() is None
    key = 0x0123456789ABCDEF_FEDCBA9876543210
    got, largest = stream(key, 1001)
    want = _numpy_stream(key, 1001)
    np.testing.assert_array_equal(got, want)
    assert largest == int(want.max())
    words, nothing = stream(key, 1001, largest=False)  # the sampler's draws: no pass for the largest word
    np.testing.assert_array_equal(words, want)
    assert nothing is None
    ids = np.array([0, 3, 4, 1000, 2**63], dtype=np.uint64)
    np.testing.assert_array_equal(draws(_pairs([key] * 5), ids)[:4], want[[0, 3, 4, 1000]])


def test_mismatched_keys_and_indices_are_refused() -> None:
    with pytest.raises(ValueError):
        draws(_pairs([1, 2]), np.arange(3))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(1.0, 0, 1.0), (0.8, 40, 1.0), (0.8, 0, 0.95), (1.5, 0, 1.0)]),
       st.sampled_from([5000, 49_152]), st.sampled_from([1e-4, 1.79e-3, 0.5]))
def test_the_checks_verdicts_are_the_same_with_numpys_words(seed, setting, vocab, tolerance) -> None:
    """judge_rows end to end (its plain rows read whole streams, its top-k/top-p rows words at chosen IDs): the
    same verdicts and near-tie flags with the C words as with numpy's, on rows shaped like a model's (a few strong
    tokens over a long tail; with wide tolerances near ties are common). The rows are made once, so only the
    Philox words' source differs."""
    import os

    from p2pinfer.runtime.sampling import LogProbRows, SamplingParams, judge_rows, sample, sampling_seed

    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (20, vocab))  # 20 rows: two threads judge them (row_halves)
    for r in range(20):
        logits[r, rng.choice(vocab, 4, replace=False)] += rng.uniform(0, 12, 4)
    rows = LogProbRows.from_logits(logits.astype(np.float32))
    temperature, top_k, top_p = setting
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    material = sampling_seed(bytes(32), seed)
    tokens = np.array([sample(rows.row(r), params, material, 7 + r) if r % 3 else int(rng.integers(0, vocab))
                       for r in range(20)])
    with_c = judge_rows(rows, params, material, 7, tokens, tolerance)
    before = os.environ.get("P2PINFER_DECODE_KERNEL")
    os.environ["P2PINFER_DECODE_KERNEL"] = "0"
    try:
        assert philox._functions() is None
        with_numpy = judge_rows(rows, params, material, 7, tokens, tolerance)
    finally:
        if before is None:
            del os.environ["P2PINFER_DECODE_KERNEL"]
        else:
            os.environ["P2PINFER_DECODE_KERNEL"] = before
    np.testing.assert_array_equal(with_c[0], with_numpy[0])
    np.testing.assert_array_equal(with_c[1], with_numpy[1])
    assert with_c[0][[r for r in range(20) if r % 3]].all()  # the honest picks pass
