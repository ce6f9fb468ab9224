"""A float64 forward pass of a served ONNX graph: the arbiter of near ties (see :mod:`.tiebreak`).

onnxruntime computes in float32, and two honest configurations (threads, optimization levels, KV decode or
one prefill, onnxruntime versions) differ by up to the calibrated tolerance per log-prob. Where the seeded
sampler's decision is closer than that, :mod:`.tiebreak` asks this module instead: the same graph, the same
weights, every floating-point value and every operation in float64. Two honest machines running it differ by
float64 rounding (~1e-12 relative), so its pick is the same everywhere except at a true key gap below ~1e-10.

How it runs:

* the graph is read once, with the weights **not copied**: external data is memory-mapped read-only for the
  node that reads it only (the page cache holds it once for every reader; an idle reference maps nothing),
  and float32 weights are widened to float64 one node input at a time. A large weight is never widened whole
  (:func:`_run_node`): ``Gather`` widens the rows it picked, ``Gemm``/``MatMul`` widen at most 16 MB of it
  at a time and drop each mapped block's pages after use, ``MatMulNBits`` dequantizes 4 MB of float64 at a
  time into a reused buffer (integer unpacking, exact values), and attention scores exist for a block of 64
  query positions at a time, each block reading only the keys it may see. Each value is the same float64
  operation as on the whole matrix (BLAS may block a product differently: float64 rounding, ~1e-14 in a
  SmolLM2 log-prob). Measured on SmolLM2 at 557 positions: the transient memory of one row fell from 447 to
  ~60 MiB (fp32) and from 157 to ~80 MiB (4-bit);
* nodes run with ``onnx.reference``'s numpy operators (``Sigmoid`` and ``Sum`` replaced by faster versions
  with the same bits), in graph order, pruned to what ``logits`` and the ``present.N`` outputs need, and
  every intermediate is freed after its last use;
* ``Cast`` (and ``ConstantOfShape``) to a float type produce float64; the com.microsoft operators the GGUF
  importer emits (``MatMulNBits``, ``GroupQueryAttention``, ``SkipSimplifiedLayerNormalization``) have
  float64 implementations here (another operator is refused with :class:`ReferenceUnsupported`);
* positions go :data:`REFERENCE_CHUNK` at a time over the graph's own past/present inputs, in float64 (a
  float64 KV cache: chunks and cached prefixes change a row by float64 rounding only, nothing like the
  float32 drift between a decode path and a prefill path); with ``logits_to_keep`` only the requested rows
  pay for the LM head, and chunks before the last skip it;
* the chunks run **layer-major** (:meth:`ReferenceModel._run_chunks`): a layer runs over every chunk before the
  next layer starts, so one layer's float64 keys/values exist at a time, not every layer's (92 KB a position on
  SmolLM2); a verifier asks for all its near-tie rows in one such run that keeps no cache (:meth:`rows_at`);
* a :class:`ReferenceSession` per request keeps that cache between its near-tie rows (bounded by
  :data:`REFERENCE_KV_BYTES`), so a later row computes only the positions after the cached prefix.

Where the C kernels of :mod:`p2pinfer.kernels.ref64` run (a C compiler and an AVX-512 CPU;
``P2PINFER_REF64_KERNEL=0`` turns them off), the costly nodes are computed there, in float64, on two threads of
their own: every 4-bit layer as one ``Q4Linear`` node (its ``MatMulNBits`` terms and Q4_1 block-minimum term
summed into one output, :mod:`.reference_fuse`; the 4-bit codes widened in registers, never a float64 weight
matrix), every product by a float32 weight, ``GroupQueryAttention`` (RoPE, present caches, attention),
``SkipSimplifiedLayerNormalization`` and each MLP activation as one ``SiluMul`` node. They are the same float64
operations summed in another order, with an exponential within ~2 ulp of numpy's: rows within ~2e-13 of the
numpy path's on SmolLM2 (``tests/test_ref64_kernel.py``). Elsewhere the nodes run in numpy, and matrix products
go through numpy's BLAS in float64, on one thread (:data:`REFERENCE_BLAS_THREADS`). A row costs 2.5-6x
onnxruntime's prefill of the same tokens on SmolLM2 with the kernels (5-8x without; ``benchmarks/reference_row.py``
measures both) and only ever runs at the few positions the float32 rule cannot decide. Callers in async code run
it in a worker thread, as they do every forward pass.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from threadpoolctl import threadpool_limits

from ..kernels import ref64
from .digest import ModelFormatError
from .memory import drop_read_only_mapped_pages, release_freed_memory
from .reference_fuse import FUSED_DOMAIN, fuse_q4_linears, fuse_silu_mul
from .sampling import log_softmax

CONTRIB_DOMAIN = "com.microsoft"
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
_WIDEN = (np.float32, np.float16)
_DEQUANT_BLOCK_BYTES = 4 << 20  # MatMulNBits: float64 weights dequantized at a time (a reused buffer)
_WIDE_BLOCK_BYTES = 16 << 20  # a float weight whose float64 copy is larger is widened a block at a time
#: a float32-weight product with fewer k values runs on numpy's BLAS (the 4-bit graph's block-minimum terms: k = 18
#: and 48 on SmolLM2, where the C products' panel set-up is most of the work; 1.7-3.4x slower measured)
_KERNEL_MIN_K = 64
_ATTENTION_QUERY_BLOCK = 64  # attention query positions per block (each reads only the keys it may see)
#: positions per pass of the reference over its own float64 KV cache: bounds a pass's activations (~40 MB of
#: float64 on SmolLM2) while the 4-bit weights are dequantized once per chunk
REFERENCE_CHUNK = 256
#: the most a :class:`ReferenceSession` keeps of its float64 KV cache between rows (92 KB a position on SmolLM2:
#: ~180 positions). It is held while its request generates or verifies, on top of the serving memory (files +
#: ~200 MB on SmolLM2 while a request runs, against the 300 MB limit); a later near tie past it recomputes the
#: positions after the kept ones. 16 MB since the C products (kernels/ref64.c) made those positions ~2.7x
#: cheaper: at 32 MB an executor's 512-token sampled request with a near tie peaked at files + 305 MB
REFERENCE_KV_BYTES = 16 << 20
#: BLAS threads of a reference pass. One: a pass makes hundreds of BLAS calls (a block of dequantized weights
#: each), and with two threads each call waits for the other thread; on the shared 2-core machine (load 10) a
#: SmolLM2 row took 4-10x longer with two threads than with one (41-59 s against 10 s at 600 positions)
REFERENCE_BLAS_THREADS = 1


class ReferenceUnsupported(ModelFormatError):
    """The graph uses an operator or attribute the float64 reference does not implement."""


# ---- com.microsoft operators in float64 ---------------------------------------------------------------


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[..., m]`` -> codes ``[..., 2m]``: element 2i is the low nibble of byte i, 2i+1 the high one."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 15
    out[..., 1::2] = packed >> 4
    return out


class MatMulNBits(OpRun):
    """``A @ dequantize(B).T`` (4-bit codes, per-block scale and zero point), dequantized in float64.

    Every dequantized weight ``scale * (code - zero_point)`` is exact in float64 (a float32 scale times a
    4-bit integer needs at most 29 significant bits), however it is computed. So the codes are unpacked with
    integer operations into a reused buffer and widened by one subtraction and one multiplication per weight,
    a block of at most :data:`_DEQUANT_BLOCK_BYTES` of float64 at a time (it stays in cache for the product),
    instead of a float64 table lookup per byte."""

    op_domain = CONTRIB_DOMAIN

    def _run(self, A, B, scales, zero_points=None, g_idx=None, bias=None, K=None, N=None, bits=None,  # noqa: N803
             block_size=None, accuracy_level=None):
        if bits != 4:
            raise ReferenceUnsupported(f"MatMulNBits with bits={bits} (the reference implements 4)")
        if g_idx is not None and g_idx.size:
            raise ReferenceUnsupported("MatMulNBits with g_idx")
        if zero_points is not None and zero_points.size and zero_points.dtype != np.uint8:
            raise ReferenceUnsupported("MatMulNBits with float zero points")
        k_, n_, bs = int(K), int(N), int(block_size)
        n_blocks = (k_ + bs - 1) // bs
        scale = np.asarray(scales, dtype=np.float64).reshape(n_, n_blocks, 1)
        if zero_points is None or not zero_points.size:
            zp = np.full((n_, n_blocks), 8, dtype=np.uint8)
        else:
            zp = _unpack_nibbles(zero_points.reshape(n_, -1))[:, :n_blocks]
        a = np.asarray(A, dtype=np.float64)
        product = ref64.q4_product(a, B, scales, None if zero_points is None or not zero_points.size else zp,
                                   n=n_, k=k_, block_size=bs)
        if product is not None:  # the C products (no float64 weights in memory); else numpy below
            if bias is not None:
                product += np.asarray(bias, dtype=np.float64)
            return (product,)
        uniform = bool(np.all(zp == zp.flat[0]))  # the GGUF importer writes one zero point per term
        flat = a.reshape(-1, a.shape[-1])
        out = np.empty((flat.shape[0], n_), dtype=np.float64)
        packed = B.reshape(n_, n_blocks, bs // 2)
        step = max(1, min(n_, _DEQUANT_BLOCK_BYTES // (8 * n_blocks * bs)))
        codes = np.empty((step, n_blocks, bs // 2, 2), dtype=np.uint8)
        w = np.empty((step, n_blocks, bs), dtype=np.float64)
        for lo in range(0, n_, step):
            hi = min(n_, lo + step)
            c, wb = codes[:hi - lo], w[:hi - lo]
            np.bitwise_and(packed[lo:hi], 15, out=c[..., 0])  # element 2i: the low nibble of byte i
            np.right_shift(packed[lo:hi], 4, out=c[..., 1])
            if uniform:
                np.subtract(c.reshape(hi - lo, n_blocks, bs), float(zp.flat[0]), out=wb)
            else:
                np.subtract(c.reshape(hi - lo, n_blocks, bs), zp[lo:hi, :, None], out=wb, dtype=np.float64)
            wb *= scale[lo:hi]
            out[:, lo:hi] = flat @ wb.reshape(hi - lo, -1)[:, :k_].T
        if bias is not None:
            out += np.asarray(bias, dtype=np.float64)
        return (out.reshape(a.shape[:-1] + (n_,)),)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """RoPE on ``x [b, heads, s, d]`` with ``cos``/``sin`` ``[b, 1, s, d/2]``."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x2 * cos + x1 * sin
        return out
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = np.empty(np.broadcast_shapes(x.shape, cos.shape[:-1] + (x.shape[-1],)), dtype=np.result_type(x, cos))
    first = np.multiply(x1, cos, out=out[..., :half])  # each half written in place (no concatenation), with
    first -= x2 * sin                                  # the same operations in the same order: the same bits
    second = np.multiply(x2, cos, out=out[..., half:])
    second += x1 * sin
    return out


