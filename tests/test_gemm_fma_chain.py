"""The 4-bit kernel's many-row float32 GEMM (``gemm_part`` in p2pinfer/kernels/qmatmul.c, ``amx=0``) bit for bit
against the rule it promises, emulated here exactly.

The rule: each weight dequantized as ``s0 * (q0 - zp0)`` rounded to float32, then (two terms) ``+ s1 * (q1 - zp1)``
as one fused multiply-add, then (block minimums) ``+ min`` rounded; each output element ONE sequential chain over
k = 0..K-1 from +0: ``acc = fma(x[m, k], w[n, k], acc)``, rounded to float32 at every step. Where the build has no
FMA (``-march=x86-64``, ``x86-64-v2``) every product is rounded before its add instead.

Python 3.11 has no ``math.fma``, so a float32 fused multiply-add is emulated in float64 exactly: the product of two
float32 is exact in float64, the sum is rounded to odd (round to nearest, then the last bit forced to 1 when the
rounding was inexact, found by TwoSum), and rounding to odd at 53 bits then to nearest at 24 bits is the correctly
rounded result (53 >= 24 + 2). The emulation is itself checked (hypothesis) against float32 arithmetic where a
product or a sum alone is rounded. Outputs are compared bit for bit where they are numbers and position for
position where they are NaN (a NaN's sign and payload are the CPU's business). Shapes: the real layer shapes of
SmolLM2-135M (and the head's two terms on fewer columns), columns not a multiple of the 32-column panels, row counts
that are not multiples of the 8-row tile, 1 to 3 threads, rows of NaN, infinities, zeros, -0 and subnormals."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from p2pinfer import kernels

from kernel_builds import library_for

ZP = 8


@pytest.fixture(autouse=True)
def _kernel_enabled(monkeypatch) -> None:
    """A developer's P2PINFER_DECODE_KERNEL=0 or P2PINFER_KERNEL_MARCH must not change what these tests run."""
    monkeypatch.delenv("P2PINFER_DECODE_KERNEL", raising=False)
    monkeypatch.delenv("P2PINFER_KERNEL_MARCH", raising=False)


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a * b + c`` rounded once (elementwise; float32 arrays in, float32 out)."""
    c64 = c.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        p = a.astype(np.float64) * b.astype(np.float64)  # exact: 24 + 24 bits
        t = p + c64
        bp = t - p  # TwoSum: e = (p + c) - t exactly, where everything is finite
        e = (p - (t - bp)) + (c64 - bp)
    bits = t.view(np.int64)
    inexact = np.isfinite(t) & (e != 0) & ((bits & 1) == 0)
    # round to odd: move the even-ended t one unit toward the exact sum (the neighbour ends odd)
    towards = np.where(e > 0, np.inf, -np.inf)
    t = np.where(inexact, np.nextafter(t, towards), t)
    with np.errstate(over="ignore"):
        return t.astype(np.float32)


def mul_add32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a * b`` rounded, then ``+ c`` rounded (a build without FMA)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return (a.astype(np.float32) * b.astype(np.float32)) + c.astype(np.float32)


def expected(x: np.ndarray, codes: list[np.ndarray], scales: list[np.ndarray], mins: np.ndarray | None,
             fused: bool) -> np.ndarray:
    """The rule above for x [M, K], codes [N, K] (0..15), scales [N, K // 32] and mins [K // 32, N]."""
    step = fma32 if fused else mul_add32
    f = [(c.astype(np.int32) - ZP).astype(np.float32) for c in codes]
    s = [np.repeat(sc, 32, axis=1) for sc in scales]
    with np.errstate(invalid="ignore", over="ignore"):
        w = s[0] * f[0]  # rounded: the multiply no build fuses
        for t in range(1, len(codes)):
            w = step(s[t], f[t], w)
        if mins is not None:
            w = w + np.repeat(mins.T, 32, axis=1)
    acc = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for k in range(x.shape[1]):
        acc = step(x[:, k : k + 1], w[None, :, k], acc)
    return acc


@settings(max_examples=400, deadline=None)
@given(st.floats(width=32), st.floats(width=32), st.floats(width=32))
def test_the_emulated_fma_is_correctly_rounded_where_float32_can_tell(a: float, b: float, c: float) -> None:
    """fma(a, 1, c) = a + c and fma(a, b, +0) = a * b rounded once by float32 itself (an exact zero product's -0
    made +0; a nonzero product that underflows stays -0 or +0 by its sign)."""
    f32 = np.float32
    a32, b32, c32 = (np.array([v], np.float32) for v in (a, b, c))
    with np.errstate(all="ignore"):
        sum32 = a32 + c32
        prod32 = a32 * b32
        exactly_zero = ((a32 == 0) | (b32 == 0)) & ~np.isnan(prod32)
        prod32 = np.where(exactly_zero, f32(0), prod32)  # -0 + +0 is +0; a product too small for float32 keeps its sign
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    for got, want in ((fma32(a32, one, c32), sum32), (fma32(a32, b32, zero), prod32)):
        assert (np.isnan(got) & np.isnan(want)).all() or got.view(np.uint32)[0] == want.view(np.uint32)[0], (a, b, c)


@settings(max_examples=400, deadline=None)
@given(st.floats(width=32, allow_nan=False, allow_infinity=False), st.floats(width=32, allow_nan=False, allow_infinity=False),
       st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_the_emulated_fma_is_the_float32_nearest_the_exact_value(a: float, b: float, c: float) -> None:
    """Against exact rational arithmetic: no float32 is nearer a * b + c (a tie goes to the even one); c is
    also drawn as nearly -a * b, where the sum cancels and double rounding would show."""
    for c_ in (c, -float(np.float32(a * b)) if abs(a * b) < 3e38 else c):
        a32, b32, c32 = (np.array([v], np.float32) for v in (a, b, c_))
        exact = Fraction(a) * Fraction(b) + Fraction(float(c32[0]))
        got = fma32(a32, b32, c32)[0]
        if not np.isfinite(got):
            assert abs(exact) >= Fraction(float(np.finfo(np.float32).max)), (a, b, c_)
            continue
        error = abs(Fraction(float(got)) - exact)
        for other in (np.nextafter(got, np.float32(-np.inf)), np.nextafter(got, np.float32(np.inf))):
            if np.isfinite(other):
                other_error = abs(Fraction(float(other)) - exact)
                assert other_error > error or (other_error == error and not got.view(np.uint32) & 1), (a, b, c_)


def test_the_emulated_fma_differs_from_a_rounded_product_where_it_must() -> None:
    """The emulation keeps the product's low bits (an FMA does, mul + add does not): (1 + 2^-12)^2 - (1 + 2^-11)
    is 2^-24 exactly, 0 after rounding the product."""
    a = np.array([1 + 2.0**-12], np.float32)
    c = -np.array([1 + 2.0**-11], np.float32)
    assert fma32(a, a, c)[0] == np.float32(2.0**-24)
    assert mul_add32(a, a, c)[0] == 0


def _layer(k: int, n: int, terms: int, with_mins: bool, rng: np.random.Generator):
    """A QMatMul node on random codes, float16 scales and minimums (as GGUF stores them), and its arrays."""
    nb = k // 32
    codes = [rng.integers(0, 16, (n, k), dtype=np.uint8) for _ in range(terms)]
    scales = [np.float16(rng.uniform(0.001, 0.05, (n, nb)) * (16 if t else 1)).astype(np.float32) for t in range(terms)]
    mins = np.float16(rng.uniform(-0.3, 0.0, (nb, n))).astype(np.float32) if with_mins else None
    inits, inputs = [], ["x"]
    for t in range(terms):
        blocks = codes[t].reshape(n, nb, 32)
        packed = (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)
        inits += [numpy_helper.from_array(packed, f"q{t}"), numpy_helper.from_array(scales[t].reshape(-1), f"s{t}")]
        inputs += [f"q{t}", f"s{t}"]
    if with_mins:
        inits.append(numpy_helper.from_array(mins, "mins"))
        inputs.append("mins")
    op = "QMatMul2" if terms == 2 else "QMatMul1M" if with_mins else "QMatMul1"
    zps = {"zp0": ZP, "zp1": ZP} if terms == 2 else {"zp0": ZP}

    def session(lib, threads: int) -> ort.InferenceSession:
        node = helper.make_node(op, inputs, ["y"], domain=kernels.DOMAIN, K=k, N=n, threads=threads, amx=0, **zps)
        graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.register_custom_ops_library(str(lib))
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    return session, codes, scales, mins


def _activations(rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, k)).astype(np.float32)
    if rows >= 9:
        x[1, 3], x[3, 5], x[4, 7] = np.nan, np.inf, -np.inf
        x[2], x[5] = 0.0, -0.0
        x[6] = rng.standard_normal(k).astype(np.float32) * np.float32(1e-39)  # subnormal
        x[7] *= np.float32(1e30)  # products near float32's top: some sums overflow to infinity
    return x


def _assert_same(got: np.ndarray, want: np.ndarray, what) -> None:
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), what
    differ = got.view(np.uint32)[~nan] != want.view(np.uint32)[~nan]
    assert not differ.any(), (what, int(differ.sum()), "of", int((~nan).sum()))


