"""The vectorized Philox4x64-10 gives numpy's Philox stream word for word (the sampler's noise)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from p2pinfer.runtime.philox import draws


def _numpy_stream(key: int, n: int) -> np.ndarray:
    g = np.random.Philox(key=0)
    g.state = {"bit_generator": "Philox",
               "state": {"counter": np.zeros(4, np.uint64), "key": np.array([key & (2**64 - 1), key >> 64], np.uint64)},
               "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
    return g.random_raw(n)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**128 - 1), min_size=1, max_size=4), st.integers(1, 60_000), st.integers(0, 2**32))
def test_draws_are_the_numpy_stream(keys, n, seed) -> None:
    rng = np.random.default_rng(seed)
    pairs, ids, expected = [], [], []
    for key in keys:
        stream = _numpy_stream(key, n)
        picked = rng.choice(n, size=min(n, 50), replace=False)
        pairs += [[key & (2**64 - 1), key >> 64]] * picked.size
        ids += picked.tolist()
        expected += stream[picked].tolist()
    got = draws(np.array(pairs, dtype=np.uint64), np.array(ids))
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.uint64))


def test_extreme_keys_and_the_first_and_last_words_of_a_block() -> None:
    for key in (0, 1, 2**64 - 1, 2**64, 2**128 - 1):
        stream = _numpy_stream(key, 12)
        got = draws(np.array([[key & (2**64 - 1), key >> 64]] * 12, dtype=np.uint64), np.arange(12))
        np.testing.assert_array_equal(got, stream)
