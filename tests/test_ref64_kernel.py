"""The float64 reference's C kernels (p2pinfer/kernels/ref64.c) against numpy float64 on the same values.

Each C result is a float64 evaluation of the same expression in another order, so it must agree with numpy's
to float64 rounding: a few ulp of the sum of the absolute terms. The reference's rows with the kernels agree
with its numpy path (``P2PINFER_REF64_KERNEL=0``) on SmolLM2 far inside the ~1e-12 the tie-break argument needs.

Where the library cannot run (no compiler, a CPU without AVX-512) each function must say so (None), which is
what these tests then check: the reference multiplies with numpy there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pinfer.kernels import ref64


EPS = np.finfo(np.float64).eps


def _dequantized(packed: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, n: int, k: int, bs: int) -> np.ndarray:
    blocks = packed.shape[1]
    codes = np.empty((n, blocks, bs), dtype=np.float64)
    codes[..., 0::2] = packed & 15
    codes[..., 1::2] = packed >> 4
    zero = np.full((n, blocks, 1), 8.0) if zp is None else zp.astype(np.float64)[..., None]
    w = (codes - zero) * scales.astype(np.float64).reshape(n, blocks, 1)
    return w.reshape(n, blocks * bs)[:, :k]


def _bound(a: np.ndarray, w_t: np.ndarray) -> np.ndarray:
    """A float64 error bound of any summation order: k x eps x sum |a_i w_i| (and a floor for exact zeros)."""
    k = a.shape[-1]
    return (k + 2) * EPS * (np.abs(a) @ np.abs(w_t)) + 1e-300


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 19), n=st.integers(1, 75), blocks=st.integers(1, 6), bs=st.sampled_from([16, 32, 64]),
       short=st.integers(0, 15), zero=st.sampled_from(["none", "uniform", "random"]), seed=st.integers(0, 2**32 - 1),
       batch=st.booleans())
def test_q4_product_matches_numpy(m, n, blocks, bs, short, zero, seed, batch) -> None:
    """Shapes off every tile size (rows, columns, k not a multiple of 8 or of the block), zero points absent,
    uniform or per block: the C product equals numpy's float64 product of the dequantized weight."""
    rng = np.random.default_rng(seed)
    k = max(1, blocks * bs - short)
    packed = rng.integers(0, 256, (n, blocks, bs // 2), dtype=np.uint8)
    scales = (rng.standard_normal(n * blocks) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
    zp = None if zero == "none" else np.full((n, blocks), int(rng.integers(0, 16)), np.uint8) if zero == "uniform" \
        else rng.integers(0, 16, (n, blocks), dtype=np.uint8)
    a = rng.standard_normal((2, m, k) if batch else (m, k)) * 10.0 ** rng.integers(-2, 3)
    got = ref64.q4_product(a, packed, scales, zp, n=n, k=k, block_size=bs)
    if not ref64.available():
        assert got is None
        return
    w = _dequantized(packed, scales, zp, n, k, bs)
    want = a @ w.T
    assert got.shape == want.shape and got.dtype == np.float64
    assert np.all(np.abs(got - want) <= _bound(a, w.T))


@pytest.mark.parametrize("m", [1, 2, 4, 5, 9])
@pytest.mark.parametrize("bs", [32, 64])
def test_q4_product_adds_into_out_with_a_second_term(m, bs) -> None:
    """``out`` given: the product is added to it; ``extra``: a float32 term (a Q4_1 layer's block minimums) summed
    in the same pass. One to four rows take the dot-product path (the LM head's row), more the panel path."""
    rng = np.random.default_rng(m * bs)
    n, blocks = 77, 5
    k = blocks * bs
    packed = rng.integers(0, 256, (n, blocks, bs // 2), dtype=np.uint8)
    scales = rng.standard_normal(n * blocks).astype(np.float32)
    zp = rng.integers(0, 16, (n, blocks), dtype=np.uint8)
    a = rng.standard_normal((1, m, k))
    start = rng.standard_normal((1, m, n))
    sums, mins = rng.standard_normal((1, m, blocks)), rng.standard_normal((blocks, n)).astype(np.float32)
    w = _dequantized(packed, scales, zp, n, k, bs)
    for extra in (None, (sums, mins)):
        out = start.copy()
        got = ref64.q4_product(a, packed, scales, zp, n=n, k=k, block_size=bs, out=out, extra=extra)
        if not ref64.available():
            assert got is None
            return
        want = start + a @ w.T + (0 if extra is None else sums @ mins.astype(np.float64))
        assert got is out
        bound = _bound(a[0], w.T) + (0 if extra is None else _bound(sums[0], mins.astype(np.float64))) + 4 * EPS * np.abs(want)
        assert np.all(np.abs(got - want) <= bound)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 19), n=st.integers(1, 75), k=st.integers(1, 300), transposed=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_f32_product_matches_numpy(m, n, k, transposed, seed) -> None:
    """float32 weights widened in registers ([k, n] as MatMul stores them, [n, k] as Gemm's transB)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k) if transposed else (k, n)).astype(np.float32)
    a = rng.standard_normal((m, k))
    got = ref64.f32_product(a, w, transposed=transposed)
    if not ref64.available():
        assert got is None
        return
    w_t = w.astype(np.float64).T if transposed else w.astype(np.float64)
    assert np.all(np.abs(got - a @ w_t) <= _bound(a, w_t))


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, past: int, total: int, factor: float) -> np.ndarray:
    """Causal grouped-query attention, one query row at a time, plainly in numpy float64."""
    s, nh, hd = q.shape
    groups = nh // k.shape[0]
    ctx = np.empty((s, nh, hd))
    for i in range(s):
        visible = min(past + i + 1, total)
        for h in range(nh):
            scores = (k[h // groups, :visible] @ q[i, h]) * factor
            e = np.exp(scores - scores.max())
            ctx[i, h] = (e / e.sum()) @ v[h // groups, :visible]
    return ctx.reshape(s, nh * hd)


@settings(max_examples=40, deadline=None)
@given(s=st.integers(1, 20), past=st.integers(0, 40), kv=st.integers(1, 3), groups=st.integers(1, 3),
       hd=st.sampled_from([64, 128]), scale=st.sampled_from([0.1, 1.0, 30.0]), seed=st.integers(0, 2**32 - 1))
def test_attention_matches_numpy(s, past, kv, groups, hd, scale, seed) -> None:
    """Query blocks off the block size, pasts of any length, grouped heads; large scores (scale 30) make most
    probabilities underflow, the case where subnormal probabilities are dropped (below 1e-307)."""
    rng = np.random.default_rng(seed)
    nh, t = kv * groups, past + s
    q = rng.standard_normal((s, nh, hd)) * scale
    k, v = rng.standard_normal((kv, t, hd)), rng.standard_normal((kv, t, hd))
    factor = 1.0 / math.sqrt(hd)
    got = ref64.attention(q, k, v, past=past, total=t, factor=factor)
    if not ref64.available():
        assert got is None
        return
    want = _attention(q, k, v, past, t, factor)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * max(1.0, float(np.abs(v).max())) * scale)


def test_attention_refuses_what_it_does_not_implement() -> None:
    """A head size that is not a multiple of 64 is left to numpy (None), never computed wrongly."""
    q, k = np.zeros((2, 2, 32)), np.zeros((1, 2, 32))
    assert ref64.attention(q, k, k, past=0, total=2, factor=1.0) is None


def test_sigmoid_split_over_threads_gives_onnx_reference_bits() -> None:
    """The reference's Sigmoid computes a large input in parts on several threads: every element is still
    onnx.reference's value, bit for bit (test_reference_kv.py checks a small input, computed in one part)."""
    from onnx.reference.ops.op_sigmoid import sigmoid

    from p2pinfer.runtime.reference import _PARALLEL_ELEMENTS, Sigmoid

    rng = np.random.default_rng(5)
    x = rng.standard_normal(3 * _PARALLEL_ELEMENTS + 7) * 12
    x[:6] = [0.0, -0.0, 750.0, -750.0, 1e-300, -1e-300]
    with np.errstate(over="ignore", invalid="ignore"):
        expected = sigmoid(x)
    assert np.array_equal(Sigmoid._run(None, x)[0].view(np.int64), expected.view(np.int64))
    block = x[:7 * 20_000].reshape(1, 7, 20_000)[:, :, :15_000]  # not contiguous: computed as the layout says
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.array_equal(Sigmoid._run(None, block)[0], sigmoid(block))
        assert np.array_equal(Sigmoid._run(None, block[0].T)[0], sigmoid(block[0].T))


@pytest.fixture(scope="module")
def smollm2_q4(tmp_path_factory, smollm2_gguf):
    from p2pinfer.gguf import import_gguf
    from p2pinfer.runtime import load_model

    folder = tmp_path_factory.mktemp("smollm2-ref64") / "SmolLM2-135M-Instruct"
    import_gguf(smollm2_gguf, folder)  # the served 4-bit class
    return load_model(folder, providers=["CPUExecutionProvider"])


def test_reference_rows_with_the_kernels_equal_the_numpy_path(smollm2_q4, monkeypatch) -> None:
    """SmolLM2 (4-bit products, the float32 block-minimum products, GroupQueryAttention, SiLU): rows from the C
    kernels and from numpy (``P2PINFER_REF64_KERNEL=0``, a reference built afresh) agree to float64 rounding,
    at two chunks' worth of positions (a past in the second chunk's attention)."""
    from p2pinfer.runtime.reference import ReferenceModel, ReferenceSession

    model = smollm2_q4
    ids = model.prompt_ids(messages=[{"role": "user", "content": "Tell me about lighthouses. " * 12}])[:150]
    empty = model.empty_cache().arrays[0].shape

    def rows() -> np.ndarray:
        ref = ReferenceModel(model.path / "model.onnx", kv_heads=empty[1], head_dim=empty[3])
        return ReferenceSession(ref, max_bytes=0, chunk=64).logprobs(ids, last=3)

    fast = rows()
    kernels = ref64.available()
    monkeypatch.setenv("P2PINFER_REF64_KERNEL", "0")
    monkeypatch.setattr(ref64, "_lib", [])  # the library is looked up again, under the switch
    slow = rows()
    assert not ref64.available()
    difference = float(np.max(np.abs(fast - slow)))
    assert difference <= 1e-12 and (difference > 0 or not kernels)  # (> 0: the kernels did run)


def test_silu_mul_matches_the_graph_nodes() -> None:
    """The fused MLP activation: (gate * Sigmoid(gate)) * up, the sigmoid as the reference's Sigmoid node computes
    it; the C exponential within a few ulp (0 where the true sigmoid is below 2^-1022)."""
    from p2pinfer.runtime.reference import Sigmoid

    rng = np.random.default_rng(3)
    h = rng.standard_normal((1, 37, 2 * 203)) * 8
    h[0, 0, :6] = [0.0, -0.0, 700.0, -700.0, 1e-300, -1e-300]
    got = ref64.silu_mul(h)
    if not ref64.available():
        assert got is None
        return
    gate, up = h[..., :203], h[..., 203:]
    want = (gate * Sigmoid._run(None, gate)[0]) * up
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=8 * EPS, atol=1e-300)
    assert ref64.silu_mul(h[..., :5]) is None  # an odd last axis is not two halves


def _linear_graph(shared_sums: bool) -> tuple:
    """x @ (a Q4_1 term + its block minimums), as gguf.graph writes it; ``shared_sums``: the block sums are also
    a graph output (read twice), which must stop the rewrite."""
    import onnx
    from onnx import TensorProto, helper

    k, n, bs = 64, 8, 32
    nodes = [
        helper.make_node("MatMulNBits", ["x", "q", "s"], ["t0"], domain="com.microsoft", K=k, N=n, bits=4,
                         block_size=bs),
        helper.make_node("Reshape", ["x", "shape"], ["blocks"]),
        helper.make_node("ReduceSum", ["blocks", "axes"], ["sums"], keepdims=0),
        helper.make_node("MatMul", ["sums", "mins"], ["m"]),
        helper.make_node("Sum", ["t0", "m"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared_sums:
        outputs.append(helper.make_tensor_value_info("sums", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], outputs)
    inits = {"q": np.zeros((n, k // bs, bs // 2), np.uint8), "s": np.ones(n * k // bs, np.float32),
             "shape": np.array([0, 0, k // bs, bs], np.int64), "axes": np.array([-1], np.int64),
             "mins": np.ones((k // bs, n), np.float32)}
    return graph, inits, onnx


def test_fusion_rewrites_exactly_the_importer_pattern() -> None:
    from p2pinfer.runtime.reference_fuse import fuse_q4_linears

    graph, inits, _ = _linear_graph(shared_sums=False)
    assert fuse_q4_linears(graph, inits) == 1
    assert [node.op_type for node in graph.node] == ["Q4Linear"]
    assert list(graph.node[0].input) == ["x", "q", "s", "", "mins"] and list(graph.node[0].output) == ["y"]
    graph, inits, _ = _linear_graph(shared_sums=True)
    assert fuse_q4_linears(graph, inits) == 0  # an intermediate read elsewhere: left as it is
    assert [node.op_type for node in graph.node] == ["MatMulNBits", "Reshape", "ReduceSum", "MatMul", "Sum"]


def test_fused_graph_and_its_numpy_fallback_on_smollm2(smollm2_q4, monkeypatch) -> None:
    """Where the kernels run, SmolLM2's reference graph has every 4-bit layer as one Q4Linear and every MLP
    activation as one SiluMul (no MatMulNBits, Sum or Sigmoid left); with the library gone at run time, the
    fused nodes compute the replaced nodes in numpy, and the row agrees with the kernels' to float64 rounding."""
    from p2pinfer.runtime.reference import ReferenceModel, ReferenceSession

    model = smollm2_q4
    empty = model.empty_cache().arrays[0].shape
    ref = ReferenceModel(model.path / "model.onnx", kv_heads=empty[1], head_dim=empty[3])
    kinds = {node.op_type for node in ref._nodes}
    if not ref64.available():
        assert "Q4Linear" not in kinds and "MatMulNBits" in kinds
        return
    assert {"Q4Linear", "SiluMul"} <= kinds and not kinds & {"MatMulNBits", "Sum", "Sigmoid"}
    assert sum(node.op_type == "SiluMul" for node in ref._nodes) == 30
    ids = model.prompt_ids(messages=[{"role": "user", "content": "Why is the sea salty?"}])
    fast = ReferenceSession(ref, max_bytes=0).logprobs(ids, last=2)
    monkeypatch.setattr(ref64, "_lib", [None])  # the library unavailable from here on
    slow = ReferenceSession(ref, max_bytes=0).logprobs(ids, last=2)
    assert float(np.max(np.abs(fast - slow))) <= 1e-12


def test_skip_rmsnorm_matches_the_node() -> None:
    """SkipSimplifiedLayerNormalization's four outputs from the C kernel against its numpy computation."""
    from p2pinfer.runtime.reference import SkipSimplifiedLayerNormalization

    rng = np.random.default_rng(9)
    for d in (576, 13):
        x, skip, gamma = rng.standard_normal((1, 21, d)) * 3, rng.standard_normal((1, 21, d)), rng.standard_normal(d)
        got = ref64.skip_rmsnorm(x, skip, gamma, 1e-5)
        if not ref64.available():
            assert got is None
            return
        total = x + skip
        inv_std = 1.0 / np.sqrt(np.mean(total * total, axis=-1, keepdims=True) + 1e-5)
        normed = total * inv_std * gamma
        assert np.array_equal(got[2], total)
        np.testing.assert_allclose(got[1], inv_std, rtol=d * EPS, atol=0)
        np.testing.assert_allclose(got[0], normed, rtol=(d + 4) * EPS, atol=0)
        outputs = SkipSimplifiedLayerNormalization._run(None, x, skip, gamma, epsilon=1e-5)
        assert len(outputs) == 4 and np.array_equal(outputs[0], got[0]) and not outputs[1].any()
    assert ref64.skip_rmsnorm(x, skip[:, :3], gamma, 1e-5) is None  # broadcasting is left to numpy


@settings(max_examples=25, deadline=None)
@given(s=st.integers(1, 20), past=st.integers(0, 30), kv=st.integers(1, 3), groups=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_grouped_query_attention_node_in_c_matches_its_numpy_path(s, past, kv, groups, seed) -> None:
    """The reference's GroupQueryAttention node, whole in C (RoPE from float32 caches, present caches,
    attention) against the same node's numpy path (the library swapped out): outputs within float64 rounding."""
    from p2pinfer.runtime.reference import GroupQueryAttention

    rng = np.random.default_rng(seed)
    nh, hd = kv * groups, 64
    query = rng.standard_normal((1, s, (nh + 2 * kv) * hd))
    past_k = rng.standard_normal((1, kv, past, hd)) if past else None
    past_v = rng.standard_normal((1, kv, past, hd)) if past else None
    cos = rng.uniform(-1, 1, (past + s + 3, hd // 2)).astype(np.float32)
    sin = rng.uniform(-1, 1, (past + s + 3, hd // 2)).astype(np.float32)

    def node() -> tuple:
        return GroupQueryAttention._run(GroupQueryAttention.__new__(GroupQueryAttention), query, None, None, past_k,
                                        past_v, np.array([past + s - 1]), np.array(past + s), cos, sin,
                                        num_heads=nh, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0)

    fast = node()
    lib = list(ref64._lib)
    ref64._lib[:] = [None]
    try:
        slow = node()
    finally:
        ref64._lib[:] = lib
    for got, want in zip(fast, slow):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * max(1.0, float(np.abs(want).max())))


def test_reference_rows_do_not_depend_on_the_kernels_thread_count(smollm2_q4, monkeypatch) -> None:
    """Every output element of every kernel is computed by one thread with one instruction sequence, whichever
    thread takes its panel: one thread and two give the same row, bit for bit."""
    from p2pinfer.runtime.reference import ReferenceModel, ReferenceSession

    model = smollm2_q4
    empty = model.empty_cache().arrays[0].shape
    ref = ReferenceModel(model.path / "model.onnx", kv_heads=empty[1], head_dim=empty[3])
    ids = model.prompt_ids(messages=[{"role": "user", "content": "Name three rivers."}])
    two = ReferenceSession(ref, max_bytes=0, chunk=16).logprobs(ids, last=2)
    monkeypatch.setattr(ref64, "PRODUCT_THREADS", 1)
    one = ReferenceSession(ref, max_bytes=0, chunk=16).logprobs(ids, last=2)
    assert np.array_equal(one, two)
