"""GGUF block-quantized tensors as 4-bit ``MatMulNBits`` terms, without leaving the quantized domain.

``MatMulNBits`` (com.microsoft) stores a weight ``W[N, K]`` (N output rows, K inputs: GGUF's own row layout)
as blocks of ``block_size`` consecutive values along K: ``qweight[N, K/bs, bs/2]`` (element ``2i`` in the low
nibble of byte ``i``, ``2i+1`` in the high one), one float32 scale per block and optionally a uint8 zero
point per block (absent: 8). A value is ``(q - zero_point) * scale``.

onnxruntime 1.32's CPU kernel is only fast for 4 bits with integer zero points: 8-bit weights and float
zero points make it dequantize the whole matrix on every call (measured: 20-200x slower than float32 for
one decode row). So every GGUF type is written as a sum of 4-bit terms plus, for types with a per-block
minimum, a small ``[N, K/bs]`` float matrix applied to the block sums of the input::

    W[n, k] = sum_t (q_t[n, k] - zp_t) * scale_t[n, b(k)]  +  min[n, b(k)]
    x @ W.T = sum_t MatMulNBits(x, q_t, scale_t, zp_t)      +  blocksum(x) @ min.T

======  =====  ===========================================================  ========================
type    block  terms                                                        vs llama.cpp (per value)
======  =====  ===========================================================  ========================
Q4_0    32     ``(q - 8) * d``                                              bit-identical
Q4_1    32     ``(q - 0) * d``, min ``m``                                   bit-identical (``q*d + m``)
Q8_0    32     ``(hi - 8) * 16d + (lo - 0) * d``, ``q + 128 = 16 hi + lo``  bit-identical (exact sums)
Q4_K    32     ``(q - 0) * (d*sc_j)``, min ``-(dmin*m_j)``                  bit-identical
Q6_K    16     ``(hi - 2) * 16(d*sc_j) + (lo - 0) * (d*sc_j)``              within one float32 rounding
======  =====  ===========================================================  ========================

(Q8_0: ``d`` is a float16, so ``16d*(hi-8)`` and ``d*lo`` are exact in float32 and so is their sum; Q6_K's
``d*sc_j`` is a float32 product, so ``d*sc_j*lo`` may round.) The products are summed in a different order
than llama.cpp's dot products, as any two BLAS kernels do. :meth:`BlockQuantized.dequantize` is the value
the graph computes per weight; tests compare it, and onnxruntime's output, with ``gguf.quants.dequantize``.

Everything here is pure numpy on the GGUF's raw bytes (``uint8[rows, row_bytes]``); nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

#: GGUF types kept block-quantized (the others are dequantized to float32 by the importer).
NATIVE_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q6_K)
#: MatMulNBits' zero point when none is stored (4 bits).
DEFAULT_ZERO_POINT = 8

_BLOCK_BYTES = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q8_0: 34, QT.Q4_K: 144, QT.Q6_K: 210}
_BLOCK_VALUES = {QT.Q4_0: 32, QT.Q4_1: 32, QT.Q8_0: 32, QT.Q4_K: 256, QT.Q6_K: 256}


@dataclass(frozen=True)
class Term:
    """``(q - zero_point) * scale``: 4-bit codes ``uint8[rows, n_blocks, block]``, float32 ``scales[rows,
    n_blocks]`` and one zero point for every block."""

    q: np.ndarray
    scales: np.ndarray
    zero_point: int = DEFAULT_ZERO_POINT

    @property
    def packed(self) -> np.ndarray:
        """``uint8[rows, n_blocks, block/2]`` as MatMulNBits reads it."""
        return np.ascontiguousarray(self.q[..., 0::2] | (self.q[..., 1::2] << 4))

    @property
    def packed_zero_points(self) -> np.ndarray | None:
        """None for the default zero point, else ``uint8[rows * ceil(n_blocks/2)]`` (two per byte)."""
        if self.zero_point == DEFAULT_ZERO_POINT:
            return None
        rows, n_blocks = self.scales.shape
        byte = np.uint8(self.zero_point | (self.zero_point << 4))
        out = np.full((rows, (n_blocks + 1) // 2), byte, dtype=np.uint8)
        if n_blocks % 2:  # the unused high nibble of the last byte stays zero
            out[:, -1] = np.uint8(self.zero_point)
        return out.reshape(-1)

    def values(self) -> np.ndarray:
        return (self.q.astype(np.float32) - np.float32(self.zero_point)) * self.scales[..., None]

    def take_rows(self, order: np.ndarray) -> "Term":
        return Term(self.q[order], self.scales[order], self.zero_point)


@dataclass(frozen=True)
class BlockQuantized:
    """One weight matrix ``[rows, cols]`` as 4-bit terms plus an optional per-block float ``mins``."""

    qtype: QT
    block_size: int
    terms: tuple[Term, ...]
    mins: np.ndarray | None

    @property
    def rows(self) -> int:
        return int(self.terms[0].q.shape[0])

    @property
    def cols(self) -> int:
        return int(self.terms[0].q.shape[1] * self.block_size)

    @property
    def kind(self) -> tuple:
        """Matrices with the same kind can be stacked row-wise into one node group."""
        return (self.block_size, tuple(t.zero_point for t in self.terms), self.mins is not None)

    def take_rows(self, order: np.ndarray) -> "BlockQuantized":
        return BlockQuantized(self.qtype, self.block_size, tuple(t.take_rows(order) for t in self.terms),
                              None if self.mins is None else self.mins[order])

    def scaled(self, factor: np.float32) -> "BlockQuantized":
        """Every value multiplied by ``factor`` (exact when it is a power of two)."""
        f = np.float32(factor)
        return BlockQuantized(self.qtype, self.block_size,
                              tuple(Term(t.q, (t.scales * f).astype(np.float32), t.zero_point) for t in self.terms),
                              None if self.mins is None else (self.mins * f).astype(np.float32))

    def dequantize(self) -> np.ndarray:
        """float32 ``[rows, cols]``, the value each weight has in the graph."""
        values = self.terms[0].values()
        for term in self.terms[1:]:
            values = values + term.values()
        if self.mins is not None:
            values = values + self.mins[..., None]
        return values.reshape(self.rows, self.cols).astype(np.float32)


def stack_rows(parts: list[BlockQuantized]) -> BlockQuantized:
    """Concatenate along the output rows (all parts of the same :attr:`~BlockQuantized.kind` and width)."""
    first = parts[0]
    if any(p.kind != first.kind or p.cols != first.cols for p in parts):
        raise ValueError("parts of different kinds cannot be stacked")
    terms = tuple(Term(np.concatenate([p.terms[j].q for p in parts]),
                       np.concatenate([p.terms[j].scales for p in parts]), t.zero_point)
                  for j, t in enumerate(first.terms))
    mins = None if first.mins is None else np.concatenate([p.mins for p in parts])
    return BlockQuantized(first.qtype, first.block_size, terms, mins)


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 pairs (``uint8[..., 2]``) as float32."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)


def _split_byte(q: np.ndarray, scale: np.ndarray, hi_zero_point: int) -> tuple[Term, Term]:
    """``q * scale`` (q < 256) as ``(hi - zp) * 16 scale + lo * scale`` with 4-bit ``hi``/``lo``."""
    hi = Term((q >> 4).astype(np.uint8), (scale * np.float32(16)).astype(np.float32), hi_zero_point)
    lo = Term((q & 0xF).astype(np.uint8), scale.astype(np.float32), 0)
    return hi, lo


def from_gguf(raw: np.ndarray, qtype: QT, cols: int) -> BlockQuantized:
    """The GGUF tensor with raw bytes ``uint8[rows, row_bytes]`` of type ``qtype`` as 4-bit terms."""
    if qtype not in NATIVE_TYPES:
        raise ValueError(f"{qtype.name} is not kept block-quantized")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    per_block = _BLOCK_VALUES[qtype]
    if cols % per_block or raw.shape[1] != cols // per_block * _BLOCK_BYTES[qtype]:
        raise ValueError(f"{qtype.name} tensor with {cols} columns has {raw.shape[1]} bytes per row")
    blocks = raw.reshape(rows, cols // per_block, _BLOCK_BYTES[qtype])
    if qtype == QT.Q8_0:  # int8 q: q + 128 = 16 hi + lo, and (q + 128 - 128) * d = (hi - 8) * 16d + lo * d
        d = _f16(blocks[..., 0:2])
        biased = (blocks[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return BlockQuantized(qtype, 32, _split_byte(biased, d, 8), None)
    if qtype in (QT.Q4_0, QT.Q4_1):
        d = _f16(blocks[..., 0:2])
        qs = blocks[..., 2:18] if qtype == QT.Q4_0 else blocks[..., 4:20]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # GGUF: low nibbles are values 0..15
        if qtype == QT.Q4_0:
            return BlockQuantized(qtype, 32, (Term(q, d, 8),), None)
        return BlockQuantized(qtype, 32, (Term(q, d, 0),), _f16(blocks[..., 2:4]))
    if qtype == QT.Q4_K:
        d, dmin = _f16(blocks[..., 0:2])[..., None], _f16(blocks[..., 2:4])[..., None]
        sc_raw = blocks[..., 4:16]
        lo, hi, tail = sc_raw[..., 0:4], sc_raw[..., 4:8], sc_raw[..., 8:12]
        sc = np.concatenate([lo & 63, (tail & 0xF) | ((lo >> 6) << 4)], axis=-1)  # sub-blocks 0..3, 4..7
        mn = np.concatenate([hi & 63, (tail >> 4) | ((hi >> 6) << 4)], axis=-1)
        qs = blocks[..., 16:144].reshape(rows, -1, 4, 32)  # 4 groups of 32 bytes, 64 values each
        q = np.stack([qs & 0xF, qs >> 4], axis=3).reshape(rows, -1, 32)  # sub-block 2g: low, 2g+1: high
        scale = (d * sc.astype(np.float32)).astype(np.float32).reshape(rows, -1)
        minimum = (dmin * mn.astype(np.float32)).astype(np.float32).reshape(rows, -1)
        return BlockQuantized(qtype, 32, (Term(q, scale, 0),), -minimum)
    # Q6_K: ql[128], qh[64], int8 scales[16], d; 16 values per scale; value = d*sc * (q6 - 32)
    ql, qh = blocks[..., 0:128], blocks[..., 128:192]
    scales = blocks[..., 192:208].view(np.int8).astype(np.float32)
    d = _f16(blocks[..., 208:210])[..., None]
    halves = []
    for h in range(2):
        l_, h_ = ql[..., 64 * h:64 * h + 64], qh[..., 32 * h:32 * h + 32]
        halves += [(l_[..., 0:32] & 0xF) | (((h_ >> 0) & 3) << 4),
                   (l_[..., 32:64] & 0xF) | (((h_ >> 2) & 3) << 4),
                   (l_[..., 0:32] >> 4) | (((h_ >> 4) & 3) << 4),
                   (l_[..., 32:64] >> 4) | (((h_ >> 6) & 3) << 4)]
    q6 = np.concatenate(halves, axis=-1).reshape(rows, -1, 16)  # values in order, 16 per scale
    scale = (d * scales).astype(np.float32).reshape(rows, -1)
    return BlockQuantized(qtype, 16, _split_byte(q6, scale, 2), None)  # q6 - 32 = 16 (hi - 2) + lo
