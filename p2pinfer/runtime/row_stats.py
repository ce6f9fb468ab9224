"""Per-row statistics of float32 logits in C (``kernels/rowstats.c``), for the verifier's check.

A check reads every logit of every checked row: the log-softmax normaliser (:func:`log_norm`), then the best
token, the runner-up and the best unclaimed token (:func:`scan`). numpy spends a float64 copy, an exp and a sum
per row on the first and an argmax pass over a masked copy of the rows on each of the others; the C functions
read each float32 row once per statistic. Same semantics as the numpy expressions they replace (numpy's argmax
ties and infinities; the normaliser to float64 rounding, see ``rowstats.c``), tested against them in
``tests/test_row_stats.py``. Rows the C code leaves alone (NaN, +inf, nothing finite) are reported, and the
callers compute those with numpy. Every function returns None where the kernel library is unavailable (no
compiler, ``P2PINFER_DECODE_KERNEL=0``, or a CPU without AVX-512): callers then run numpy on every row.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np

from .. import kernels

_P = ctypes.c_void_p
_I = ctypes.c_int64
MAX_EXCLUDED = 64  # rowstats.c's bound on the excluded IDs per row


class Scan(NamedTuple):
    """Per row: ``ids`` the lowest ID of the largest value (excluded IDs left out), ``best`` that value,
    ``second`` the largest value once that ID is left out too, ``flagged`` rows holding a NaN (the other
    fields are unset there)."""

    ids: np.ndarray  # int64
    best: np.ndarray  # float32
    second: np.ndarray  # float32
    flagged: np.ndarray  # bool


class LogNorm(NamedTuple):
    """Per row: ``shift`` the largest value (float64, exact), ``log_norm`` ``log(sum(exp(x - shift)))`` in float64,
    ``flagged`` rows holding a NaN or +inf, or nothing finite (the other fields are unset there)."""

    shift: np.ndarray
    log_norm: np.ndarray
    flagged: np.ndarray


_SIGNATURES = {"p2pinfer_row_scan": ((_P, _I, _I, _I, _P, _I, _P, _P, _P, _P), _I),
               "p2pinfer_row_log_norm": ((_P, _I, _I, _I, _P, _P, _P), _I)}


def _functions() -> ctypes.CDLL | None:
    """The kernel library with these functions typed (looked up once per value of the kernel switch)."""
    return kernels.library_functions(_SIGNATURES)


def _rows_of(values: np.ndarray) -> tuple[int, int, int] | None:
    """(rows, vocab, row stride in values) when the C code can read ``values`` in place: 2-D float32 rows, each
    contiguous."""
    if values.ndim != 2 or values.dtype != np.float32 or values.shape[1] == 0:
        return None
    if values.shape[0] > 1 and values.strides[0] % 4:
        return None
    if values.strides[1] != 4 and values.shape[1] > 1:
        return None
    return values.shape[0], values.shape[1], (values.strides[0] // 4 if values.shape[0] > 1 else values.shape[1])


def scan(values: np.ndarray, exclude: np.ndarray | None = None) -> Scan | None:
    """:class:`Scan` of each row of ``values`` (``exclude``: ``[rows, k]`` token IDs left out of that row, at most
    :data:`MAX_EXCLUDED`; IDs outside the vocabulary are ignored); None where the C code cannot run."""
    shape = _rows_of(values)
    lib = _functions() if shape is not None else None
    if lib is None:
        return None
    rows, vocab, stride = shape
    ex = None
    if exclude is not None:
        ex = np.ascontiguousarray(exclude, dtype=np.int64)
        if ex.ndim != 2 or ex.shape[0] != rows or ex.shape[1] > MAX_EXCLUDED:
            return None
    out = Scan(np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.float32), np.empty(rows, dtype=np.float32),
               np.zeros(rows, dtype=np.uint8))
    if rows == 0:
        return out._replace(flagged=out.flagged.astype(bool))
    done = lib.p2pinfer_row_scan(values.ctypes.data, rows, vocab, stride, None if ex is None else ex.ctypes.data,
                                 0 if ex is None else ex.shape[1], out.ids.ctypes.data, out.best.ctypes.data,
                                 out.second.ctypes.data, out.flagged.ctypes.data)
    return None if done < 0 else out._replace(flagged=out.flagged.astype(bool))


def log_norm(values: np.ndarray) -> LogNorm | None:
    """:class:`LogNorm` of each row of ``values``; None where the C code cannot run."""
    shape = _rows_of(values)
    lib = _functions() if shape is not None else None
    if lib is None:
        return None
    rows, vocab, stride = shape
    out = LogNorm(np.empty(rows), np.empty(rows), np.zeros(rows, dtype=np.uint8))
    if rows == 0:
        return out._replace(flagged=out.flagged.astype(bool))
    done = lib.p2pinfer_row_log_norm(values.ctypes.data, rows, vocab, stride, out.shift.ctypes.data,
                                     out.log_norm.ctypes.data, out.flagged.ctypes.data)
    return None if done < 0 else out._replace(flagged=out.flagged.astype(bool))
