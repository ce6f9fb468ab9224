"""The kernel's attention (p2pinfer/kernels/qattn.c, GQAttention): onnxruntime's GroupQueryAttention as the GGUF
importer emits it, against a float64 attention with rotary and against onnxruntime's own node, on the native,
x86-64-v3 and x86-64-v2 builds (the first two the same bits); each row the same bits whatever the pass split
and the thread count, decode steps included; the in-place KV buffers; every bad input an onnxruntime error, never
a read or write out of bounds; the rewrite leaving what it does not support alone; and a 4-bit model's kernel
session within float32 rounding of the same session on onnxruntime's attention."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from p2pinfer import kernels


@pytest.fixture(autouse=True)
def _kernel_enabled(monkeypatch) -> None:
    """The kernel and its attention are on by default; a developer's environment must not turn these tests off."""
    monkeypatch.delenv("P2PINFER_DECODE_KERNEL", raising=False)
    monkeypatch.delenv("P2PINFER_KERNEL_ATTENTION", raising=False)


def _rotary_tables(positions: int, head: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / theta ** (np.arange(0, head, 2, dtype=np.float64) / head)
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _graph(nh: int, nkv: int, head: int, positions: int = 96, **attrs) -> onnx.ModelProto:
    """One GroupQueryAttention node as p2pinfer.gguf.graph writes it (``attrs`` override or add attributes)."""
    cos, sin = _rotary_tables(positions, head)
    if "cos" in attrs:
        cos, sin = attrs.pop("cos"), attrs.pop("sin")
    node_attrs = {"num_heads": nh, "kv_num_heads": nkv, "scale": 1.0, "do_rotary": 1, "rotary_interleaved": 0}
    node_attrs.update(attrs)
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total",
                                                    "cos", "sin"], ["out", "present_key", "present_value"],
                            domain="com.microsoft", name="attn", **node_attrs)
    kv = ["b", "kv_heads", "p", head]  # the head size stated (the rewrite needs it); the rest symbolic: wrong shapes
    # reach the op (the test of its own checks)
    graph = helper.make_graph(
        [node], "gqa",
        [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["b", "s", "width"]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
         helper.make_tensor_value_info("total", TensorProto.INT32, ["one"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", "out_width"]),
         helper.make_tensor_value_info("present_key", TensorProto.FLOAT, ["b", "kv_heads", "t", "head"]),
         helper.make_tensor_value_info("present_value", TensorProto.FLOAT, ["b", "kv_heads", "t", "head"])],
        initializer=[numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def _session(model: onnx.ModelProto, lib: Path | None = None, threads: int = 2) -> ort.InferenceSession:
    """onnxruntime's node (``lib`` None) or the kernel's (the graph rewritten)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if lib is not None:
        assert kernels.kernel_attention(model, threads) == 1
        if not any(o.domain == kernels.DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(kernels.DOMAIN, 1))
        options.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feed(qkv: np.ndarray, past_k: np.ndarray, past_v: np.ndarray, past: int) -> dict[str, np.ndarray]:
    s = qkv.shape[1]
    return {"qkv": qkv, "past_key": past_k, "past_value": past_v,
            "seqlens_k": np.full(qkv.shape[0], past + s - 1, np.int32), "total": np.array([past + s], np.int32)}


def _reference(qkv: np.ndarray, past_k: np.ndarray, past_v: np.ndarray, past: int, nh: int, nkv: int, head: int,
               cos: np.ndarray, sin: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64: rotate-half rotary at positions past.., causal grouped-query attention; (out, keys, values)."""
    b, s, _ = qkv.shape
    x = qkv.astype(np.float64).reshape(b, s, nh + 2 * nkv, head)
    half = head // 2
    c = cos[past:past + s].astype(np.float64)[None, :, None, :]
    sn = sin[past:past + s].astype(np.float64)[None, :, None, :]

    def rope(t: np.ndarray) -> np.ndarray:
        a, z = t[..., :half], t[..., half:]
        return np.concatenate([a * c - z * sn, z * c + a * sn], axis=-1)

    q, k, v = rope(x[:, :, :nh]), rope(x[:, :, nh:nh + nkv]), x[:, :, nh + nkv:]
    keys = np.concatenate([past_k[:, :, :past].astype(np.float64), k.transpose(0, 2, 1, 3)], axis=2)
    values = np.concatenate([past_v[:, :, :past].astype(np.float64), v.transpose(0, 2, 1, 3)], axis=2)
    alpha = scale if scale else 1.0 / np.sqrt(head)
    out = np.zeros((b, s, nh, head))
    for h in range(nh):
        kk, vv = keys[:, h // (nh // nkv)], values[:, h // (nh // nkv)]
        scores = alpha * np.einsum("bsd,btd->bst", q[:, :, h], kk)
        future = np.arange(past + s)[None, :] > (past + np.arange(s))[:, None]
        scores = np.where(future[None], -np.inf, scores)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, h] = np.einsum("bst,btd->bsd", p / p.sum(-1, keepdims=True), vv)
    return out.reshape(b, s, nh * head), keys, values


@pytest.fixture(scope="module")
def libraries() -> dict[str, Path]:
    """The kernel built for this CPU and for x86-64-v3 (AVX2) and x86-64-v2 (no AVX2, no FMA)."""
    mp = pytest.MonkeyPatch()
    libs = {}
    try:
        for march in ("native", "x86-64-v3", "x86-64-v2"):
            mp.setenv("P2PINFER_KERNEL_MARCH", march)
            lib = kernels.library_path()
            assert lib is not None, f"the C compiler should build the kernel for {march}"
            libs[march] = lib
    finally:
        mp.undo()
    return libs


# head sizes: SmolLM2's 64; 16 and 32 (fewer than the values' four vectors at a time); 128 (two groups of four) and
# 112 (a group of four and one of three)
SHAPES = [(9, 3, 64), (4, 2, 16), (4, 4, 32), (2, 1, 128), (2, 1, 112)]


@pytest.mark.parametrize("nh,nkv,head", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("scale", [1.0, 0.0, 0.37])
def test_attention_matches_float64_and_onnxruntime(libraries, nh: int, nkv: int, head: int, scale: float) -> None:
    """A first pass (no past), a pass after a past, and a decode step: the kernel's rows and present KV are as close
    to the float64 attention as onnxruntime's GroupQueryAttention is (float32 rounding), on every build."""
    model = _graph(nh, nkv, head, scale=scale)
    cos, sin = _rotary_tables(96, head)
    theirs = _session(model)
    ours = {march: _session(model, lib) for march, lib in libraries.items()}
    rng = np.random.default_rng(nh * 1000 + head)
    for past, s in ((0, 23), (17, 29), (40, 1)):
        qkv = rng.standard_normal((1, s, (nh + 2 * nkv) * head)).astype(np.float32) * 2
        past_k = rng.standard_normal((1, nkv, past, head)).astype(np.float32)
        past_v = rng.standard_normal((1, nkv, past, head)).astype(np.float32)
        out, keys, values = _reference(qkv, past_k, past_v, past, nh, nkv, head, cos, sin, scale)
        feed = _feed(qkv, past_k, past_v, past)
        ort_out, ort_k, ort_v = theirs.run(None, feed)
        assert np.abs(ort_out - out).max() < 2e-5 * np.abs(values).max()  # the reference itself is right
        by_build = {}
        for march, session in ours.items():
            got, got_k, got_v = by_build[march] = session.run(None, feed)
            assert got.shape == ort_out.shape and got_k.shape == ort_k.shape == keys.shape
            assert np.abs(got - out).max() < 2e-5 * np.abs(values).max(), (march, past, s)
            assert np.abs(got_k - keys).max() < 2e-6 * np.abs(keys).max(), (march, past, s)
            assert np.array_equal(got_v, values.astype(np.float32)), (march, past, s)
            assert np.abs(got - ort_out).max() < 2e-5 * np.abs(values).max(), (march, past, s)
        # the AVX-512 and AVX2 builds: the same instruction sequence per element (FMA on both), the same bits
        assert all(np.array_equal(a, b) for a, b in zip(by_build["native"], by_build["x86-64-v3"])), (past, s)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 70), min_size=1, max_size=5, unique=True), seed=st.integers(0, 2 ** 32 - 1))
def test_rows_are_the_same_bits_whatever_the_pass_split_threads_and_decode(libraries, cuts: list[int], seed: int) -> None:
    """A sequence of 71 positions run as one pass, as passes cut anywhere (one-row passes, i.e. decode steps, too),
    on 1 and 3 threads: every row of the output and the present KV is bit for bit the same, on each build."""
    nh, nkv, head, n = 9, 3, 64, 71
    model = _graph(nh, nkv, head)
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((1, n, (nh + 2 * nkv) * head)).astype(np.float32)
    bounds = [0, *sorted(cuts), n]
    for march, lib in libraries.items():
        rows = {}
        for threads in (1, 3):
            session = _session(model, lib, threads)
            whole, k, v = session.run(None, _feed(qkv, np.zeros((1, nkv, 0, head), np.float32),
                                                  np.zeros((1, nkv, 0, head), np.float32), 0))
            rows[threads] = whole
            past_k, past_v, parts = np.zeros((1, nkv, 0, head), np.float32), np.zeros((1, nkv, 0, head), np.float32), []
            for start, stop in zip(bounds, bounds[1:]):
                out, past_k, past_v = session.run(None, _feed(qkv[:, start:stop], past_k, past_v, start))
                parts.append(out)
            assert np.array_equal(_bits(np.concatenate(parts, axis=1)), _bits(whole)), (march, threads, bounds)
            assert np.array_equal(_bits(past_k), _bits(k)) and np.array_equal(_bits(past_v), _bits(v))
            steps = [session.run(None, _feed(qkv[:, t:t + 1], k[:, :, :t], v[:, :, :t], t))[0] for t in (0, 35, 70)]
            for t, step in zip((0, 35, 70), steps):
                assert np.array_equal(_bits(step[0, 0]), _bits(whole[0, t])), (march, threads, t)
        assert np.array_equal(_bits(rows[1]), _bits(rows[3])), march


def test_in_place_kv_buffers_compute_what_copies_compute(libraries) -> None:
    """One buffer bound as both past and present (how runtime.model's KVDecoder and KVPasses run): passes and steps
    append in place and compute the same bits as passes that copy the cache; positions past the pass stay as they
    were (zeros)."""
    nh, nkv, head, capacity = 9, 3, 64, 80
    model = _graph(nh, nkv, head)
    session = _session(model, libraries["native"], 2)
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((1, 60, (nh + 2 * nkv) * head)).astype(np.float32)
    copied, k, v = session.run(None, _feed(qkv, np.zeros((1, nkv, 0, head), np.float32),
                                           np.zeros((1, nkv, 0, head), np.float32), 0))
    kbuf, vbuf = np.zeros((1, nkv, capacity, head), np.float32), np.zeros((1, nkv, capacity, head), np.float32)
    binding = session.io_binding()
    kval, vval = ort.OrtValue.ortvalue_from_numpy(kbuf), ort.OrtValue.ortvalue_from_numpy(vbuf)
    binding.bind_ortvalue_input("past_key", kval)
    binding.bind_ortvalue_output("present_key", kval)
    binding.bind_ortvalue_input("past_value", vval)
    binding.bind_ortvalue_output("present_value", vval)
    outs = []
    for start, stop in ((0, 25), (25, 26), (26, 60)):
        feed = _feed(qkv[:, start:stop], kbuf, vbuf, start)
        binding.bind_cpu_input("qkv", feed["qkv"])
        binding.bind_cpu_input("seqlens_k", feed["seqlens_k"])
        binding.bind_cpu_input("total", feed["total"])
        out = np.zeros((1, stop - start, nh * head), np.float32)
        binding.bind_ortvalue_output("out", ort.OrtValue.ortvalue_from_numpy(out))
        session.run_with_iobinding(binding)
        outs.append(out)
    assert np.array_equal(_bits(np.concatenate(outs, axis=1)), _bits(copied))
    assert np.array_equal(_bits(kbuf[:, :, :60]), _bits(k)) and np.array_equal(_bits(vbuf[:, :, :60]), _bits(v))
    assert not kbuf[:, :, 60:].any() and not vbuf[:, :, 60:].any()
    # a pass that would run past the buffer: an error, and the buffer is untouched
    before = kbuf.copy()
    feed = _feed(rng.standard_normal((1, 30, (nh + 2 * nkv) * head)).astype(np.float32), kbuf, vbuf, 60)
    binding.bind_cpu_input("qkv", feed["qkv"])
    binding.bind_cpu_input("seqlens_k", feed["seqlens_k"])
    binding.bind_cpu_input("total", feed["total"])
    binding.bind_output("out")
    with pytest.raises(Exception):
        session.run_with_iobinding(binding)
    assert np.array_equal(kbuf, before)


def _bad_feeds(nh: int, nkv: int, head: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((1, 4, (nh + 2 * nkv) * head)).astype(np.float32)
    past = np.zeros((1, nkv, 10, head), np.float32)
    good = _feed(qkv, past, past, 10)
    bad = {
        "seqlens_k past the rotary cache": {**good, "seqlens_k": np.array([500], np.int32),
                                            "total": np.array([501], np.int32)},
        "seqlens_k beyond the past buffer": {**good, "seqlens_k": np.array([60], np.int32)},
        "negative seqlens_k": {**good, "seqlens_k": np.array([-7], np.int32)},
        "most negative seqlens_k": {**good, "seqlens_k": np.array([-2 ** 31], np.int32)},
        "largest seqlens_k": {**good, "seqlens_k": np.array([2 ** 31 - 1], np.int32)},
        "total below the sequence": {**good, "total": np.array([2], np.int32)},
        "total past the rotary cache": {**good, "total": np.array([97], np.int32)},
        "negative total": {**good, "total": np.array([-5], np.int32)},
        "qkv of the wrong width": {**good, "qkv": qkv[:, :, :-16]},
        "past key and value of different lengths": {**good, "past_value": np.zeros((1, nkv, 9, head), np.float32)},
        "past of the wrong kv heads": {**good, "past_key": np.zeros((1, nkv + 1, 10, head), np.float32),
                                       "past_value": np.zeros((1, nkv + 1, 10, head), np.float32)},
        "seqlens_k of the wrong batch": {**good, "seqlens_k": np.array([13, 13], np.int32)},
        "two totals": {**good, "total": np.array([14, 14], np.int32)},
    }
    return {"good": good, **bad}


def test_bad_inputs_are_errors_never_crashes(libraries) -> None:
    """Lengths that do not fit the buffers, negative or huge lengths, wrong shapes: the run fails with an onnxruntime
    error (a message naming GQAttention or the shape), the process lives on, and good input still runs."""
    nh, nkv, head = 4, 2, 32
    model = _graph(nh, nkv, head)
    for march, lib in libraries.items():
        session = _session(model, lib, 2)
        feeds = _bad_feeds(nh, nkv, head)
        good = session.run(None, feeds.pop("good"))[0]
        for what, feed in feeds.items():
            with pytest.raises(Exception) as err:
                session.run(None, feed)
            assert "GQAttention" in str(err.value), (march, what, str(err.value))
        assert np.array_equal(session.run(None, _bad_feeds(nh, nkv, head)["good"])[0], good)


def test_a_non_finite_input_gives_not_a_number_rows(libraries) -> None:
    """A NaN or infinity in a key reaches every later row as NaN (never a plausible number); earlier rows are as
    before."""
    nh, nkv, head = 4, 2, 32
    model = _graph(nh, nkv, head)
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((1, 12, (nh + 2 * nkv) * head)).astype(np.float32)
    empty = np.zeros((1, nkv, 0, head), np.float32)
    for lib in libraries.values():
        session = _session(model, lib, 2)
        clean = session.run(None, _feed(qkv, empty, empty, 0))[0]
        for bad in (np.nan, np.inf):
            poisoned = qkv.copy()
            poisoned[0, 5, nh * head + 3] = bad  # a key of position 5, kv head 0
            out = session.run(None, _feed(poisoned, empty, empty, 0))[0].reshape(12, nh, head)
            assert np.array_equal(out[:5], clean.reshape(12, nh, head)[:5])
            assert np.isnan(out[5:, :nh // nkv]).all()


@pytest.mark.parametrize("change", [
    {"rotary_interleaved": 1}, {"do_rotary": 0}, {"softcap": 30.0}, {"local_window_size": 8}, {"smooth_softmax": 1},
    {"some_future_attribute": 1},
    {"cos": np.ones((96, 8), np.float32), "sin": np.zeros((96, 8), np.float32)},  # rotary over half the head only
    {"head_unknown": True},
])
def test_rewrite_leaves_unsupported_attention_alone(change: dict) -> None:
    model = _graph(4, 2, 32, **{k: v for k, v in change.items() if k != "head_unknown"})
    if "head_unknown" in change:  # a past key whose shape does not state the head size
        model.graph.input[1].type.tensor_type.shape.dim[3].dim_param = "head"
    assert kernels.kernel_attention(model, 2) == 0
    assert model.graph.node[0].op_type == "GroupQueryAttention"


def test_rewrite_turned_off_by_environment(monkeypatch) -> None:
    model = _graph(4, 2, 32)
    monkeypatch.setenv("P2PINFER_KERNEL_ATTENTION", "0")
    assert kernels.kernel_attention(model, 2) == 0
    monkeypatch.setenv("P2PINFER_KERNEL_ATTENTION", "1")
    assert kernels.kernel_attention(model, 2) == 1
    assert model.graph.node[0].op_type == "GQAttention" and model.graph.node[0].domain == kernels.DOMAIN


def test_a_4bit_model_runs_the_kernels_attention_within_float32_rounding(tmp_path: Path, monkeypatch) -> None:
    """A GGUF-imported 4-bit model: its kernel session runs GQAttention in every layer (the model file keeps
    GroupQueryAttention), and its rows, prefill and decode, are within float32 rounding of the same kernel session
    with onnxruntime's attention (``P2PINFER_KERNEL_ATTENTION=0``), the same tokens chosen."""
    from gguf import GGMLQuantizationType as QT

    from gguf_fixtures import TinyLlama, write_tiny_llama
    from p2pinfer.gguf import import_gguf
    from p2pinfer.runtime import load_model

    cfg = TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=2)
    write_tiny_llama(tmp_path / "m.gguf", cfg)
    import_gguf(tmp_path / "m.gguf", tmp_path / "m")
    stored = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "GroupQueryAttention" for n in stored.graph.node) == cfg.n_layers
    rewritten = onnx.ModelProto.FromString(stored.SerializeToString())
    kernels.kernel_model(rewritten, tmp_path / "m", 2)
    assert sum(n.op_type == "GQAttention" for n in rewritten.graph.node) == cfg.n_layers
    assert not any(n.op_type == "GroupQueryAttention" for n in rewritten.graph.node)
    ours = load_model(tmp_path / "m", threads=2, providers=["CPUExecutionProvider"])
    monkeypatch.setenv("P2PINFER_KERNEL_ATTENTION", "0")
    theirs = ours.with_session(threads=2, providers=["CPUExecutionProvider"])
    assert ours.runs_kernel and theirs.runs_kernel
    ids = [5, 77, 200, 3, 260, 261, 99, 12, 140, 33, 7, 18, 250, 41]
    a, cache_a = ours.forward(ids, ours.empty_cache())
    b, cache_b = theirs.forward(ids, theirs.empty_cache())
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-5)
    assert np.array_equal(a.argmax(-1), b.argmax(-1))
    dec_a, dec_b = ours.decoder(cache_a, capacity=len(ids) + 6), theirs.decoder(cache_b, capacity=len(ids) + 6)
    for token in (9, 30, 2, 71, 64, 128):
        x, y = dec_a.step(token), dec_b.step(token)
        np.testing.assert_allclose(x, y, atol=5e-5, rtol=1e-5)
        assert int(x.argmax()) == int(y.argmax())


def test_a_batch_of_two_matches_onnxruntime(libraries) -> None:
    """The runtime feeds one sequence at a time, but the node takes a batch: two sequences of the same length, as a
    first pass and then as a decode step, give onnxruntime's rows (float32 rounding) and each sequence's rows alone."""
    nh, nkv, head = 4, 2, 32
    model = _graph(nh, nkv, head)
    theirs, ours = _session(model), _session(model, libraries["native"], 2)
    rng = np.random.default_rng(11)
    qkv = rng.standard_normal((2, 9, (nh + 2 * nkv) * head)).astype(np.float32)
    empty = np.zeros((2, nkv, 0, head), np.float32)
    a, k, v = ours.run(None, _feed(qkv, empty, empty, 0))
    b = theirs.run(None, _feed(qkv, empty, empty, 0))[0]
    assert np.abs(a - b).max() < 2e-5 * np.abs(qkv).max()
    for i in range(2):
        alone = ours.run(None, _feed(qkv[i:i + 1], empty[:1], empty[:1], 0))[0]
        assert np.array_equal(alone[0], a[i])
    step = rng.standard_normal((2, 1, (nh + 2 * nkv) * head)).astype(np.float32)
    a = ours.run(None, _feed(step, k, v, 9))[0]
    b = theirs.run(None, _feed(step, k, v, 9))[0]
    assert np.abs(a - b).max() < 2e-5 * np.abs(qkv).max()


REFERENCE_SOURCE = Path(__file__).with_name("qattn_reference.c")


@pytest.fixture(scope="module")
def reference_libraries(tmp_path_factory) -> dict[str, Path]:
    """The kernel library built with tests/qattn_reference.c (qattn.c before its speed-up, verbatim) in place of
    qattn.c, and everything else as it is now, for the same -march targets as ``libraries``."""
    folder = tmp_path_factory.mktemp("qattn-reference")
    for source in kernels._SOURCES:
        shutil.copyfile(source, folder / source.name)
    shutil.copyfile(REFERENCE_SOURCE, folder / kernels.ATTENTION_SOURCE.name)
    cc = kernels._compiler()
    assert cc is not None, "the C compiler should build the reference library"
    libs = {}
    for march in ("native", "x86-64-v3", "x86-64-v2"):
        lib = kernels._build(cc, march, sources=tuple(folder / s.name for s in kernels._SOURCES),
                             stem="qattn-reference")
        assert lib is not None, f"the reference library should build for {march}"
        libs[march] = lib
    return libs


def _inputs(rng: np.random.Generator, batch: int, s: int, past: int, nh: int, nkv: int, head: int, spread: float,
            poison: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """qkv and past KV; ``spread`` scales the queries (8: scores in the hundreds, most weights e^-87.3 clamped);
    ``poison``: a NaN and an infinity among the past keys and the pass's keys, and a query that overflows (scores
    of +-inf), so that some rows are NaN rows."""
    qkv = rng.standard_normal((batch, s, (nh + 2 * nkv) * head)).astype(np.float32)
    qkv[..., :nh * head] *= spread
    past_k = rng.standard_normal((batch, nkv, past, head)).astype(np.float32)
    past_v = rng.standard_normal((batch, nkv, past, head)).astype(np.float32)
    if poison:
        if past > 3:
            past_k[0, 0, past // 2, 3] = np.nan
            past_k[-1, nkv - 1, past - 2, 0] = np.inf
        qkv[0, s // 2, nh * head + 5] = -np.inf  # a key of the pass, kv head 0
        qkv[-1, s - 1, :head] = 3e38  # a query whose scores overflow
    return qkv, past_k, past_v


def _assert_same_outputs(got: list[np.ndarray], expected: list[np.ndarray], what) -> None:
    for name, a, b in zip(("out", "present_key", "present_value"), got, expected):
        assert a.shape == b.shape and np.array_equal(_bits(a), _bits(b)), (name, *what)


@pytest.mark.parametrize("nh,nkv,head", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("scale", [1.0, 0.0])
def test_outputs_are_the_bits_of_the_attention_before_its_speed_up(libraries, reference_libraries, nh: int, nkv: int,
                                                                   head: int, scale: float) -> None:
    """The numeric contract kept bit for bit: passes of 1, 4, 127, 128 and 129 rows after 0, 24, 300 and 431 past
    positions (rows and keys not multiples of the work unit or of 16), wide and peaky scores, NaN and infinite
    inputs, a batch of two sequences at different positions, on 1 and 2 threads and every build: outputs and
    present KV are the bits of the code before the speed-up (tests/qattn_reference.c)."""
    model = _graph(nh, nkv, head, positions=600, scale=scale)
    for march in libraries:
        for threads in (1, 2):
            ours = _session(model, libraries[march], threads)
            before = _session(model, reference_libraries[march], threads)
            rng = np.random.default_rng(head * 7 + threads)
            for k, (s, past) in enumerate((s, past) for s in (1, 4, 127, 128, 129) for past in (0, 24, 300, 431)):
                spread, poison = (1.0, 8.0)[k % 2], k % 5 == 3
                feed = _feed(*_inputs(rng, 1, s, past, nh, nkv, head, spread, poison), past)
                _assert_same_outputs(ours.run(None, feed), before.run(None, feed), (march, threads, s, past))
            # a batch of two: the second sequence 407 positions behind the first, its past buffer longer than it uses
            qkv, past_k, past_v = _inputs(rng, 2, 129, 431, nh, nkv, head, 2.0, False)
            feed = {**_feed(qkv, past_k, past_v, 431), "seqlens_k": np.array([559, 152], np.int32)}
            _assert_same_outputs(ours.run(None, feed), before.run(None, feed), (march, threads, "batch"))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.sampled_from(SHAPES), s=st.integers(1, 140), past=st.integers(0, 450), threads=st.integers(1, 3),
       spread=st.sampled_from([0.5, 1.0, 4.0, 16.0]), poison=st.booleans(), seed=st.integers(0, 2 ** 32 - 1))
def test_any_pass_is_the_bits_of_the_attention_before_its_speed_up(libraries, reference_libraries, shape, s: int,
                                                                   past: int, threads: int, spread: float,
                                                                   poison: bool, seed: int) -> None:
    """Any pass length, past, head shape, thread count and score spread: the native build's outputs and present KV
    are the bits of the code before the speed-up."""
    nh, nkv, head = shape
    model = _graph(nh, nkv, head, positions=600)
    feed = _feed(*_inputs(np.random.default_rng(seed), 1, s, past, nh, nkv, head, spread, poison), past)
    ours = _session(model, libraries["native"], threads)
    before = _session(model, reference_libraries["native"], threads)
    _assert_same_outputs(ours.run(None, feed), before.run(None, feed), (shape, s, past, threads))
