"""The verifier's row work on two threads (runtime/row_halves): every row once, the same bits as one thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.runtime.row_halves import MIN_ROWS, over_rows
from p2pinfer.runtime.sampling import LogProbRows, log_softmax


@given(n=st.integers(0, 200), align=st.sampled_from([1, 4, 16]))
def test_every_row_once(n: int, align: int) -> None:
    seen = np.zeros(n, dtype=int)
    threads = set()

    def work(lo: int, hi: int) -> None:
        threads.add(threading.get_ident())
        seen[lo:hi] += 1
        assert lo == 0 or lo % align == 0

    over_rows(n, work, align=align)
    assert np.all(seen == 1)
    if n >= MIN_ROWS + align:
        assert len(threads) == 2  # the second half really ran on the helper


def test_helper_error_is_raised_after_both_halves() -> None:
    done = []

    def work(lo: int, hi: int) -> None:
        if lo > 0:
            raise ValueError("second half failed")
        done.append((lo, hi))

    with pytest.raises(ValueError, match="second half"):
        over_rows(64, work)
    assert done == [(0, 32)]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 70), seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([0.1, 5.0, 80.0]))
def test_normaliser_and_best_bits(n: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    vocab = 3000
    logits = (rng.standard_normal((n, vocab)) * scale).astype(np.float32)
    logits[rng.integers(0, n), rng.integers(0, vocab, 5)] = -np.inf
    rows = LogProbRows.from_logits(logits)
    dense = log_softmax(logits)  # the same normaliser (row_stats where it runs), hence the same bits
    assert np.array_equal(np.asarray(rows).view(np.uint64), dense.view(np.uint64))
    exclude = np.argsort(-logits, axis=1, kind="stable")[:, :8]
    ids, best = rows.best(exclude=exclude)
    masked = dense.copy()
    masked[np.arange(n)[:, None], exclude] = -np.inf
    assert np.array_equal(ids, np.argmax(masked, axis=1))
    assert np.array_equal(best.view(np.uint64), masked[np.arange(n), ids].view(np.uint64))
