"""The near-tie reference's float64 products (``p2pinfer_ref64_q4`` / ``p2pinfer_ref64_f32`` in
p2pinfer/kernels/ref64.c) bit for bit against the order they promise, emulated here exactly.

The rule (ref64.c's header): each weight widened exactly to float64 (``(code - zero point) x scale``, or a float32
weight); with five rows or more (and always for float32 weights) each output element is ONE sequential chain of
float64 fused multiply-adds over k = 0..K-1, ``acc = fma(a[m, k], w[n, k], acc)``, from +0 (or from ``out``'s value
when the call adds into it), each further 4-bit term continuing the chain over its own k, then the block-minimum
term's ``fma(sums[m, b], minimums[b, n], acc)`` over b. With one to four rows (the LM head's row, one 4-bit
term, blocks a multiple of 32) it is eight such chains, lane ``l`` over k = l mod 8, summed as GCC's
``_mm512_reduce_add_pd`` does (``(l0 + l4) + (l2 + l6)`` and ``(l1 + l5) + (l3 + l7)``, then those two), then added to
``out``'s value when the call adds into it. The thread count changes nothing.

Python 3.11 has no ``math.fma``: a float64 fused multiply-add is computed exactly in rationals and rounded once
(``Fraction`` to float is correctly rounded), with IEEE's rule for the sign of a zero. Inputs are finite (zeros,
-0 and subnormals among them); NaN and infinities are compared against the previous kernel by
``benchmarks/ref64_products.py``. Outputs are compared as bytes."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from p2pinfer.kernels import ref64

pytestmark = pytest.mark.skipif(not ref64.available(), reason="no AVX-512 float64 kernel on this CPU")


def fma(a: float, b: float, c: float) -> float:
    """a x b + c rounded once to float64 (finite operands; overflow raises)."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    if exact == 0:
        product_negative = (math.copysign(1.0, a) < 0) != (math.copysign(1.0, b) < 0)
        if a == 0 or b == 0:  # an exact zero product: -0 only where both it and c are -0
            return -0.0 if product_negative and math.copysign(1.0, c) < 0 else 0.0
        return 0.0  # a nonzero product cancelled by c exactly: +0 in round to nearest
    result = float(exact)
    return math.copysign(0.0, exact) if result == 0 else result  # an underflow keeps its sign


def test_fma_emulation_rounds_once() -> None:
    """Cases where one rounding and two differ, and IEEE's zero signs."""
    eps = 2.0 ** -52
    # (1 + eps)(1 - eps) = 1 - eps^2: two roundings give exactly 1 - 1 = 0, one gives -eps^2
    assert fma(1 + eps, 1 - eps, -1.0) == -eps * eps
    assert (1 + eps) * (1 - eps) - 1.0 == 0.0
    assert math.copysign(1.0, fma(-0.0, 1.0, -0.0)) < 0
    assert math.copysign(1.0, fma(-0.0, 1.0, 0.0)) > 0
    assert math.copysign(1.0, fma(2.0, 3.0, -6.0)) > 0
    assert math.copysign(1.0, fma(-5e-324, 0.5, -0.0)) < 0  # underflows to -0
    assert fma(5e-324, 0.5, 5e-324) == 1e-323  # 1.5 ulp of the smallest subnormal, to even


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e30, 1e30, allow_subnormal=True), st.floats(-1e30, 1e30, allow_subnormal=True),
       st.floats(-1e30, 1e30, allow_subnormal=True))
def test_fma_emulation_against_rationals_where_the_product_is_exact(a, b, c) -> None:
    """Where a x b is exact in float64 (a and b cut to 26 significant bits) fma is the single rounding of the sum,
    which is what float64 addition does."""
    def cut(x: float) -> float:
        if x == 0 or not math.isfinite(x):
            return x
        m, e = math.frexp(x)
        return math.ldexp(round(m * 2 ** 26) / 2 ** 26, e)
    a, b = cut(a), cut(b)
    product = a * b
    if Fraction(product) != Fraction(a) * Fraction(b) or not math.isfinite(product):
        return  # underflow or overflow: not an exact product
    want = product + c
    got = fma(a, b, c)
    assert got == want and math.copysign(1.0, got) == math.copysign(1.0, want)


