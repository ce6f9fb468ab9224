"""Fingerprint packing and the tolerance rule (pure, hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from p2pinfer.runtime.fingerprint import (
    FORMAT, QUANTUM, Fingerprint, FingerprintBuilder, FingerprintFormatError, bytes_per_token, commitment, pack,
    top_k_row, unpack, verify_fingerprint,
)
from p2pinfer.runtime.sampling import GREEDY, SamplingParams, log_softmax, sample, sampling_seed

SEED = sampling_seed(bytes(32), 99)


@st.composite
def fingerprints(draw: st.DrawFn) -> Fingerprint:
    n = draw(st.integers(0, 20))
    k = draw(st.integers(1, 12))
    ids = draw(hnp.arrays(np.int64, (n, k), elements=st.integers(0, (1 << 24) - 1)))
    q = draw(hnp.arrays(np.int64, (n, k), elements=st.integers(0, (1 << 24) - 1)))
    return Fingerprint(ids, q)


@given(fingerprints())
def test_pack_unpack_round_trip(fp: Fingerprint) -> None:
    data = pack(fp)
    assert len(data) == 2 + len(fp) * bytes_per_token(fp.k)
    back = unpack(data)
    assert back.ids.shape == fp.ids.shape
    assert np.array_equal(back.ids, fp.ids) and np.array_equal(back.q, fp.q)
    assert pack(back) == data


def test_bytes_per_token_is_48_for_top8() -> None:
    assert bytes_per_token() == 48
    rows = FingerprintBuilder()
    for _ in range(10):
        rows.add(log_softmax(np.random.default_rng(0).normal(size=1000)))
    assert len(rows.build().pack()) == 2 + 480


@given(st.binary(max_size=200))
def test_unpack_rejects_garbage_cleanly(data: bytes) -> None:
    try:
        fp = unpack(data)
    except FingerprintFormatError:
        return
    assert pack(fp) == data


@given(hnp.arrays(np.float64, st.integers(8, 300), elements=st.floats(-40, 10)))
def test_top_k_row_quantization_error_is_bounded(logits: np.ndarray) -> None:
    lp = log_softmax(logits)
    ids, q = top_k_row(lp)
    assert len(set(ids.tolist())) == len(ids) == min(8, len(lp))
    assert np.all(np.diff(q) >= 0)
    assert np.max(np.abs(-q / 65536 - lp[ids])) <= QUANTUM / 2 + 1e-12
    assert lp[ids].min() >= np.sort(lp)[::-1][len(ids) - 1]


def test_commitment_binds_every_byte() -> None:
    fp = FingerprintBuilder()
    fp.add(log_softmax(np.arange(20.0)))
    data = fp.build().pack()
    flipped = data[:-1] + bytes([data[-1] ^ 1])
    assert commitment(data) != commitment(flipped)
    assert commitment(data) == commitment(data, FORMAT) != commitment(data, "other/1")


def _claim(rows: np.ndarray, params: SamplingParams) -> tuple[Fingerprint, list[int]]:
    b = FingerprintBuilder()
    out = []
    for i, lp in enumerate(rows):
        b.add(lp)
        out.append(sample(lp, params, SEED, i))
    return b.build(), out


row_sets = hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(16, 64)), elements=st.floats(-8, 8))


@settings(max_examples=80)
@given(row_sets, st.sampled_from([GREEDY, SamplingParams(temperature=0.8, top_k=10)]),
       st.sampled_from([1e-3, 1e-2]), st.integers(0, 2**32 - 1))
def test_drift_within_tolerance_accepted(logits: np.ndarray, params: SamplingParams, tol: float, seed: int) -> None:
    executor = log_softmax(logits)
    fp, out = _claim(executor, params)
    rng = np.random.default_rng(seed)
    verifier = log_softmax(logits + rng.uniform(-tol / 2, tol / 2, logits.shape))
    v = verify_fingerprint(fp, verifier, out, params, SEED, tol)
    assert v.accept, v.reason
    assert v.max_deviation <= tol + QUANTUM


@settings(max_examples=80)
@given(row_sets, st.sampled_from([1e-3, 1e-2]), st.data())
def test_claim_moved_beyond_tolerance_rejected(logits: np.ndarray, tol: float, data: st.DataObject) -> None:
    lp = log_softmax(logits)
    fp, out = _claim(lp, GREEDY)
    row = data.draw(st.integers(0, len(out) - 1))
    col = data.draw(st.integers(0, fp.k - 1))
    q = fp.q.copy()
    # move one claimed log-prob by more than tolerance + quantization, keeping the row ordered or not
    q[row, col] += int((tol + 3 * QUANTUM) * 65536) + 1
    v = verify_fingerprint(Fingerprint(fp.ids, q), lp, out, GREEDY, SEED, tol)
    assert not v.accept
    assert v.first_bad_position == row


def test_hidden_better_token_rejected() -> None:
    lp = log_softmax(np.array([[3.0, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0, -4.0, 2.5]]))
    fp, out = _claim(lp, GREEDY)
    assert 9 in fp.ids[0]
    ids = fp.ids.copy()
    ids[0, list(ids[0]).index(9)] = 8  # claim token 8 instead of the better token 9, keep its value
    v = verify_fingerprint(Fingerprint(ids, fp.q), lp, out, GREEDY, SEED, 1e-3)
    assert not v.accept and v.first_bad_position == 0


def test_row_count_and_structure_checked() -> None:
    lp = log_softmax(np.random.default_rng(1).normal(size=(3, 50)))
    fp, out = _claim(lp, GREEDY)
    v = verify_fingerprint(fp.truncated(2), lp, out, GREEDY, SEED, 1e-3)
    assert not v.accept and v.first_bad_position == 2 and "rows" in v.reason
    dup = fp.ids.copy()
    dup[1, 1] = dup[1, 0]
    v = verify_fingerprint(Fingerprint(dup, fp.q), lp, out, GREEDY, SEED, 1e-3)
    assert not v.accept and v.first_bad_position == 1 and "malformed" in v.reason
    with pytest.raises(ValueError):
        verify_fingerprint(fp, lp[:2], out, GREEDY, SEED, 1e-3)


# The verifier checks from the logits (LogProbRows) instead of the full float64 log-softmax matrix: every
# number it reads, and so every verdict, must be the same bits as the matrix's.

logit_blocks = hnp.arrays(np.float32, st.tuples(st.integers(1, 40), st.integers(2, 300)),
                          elements=st.floats(-30, 30, width=32))


@settings(max_examples=60, deadline=None)
@given(logit_blocks, st.data())
def test_log_prob_rows_are_log_softmax_bit_for_bit(logits: np.ndarray, data: st.DataObject) -> None:
    from p2pinfer.runtime.sampling import LogProbRows

    dense = log_softmax(logits)
    rows = LogProbRows.from_logits(logits)
    for r in range(logits.shape[0]):
        assert np.array_equal(rows.row(r), dense[r]) and np.array_equal(rows[r], dense[r])
    assert np.array_equal(np.asarray(rows, dtype=np.float64), dense) and len(rows) == logits.shape[0]
    ids = data.draw(hnp.arrays(np.int64, (logits.shape[0], 8), elements=st.integers(0, logits.shape[1] - 1)))
    r = np.arange(logits.shape[0])[:, None]
    assert np.array_equal(rows.at(r, ids), dense[r, ids])
    masked = dense.copy()
    masked[r, ids] = -np.inf  # with fewer than 9 tokens this may leave nothing
    best_id, best = rows.best(exclude=ids)
    assert np.array_equal(best, masked.max(axis=1))
    assert np.array_equal(masked[r[:, 0], best_id], best)
    assert np.array_equal(rows.best()[1], dense.max(axis=1))


@settings(max_examples=60, deadline=None)
@given(logit_blocks, st.sampled_from([GREEDY, SamplingParams(temperature=0.8, top_p=0.9),
                                      SamplingParams(temperature=1.0, top_k=5)]),
       st.sampled_from([0.0, 1e-4, 1e-2]), st.data())
def test_checking_from_logits_gives_the_dense_verdict(logits: np.ndarray, params: SamplingParams, tol: float,
                                                      data: st.DataObject) -> None:
    from p2pinfer.runtime.fingerprint import FingerprintChecker
    from p2pinfer.runtime.sampling import LogProbRows

    dense = log_softmax(logits)
    builder = FingerprintBuilder()
    for row in dense:
        builder.add(row)
    fp = builder.build()
    tokens = [sample(row, params, SEED, i) for i, row in enumerate(dense)]
    # tamper: claimed values, claimed IDs or tokens, at a drawn row
    j = data.draw(st.integers(0, len(tokens) - 1))
    how = data.draw(st.sampled_from(["none", "value", "id", "token"]))
    ids, q = fp.ids.copy(), fp.q.copy()
    if how == "value":
        q[j, data.draw(st.integers(0, fp.k - 1))] += data.draw(st.integers(1, 5000))
    elif how == "id":
        ids[j, data.draw(st.integers(0, fp.k - 1))] = data.draw(st.integers(0, logits.shape[1] - 1))
    elif how == "token":
        tokens[j] = data.draw(st.integers(0, logits.shape[1] - 1))
    fp = Fingerprint(ids, q)
    verdicts = []
    for rows in (dense, LogProbRows.from_logits(logits)):
        checker = FingerprintChecker(fp, tokens, params, SEED, tol)
        split = data.draw(st.integers(0, len(tokens)))
        if split:
            checker.check_rows(0, rows[:split] if isinstance(rows, np.ndarray) else
                               LogProbRows(rows.values[:split], rows.shift[:split], rows.log_norm[:split]))
        if split < len(tokens):
            checker.check_rows(split, rows[split:] if isinstance(rows, np.ndarray) else
                               LogProbRows(rows.values[split:], rows.shift[split:], rows.log_norm[split:]))
        verdicts.append(checker.verdict())
    assert verdicts[0] == verdicts[1]
