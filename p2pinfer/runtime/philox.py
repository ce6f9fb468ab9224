"""numpy's Philox4x64-10 stream: whole streams (:func:`stream`) and words at chosen draw indices for many keys
(:func:`draws`), in C (``kernels/philox.c``) where the kernel library runs, else with numpy.

The seeded sampler's noise is numpy's ``Philox`` stream (:func:`.sampling.uniforms`): draw ``v`` of a key is
word ``v % 4`` of the Philox4x64-10 block at counter ``v // 4 + 1`` (numpy increments the counter before
each block). A verifier that needs the noise of a few hundred tokens in each of 512 rows computes exactly
those blocks (:func:`draws`), for all rows in one pass, instead of drawing every row's stream up to its largest
token ID; a plain-sampling (T=1) row needs its whole stream (:func:`stream`: 49,152 words on SmolLM2).

The C functions give the same integers as numpy (integer arithmetic only; ``tests/test_philox.py`` checks both
paths against ``numpy.random.Philox``) at ~0.7 ns a word with AVX-512 (numpy's ``random_raw``: ~2.7 ns;
the vectorized :func:`blocks`: ~110 ns a word at chosen indices). Where the kernel library is unavailable (no
compiler, ``P2PINFER_DECODE_KERNEL=0``; the reason is logged once as ``kernel.unavailable``), numpy computes them.

Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011); the constants are
Random123's ``PHILOX_M4x64_0/1`` and ``PHILOX_W64_0/1``.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from .. import kernels

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


def draws(key: np.ndarray, ids: np.ndarray, *, scalar: bool = False) -> np.ndarray:
    """Raw draw ``ids[j]`` of the numpy Philox stream keyed ``key[j]`` (128-bit keys as Python ints in an
    object array, or pairs ``[n, 2]`` of uint64 (low, high)), for every ``j``. ``scalar``: the C library's path
    for CPUs without AVX-512 even where it has AVX-512 (for tests; the same words)."""
    pairs = np.ascontiguousarray(np.asarray(key, dtype=np.uint64).reshape(-1, 2))
    ids = np.ascontiguousarray(ids, dtype=np.uint64)
    if pairs.shape[0] != ids.shape[0]:
        raise ValueError(f"{pairs.shape[0]} keys for {ids.shape[0]} draw indices")
    lib = _functions()
    if lib is not None:
        out = np.empty(ids.shape[0], dtype=np.uint64)
        if ids.shape[0]:
            lib.p2pinfer_philox_draws(pairs.ctypes.data, ids.ctypes.data, ids.shape[0], out.ctypes.data, int(scalar))
        return out
    return draws_numpy(pairs, ids)


def draws_numpy(pairs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """:func:`draws` with numpy's integer arithmetic (:func:`blocks`): ``pairs`` ``[n, 2]`` uint64 keys, ``ids``
    uint64."""
    words = blocks(pairs[:, 0], pairs[:, 1], ids // np.uint64(4) + np.uint64(1))
    return words[np.arange(ids.shape[0]), (ids % np.uint64(4)).astype(np.intp)]


_MASK64 = 2**64 - 1


def stream(key: int, n: int, *, scalar: bool = False, largest: bool = True) -> tuple[np.ndarray, int | None]:
    """Draws ``0 .. n-1`` of the numpy Philox stream keyed ``key`` (a 128-bit int; ``Philox(key=key).random_raw(n)``
    from a fresh generator) and the largest of them (0 when ``n`` is 0), which the sampled check needs and C
    finds in the same pass; numpy's path looks for it only when asked (``largest``; else None there). ``scalar``:
    as in :func:`draws`."""
    lib = _functions()
    if lib is None:
        return stream_numpy(key, n, largest=largest)
    out = np.empty(n, dtype=np.uint64)
    top = ctypes.c_uint64(0)
    lib.p2pinfer_philox_stream(key & _MASK64, key >> 64, n, out.ctypes.data, ctypes.byref(top), int(scalar))
    return out, int(top.value)


_generators = threading.local()  # one numpy generator per thread, re-keyed per stream (constructing one costs more)


def stream_numpy(key: int, n: int, *, largest: bool = True) -> tuple[np.ndarray, int | None]:
    """:func:`stream` with numpy's own generator."""
    generator = getattr(_generators, "philox", None)
    if generator is None:
        generator = _generators.philox = np.random.Philox(key=0)
    generator.state = {"bit_generator": "Philox",
                       "state": {"counter": np.zeros(4, np.uint64),
                                 "key": np.array([key & _MASK64, key >> 64], np.uint64)},
                       "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
    out = generator.random_raw(n)
    return out, (int(out.max()) if n else 0) if largest else None


_P = ctypes.c_void_p
_I = ctypes.c_int64
_U = ctypes.c_uint64
_SIGNATURES = {"p2pinfer_philox_stream": ((_U, _U, _I, _P, _P, ctypes.c_int32), _I),
               "p2pinfer_philox_draws": ((_P, _P, _I, _P, ctypes.c_int32), _I)}


def _functions() -> ctypes.CDLL | None:
    """The kernel library with these functions typed (looked up once per value of the kernel switch)."""
    return kernels.library_functions(_SIGNATURES)