def dequantized(packed: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, n: int, k: int) -> np.ndarray:
    blocks, half = packed.shape[1], packed.shape[2]
    codes = np.empty((n, blocks, 2 * half), dtype=np.float64)
    codes[..., 0::2] = packed & 15
    codes[..., 1::2] = packed >> 4
    zero = np.full((n, blocks, 1), 8.0) if zp is None else zp.astype(np.float64)[..., None]
    return ((codes - zero) * scales.astype(np.float64).reshape(n, blocks, 1)).reshape(n, -1)[:, :k]


def chain(acc: float, a_row: np.ndarray, w_col: np.ndarray) -> float:
    for x, w in zip(a_row.tolist(), w_col.tolist()):
        acc = fma(x, w, acc)
    return acc


def lanes_then_reduce(a_row: np.ndarray, w_col: np.ndarray) -> float:
    lanes = [chain(0.0, a_row[lane::8], w_col[lane::8]) for lane in range(8)]
    s = [lanes[4 + i] + lanes[i] for i in range(4)]
    u = [s[2 + j] + s[j] for j in range(2)]
    return u[0] + u[1]


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    bad = np.argwhere(got.view(np.uint64) != want.view(np.uint64))
    assert bad.size == 0, f"{len(bad)} elements differ, first at {bad[0]}: {got[tuple(bad[0])]!r} != " \
                          f"{want[tuple(bad[0])]!r}"


