"""The check's per-row statistics in C (runtime/row_stats, kernels/rowstats.c) against numpy's expressions."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.runtime import row_stats
from p2pinfer.runtime.sampling import LogProbRows, log_softmax

# Where the kernel library cannot run (no compiler, P2PINFER_DECODE_KERNEL=0, no AVX-512) every function returns
# None and the callers run numpy: the tests then check exactly that, and the numpy paths' agreement below.
RUNS = row_stats.scan(np.zeros((1, 16), dtype=np.float32)) is not None


def _rows(seed: int, n: int, vocab: int, ties: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.integers(-3, 3, size=(n, vocab)) if ties else rng.standard_normal((n, vocab)) * 4).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = -np.inf
    if n > 1:
        x[rng.integers(0, n)] = -np.inf  # a row with nothing finite
    if rng.random() < 0.3:
        x[rng.random(x.shape) < 0.01] = np.inf
    return x


def _numpy_scan(x: np.ndarray, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    masked = x.copy()
    every = np.arange(x.shape[0])
    if exclude is not None:
        masked[every[:, None], exclude] = -np.inf
    ids = np.argmax(masked, axis=1)
    best = masked[every, ids]
    masked[every, ids] = -np.inf
    return ids, best, masked.max(axis=1)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 9), vocab=st.integers(1, 300), ties=st.booleans(),
       k=st.integers(0, 9))
def test_scan_is_numpys_argmax_and_runner_up(seed: int, n: int, vocab: int, ties: bool, k: int) -> None:
    x = _rows(seed, n, vocab, ties)
    exclude = np.random.default_rng(seed + 1).integers(0, vocab, size=(n, k)) if k else None  # repeats too
    scan = row_stats.scan(x, exclude)
    if not RUNS:
        assert scan is None
        return
    assert scan is not None and not scan.flagged.any()
    ids, best, second = _numpy_scan(x, exclude)
    assert np.array_equal(scan.ids, ids)
    assert np.array_equal(scan.best, best) and np.array_equal(scan.second, second)


def test_scan_flags_nan_rows_and_reads_strided_rows() -> None:
    x = np.random.default_rng(0).standard_normal((6, 500)).astype(np.float32)
    x[3, 77] = np.nan
    scan = row_stats.scan(x)
    if not RUNS:
        assert scan is None and row_stats.log_norm(x) is None
        return
    assert scan is not None and list(np.flatnonzero(scan.flagged)) == [3]
    wide = np.random.default_rng(1).standard_normal((5, 700)).astype(np.float32)
    view = wide[:, 100:600]  # rows 700 apart, 500 read
    scan = row_stats.scan(view)
    assert scan is not None and np.array_equal(scan.ids, np.argmax(view, axis=1))
    assert row_stats.scan(x.astype(np.float64)) is None  # float32 rows only: callers run numpy
    assert row_stats.scan(x, np.zeros((6, row_stats.MAX_EXCLUDED + 1), dtype=np.int64)) is None


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6), vocab=st.integers(1, 5000),
       scale=st.sampled_from([0.01, 1.0, 30.0, 300.0]))
def test_log_norm_is_float64_accurate(seed: int, n: int, vocab: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, vocab)) * scale).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = -np.inf
    x[:, rng.integers(0, vocab)] = 1.0  # every row has a finite value
    stats = row_stats.log_norm(x)
    if not RUNS:
        assert stats is None
        return
    assert stats is not None and not stats.flagged.any()
    wide = x.astype(np.float64)
    shift = wide.max(axis=1)
    assert np.array_equal(stats.shift, shift)
    exact = np.log(np.sum(np.exp(wide - shift[:, None]), axis=1))  # numpy's float64 value of the same
    assert np.all(np.abs(stats.log_norm - exact) <= 1e-13 * np.maximum(1.0, np.abs(exact)))


def test_log_norm_flags_what_numpy_decides() -> None:
    x = np.random.default_rng(2).standard_normal((4, 100)).astype(np.float32)
    x[0, 5] = np.nan
    x[1, 6] = np.inf
    x[2] = -np.inf
    stats = row_stats.log_norm(x)
    assert stats is None if not RUNS else list(np.flatnonzero(stats.flagged)) == [0, 1, 2]
    # those rows go through numpy's rules in both the dense and the row form, the others through C: same bits
    with np.errstate(invalid="ignore"):  # numpy's NaN rules: inf - inf
        dense = log_softmax(x)
        rows = np.asarray(LogProbRows.from_logits(x))
    assert np.array_equal(np.isnan(dense), np.isnan(rows))
    assert np.array_equal(dense[~np.isnan(dense)], rows[~np.isnan(rows)])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40))
def test_top_two_equals_best_and_best_without_the_top(seed: int, n: int) -> None:
    x = _rows(seed, n, 2000, ties=bool(seed % 2))
    x[:, 0] = np.where(np.isfinite(x).any(axis=1), x[:, 0], -np.inf)
    finite = np.isfinite(x).any(axis=1) & ~np.isposinf(x).any(axis=1)
    x = x[finite] if finite.any() else np.zeros((1, 2000), dtype=np.float32)
    rows = LogProbRows.from_logits(x)
    ids, best, runner_up = rows.top_two()
    ids0, best0 = rows.best()
    assert np.array_equal(ids, ids0) and np.array_equal(best.view(np.uint64), best0.view(np.uint64))
    assert np.array_equal(runner_up.view(np.uint64), rows.best(exclude=ids0[:, None])[1].view(np.uint64))