# (K, N, terms, block minimums, row counts): SmolLM2-135M's q/k/v, o, gate/up and down; the head's two terms
# (49,152 columns there) on 200; edge shapes: 70 and 33 columns (partial 16-column groups), one block
SHAPES = [
    (576, 960, 1, True, (4, 13)),
    (576, 576, 1, True, (9,)),
    (576, 3072, 1, True, (5,)),
    (1536, 576, 1, True, (11,)),
    (576, 200, 2, False, (4, 17)),
    (64, 70, 1, True, (4, 7, 8, 9, 23)),
    (96, 33, 2, False, (6, 10, 16)),
    (32, 17, 1, False, (12,)),
]


# x86-64 and x86-64-v2 both take the portable build (no FMA); v2 lets the compiler use SSE4 in it
@pytest.mark.parametrize("march", ["native", "x86-64-v3", "x86-64-v2", "x86-64"])
def test_every_output_is_the_promised_float32_chain(monkeypatch, march: str) -> None:
    lib = library_for(monkeypatch, march)
    fused = kernels.library_isa(lib) != "portable"
    assert fused == (march not in ("x86-64", "x86-64-v2")), kernels.library_isa(lib)
    rng = np.random.default_rng(7)
    for k, n, terms, with_mins, row_counts in SHAPES:
        session, codes, scales, mins = _layer(k, n, terms, with_mins, rng)
        sessions = {threads: session(lib, threads) for threads in (1, 2, 3)}
        for rows in row_counts:
            x = _activations(rows, k, rng)
            want = expected(x, codes, scales, mins, fused)
            for threads, s in sessions.items():
                _assert_same(s.run(None, {"x": x})[0], want, (march, k, n, terms, with_mins, rows, threads))


def test_a_rows_output_does_not_depend_on_the_call(monkeypatch) -> None:
    """Row determinism across the 8-row tiles: a row's output is the same whatever the row count, its place in
    the call and the thread count (the chain is per element)."""
    lib = library_for(monkeypatch, "native")
    rng = np.random.default_rng(8)
    session, *_ = _layer(576, 960, 1, True, rng)
    sessions = [session(lib, threads) for threads in (1, 2, 3)]
    x = _activations(300, 576, rng)
    whole = sessions[0].run(None, {"x": x})[0]
    for start, stop in ((0, 4), (5, 21), (3, 12), (17, 50), (31, 64), (250, 300), (1, 300)):
        for s in sessions:
            got = s.run(None, {"x": x[start:stop]})[0]
            assert np.array_equal(got.view(np.uint32), whole[start:stop].view(np.uint32)), (start, stop)
