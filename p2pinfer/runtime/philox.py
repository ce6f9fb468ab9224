"""Philox4x64-10 at chosen counters, vectorized over many keys at once (numpy integer arithmetic only).

The seeded sampler's noise is numpy's ``Philox`` stream (:func:`.sampling.uniforms`): draw ``v`` of a key is
word ``v % 4`` of the Philox4x64-10 block at counter ``v // 4 + 1`` (numpy increments the counter before
each block). A verifier that needs the noise of a few hundred tokens in each of 512 rows computes exactly
those blocks here, for all rows in one pass, instead of drawing every row's stream up to its largest token ID.
``tests/test_philox.py`` checks the words against ``numpy.random.Philox``.

Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011); the constants are
Random123's ``PHILOX_M4x64_0/1`` and ``PHILOX_W64_0/1``.
"""

from __future__ import annotations

import numpy as np

_M0 = 0xD2E7470EE14C6C93
_M1 = 0xCA5A826395121157
_W0 = np.uint64(0x9E3779B97F4A7C15)
_W1 = np.uint64(0xBB67AE8584CAA73B)
_LOW = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)
ROUNDS = 10


def _mulhilo(a: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The high and low 64 bits of ``a * b`` (128-bit product), from 32-bit halves (numpy has no 128-bit
    integers; every partial product fits in 64 bits, and uint64 arithmetic wraps)."""
    a_lo, a_hi = np.uint64(a & 0xFFFFFFFF), np.uint64(a >> 32)
    b_lo, b_hi = b & _LOW, b >> _32
    t = a_lo * b_lo
    mid1 = a_hi * b_lo + (t >> _32)
    mid2 = a_lo * b_hi + (mid1 & _LOW)
    return a_hi * b_hi + (mid1 >> _32) + (mid2 >> _32), b * np.uint64(a)


def blocks(key_lo: np.ndarray, key_hi: np.ndarray, counter: np.ndarray) -> np.ndarray:
    """Philox4x64-10 of counters ``(counter, 0, 0, 0)`` under keys ``(key_lo, key_hi)`` (uint64 arrays of one
    length): ``[n, 4]`` uint64 words."""
    x0 = np.asarray(counter, dtype=np.uint64)
    x1 = np.zeros_like(x0)
    x2 = np.zeros_like(x0)
    x3 = np.zeros_like(x0)
    k0 = np.array(key_lo, dtype=np.uint64)
    k1 = np.array(key_hi, dtype=np.uint64)
    for r in range(ROUNDS):
        if r:
            k0 += _W0
            k1 += _W1
        hi0, lo0 = _mulhilo(_M0, x0)
        hi1, lo1 = _mulhilo(_M1, x2)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return np.stack([x0, x1, x2, x3], axis=1)


def draws(key: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Raw draw ``ids[j]`` of the numpy Philox stream keyed ``key[j]`` (128-bit keys as Python ints in an
    object array, or pairs ``[n, 2]`` of uint64 (low, high)), for every ``j``."""
    pairs = np.asarray(key, dtype=np.uint64).reshape(-1, 2)
    ids = np.asarray(ids, dtype=np.uint64)
    words = blocks(pairs[:, 0], pairs[:, 1], ids // np.uint64(4) + np.uint64(1))
    return words[np.arange(ids.shape[0]), (ids % np.uint64(4)).astype(np.intp)]
