"""The float64 products of the near-tie reference (``ref64.c``), called through ctypes.

``A @ W.T`` in float64 where ``W`` is a 4-bit ``MatMulNBits`` weight or a float32 weight, without a float64
copy of ``W``: the library widens a panel of W's output columns at a time (24 columns x 128 values, in the L1
cache) and multiplies every row of ``A`` by it with AVX-512 FMA, on :data:`PRODUCT_THREADS` threads of its own
that take panels from a shared counter (no barrier: a descheduled thread leaves its panels to the other). Every
value is a float64 operation; the sums run in another order than BLAS's (float64 rounding).

Each function returns None where the library is unavailable (no compiler, a CPU without AVX-512,
``P2PINFER_REF64_KERNEL=0``): the caller multiplies with numpy instead.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from . import ref64_library_path

#: threads of one product: two (the reference's products are ~60 % of a row), one where the process may use one
#: CPU only. Each output element is computed the same way whatever the count.
PRODUCT_THREADS = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))

_lock = threading.Lock()
_lib: list = []  # [the loaded library or None], once looked up

_P = ctypes.c_void_p
_I = ctypes.c_int64


def _library() -> ctypes.CDLL | None:
    with _lock:
        if not _lib:
            path = ref64_library_path()
            lib = None
            if path is not None:
                try:
                    lib = ctypes.CDLL(str(path))
                    lib.p2pinfer_ref64_available.restype = ctypes.c_int
                    if not lib.p2pinfer_ref64_available():
                        lib = None
                    else:
                        lib.p2pinfer_ref64_q4.argtypes = [_P, _I, _I, _I, _P, _P, _P, _I, _I, _I, _P, _I, ctypes.c_int,
                                                          _P, _I, _P, ctypes.c_int]
                        lib.p2pinfer_ref64_q4.restype = ctypes.c_int
                        lib.p2pinfer_ref64_f32.argtypes = [_P, _I, _I, _I, _P, ctypes.c_int, _I, _P, _I, ctypes.c_int]
                        lib.p2pinfer_ref64_f32.restype = ctypes.c_int
                        lib.p2pinfer_ref64_attention.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I,
                                                                 ctypes.c_double, ctypes.c_int]
                        lib.p2pinfer_ref64_attention.restype = ctypes.c_int
                        lib.p2pinfer_ref64_silu_mul.argtypes = [_P, _P, _I, _I, ctypes.c_int]
                        lib.p2pinfer_ref64_silu_mul.restype = ctypes.c_int
                        lib.p2pinfer_ref64_gqa.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I,
                                                           ctypes.c_double, ctypes.c_int]
                        lib.p2pinfer_ref64_gqa.restype = ctypes.c_int
                        lib.p2pinfer_ref64_skip_rmsnorm.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I, ctypes.c_double,
                                                                    ctypes.c_int]
                        lib.p2pinfer_ref64_skip_rmsnorm.restype = ctypes.c_int
                except (OSError, AttributeError):
                    lib = None
            _lib.append(lib)
        return _lib[0]


def available() -> bool:
    """Whether the library runs here (else the reference multiplies with numpy)."""
    return _library() is not None


def _rows(a: np.ndarray, k: int) -> np.ndarray:
    flat = np.ascontiguousarray(np.asarray(a, dtype=np.float64).reshape(-1, k))
    return flat


def q4_product(a: np.ndarray, packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *,
               n: int, k: int, block_size: int, out: np.ndarray | None = None,
               extra: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray | None:
    """``a[..., k] @ dequantize(W).T`` -> float64 ``[..., n]``: ``packed`` uint8 ``[n, blocks, block_size/2]``
    (code ``2t`` the low nibble of byte ``t``), ``scales`` ``[n * blocks]`` float32, ``zero_points`` uint8 codes
    ``[n, blocks]`` (None: 8). ``out`` (C-contiguous float64 ``[..., n]``): the product is added to it (and it is
    returned). ``extra`` ``(a2 [..., k2], w2 [k2, n] float32)``: ``a2 @ w2`` added in the same accumulators (a
    Q4_1 weight's block-minimum term). None where the library is unavailable."""
    lib = _library()
    if lib is None or np.shape(a)[-1:] != (k,) or block_size < 2 or block_size % 2 or n < 1 or k < 1:
        return None  # (the numpy path reports what is wrong with such a node)
    blocks = (k + block_size - 1) // block_size
    flat = _rows(a, k)
    q = np.ascontiguousarray(packed, dtype=np.uint8).reshape(n, blocks, block_size // 2)
    s = np.ascontiguousarray(scales, dtype=np.float32).reshape(n * blocks)
    z = None if zero_points is None else np.ascontiguousarray(zero_points, dtype=np.uint8).reshape(n, blocks)
    shape = np.shape(a)[:-1] + (n,)
    accumulate = out is not None
    if out is None:
        out = np.empty(shape, dtype=np.float64)
    if out.shape != shape or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError("q4_product: out must be C-contiguous float64 of the product's shape")
    a2 = w2 = None
    k2 = 0
    if extra is not None:
        k2 = extra[1].shape[0]
        a2 = _rows(extra[0], k2)
        w2 = np.ascontiguousarray(extra[1], dtype=np.float32)
        if a2.shape[0] != flat.shape[0] or w2.shape != (k2, n):
            raise ValueError("q4_product: extra term of another shape")
    if lib.p2pinfer_ref64_q4(flat.ctypes.data, flat.shape[0], k, k, q.ctypes.data, s.ctypes.data,
                             None if z is None else z.ctypes.data, n, blocks, block_size, out.ctypes.data, n,
                             int(accumulate), None if a2 is None else a2.ctypes.data, k2,
                             None if w2 is None else w2.ctypes.data, PRODUCT_THREADS):
        raise MemoryError("the float64 reference's product could not allocate its panel buffers")
    return out


def f32_product(a: np.ndarray, w: np.ndarray, *, transposed: bool) -> np.ndarray | None:
    """``a[..., k] @ W`` -> float64 ``[..., n]`` for a 2-D float32 ``w``: ``[k, n]`` (MatMul), or ``[n, k]`` with
    ``transposed`` (Gemm's ``transB``). None where the library is unavailable."""
    lib = _library()
    if lib is None or w.ndim != 2:
        return None
    n, k = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
    if np.shape(a)[-1:] != (k,):
        return None
    flat = _rows(a, k)
    wc = np.ascontiguousarray(w, dtype=np.float32)  # a mapped weight is read in place (already contiguous)
    out = np.empty((flat.shape[0], n), dtype=np.float64)
    if lib.p2pinfer_ref64_f32(flat.ctypes.data, flat.shape[0], k, k, wc.ctypes.data, int(transposed), n,
                              out.ctypes.data, n, PRODUCT_THREADS):
        raise MemoryError("the float64 reference's product could not allocate its panel buffers")
    return out.reshape(np.shape(a)[:-1] + (n,))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, past: int, total: int,
              factor: float) -> np.ndarray | None:
    """Causal grouped-query attention of one sequence in float64: ``q`` ``[s, heads, head]`` (rotated), ``k`` and
    ``v`` ``[kv_heads, t, head]`` (past then new); query ``i`` (position ``past + i``) attends to keys
    ``j <= past + i`` with ``j < total``; returns ``ctx`` ``[s, heads * head]``. Each query block reads only the
    keys it may see, and its scores exist for 8 queries of one head at a time. None where the library is
    unavailable or the shapes are outside what it implements (a head size not a multiple of 64)."""
    lib = _library()
    if lib is None or q.ndim != 3 or k.ndim != 3:
        return None
    s, nh, hd = q.shape
    nkv, t = k.shape[0], k.shape[1]
    if hd % 64 or nkv < 1 or nh % nkv or k.shape != (nkv, t, hd) or v.shape != k.shape or not 0 <= past < t \
            or not past < total <= t or t != past + s:
        return None
    qc, kc, vc = (np.ascontiguousarray(x, dtype=np.float64) for x in (q, k, v))
    ctx = np.empty((s, nh * hd), dtype=np.float64)
    if lib.p2pinfer_ref64_attention(qc.ctypes.data, kc.ctypes.data, vc.ctypes.data, ctx.ctypes.data, s, nh, nkv,
                                    t, hd, int(past), int(total), float(factor), PRODUCT_THREADS):
        raise MemoryError("the float64 reference's attention could not allocate its buffers")
    return ctx


def silu_mul(h: np.ndarray) -> np.ndarray | None:
    """The MLP activation over ``h [..., 2 * half]`` (gate, then up): ``(gate * sigmoid(gate)) * up`` in float64,
    the sigmoid in ``onnx.reference``'s stable form with an exponential within ~2 ulp of numpy's (0 below
    2^-1022, where numpy's is subnormal). None where the library is unavailable or ``h`` is not float64 with an
    even last axis."""
    lib = _library()
    if lib is None or not isinstance(h, np.ndarray) or h.dtype != np.float64 or h.ndim < 1 or h.shape[-1] % 2:
        return None
    half = h.shape[-1] // 2
    src = np.ascontiguousarray(h)
    rows = src.size // max(1, src.shape[-1])
    out = np.empty(h.shape[:-1] + (half,), dtype=np.float64)
    if lib.p2pinfer_ref64_silu_mul(src.ctypes.data, out.ctypes.data, rows, half, PRODUCT_THREADS):
        raise MemoryError("the float64 reference's activation could not allocate its buffers")
    return out


def skip_rmsnorm(x: np.ndarray, skip: np.ndarray, gamma: np.ndarray,
                 eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """RMSNorm of ``total = x + skip`` over the last axis in float64: ``(total * inv_std * gamma, inv_std
    [..., 1], total)`` with ``inv_std = 1 / sqrt(mean(total^2) + eps)``. None where the library is unavailable
    or the shapes differ (broadcasting is left to numpy)."""
    lib = _library()
    if lib is None or not all(isinstance(v, np.ndarray) for v in (x, skip, gamma)) or x.shape != skip.shape \
            or x.ndim < 1 or gamma.shape != x.shape[-1:]:
        return None
    d = x.shape[-1]
    xc, sc, gc = (np.ascontiguousarray(v, dtype=np.float64) for v in (x, skip, gamma))
    normed, total = np.empty(x.shape), np.empty(x.shape)
    inv_std = np.empty(x.shape[:-1] + (1,))
    if lib.p2pinfer_ref64_skip_rmsnorm(xc.ctypes.data, sc.ctypes.data, gc.ctypes.data, normed.ctypes.data,
                                       inv_std.ctypes.data, total.ctypes.data, x.size // max(1, d), d, float(eps),
                                       PRODUCT_THREADS):
        raise MemoryError("the float64 reference's normalization could not allocate its buffers")
    return normed, inv_std, total


def grouped_query_attention(packed: np.ndarray, past_k: np.ndarray | None, past_v: np.ndarray | None,
                            cos: np.ndarray, sin: np.ndarray, *, heads: int, kv_heads: int, past: int, total: int,
                            factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """GroupQueryAttention of one sequence from its packed projections ``packed [s, (heads + 2 kv_heads) head]``
    (float64), with rotate-half RoPE from the float32 ``cos``/``sin`` caches ``[positions, head / 2]`` at
    positions ``past..``; ``past_k``/``past_v`` ``[kv_heads, past, head]`` (None where ``past`` is 0). Returns
    ``(ctx [s, heads * head], present_k, present_v [kv_heads, past + s, head])``, or None where the library is
    unavailable or the shapes are outside what it implements (the caller's numpy path then runs)."""
    lib = _library()
    if lib is None or packed.ndim != 2:
        return None
    s, width = packed.shape
    if s < 1 or past < 0 or not past < total <= past + s or heads < 1 or kv_heads < 1 or heads % kv_heads or width % (heads + 2 * kv_heads):
        return None
    hd = width // (heads + 2 * kv_heads)
    t = past + s
    if hd % 64 or cos.dtype != np.float32 or sin.dtype != np.float32 or cos.ndim != 2 \
            or cos.shape != sin.shape or cos.shape[1] != hd // 2 or cos.shape[0] < t:
        return None
    if past and (past_k is None or past_v is None or past_k.shape != (kv_heads, past, hd)
                 or past_v.shape != past_k.shape):
        return None
    pc = np.ascontiguousarray(packed, dtype=np.float64)
    pk = None if not past else np.ascontiguousarray(past_k, dtype=np.float64)
    pv = None if not past else np.ascontiguousarray(past_v, dtype=np.float64)
    cc, sc = np.ascontiguousarray(cos), np.ascontiguousarray(sin)
    present_k, present_v = np.empty((kv_heads, t, hd)), np.empty((kv_heads, t, hd))
    ctx = np.empty((s, heads * hd))
    if lib.p2pinfer_ref64_gqa(pc.ctypes.data, None if pk is None else pk.ctypes.data,
                              None if pv is None else pv.ctypes.data, cc.ctypes.data, sc.ctypes.data,
                              present_k.ctypes.data, present_v.ctypes.data, ctx.ctypes.data, s, heads, kv_heads, hd,
                              int(past), int(total), float(factor), PRODUCT_THREADS):
        raise MemoryError("the float64 reference's attention could not allocate its buffers")
    return ctx, present_k, present_v