def awkward(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values over several magnitudes, with zeros, -0 and subnormals sprinkled in, and one row of zeros."""
    a = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, shape)
    flat = a.reshape(-1)
    picks = rng.integers(0, flat.size, max(3, flat.size // 50))
    flat[picks[0::3]] = 0.0
    flat[picks[1::3]] = -0.0
    flat[picks[2::3]] = 5e-324 * rng.integers(1, 1000, len(picks[2::3]))
    if shape[0] > 2:
        a[1] = -0.0
    return a


def q4_case(rng: np.random.Generator, n: int, k: int, bs: int, zero_points: bool):
    blocks = (k + bs - 1) // bs
    packed = rng.integers(0, 256, (n, blocks, bs // 2), dtype=np.uint8)
    scales = (rng.standard_normal(n * blocks) * 0.01).astype(np.float32)
    scales[rng.integers(0, scales.size)] = -0.0
    zp = rng.integers(0, 16, (n, blocks), dtype=np.uint8) if zero_points else None
    return packed, scales, zp


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m, n, k, bs", [
    (9, 50, 300, 32),    # rows 8 + 1, columns 24 + 24 + 2, k blocks 128 + 128 + 44 (a 32-code group and a tail)
    (13, 100, 160, 32),  # a second 96-column panel; k blocks 128 + 32
    (6, 30, 200, 64),    # fewer rows than the tile; blocks of 64
    (5, 17, 130, 16),    # blocks of 16 (no 32-code groups)
])
def test_q4_panel_path_is_one_fma_chain_per_element(monkeypatch, threads, m, n, k, bs) -> None:
    """Five rows or more: two 4-bit terms (the served Q4_1 graph's layers), the block-minimum term, added into a
    given ``out``; each element the one chain of the rule."""
    monkeypatch.setattr(ref64, "PRODUCT_THREADS", threads)
    rng = np.random.default_rng(m * 1000 + n + k)
    terms = [q4_case(rng, n, k, bs, zero_points=bool(t)) for t in range(2)]
    a = awkward(rng, (m, k))
    blocks = (k + bs - 1) // bs
    sums = awkward(rng, (m, blocks))
    minimums = (rng.standard_normal((blocks, n)) * 0.01).astype(np.float32)
    start = awkward(rng, (m, n))
    out = start.copy()
    for j, (packed, scales, zp) in enumerate(terms):
        out = ref64.q4_product(a, packed, scales, zp, n=n, k=k, block_size=bs, out=out,
                               extra=(sums, minimums) if j == 1 else None)
    weights = [dequantized(*term, n, k) for term in terms]
    mins = minimums.astype(np.float64)
    want = np.empty((m, n))
    for r in range(m):
        for c in range(n):
            acc = float(start[r, c])
            for w in weights:
                acc = chain(acc, a[r], w[c])
            want[r, c] = chain(acc, sums[r], mins[:, c])
    assert_same_bits(out, want)
    # and from +0 (no out given), one term
    got = ref64.q4_product(a, *terms[0], n=n, k=k, block_size=bs)
    want = np.array([[chain(0.0, a[r], weights[0][c]) for c in range(n)] for r in range(m)])
    assert_same_bits(got, want)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_q4_few_rows_are_eight_lanes_then_the_reduction(monkeypatch, m) -> None:
    """One to four rows (the LM head's last row): eight lane chains and GCC's reduction, then out's value + it."""
    monkeypatch.setattr(ref64, "PRODUCT_THREADS", 2)
    rng = np.random.default_rng(m)
    n, k, bs = 70, 192, 32
    packed, scales, zp = q4_case(rng, n, k, bs, zero_points=False)
    a = awkward(rng, (m, k))
    w = dequantized(packed, scales, zp, n, k)
    got = ref64.q4_product(a, packed, scales, zp, n=n, k=k, block_size=bs)
    assert_same_bits(got, np.array([[lanes_then_reduce(a[r], w[c]) for c in range(n)] for r in range(m)]))
    start = awkward(rng, (m, n))
    got = ref64.q4_product(a, packed, scales, zp, n=n, k=k, block_size=bs, out=start.copy())
    want = np.array([[start[r, c] + lanes_then_reduce(a[r], w[c]) for c in range(n)] for r in range(m)])
    assert_same_bits(got, want)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 18), n=st.integers(1, 60), k=st.integers(1, 280), transposed=st.booleans(),
       threads=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_f32_product_is_one_fma_chain_per_element(m, n, k, transposed, threads, seed) -> None:
    """float32 weights, both layouts, any row count: each element one chain from +0."""
    rng = np.random.default_rng(seed)
    w = awkward(rng, (n, k) if transposed else (k, n)).astype(np.float32)
    a = awkward(rng, (m, k))
    old = ref64.PRODUCT_THREADS
    ref64.PRODUCT_THREADS = threads
    try:
        got = ref64.f32_product(a, w, transposed=transposed)
    finally:
        ref64.PRODUCT_THREADS = old
    w_nk = (w if transposed else w.T).astype(np.float64)
    assert_same_bits(got, np.array([[chain(0.0, a[r], w_nk[c]) for c in range(n)] for r in range(m)]))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(5, 20), n=st.integers(1, 60), blocks=st.integers(1, 6), bs=st.sampled_from([16, 32, 64]),
       short=st.integers(0, 15), zero_points=st.booleans(), threads=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_q4_panel_path_any_shape(m, n, blocks, bs, short, zero_points, threads, seed) -> None:
    """Rows, columns and k off every tile, panel, block and 32-code group: one chain per element."""
    rng = np.random.default_rng(seed)
    k = max(1, blocks * bs - short)
    packed, scales, zp = q4_case(rng, n, k, bs, zero_points)
    a = awkward(rng, (m, k))
    old = ref64.PRODUCT_THREADS
    ref64.PRODUCT_THREADS = threads
    try:
        got = ref64.q4_product(a, packed, scales, zp, n=n, k=k, block_size=bs)
    finally:
        ref64.PRODUCT_THREADS = old
    w = dequantized(packed, scales, zp, n, k)
    assert_same_bits(got, np.array([[chain(0.0, a[r], w[c]) for c in range(n)] for r in range(m)]))