class GroupQueryAttention(OpRun):
    """Causal grouped-query attention with optional rotary embedding, past KV in BNSH layout."""

    op_domain = CONTRIB_DOMAIN

    def _run(self, query, key, value, past_key=None, past_value=None, seqlens_k=None, total_sequence_length=None,
             cos_cache=None, sin_cache=None, *extra, num_heads=None, kv_num_heads=None, scale=None,
             do_rotary=None, rotary_interleaved=None, local_window_size=None, softcap=None,
             smooth_softmax=None):
        nh, nkv = int(num_heads), int(kv_num_heads)
        fast = self._in_c(query, key, value, past_key, past_value, seqlens_k, cos_cache, sin_cache, extra, nh, nkv,
                          scale, do_rotary, rotary_interleaved, local_window_size, softcap, smooth_softmax)
        if fast is not None:
            return fast
        if key is None or value is None:  # packed: query holds Q, K and V one after the other
            hd_packed = query.shape[-1] // (nh + 2 * nkv)
            query, key, value = np.split(np.asarray(query), [nh * hd_packed, (nh + nkv) * hd_packed], axis=-1)
        if any(e is not None and getattr(e, "size", 0) for e in extra):
            raise ReferenceUnsupported("GroupQueryAttention with position_ids, attention_bias or head_sink")
        if (local_window_size not in (None, -1)) or (softcap not in (None, 0.0)) or smooth_softmax:
            raise ReferenceUnsupported("GroupQueryAttention with a local window, softcap or smooth softmax")
        b, s, _ = query.shape
        hd = query.shape[-1] // nh
        q = np.asarray(query, np.float64).reshape(b, s, nh, hd).transpose(0, 2, 1, 3)
        k = np.asarray(key, np.float64).reshape(b, s, nkv, hd).transpose(0, 2, 1, 3)
        v = np.asarray(value, np.float64).reshape(b, s, nkv, hd).transpose(0, 2, 1, 3)
        total = np.asarray(seqlens_k, dtype=np.int64).reshape(b) + 1  # valid keys per batch row
        past_len = total - s
        if np.any(past_len < 0):
            raise ReferenceUnsupported("GroupQueryAttention with seqlens_k shorter than the new tokens")
        if do_rotary:
            pos = past_len[:, None] + np.arange(s)[None, :]  # [b, s]
            # the rows used, widened (exact): not the whole cache (_run_node passes the caches as stored)
            cos = np.asarray(np.asarray(cos_cache)[pos], np.float64)[:, None]  # [b, 1, s, hd/2]
            sin = np.asarray(np.asarray(sin_cache)[pos], np.float64)[:, None]
            q = _rotate(q, cos, sin, bool(rotary_interleaved))
            k = _rotate(k, cos, sin, bool(rotary_interleaved))
        past_k = np.zeros((b, nkv, 0, hd)) if past_key is None else np.asarray(past_key, np.float64)
        past_v = np.zeros((b, nkv, 0, hd)) if past_value is None else np.asarray(past_value, np.float64)
        if past_k.shape[2] and np.any(past_len != past_k.shape[2]):
            raise ReferenceUnsupported("GroupQueryAttention with a past buffer longer than its sequence")
        k_all = np.concatenate([past_k, k], axis=2)
        v_all = np.concatenate([past_v, v], axis=2)
        t = k_all.shape[2]
        factor = float(scale) if scale else 1.0 / math.sqrt(hd)
        groups = nh // nkv
        if b == 1:  # the C attention (p2pinfer.kernels.ref64), where it runs; else numpy below
            fast = ref64.attention(q[0].transpose(1, 0, 2), k_all[0], v_all[0], past=int(past_len[0]),
                                   total=int(total[0]), factor=factor)
            if fast is not None:
                return fast.reshape(1, s, nh * hd), k_all, v_all
        k_t = k_all.transpose(0, 1, 3, 2)
        ctx = np.empty((b, nh, s, hd))
        # query positions a block at a time: the scores of all of them are nh x s x t float64 values (5.4 GB at
        # SmolLM2's 8,192 positions); each row's softmax and products are the same in a block as in the whole.
        # A block reads only the keys its last query may see (causal): the keys after it have probability 0
        # exactly, so leaving them out changes a sum's order only (float64 rounding), and halves the work.
        step = max(1, min(_ATTENTION_QUERY_BLOCK, _WIDE_BLOCK_BYTES // (8 * nh * t)))
        for lo in range(0, s, step):
            hi = min(s, lo + step)
            seen = int(min(t, np.max(np.minimum(past_len + hi, total))))  # keys any query of the block may read
            qg = q[:, :, lo:hi].reshape(b, nkv, groups * (hi - lo), hd)
            scores = qg @ k_t[..., :seen]  # [b, nkv, groups*(hi-lo), seen]
            scores *= factor
            query_pos = np.tile(np.arange(lo, hi), groups)[None, :] + past_len[:, None]  # [b, groups*(hi-lo)]
            keys = np.arange(seen)[None, None, :]
            blocked = (keys > query_pos[:, :, None]) | (keys >= total[:, None, None])
            np.copyto(scores, -np.inf, where=blocked[:, None])
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores, out=scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            ctx[:, :, lo:hi] = (probs @ v_all[:, :, :seen]).reshape(b, nh, hi - lo, hd)
            del scores, probs  # freed before the next block's scores exist
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, s, nh * hd)
        return ctx, k_all, v_all

    @staticmethod
    def _in_c(query, key, value, past_key, past_value, seqlens_k, cos_cache, sin_cache, extra, nh, nkv, scale,
              do_rotary, rotary_interleaved, local_window_size, softcap, smooth_softmax):
        """The whole node in C (:func:`p2pinfer.kernels.ref64.grouped_query_attention`: RoPE, the present
        caches and the attention) for the importer's form (one sequence, packed projections, rotate-half RoPE
        from float32 caches, nothing else); None otherwise, or where the library is unavailable."""
        if key is not None or value is not None or not do_rotary or rotary_interleaved or any(
                e is not None and getattr(e, "size", 0) for e in extra) or local_window_size not in (None, -1) \
                or softcap not in (None, 0.0) or smooth_softmax or not isinstance(query, np.ndarray) \
                or query.ndim != 3 or query.shape[0] != 1 or not isinstance(cos_cache, np.ndarray) \
                or not isinstance(sin_cache, np.ndarray) or seqlens_k is None or np.asarray(seqlens_k).size != 1:
            return None
        s, width = query.shape[1], query.shape[2]
        if nh < 1 or nkv < 1 or width % (nh + 2 * nkv):
            return None
        hd = width // (nh + 2 * nkv)
        total = int(np.asarray(seqlens_k).reshape(-1)[0]) + 1
        past = total - s
        held = 0 if past_key is None else past_key.shape[2]
        if past < 0 or (held and held != past) or (not held and past):
            return None  # the numpy path says what is wrong
        factor = float(scale) if scale else 1.0 / math.sqrt(hd)
        fast = ref64.grouped_query_attention(
            np.asarray(query, np.float64)[0], None if not past else np.asarray(past_key, np.float64)[0],
            None if not past else np.asarray(past_value, np.float64)[0], cos_cache, sin_cache, heads=nh,
            kv_heads=nkv, past=past, total=total, factor=factor)
        if fast is None:
            return None
        ctx, present_k, present_v = fast
        return ctx.reshape(1, s, nh * hd), present_k[None], present_v[None]


class SkipSimplifiedLayerNormalization(OpRun):
    """RMSNorm of ``input + skip (+ bias)``; outputs (normed, mean: unused, inverse std, the sum)."""

    op_domain = CONTRIB_DOMAIN

    def _run(self, x, skip, gamma, bias=None, epsilon=None):
        eps = 1e-5 if epsilon is None else float(epsilon)
        if bias is None:  # the C kernel (sums in another order: float64 rounding), where it runs
            fast = ref64.skip_rmsnorm(np.asarray(x, np.float64), np.asarray(skip, np.float64),
                                      np.asarray(gamma, np.float64), eps)
            if fast is not None:
                normed, inv_std, total = fast
                return normed, np.zeros_like(inv_std), inv_std, total
        total = np.asarray(x, np.float64) + np.asarray(skip, np.float64)
        if bias is not None:
            total = total + np.asarray(bias, np.float64)
        inv_std = 1.0 / np.sqrt(np.mean(total * total, axis=-1, keepdims=True) + eps)
        return total * inv_std * np.asarray(gamma, np.float64), np.zeros_like(inv_std), inv_std, total


class Sigmoid(OpRun):
    """``onnx.reference``'s stable sigmoid with one exponential instead of two: ``exp(-|x|)`` is the
    ``exp(-x)`` of its positive branch and the ``exp(x)`` of the other, so the values are the same bits. A large
    input is cut in :data:`~p2pinfer.kernels.ref64.PRODUCT_THREADS` parts computed at once (numpy's element-wise
    operations release the GIL; each element is the same operations: the same bits)."""

    def _run(self, x):
        x = np.asarray(x)
        if x.dtype.kind != "f":  # computed in float64 and cast back to the input's type, as before
            out = np.empty(x.shape, dtype=np.float64)
            _sigmoid_into(x.astype(np.float64), out)
            return (out.astype(x.dtype),)
        out = np.empty(x.shape, dtype=x.dtype)  # C order: its flat view below is itself, not a copy
        flat_x, flat_out = x.reshape(-1), out.reshape(-1)
        parts = ref64.PRODUCT_THREADS if x.size >= _PARALLEL_ELEMENTS else 1
        bounds = [x.size * p // parts for p in range(parts + 1)]
        failed: list[BaseException] = []

        def part(lo: int, hi: int) -> None:
            try:
                _sigmoid_into(flat_x[lo:hi], flat_out[lo:hi])
            except BaseException as exc:  # re-raised by the caller's thread, never left behind half done
                failed.append(exc)

        helpers = [threading.Thread(target=part, args=(lo, hi), daemon=True)
                   for lo, hi in zip(bounds[1:-1], bounds[2:])]
        for helper_thread in helpers:
            helper_thread.start()
        part(bounds[0], bounds[1])
        for helper_thread in helpers:
            helper_thread.join()
        if failed:
            raise failed[0]
        return (out,)


#: element-wise work split over threads from this many elements (SmolLM2's SiLU at 256 positions: 393,216)
_PARALLEL_ELEMENTS = 1 << 16


def _sigmoid_into(x: np.ndarray, out: np.ndarray) -> None:
    """``exp(x) / (1 + exp(x))`` where x <= 0 and ``1 / (1 + exp(-x))`` where x > 0, from one ``e = exp(-|x|)``:
    the numerator is ``e`` or 1 by element, then one division (numpy's masked ``divide(where=)`` took 2x)."""
    e = np.abs(x)
    np.negative(e, out=e)
    np.exp(e, out=e)
    denominator = e + 1.0
    np.copyto(e, 1.0, where=x > 0)
    np.divide(e, denominator, out=out)


class Sum(OpRun):
    """Element-wise sum in input order without ``onnx.reference``'s ``0 +`` start and final copy (same bits)."""

    def _run(self, *args):
        out = args[0] + args[1] if len(args) > 1 else np.array(args[0], copy=True)
        for term in args[2:]:
            out += term
        return (out.astype(args[0].dtype, copy=False),)


class Q4Linear(OpRun):
    """A 4-bit linear layer written by :func:`.reference_fuse.fuse_q4_linears`: ``Sum`` of its ``MatMulNBits``
    terms (inputs ``(qweight, scales, zero_points or None)`` each) and of the Q4_1 block-minimum term
    ``ReduceSum(x in blocks) @ minimums`` (last input, or None), every term summed into one float64 output by the
    C products (float64 rounding apart from the nodes it replaces); numpy's nodes, one after the other, where the
    library is unavailable."""

    op_domain = FUSED_DOMAIN

    def _run(self, x, *inputs, K=None, N=None, block_size=None):  # noqa: N803
        *terms, minimums = inputs
        k_, n_, bs = int(K), int(N), int(block_size)
        a = np.asarray(x, dtype=np.float64)
        sums = None
        if minimums is not None:  # ReduceSum(Reshape(x, [0, 0, blocks, block_size]), [-1], keepdims=0)
            sums = a.reshape(a.shape[:-1] + (k_ // bs, bs)).sum(axis=-1)
        groups = [terms[i:i + 3] for i in range(0, len(terms), 3)]
        out = None
        if ref64.available():
            n_blocks = (k_ + bs - 1) // bs
            for j, (qweight, scales, zero_points) in enumerate(groups):
                zp = None if zero_points is None or not zero_points.size else \
                    _unpack_nibbles(np.asarray(zero_points).reshape(n_, -1))[:, :n_blocks]
                extra = (sums, minimums) if sums is not None and j == len(groups) - 1 else None
                out = ref64.q4_product(a, qweight, scales, zp, n=n_, k=k_, block_size=bs, out=out, extra=extra)
            if out is not None:
                return (out,)
        parts = [MatMulNBits._run(self, a, qweight, scales, zero_points, K=K, N=N, bits=4, block_size=block_size)[0]
                 for qweight, scales, zero_points in groups]
        if sums is not None:
            parts.append(sums @ np.asarray(minimums, dtype=np.float64))
        return Sum._run(self, *parts)


class SiluMul(OpRun):
    """The MLP activation written by :func:`.reference_fuse.fuse_silu_mul`: ``h`` split into two equal halves of
    its last axis (gate, up), ``(gate * Sigmoid(gate)) * up``: in one pass of the C kernel where it runs (its
    exponential within ~2 ulp of numpy's: float64 rounding), else the nodes it replaces, in numpy."""

    op_domain = FUSED_DOMAIN

    def _run(self, h, axis=None, half=None):
        h = np.asarray(h)
        half = int(half)
        if int(axis) not in (-1, h.ndim - 1) or h.shape[-1] != 2 * half:
            raise ReferenceUnsupported("SiluMul over an axis other than the last, or of another size")
        fast = ref64.silu_mul(h)
        if fast is not None:
            return (fast,)
        gate, up = h[..., :half], h[..., half:]
        return ((gate * Sigmoid._run(self, gate)[0]) * up,)


CONTRIB_OPS = (MatMulNBits, GroupQueryAttention, SkipSimplifiedLayerNormalization, Q4Linear, SiluMul)
#: standard operators replaced by faster float64-identical versions
FAST_OPS = (Sigmoid, Sum)


# ---- the graph --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _External:
    """Where an initializer's bytes are; mapped (read-only, never copied) for the length of one run only, so an
    idle reference holds none of the weights."""

    location: Path
    dtype: np.dtype
    offset: int
    shape: tuple[int, ...]

    def map(self) -> np.ndarray:
        count = int(np.prod(self.shape, dtype=np.int64))
        if count == 0:
            return np.zeros(self.shape, dtype=self.dtype)
        # a str, not the Path: np.memmap resolves a Path again on every map (5 lstat calls; ~1,000 maps a row)
        return np.memmap(str(self.location), dtype=self.dtype, mode="r", offset=self.offset,
                         shape=(count,)).reshape(self.shape)


def _external(tensor: onnx.TensorProto, base: Path) -> _External:
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = (base / info["location"]).resolve()
    if base.resolve() not in location.parents:
        raise ModelFormatError(f"initializer {tensor.name!r} points outside the model folder")
    return _External(location, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)),
                     int(info.get("offset", 0)), tuple(int(d) for d in tensor.dims))


def _widen_attributes(graph: onnx.GraphProto) -> None:
    """Casts and constant fills to a float type produce float64 instead."""
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i in _FLOAT_TYPES:
                    attr.i = TensorProto.DOUBLE
        elif node.domain in ("", "ai.onnx") and node.op_type == "ConstantOfShape":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
                    value = numpy_helper.to_array(attr.t).astype(np.float64)
                    attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise ReferenceUnsupported(f"control flow ({node.op_type}) in the graph")


class ReferenceModel:
    """The float64 evaluation of one ``model.onnx``. Thread-safe (one pass at a time in the process)."""

    def __init__(self, onnx_path: Path | str, *, kv_heads: int, head_dim: int) -> None:
        path = Path(onnx_path)
        proto = onnx.load(str(path), load_external_data=False)
        graph = proto.graph
        self._inits: dict[str, np.ndarray | _External] = {}
        for tensor in graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL:
                self._inits[tensor.name] = _external(tensor, path.parent)
            else:
                self._inits[tensor.name] = numpy_helper.to_array(tensor)
        del graph.initializer[:]
        if ref64.available():  # a 4-bit layer's terms into one output, the MLP activation in one pass (C kernels)
            if fuse_q4_linears(graph, self._inits) + fuse_silu_mul(graph, self._inits):
                proto.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
        _widen_attributes(graph)
        self._input_names = [i.name for i in graph.input]
        self._ids_dtype = helper.tensor_dtype_to_np_dtype(
            next(i for i in graph.input if i.name == "input_ids").type.tensor_type.elem_type)
        self._kv_shape = (1, int(kv_heads), 0, int(head_dim))
        try:
            evaluator = ReferenceEvaluator(proto, new_ops=list(CONTRIB_OPS + FAST_OPS))
        except (NotImplementedError, RuntimeError, TypeError, ValueError) as exc:
            raise ReferenceUnsupported(f"the float64 reference cannot run {path}: {exc}") from None
        outputs = {o.name for o in graph.output}
        # past input -> the present output that extends it (the graph's KV cache, kept by ReferenceSession)
        self._present_of = {name: "present." + name[len("past_key_values."):] for name in self._input_names
                            if name.startswith("past_key_values.")}
        if not set(self._present_of.values()) <= outputs:
            self._present_of = {}  # no present for every past: no cache, one pass over the whole sequence
        presents = frozenset(self._present_of.values())
        nodes = self._prune(evaluator.rt_nodes_, {"logits", *presents})  # every node any pass runs, in graph order
        self._nodes = nodes
        self._kv_plan = _Plan(nodes, self._prune(nodes, set(presents)))  # a chunk without rows: no LM head
        self._logits_plan = _Plan(nodes, self._prune(nodes, {"logits"}))  # the last chunk
        self._row_plan = _Plan(nodes, nodes)  # a chunk with rows that a later chunk extends
        self._stages = _stages(nodes, self._present_of)

    @staticmethod
    def _prune(nodes: list[Any], wanted: set[str]) -> list[Any]:
        want = set(wanted)
        keep = []
        for node in reversed(nodes):
            if want.intersection(node.output):
                keep.append(node)
                want.update(n for n in node.input if n)
        keep.reverse()
        return keep

    @property
    def caches(self) -> bool:
        """Whether the graph's presents extend its pasts (so a :class:`ReferenceSession` can keep them)."""
        return bool(self._present_of)

    def logprobs(self, ids: Sequence[int], *, last: int = 1) -> np.ndarray:
        """float64 log-softmax rows ``[last, vocab]``: the last ``last`` positions of ``ids``, computed from
        scratch (a :class:`ReferenceSession` of its own, dropped after the call)."""
        return ReferenceSession(self, max_bytes=0).logprobs(ids, last=last)  # nothing kept after the call

    @property
    def cache_bytes_per_position(self) -> int:
        """Bytes of the float64 KV cache per position (every layer's key and value; 0 without a cache)."""
        return len(self._present_of) * self._kv_shape[1] * self._kv_shape[3] * 8

    def extend(self, kv: dict[str, np.ndarray] | None, ids: Sequence[int], start: int, last: int, *,
               chunk: int = 0, keep: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rows ``[last, vocab]`` of the last ``last`` positions of ``ids`` and the float64 KV cache of
        ``ids[:keep]`` (default: all of ``ids``; 0: none), given ``kv``: the cache of ``ids[:start]`` (None when
        ``start`` is 0; its arrays are handed over: each is freed once its layer has read it). Positions go
        ``chunk`` (default :data:`REFERENCE_CHUNK`) at a time, the last chunk holding the ``last`` rows; chunks
        before it skip the LM head. A graph without a cache (:attr:`caches` False) runs ``ids`` in one pass
        (``start`` must be 0) and returns no cache.

        What is not kept is not built whole: where ``start <= keep <= len(ids) - last`` and it costs no extra
        pass (each pass dequantizes every 4-bit weight), a chunk ends at ``keep``, the cache there is what is
        returned, and the chunks after it run over it without building
        a cache of their own beyond what the next chunk reads: the last chunk builds none, and frees each
        layer's keys and values once read. So a row's peak holds the kept cache and one chunk's activations,
        never the float64 cache of every position (92 KB a position on SmolLM2) beside it. Chunks are a
        grouping of the same operations: the rows change by float64 rounding only. Otherwise the kept part is
        copied out of the whole cache one layer at a time."""
        n = len(ids)
        keep = n if keep is None else keep
        if n == 0 or not 1 <= last <= n - start or start < 0 or (start and kv is None) or not 0 <= keep <= n:
            raise ValueError("extend needs 1 <= last <= len(ids) - start, 0 <= keep <= len(ids) and the cache of "
                             "ids[:start]")
        if not self.caches and start:
            raise ValueError("this graph has no KV cache to extend")
        if self.caches and 0 < keep < start:
            raise ValueError("extend keeps at least the cache it was given (keep >= start) or none")
        kv = {} if kv is None else kv
        chunk = chunk or REFERENCE_CHUNK
        keep = keep if self.caches else 0
        cut = keep if start <= keep <= n - last else None  # a chunk ends where the kept cache does ...
        if cut is not None and _pass_count(start, n, last, chunk, cut) > _pass_count(start, n, last, chunk, None):
            cut = None  # ... unless that costs a pass (on 4-bit, a dequantization of every weight)
        bounds, lo = [], start
        while cut is not None and lo < cut:
            bounds.append((lo, min(lo + chunk, cut)))
            lo = bounds[-1][1]
        while self.caches and n - lo - chunk >= last:
            bounds.append((lo, lo + chunk))
            lo += chunk
        bounds.append((lo, n))
        # one process-wide lock: BLAS's thread count is global, and overlapping limits would restore it wrongly
        with _blas_lock, threadpool_limits(limits=REFERENCE_BLAS_THREADS, user_api="blas"):
            logits, kv = self._run_chunks(kv, ids, bounds, [0] * (len(bounds) - 1) + [last], keep)
        return log_softmax(np.asarray(logits[-1], dtype=np.float64)[0][-last:]), kv

    def rows_at(self, ids: Sequence[int], ends: Sequence[int], *, chunk: int = 0) -> dict[int, np.ndarray]:
        """float64 log-softmax rows after ``ids[:end]`` for each of ``ends`` (the row of position ``end - 1``),
        computed from scratch in **one** run over ``ids[:max(ends)]``: its chunks (at most ``chunk``, default
        :data:`REFERENCE_CHUNK`, positions) end at every requested end, and those chunks run the LM head for
        their last position only. Nothing is kept, so no float64 cache of a prefix is held between rows: the
        verifier, which knows all its near ties before it settles them, asks for them together. Each row equals
        :meth:`logprobs` of ``ids[:end]`` to float64 rounding (other chunk boundaries)."""
        wanted = sorted({int(e) for e in ends})
        if not wanted or wanted[0] < 1 or wanted[-1] > len(ids):
            raise ValueError("rows_at needs ends within 1..len(ids)")
        chunk = chunk or REFERENCE_CHUNK
        if not self.caches:  # no cache to carry from one chunk to the next: one pass per row
            return {e: self.logprobs(ids[:e])[0] for e in wanted}
        bounds, lo = [], 0
        for end in wanted:
            while lo < end:
                bounds.append((lo, min(lo + chunk, end)))
                lo = bounds[-1][1]
        heads = [1 if hi in wanted else 0 for _, hi in bounds]
        with _blas_lock, threadpool_limits(limits=REFERENCE_BLAS_THREADS, user_api="blas"):
            logits, _ = self._run_chunks({}, ids, bounds, heads, 0)
        return {end: log_softmax(np.asarray(row, dtype=np.float64)[0][-1:])[0] for end, row in zip(wanted, logits)}

    def _inputs(self, ids: Sequence[int], lo: int, hi: int, last: int) -> dict[str, Any]:
        """The graph inputs other than the past keys/values for positions ``lo..hi-1``."""
        feed: dict[str, Any] = {
            "input_ids": np.asarray([ids[lo:hi]], dtype=self._ids_dtype),
            "attention_mask": np.ones((1, hi), dtype=np.int64),
        }
        if "position_ids" in self._input_names:
            feed["position_ids"] = np.arange(lo, hi, dtype=np.int64)[None]
        if "logits_to_keep" in self._input_names or "logits_to_keep" in self._inits:
            feed["logits_to_keep"] = np.array([last], dtype=np.int64)
        return feed

    def _run_chunks(self, kv: dict[str, np.ndarray], ids: Sequence[int], bounds: list[tuple[int, int]],
                    rows: list[int], keep: int) -> tuple[list[Any], dict[str, np.ndarray]]:
        """(the logits of each chunk with ``rows[j] > 0``: its last ``rows[j]`` positions, in chunk order; the
        float64 cache of ``ids[:keep]``) of the passes over positions ``bounds`` (consecutive ``(lo, hi)`` chunks,
        the first starting where ``kv``'s cache ends; its arrays move into the run). A chunk with no rows runs
        without the LM head.

        **Layer-major**: the nodes go a stage at a time (:func:`_stages`: a stage ends after the node that writes
        a layer's ``present``), and each stage runs over every chunk before the next stage starts. A chunk's nodes
        and inputs are those of chunk-by-chunk passes (the same operations on the same values: the same bits);
        only the order differs. So one layer's keys and values exist at a time (the next chunk reads them as
        its past, then they are freed), not the float64 cache of every layer (92 KB a position on SmolLM2): a
        row's peak holds the values that cross from one layer to the next for every position (the residual
        stream: 2 x hidden float64 values a position), one chunk's activations within a layer, and the cache it
        keeps (``keep`` positions, copied out layer by layer as each layer finishes the chunk that reaches it)."""
        start = bounds[0][0]
        plans = [self._kv_plan if not r else self._logits_plan if j == len(bounds) - 1 else self._row_plan
                 for j, r in enumerate(rows)]
        chunks = [{"": None, **self._inputs(ids, lo, hi, r or 1)} for (lo, hi), r in zip(bounds, rows)]
        pasts: dict[str, Any] = {name: kv.pop(name) if start else np.zeros(self._kv_shape, dtype=np.float64)
                                 for name in self._present_of}
        kv.clear()
        kept: dict[str, np.ndarray] = {}
        if 0 < keep <= start:  # the cache handed in is the part kept (keep >= start): held as it is
            kept = dict(pasts)
        past_of = {present: past for past, present in self._present_of.items()}
        for first, end in self._stages:
            for j, (lo, hi) in enumerate(bounds):
                plan, results = plans[j], chunks[j]
                for k in range(first, end):
                    if k not in plan.runs:
                        continue
                    node = self._nodes[k]
                    raw = [pasts[name] if name in pasts else results[name] if name in results else self._inits[name]
                           for name in node.input]
                    # external weights stay descriptors until a node reads them: mapped for that node only
                    raw = [value.map() if isinstance(value, _External) else value for value in raw]
                    try:
                        outputs = _run_node(node, raw, {**self._inits, **results} if node.need_context() else results)
                    except ReferenceUnsupported:
                        raise
                    except Exception as exc:  # onnx.reference raises many types for what it cannot do
                        raise ReferenceUnsupported(f"float64 reference failed at {node.op_type} "
                                                   f"{getattr(node.onnx_node, 'name', '')!r}: {exc}") from None
                    del raw  # a mapped weight is unmapped here, not at the end of the run
                    for name, value in zip(node.output, outputs):
                        if name in past_of:  # this layer's cache after the chunk: the next chunk's past
                            past = past_of[name]
                            pasts[past] = value = np.asarray(value, dtype=np.float64)
                            if keep > start and hi >= keep and past not in kept:
                                kept[past] = value if hi == keep else value[:, :, :keep].copy()
                        if name and (plan.last_use.get(name, -1) > k or name == "logits"):  # read later, or kept
                            results[name] = value
                    for name in node.input:
                        if plan.last_use.get(name) == k and name in results:
                            del results[name]
            for past, present in self._present_of.items():  # each layer is done with its cache: freed
                if pasts.get(past) is not None and _producer_in(self._nodes, present, first, end):
                    pasts[past] = None
            # the stage's float64 temporaries handed back: glibc keeps freed blocks, and the next stage's blocks
            # of other sizes do not all fit them (SmolLM2, 557 positions: a row's resident peak +70 MB over the
            # heap it started on without this, +52 with it, for 28 MB of live arrays; ~2-7 ms a stage)
            release_freed_memory()
        return [results["logits"] for results, r in zip(chunks, rows) if r], kept

def _pass_count(start: int, n: int, last: int, chunk: int, cut: int | None) -> int:
    """Passes :meth:`ReferenceModel.extend` runs over positions ``start..n-1`` (with a chunk ending at ``cut``)."""
    count, lo = 0, start
    if cut is not None:
        count, lo = -(-(cut - start) // chunk), cut
    return count + max(0, n - lo - last) // chunk + 1


class _Plan:
    """Which nodes (indices into the graph-ordered node list) one kind of pass runs, and where each value is read
    last within it (it is freed after that node)."""

    def __init__(self, nodes: list[Any], runs: list[Any]) -> None:
        chosen = {id(node) for node in runs}
        self.runs = frozenset(k for k, node in enumerate(nodes) if id(node) in chosen)
        self.last_use: dict[str, int] = {}
        for k in sorted(self.runs):
            for name in nodes[k].input:
                self.last_use[name] = k


def _stages(nodes: list[Any], present_of: dict[str, str]) -> list[tuple[int, int]]:
    """The graph-ordered ``nodes`` cut into consecutive stages ``(first, end)``, each ending after a node that
    writes a ``present`` output (a layer's attention), where every reader of that layer's ``past`` is in the
    same stage as the writer of its ``present``: then a stage can run over every chunk of positions before the
    next stage starts (:meth:`ReferenceModel._run_chunks`), each chunk reading the cache the stage wrote for the
    chunk before it. A graph where that does not hold runs as one stage (chunk by chunk)."""
    writer = {out: k for k, node in enumerate(nodes) for out in node.output if out}
    spans = []
    for past, present in present_of.items():
        at = [k for k, node in enumerate(nodes) if past in node.input] + [writer[present]]
        spans.append((min(at), max(at)))
    cuts = sorted({writer[present] + 1 for present in present_of.values()})
    cuts = [c for c in cuts if 0 < c < len(nodes) and not any(lo < c <= hi for lo, hi in spans)]
    bounds = [0, *cuts, len(nodes)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _producer_in(nodes: list[Any], name: str, first: int, end: int) -> bool:
    return any(name in nodes[k].output for k in range(first, end))


class ReferenceSession:
    """One request's float64 reference: the rows it asks for, over a float64 KV cache kept between them.

    A request meets its near ties in order (the executor while it generates, the verifier while it checks), and
    each asks for the row after prompt + output so far. The first row computes its prefix once; a later one
    reuses the cache of the longest common prefix and computes only the positions after it. The cache holds at
    most ``max_bytes`` (:data:`REFERENCE_KV_BYTES`): its first positions, as many as fit, the rest recomputed
    when asked again. :meth:`close` (the end of the generation or verification) frees it.

    Rows equal :meth:`ReferenceModel.logprobs` over the whole sequence to float64 rounding: the same
    operations, grouped into other chunks (BLAS blocks and attention sums in another order;
    ``tests/test_reference_kv.py``). ``reference``: the model's reference, or a function building it at the
    first row (an idle session costs nothing); ``chunk``: positions per pass (default
    :data:`REFERENCE_CHUNK`). Thread-safe (one row at a time)."""

    def __init__(self, reference: "ReferenceModel | Callable[[], ReferenceModel]", *,
                 max_bytes: int | None = None, chunk: int | None = None) -> None:
        chunk = REFERENCE_CHUNK if chunk is None else int(chunk)
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        self._reference = reference
        self._factory = None if isinstance(reference, ReferenceModel) else reference
        self._max_bytes = REFERENCE_KV_BYTES if max_bytes is None else int(max_bytes)
        self._chunk = chunk
        self._ids: list[int] = []  # the tokens whose positions self._kv holds
        self._kv: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()
        self.computed_positions = 0  # positions run so far (cached positions are not run again)

    @property
    def cached_positions(self) -> int:
        return len(self._ids)

    @property
    def cached_bytes(self) -> int:
        return sum(v.nbytes for v in self._kv.values()) if self._kv else 0

    def logprobs(self, ids: Sequence[int], *, last: int = 1, final: bool = False) -> np.ndarray:
        """float64 log-softmax rows ``[last, vocab]`` of the last ``last`` positions of ``ids``. ``final``: the
        caller asks no later row (the verifier's last near tie): the cache is dropped, and the run builds none
        (:meth:`ReferenceModel.extend` with ``keep=0``: each layer's float64 keys and values are freed once
        read)."""
        ids = [int(t) for t in ids]
        n = len(ids)
        if n == 0 or not 1 <= last <= n:
            raise ValueError("logprobs needs at least one token and 1 <= last <= len(ids)")
        with self._lock:
            # freed heap pages handed back before and after the row (tens of ms against a row's seconds): the
            # forward passes' buffers before it (and before the graph is parsed, which stays beside them), its own
            # float64 intermediates after it; glibc would keep both resident, and the row's peak and the request's
            # memory after it would include them
            release_freed_memory()
            ref = self._model()
            start = 0
            if ref.caches:
                limit = min(len(self._ids), n - last)
                while start < limit and self._ids[start] == ids[start]:
                    start += 1
            held = len(self._ids)
            kv, self._kv, self._ids = self._kv, None, []  # handed over: freed layer by layer during the run
            if kv is not None and start < held:  # the request's tokens differ after `start`: its prefix only
                kv = {name: value[:, :, :start] for name, value in kv.items()}
            # positions kept after the row (at most max_bytes of cache; never fewer than it was given)
            keep = 0 if final or not ref.caches or self._max_bytes <= 0 else \
                max(start, min(n, self._max_bytes // max(1, ref.cache_bytes_per_position)))
            rows, kv = ref.extend(kv if start else None, ids, start, last, chunk=self._chunk, keep=keep)
            self.computed_positions += n - start
            self._kv, self._ids = (kv, ids[:keep]) if keep and kv else (None, [])
            del kv
            release_freed_memory()
            return rows

    def _model(self) -> ReferenceModel:
        """The reference, built by the factory on first use (held until :meth:`close`). Call with the lock held."""
        if not isinstance(self._reference, ReferenceModel):
            self._reference = self._reference()
        return self._reference

    def rows_at(self, ids: Sequence[int], ends: Sequence[int]) -> dict[int, np.ndarray]:
        """The float64 reference rows after ``ids[:end]`` for every ``end`` in ``ends``, in one run that keeps no
        cache (:meth:`ReferenceModel.rows_at`): a verifier's near ties, all known before they are settled. The
        session's cache, if any, is dropped."""
        ids = [int(t) for t in ids]
        with self._lock:
            self._kv, self._ids = None, []
            release_freed_memory()  # the forward passes' freed buffers (see logprobs), before the graph is parsed
            ref = self._model()
            rows = ref.rows_at(ids, ends, chunk=self._chunk)
            self.computed_positions += max(rows)
            release_freed_memory()
            return rows

    def row(self, ids: Sequence[int], *, final: bool = False) -> np.ndarray:
        """The float64 reference row after ``ids`` (what :data:`.tiebreak.ReferenceRow` returns); ``final`` as
        in :meth:`logprobs`."""
        return self.logprobs(ids, last=1, final=final)[0]

    def close(self) -> None:
        """Free the cache, and a reference this session built (from its factory): the model holds it weakly
        (:func:`reference_for`), so it is freed unless another holder keeps it. The session stays usable: a later
        row gets the reference again and recomputes its prefix."""
        with self._lock:
            self._kv, self._ids = None, []
            if self._factory is not None:
                self._reference = self._factory


def _widen(value: Any) -> Any:
    return value.astype(np.float64) if isinstance(value, np.ndarray) and value.dtype in _WIDEN else value


def _run_node(node: Any, raw: list[Any], results: dict[str, Any]) -> Sequence[Any]:
    """One node in float64. Every float input is widened for this node only; a large float weight is never
    widened whole (its float64 copy is twice its size: 226 MB for SmolLM2's tied embedding):

    * ``Gather`` picks its rows from the float32 table and widens what it picked (the same values: widening is
      exact);
    * ``Gemm``/``MatMul`` over such a weight run the node itself on blocks of the weight's output columns
      (:func:`_blockwise`);
    * ``Gemm``/``MatMul`` over any 2-D float32 weight go through the C products where they run
      (:func:`_weight_product`: the weight widened in registers);
    * ``GroupQueryAttention`` gets its cos/sin caches as stored and widens the rows it reads; ``MatMulNBits``
      and ``Q4Linear`` get their scales and minimums as stored."""
    op = node.op_type if node.onnx_node.domain in ("", "ai.onnx") else None
    if op == "Gather" and isinstance(raw[0], np.ndarray) and raw[0].dtype in _WIDEN:
        return [_widen(out) for out in node.run(*raw)]
    if op in ("Gemm", "MatMul") and len(raw) >= 2 and _is_large_weight(raw[1]):
        return (_blockwise(node, op, [_widen(v) for v in raw[:1]] + [raw[1]] + [_widen(v) for v in raw[2:]]),)
    if op in ("Gemm", "MatMul") and len(raw) >= 2 and _is_float_weight(raw[1]):
        product = _weight_product(node, op, _widen(raw[0]), raw[1], [_widen(v) for v in raw[2:]])
        if product is not None:
            return (product,)
    if node.onnx_node.domain == CONTRIB_DOMAIN and node.op_type == "GroupQueryAttention":
        # the cos/sin caches (inputs 7, 8: every position of the context) as stored; the node widens its rows
        return node.run(*[v if i in (7, 8) else _widen(v) for i, v in enumerate(raw)])
    if node.onnx_node.domain in (CONTRIB_DOMAIN, FUSED_DOMAIN) and node.op_type in ("MatMulNBits", "Q4Linear"):
        # the weights' float32 scales (and minimums) as stored: the C products read them so, and numpy's
        # MatMulNBits widens them itself (a widened copy here was 7 MB per term of SmolLM2's LM head)
        return node.run(_widen(raw[0]), *raw[1:])
    inputs = [_widen(v) for v in raw]  # transient: this node's inputs only
    return node.run(*inputs, context=results) if node.need_context() else node.run(*inputs)


def _is_float_weight(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == np.float32 and value.ndim == 2


def _weight_product(node: Any, op: str, a: Any, w: np.ndarray, rest: list[Any]) -> np.ndarray | None:
    """``MatMul(a, w)`` or ``Gemm(a, w, c)`` (alpha 1, beta 1, A not transposed) for a float32 weight ``w``
    through the C products (:mod:`p2pinfer.kernels.ref64`: ``w`` widened in registers, never as a float64
    copy); None where they do not apply (another form, or the library is unavailable): the node runs as usual."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float64 or a.ndim < 1:
        return None
    trans_b = False
    if op == "Gemm":
        if a.ndim != 2 or _attribute(node, "alpha", 1.0) != 1.0 or _attribute(node, "beta", 1.0) != 1.0 \
                or _attribute(node, "transA", 0) or len(rest) > 1:
            return None
        trans_b = bool(_attribute(node, "transB", 0))
    elif rest:
        return None
    k = w.shape[1] if trans_b else w.shape[0]
    if a.shape[-1] != k or k < _KERNEL_MIN_K:
        return None  # the operator's own error message; or a short product numpy's BLAS does faster
    out = ref64.f32_product(a, w, transposed=trans_b)
    if out is not None and rest and rest[0] is not None:
        out += rest[0]  # Gemm's C, broadcast as the operator does
    return out


def _is_large_weight(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype in _WIDEN and value.ndim == 2 \
        and value.size * 8 > _WIDE_BLOCK_BYTES


def _blockwise(node: Any, op: str, inputs: list[Any]) -> np.ndarray:
    """``Gemm``/``MatMul`` with a large float32 weight ``B`` (input 1), by blocks of B's output columns: each
    block of B is widened to float64 (at most :data:`_WIDE_BLOCK_BYTES`), the node's own operator runs on it
    (and on the matching columns of ``Gemm``'s ``C``), and its pages are dropped from the process when B is
    mapped. Each output element is the same float64 dot product over the whole of K as in one product."""
    a, w, rest = inputs[0], inputs[1], inputs[2:]
    trans_b = op == "Gemm" and bool(_attribute(node, "transB", 0))
    n, k = (w.shape[0], w.shape[1]) if trans_b else (w.shape[1], w.shape[0])
    step = max(1, _WIDE_BLOCK_BYTES // (8 * k))
    out: np.ndarray | None = None
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block = w[lo:hi] if trans_b else w[:, lo:hi]
        c = [x[..., lo:hi] if isinstance(x, np.ndarray) and x.ndim and x.shape[-1] == n else x for x in rest]
        part = _weight_product(node, op, a, block, c) if block.dtype == np.float32 else None
        if part is None:  # the node itself on the widened block (numpy's BLAS)
            part = node.run(a, block.astype(np.float64), *c)[0]
        drop_read_only_mapped_pages(block)
        if out is None:
            out = np.empty(part.shape[:-1] + (n,), dtype=part.dtype)
        out[..., lo:hi] = part
    assert out is not None  # n >= 1: a weight this large has columns
    return out


def _attribute(node: Any, name: str, default: Any) -> Any:
    for attr in node.onnx_node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


_cache_lock = threading.Lock()
_blas_lock = threading.Lock()  # one reference pass at a time in the process (see ReferenceModel.extend)


def reference_session(model: Any) -> ReferenceSession:
    """A new :class:`ReferenceSession` for one request on a :class:`~.model.LoadedModel` (builds nothing until
    its first row)."""
    return ReferenceSession(lambda: reference_for(model))


def reference_for(model: Any) -> ReferenceModel:
    """The :class:`ReferenceModel` of a :class:`~.model.LoadedModel`: the one in use, or a new one.

    The model keeps only a weak reference to it: while a :class:`ReferenceSession` (or any caller) holds it,
    every caller gets the same object; once the last holder lets go (a request's session is closed when its
    generation or verification ends) it is freed. Near ties are rare, and a kept reference held the parsed graph,
    its evaluator and the heap they fragmented (~6 MB measured on SmolLM2) for as long as the peer served, while
    building one again costs a graph parse (12-60 ms measured on SmolLM2, against a reference row's seconds)."""
    with _cache_lock:
        held = getattr(model, "_reference_model", None)
        ref = held() if held is not None else None
        if ref is None:
            empty = model.empty_cache().arrays[0].shape
            ref = ReferenceModel(Path(model.path) / "model.onnx", kv_heads=empty[1], head_dim=empty[3])
            object.__setattr__(model, "_reference_model", weakref.ref(ref))
        return ref
