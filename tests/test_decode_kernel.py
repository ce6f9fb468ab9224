"""The 4-bit kernel (p2pinfer/kernels): the custom op (decode rows on the integer and the float32 path, and the
many-row GEMM) against a float64 product and against MatMulNBits, row determinism, the kernel session against the
standard graph, the integer path's rows bit for bit the same on AVX-512 VNNI, AVX-VNNI and AVX2 builds, and the
fallbacks: a library built for a CPU without AVX2, no compiler, turned off, the float path forced."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType as QT
from onnx import TensorProto, helper, numpy_helper

from p2pinfer import kernels
from p2pinfer.kernels import DecodePath
from p2pinfer.gguf import import_gguf
from p2pinfer.gguf.blockquant import from_gguf
from p2pinfer.runtime import load_model

from gguf_fixtures import TinyLlama, write_tiny_llama
from kernel_builds import library_for

BLOCK_BYTES = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q8_0: 34}


@pytest.fixture(autouse=True)
def _kernel_enabled(monkeypatch) -> None:
    """The kernel is on by default; a developer's P2PINFER_DECODE_KERNEL=0 must not turn these tests off."""
    monkeypatch.delenv("P2PINFER_DECODE_KERNEL", raising=False)


def _random_gguf_rows(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF blocks with sane float16 scales (and minimums) and random codes."""
    nb = cols // 32
    raw = rng.integers(0, 256, (rows, nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
    raw[..., 0:2] = np.float16(rng.uniform(0.001, 0.05, (rows, nb))).view(np.uint8).reshape(rows, nb, 2)
    if qtype == QT.Q4_1:
        raw[..., 2:4] = np.float16(rng.uniform(-0.3, 0.0, (rows, nb))).view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, -1)


def _standard_graph(qtype: QT, raw: np.ndarray, cols: int, folder: Path, factor: float = 1.0) -> Path:
    """One linear layer written as the importer writes it (MatMulNBits terms, Q4_1 block sums x minimums), its
    scales and minimums multiplied by ``factor``."""
    bq = from_gguf(raw, qtype, cols).scaled(np.float32(factor))
    n, nb = bq.rows, cols // 32
    inits, nodes, terms = [], [], []
    for j, t in enumerate(bq.terms):
        ins = ["x", f"w.t{j}.qweight", f"w.t{j}.scales"]
        inits += [numpy_helper.from_array(t.packed, ins[1]), numpy_helper.from_array(t.scales.reshape(-1), ins[2])]
        if t.packed_zero_points is not None:
            inits.append(numpy_helper.from_array(t.packed_zero_points, f"w.t{j}.zero_points"))
            ins.append(f"w.t{j}.zero_points")
        nodes.append(helper.make_node("MatMulNBits", ins, [f"y/t{j}"], domain="com.microsoft", K=cols, N=n, bits=4,
                                      block_size=32, accuracy_level=0))
        terms.append(f"y/t{j}")
    if bq.mins is not None:
        inits += [numpy_helper.from_array(np.ascontiguousarray(bq.mins.T), "w.mins"),
                  numpy_helper.from_array(np.array([0, 0, nb, 32], np.int64), "shape"),
                  numpy_helper.from_array(np.array([-1], np.int64), "last")]
        nodes += [helper.make_node("Reshape", ["x", "shape"], ["y/x_blocks"]),
                  helper.make_node("ReduceSum", ["y/x_blocks", "last"], ["y/x_block_sums"], keepdims=0),
                  helper.make_node("MatMul", ["y/x_block_sums", "w.mins"], ["y/mins"])]
        terms.append("y/mins")
    nodes.append(helper.make_node("Sum", terms, ["y"]) if len(terms) > 1 else
                 helper.make_node("Identity", terms, ["y"]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)
    return folder / "model.onnx"


def _kernel_session(path: Path, threads: int,
                    decode: DecodePath = DecodePath.INTEGER) -> tuple[ort.InferenceSession, int]:
    model = onnx.load(str(path), load_external_data=False)
    rewritten = kernels.kernel_model(model, path.parent, threads, decode)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.register_custom_ops_library(str(kernels.library_path()))
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), rewritten


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0], ids=lambda q: q.name)
def test_kernel_matches_the_weights_and_is_row_deterministic(tmp_path: Path, qtype: QT) -> None:
    """Per output, both paths of the kernel (one decode row; the GEMM over >= 4 rows) are as close to the exact
    product as MatMulNBits is (float32 rounding); within each path every row is bit-identical whatever the
    number of rows in the call, where the row falls in the GEMM's row blocks, and the thread count."""
    assert kernels.library_path() is not None, "the C compiler should be present (CI installs gcc)"
    rng = np.random.default_rng(int(qtype))
    rows, cols = 70, 96  # 70 output columns: not a multiple of the 4-row groups, the 32-column panels, the split
    raw = _random_gguf_rows(qtype, rows, cols, rng)
    path = _standard_graph(qtype, raw, cols, tmp_path / qtype.name)
    standard = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    one, rewritten = _kernel_session(path, threads=1)
    three, _ = _kernel_session(path, threads=3)
    assert rewritten == 1
    x = rng.standard_normal((1, 13, cols)).astype(np.float32)  # 13 rows: two 6-row blocks and a remainder
    exact = x[0].astype(np.float64) @ from_gguf(raw, qtype, cols).dequantize().astype(np.float64).T
    many = one.run(None, {"x": x})[0][0]
    theirs = standard.run(None, {"x": x})[0][0]
    single = np.stack([one.run(None, {"x": x[:, r:r + 1]})[0][0, 0] for r in range(13)])
    scale = np.abs(exact).max()
    assert np.abs(theirs - exact).max() < 1e-5 * scale  # the reference itself is right
    assert np.abs(many - exact).max() < 1e-5 * scale
    assert np.abs(single - exact).max() < 1e-5 * scale
    assert np.array_equal(three.run(None, {"x": x})[0][0], many)
    for r in range(13):
        assert np.array_equal(three.run(None, {"x": x[:, r:r + 1]})[0][0, 0], single[r]), r
    for start, stop in ((0, 4), (5, 9), (3, 13), (7, 12)):  # other row counts, rows at other block offsets
        assert np.array_equal(three.run(None, {"x": x[:, start:stop]})[0][0], many[start:stop]), (start, stop)


def _exact(raw: np.ndarray, qtype: QT, cols: int, x: np.ndarray, factor: float = 1.0) -> np.ndarray:
    weights = from_gguf(raw, qtype, cols).scaled(np.float32(factor)).dequantize().astype(np.float64)
    return x.astype(np.float64) @ weights.T


def _integer_path_built() -> bool:
    return kernels.library_has_integer_path(kernels.library_path())


@pytest.mark.parametrize("cols", [96, 128], ids=["odd-blocks", "even-blocks"])
@pytest.mark.parametrize("factor", [1.0, 1.0001], ids=["float16-scales", "float32-scales"])
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0], ids=lambda q: q.name)
def test_integer_decode_rows_match_the_weights_and_are_row_deterministic(tmp_path: Path, qtype: QT, factor: float,
                                                                       cols: int) -> None:
    """Decode rows (1 to 3 activation rows a call) on the integer path: as close to the exact product as the float32
    path, the same bits whatever the thread count and the other rows of the call. Scales that are not float16
    values (factor 1.0001) must be read as float32, not rounded (a perturbed model stays perturbed)."""
    rng = np.random.default_rng(int(qtype) + cols)
    rows = 70
    raw = _random_gguf_rows(qtype, rows, cols, rng)
    path = _standard_graph(qtype, raw, cols, tmp_path / "m", factor)
    integer, _ = _kernel_session(path, threads=1)
    integer3, _ = _kernel_session(path, threads=3)
    floats, _ = _kernel_session(path, threads=1, decode=DecodePath.FLOAT)
    x = rng.standard_normal((1, 3, cols)).astype(np.float32)
    x[0, 1, :32] *= 1e-3  # blocks of very different sizes: each is scaled to integers on its own
    x[0, 1, 5] = 40.0
    x[0, 2, 32:64] = 0.0
    exact = _exact(raw, qtype, cols, x[0], factor)
    scale = np.abs(exact).max()
    ours = np.stack([integer.run(None, {"x": x[:, r:r + 1]})[0][0, 0] for r in range(3)])
    theirs = np.stack([floats.run(None, {"x": x[:, r:r + 1]})[0][0, 0] for r in range(3)])
    assert np.abs(theirs - exact).max() < 1e-5 * scale
    assert np.abs(ours - exact).max() < 1e-5 * scale
    for start, stop in ((0, 2), (0, 3), (1, 3)):  # 2 and 3 rows a call still take the one-row path
        assert np.array_equal(integer3.run(None, {"x": x[:, start:stop]})[0][0], ours[start:stop]), (start, stop)
    if _integer_path_built():  # the integer path ran: its sums are not the float path's, bit for bit
        assert not np.array_equal(ours, theirs)


def test_integer_decode_error_is_within_its_stated_bound(tmp_path: Path) -> None:
    """The only rounding beyond float32's: x to a multiple of 2^-e per block, at most 2^-22 of the block's
    largest |x| per element. Measured against the float64 product over wide dynamic ranges."""
    rng = np.random.default_rng(11)
    cols, rows = 256, 64
    raw = _random_gguf_rows(QT.Q4_1, rows, cols, rng)
    path = _standard_graph(QT.Q4_1, raw, cols, tmp_path / "m")
    integer, _ = _kernel_session(path, threads=2)
    weights = from_gguf(raw, QT.Q4_1, cols).dequantize().astype(np.float64)
    for trial in range(20):
        x = (rng.standard_normal(cols) * np.exp(rng.uniform(-12, 12, cols))).astype(np.float32)
        blocks = np.abs(x.astype(np.float64)).reshape(-1, 32).max(axis=1)
        step = np.repeat(blocks * 2.0 ** -22, 32)  # per element, the bound on its rounding
        bound = np.abs(weights) @ step + 1e-6 * np.abs(weights) @ np.abs(x)  # + float32 rounding of the sums
        got = integer.run(None, {"x": x[None, None]})[0][0, 0]
        assert np.all(np.abs(got - weights @ x.astype(np.float64)) <= bound), trial


def test_integer_decode_of_a_non_finite_activation_is_not_a_number(tmp_path: Path) -> None:
    """An inf or NaN in the activation gives NaN outputs, never a plausible number."""
    rng = np.random.default_rng(5)
    raw = _random_gguf_rows(QT.Q4_1, 16, 64, rng)
    integer, _ = _kernel_session(_standard_graph(QT.Q4_1, raw, 64, tmp_path / "m"), threads=1)
    for bad in (np.inf, np.nan):
        x = rng.standard_normal((1, 1, 64)).astype(np.float32)
        x[0, 0, 40] = bad
        assert not np.isfinite(integer.run(None, {"x": x})[0]).any()


def test_a_library_built_without_avx2_decodes_on_the_float_path(tmp_path: Path, monkeypatch) -> None:
    """A CPU without AVX2 (here: the library built for x86-64-v2, SSE4.2) still serves: the integer path asked
    for, the float32 one-row path runs, within float32 rounding of the standard graph."""
    monkeypatch.setenv("P2PINFER_KERNEL_MARCH", "x86-64-v2")
    monkeypatch.setenv("P2PINFER_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_built", {})
    lib = kernels.library_path()
    assert lib is not None and not kernels.library_has_integer_path(lib) and kernels.library_isa(lib) == "portable"
    rng = np.random.default_rng(9)
    raw = _random_gguf_rows(QT.Q4_1, 40, 96, rng)
    path = _standard_graph(QT.Q4_1, raw, 96, tmp_path / "m")
    session, decode = kernels.kernel_session(path, threads=2, decode=DecodePath.INTEGER,
                                             graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert decode is DecodePath.FLOAT
    x = rng.standard_normal((1, 1, 96)).astype(np.float32)
    exact = _exact(raw, QT.Q4_1, 96, x[0])
    assert np.abs(session.run(None, {"x": x})[0][0] - exact).max() < 1e-5 * np.abs(exact).max()
    cfg = TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=2)
    write_tiny_llama(tmp_path / "t.gguf", cfg)
    import_gguf(tmp_path / "t.gguf", tmp_path / "t")
    model = load_model(tmp_path / "t", threads=2, providers=["CPUExecutionProvider"])
    assert model.decode_path is DecodePath.FLOAT
    standard = model.with_session(threads=2, providers=["CPUExecutionProvider"], kernel=False)
    ids = [5, 77, 200, 3, 260, 261]
    _, cache = standard.forward(ids[:4], standard.empty_cache(), last=1)
    _, mine = model.forward(ids[:4], model.empty_cache(), last=1)
    decoder = model.decoder(mine, capacity=len(ids))
    for token in ids[4:]:
        expected, cache = standard.forward([token], cache)
        np.testing.assert_allclose(decoder.step(token), expected[-1], atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("decode", [DecodePath.INTEGER, DecodePath.FLOAT], ids=lambda d: d.value)
@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q4_0, QT.Q8_0], ids=lambda q: q.name)
def test_decoder_runs_the_kernel_within_float32_rounding_of_forward(tmp_path: Path, qtype: QT,
                                                                    decode: DecodePath) -> None:
    cfg = TinyLlama(matrix_type=qtype, n_kv_heads=2)
    write_tiny_llama(tmp_path / "m.gguf", cfg)
    import_gguf(tmp_path / "m.gguf", tmp_path / "m")
    model = load_model(tmp_path / "m", threads=2, providers=["CPUExecutionProvider"], decode=decode)
    assert model.decode_path is (decode if _integer_path_built() else DecodePath.FLOAT)
    standard = model.with_session(threads=2, providers=["CPUExecutionProvider"], kernel=False)
    assert model.runs_kernel and not standard.runs_kernel
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops  # the model file is the standard graph: the rewrite is in memory only
    ids = [5, 77, 200, 3, 260, 261, 99, 12, 140, 33, 7]
    # prefill and verification rows (the GEMM path) against the standard graph
    ours, _ = model.forward(ids, model.empty_cache())
    theirs, _ = standard.forward(ids, standard.empty_cache())
    np.testing.assert_allclose(ours, theirs, atol=5e-5, rtol=1e-5)
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))
    # decode rows through the in-place KV decoder, against the standard graph's forward()
    _, cache = standard.forward(ids[:4], standard.empty_cache(), last=1)
    _, mine = model.forward(ids[:4], model.empty_cache(), last=1)
    decoder = model.decoder(mine, capacity=len(ids))
    for token in ids[4:]:
        expected, cache = standard.forward([token], cache)
        got = decoder.step(token)
        np.testing.assert_allclose(got, expected[-1], atol=5e-5, rtol=1e-5)
        assert int(got.argmax()) == int(expected[-1].argmax())


def test_without_a_compiler_decoding_uses_the_standard_graph(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("P2PINFER_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr(kernels, "_reported", set())
    cfg = TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=2)
    write_tiny_llama(tmp_path / "m.gguf", cfg)
    import_gguf(tmp_path / "m.gguf", tmp_path / "m")
    model = load_model(tmp_path / "m", threads=1, providers=["CPUExecutionProvider"])
    assert kernels.library_path() is None
    assert not model.runs_kernel
    ids = [5, 77, 200, 3, 260]
    _, cache = model.forward(ids[:4], model.empty_cache(), last=1)
    expected, _ = model.forward(ids[4:], cache)
    assert np.array_equal(model.decoder(cache, capacity=8).step(ids[4]), expected[-1])  # bit for bit, as before


def test_float_decode_chosen_by_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("P2PINFER_DECODE_KERNEL", "float")
    cfg = TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=2)
    write_tiny_llama(tmp_path / "m.gguf", cfg)
    import_gguf(tmp_path / "m.gguf", tmp_path / "m")
    model = load_model(tmp_path / "m", threads=1, providers=["CPUExecutionProvider"])
    assert model.runs_kernel and model.decode_path is DecodePath.FLOAT


def test_disabled_by_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("P2PINFER_DECODE_KERNEL", "0")
    assert kernels.library_path() is None
    cfg = TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=2)
    write_tiny_llama(tmp_path / "m.gguf", cfg)
    import_gguf(tmp_path / "m.gguf", tmp_path / "m")
    assert not load_model(tmp_path / "m", threads=1, providers=["CPUExecutionProvider"]).runs_kernel


def test_rewrite_leaves_unsupported_groups_alone(tmp_path: Path) -> None:
    """A term with per-block zero points that differ is not the kernel's (one zero point per term)."""
    rng = np.random.default_rng(3)
    path = _standard_graph(QT.Q4_0, _random_gguf_rows(QT.Q4_0, 8, 64, rng), 64, tmp_path / "m")
    model = onnx.load(str(path), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    zp = numpy_helper.from_array(np.array([0x18] * 8, np.uint8), "w.zp")  # blocks alternate 8 and 1
    model.graph.initializer.append(zp)
    node.input.append("w.zp")
    assert kernels.kernel_model(model, path.parent, 1) == 0


# ---- the integer path on every instruction set: AVX-512 VNNI, AVX-VNNI (256-bit) and AVX2 give the same bits ----

def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _integer_libraries(monkeypatch) -> dict[str, Path]:
    """Every build of the kernel this CPU can run that has the integer decode path, by -march: this CPU's own
    (AVX-512 VNNI here), x86-64-v3 (AVX2 + FMA + F16C: vpmaddubsw), alderlake (AVX-VNNI: 256-bit vpdpbusd, no
    AVX-512), skylake-avx512 (AVX-512 without VNNI: the AVX2 integer path beside AVX-512 float code). At least
    two: the AVX2 build runs on every CPU these tests run on (x86-64-v3 or newer)."""
    flags = _cpu_flags()
    assert {"avx2", "fma", "f16c"} <= flags, "these tests need an x86-64-v3 CPU (AVX2, FMA, F16C)"
    marches = ["native", "x86-64-v3"] + (["alderlake"] if "avx_vnni" in flags else []) \
        + (["skylake-avx512"] if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags else [])
    libs = {march: library_for(monkeypatch, march) for march in marches}
    assert all(kernels.library_has_integer_path(lib) for lib in libs.values()), libs
    isas = {march: kernels.library_isa(lib) for march, lib in libs.items()}
    assert isas["x86-64-v3"] == isas.get("skylake-avx512", "avx2") == "avx2", isas
    assert isas.get("alderlake", "avx-vnni") == "avx-vnni", isas
    return libs


def _session_with(path: Path, lib: Path, threads: int, decode: DecodePath = DecodePath.INTEGER) -> ort.InferenceSession:
    model = onnx.load(str(path), load_external_data=False)
    kernels.kernel_model(model, path.parent, threads, decode)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.register_custom_ops_library(str(lib))
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0], ids=lambda q: q.name)
def test_integer_decode_rows_are_bit_identical_on_every_instruction_set(tmp_path: Path, monkeypatch,
                                                                          qtype: QT) -> None:
    """The AVX2 (vpmaddubsw) and AVX-VNNI builds compute the AVX-512 VNNI path's rows bit for bit: layers with
    odd and even block counts, float16 and float32 scales, 1 and 3 threads, over activations of any finite
    float32 values (hypothesis: wide exponent ranges, zeros, subnormals, blocks of very different sizes)."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    from hypothesis.extra.numpy import arrays

    libs = _integer_libraries(monkeypatch)
    rng = np.random.default_rng(int(qtype))
    layers = []
    for cols, factor in ((96, 1.0), (128, 1.0001), (64, 1.0)):
        raw = _random_gguf_rows(qtype, 37, cols, rng)  # 37 rows: a partial group of 4 at the end
        path = _standard_graph(qtype, raw, cols, tmp_path / f"{cols}-{factor}", factor)
        layers.append((cols, {(march, threads): _session_with(path, lib, threads)
                              for march, lib in libs.items() for threads in (1, 3)},
                       _session_with(path, libs["native"], 1, DecodePath.FLOAT)))
    finite = st.floats(width=32, allow_nan=False, allow_infinity=False)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(layer=st.sampled_from(range(len(layers))), data=st.data())
    def check(layer: int, data) -> None:
        cols, sessions, floats = layers[layer]
        x = data.draw(arrays(np.float32, (1, 1, cols), elements=finite | st.sampled_from([0.0, -0.0, 1e-40, 3e38])))
        scale = data.draw(st.sampled_from([None, 1e-30, 1e-8, 1.0, 1e12]))
        if scale is not None:  # magnitudes of ordinary activations too, not only hypothesis' extremes
            x = (rng.standard_normal(x.shape) * scale).astype(np.float32)
        rows = {key: s.run(None, {"x": x})[0] for key, s in sessions.items()}
        first = rows[("native", 1)]
        for key, row in rows.items():
            assert np.array_equal(_bits(row), _bits(first)), key
        if scale is not None and np.isfinite(first).all():  # the integer path ran on every build: not the float one
            assert not np.array_equal(first, floats.run(None, {"x": x})[0]) or not first.any()

    check()


def test_integer_decode_of_a_non_finite_value_is_not_a_number_on_every_build(tmp_path: Path, monkeypatch) -> None:
    """An inf or NaN anywhere in a block gives NaN outputs on every build, whatever the zero point and with or
    without block minimums (a NaN that maxps drops once gave Q4_0 and Q8_0 finite rows on AVX-512 VNNI)."""
    libs = _integer_libraries(monkeypatch)
    rng = np.random.default_rng(6)
    for qtype in (QT.Q4_0, QT.Q4_1, QT.Q8_0):
        raw = _random_gguf_rows(qtype, 16, 64, rng)
        path = _standard_graph(qtype, raw, 64, tmp_path / qtype.name)
        for march in libs:
            session = _session_with(path, libs[march], 1)
            for bad in (np.inf, -np.inf, np.nan):
                for where in (0, 9, 17, 40, 63):
                    x = rng.standard_normal((1, 1, 64)).astype(np.float32)
                    x[0, 0, where] = bad
                    assert np.isnan(session.run(None, {"x": x})[0]).all(), (qtype.name, march, bad, where)


def test_avx2_build_forced_to_the_float_path(tmp_path: Path, monkeypatch) -> None:
    """P2PINFER_DECODE_KERNEL=float still forces the float32 one-row path on a build with the AVX2 integer path:
    the model reports it, and its rows are the float path's, not the integer path's."""
    libs = _integer_libraries(monkeypatch)
    monkeypatch.setenv("P2PINFER_KERNEL_MARCH", "x86-64-v3")
    monkeypatch.setenv("P2PINFER_DECODE_KERNEL", "float")
    cfg = TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=2)
    write_tiny_llama(tmp_path / "t.gguf", cfg)
    import_gguf(tmp_path / "t.gguf", tmp_path / "t")
    model = load_model(tmp_path / "t", threads=2, providers=["CPUExecutionProvider"])
    assert model.runs_kernel and model.decode_path is DecodePath.FLOAT
    monkeypatch.delenv("P2PINFER_DECODE_KERNEL")
    integer = model.with_session(threads=2, providers=["CPUExecutionProvider"])
    assert integer.decode_path is DecodePath.INTEGER
    rng = np.random.default_rng(2)
    raw = _random_gguf_rows(QT.Q4_1, 40, 96, rng)
    path = _standard_graph(QT.Q4_1, raw, 96, tmp_path / "m")
    x = rng.standard_normal((1, 1, 96)).astype(np.float32)
    forced = kernels.kernel_session(path, threads=2, decode=DecodePath.FLOAT,
                                    graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert forced is not None and forced[1] is DecodePath.FLOAT
    float_rows = forced[0].run(None, {"x": x})[0]
    exact = _exact(raw, QT.Q4_1, 96, x[0])
    assert np.abs(float_rows[0] - exact).max() < 1e-5 * np.abs(exact).max()
    assert not np.array_equal(float_rows, _session_with(path, libs["x86-64-v3"], 2).run(None, {"x": x})[0])


@pytest.mark.parametrize("source", ["tiny-llama-q4_0", "smollm2"])
def test_decode_steps_of_a_model_are_bit_identical_on_every_instruction_set(tmp_path: Path, monkeypatch, source: str,
                                                                            request) -> None:
    """Whole models (a tiny Llama with Q4_0 weights; the default model, SmolLM2-135M Q4_1): sessions built on the
    AVX-512 VNNI, AVX-VNNI and AVX2 libraries, continuing the same KV cache, give the same logits bit for bit at
    every decode step (2 threads; the AVX2 build on 1 thread too): an AVX2 peer is not a new numeric variant."""
    libs = _integer_libraries(monkeypatch)
    if source == "smollm2":
        folder = import_gguf(request.getfixturevalue("smollm2_gguf"), tmp_path / "m", weights="native").out_dir
    else:
        write_tiny_llama(tmp_path / "m.gguf", TinyLlama(matrix_type=QT.Q4_0, n_kv_heads=2))
        folder = import_gguf(tmp_path / "m.gguf", tmp_path / "m").out_dir
    models = {}
    for march in libs:
        monkeypatch.setenv("P2PINFER_KERNEL_MARCH", march)
        for threads in (1, 2) if march == "x86-64-v3" else (2,):  # a session of SmolLM2 each: a few seconds
            models[(march, threads)] = load_model(folder, threads=threads, providers=["CPUExecutionProvider"])
            assert models[(march, threads)].decode_path is DecodePath.INTEGER
    monkeypatch.delenv("P2PINFER_KERNEL_MARCH")
    base = models[("native", 2)]
    prompt, tokens = [1, 5, 77, 200, 3, 260, 12], [261, 99, 140, 33, 7]
    _, cache = base.forward(prompt, base.empty_cache(), last=1)
    steps = {}
    for key, model in models.items():
        decoder = model.decoder(type(cache)([a.copy() for a in cache.arrays], cache.length),
                                capacity=len(prompt) + len(tokens))
        steps[key] = np.stack([decoder.step(t).copy() for t in tokens])
    assert np.isfinite(steps[("native", 2)]).all()
    for key, rows in steps.items():
        assert np.array_equal(_bits(rows), _bits(steps[("native", 2)])), key


# ---- the integer path's specification, in numpy: what every build must compute, bit for bit ----------------------

def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c with ONE rounding (the vfmadd instructions), for finite values: the product is exact in
    float64, the sum's float64 rounding error is recovered exactly (two-sum), and a float64 sum that lands on a
    float32 midpoint is settled by the sign of that error (elsewhere float64 -> float32 rounding is already right)."""
    a64, b64, c64 = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    p = a64 * b64
    s = p + c64
    back = s - c64
    err = (p - back) + (c64 - (s - back))
    r = s.astype(np.float32)
    other = np.nextafter(r, np.where(s > r.astype(np.float64), np.float32(np.inf), np.float32(-np.inf)))
    midpoint = (r.astype(np.float64) != s) & ((r.astype(np.float64) + other.astype(np.float64)) / 2 == s) & (err != 0)
    toward_other = np.sign(err) == np.sign(other.astype(np.float64) - r.astype(np.float64))
    return np.where(midpoint & toward_other, other, r).astype(np.float32)


def _is_half(values: np.ndarray) -> bool:
    return bool(np.array_equal(values.astype(np.float16).astype(np.float32), values))


def _integer_decode_row(bq, x: np.ndarray) -> np.ndarray:
    """One activation row through the integer decode path as docs/models.md states it, in numpy: per block the
    power of two and the rounding, exact int sums per 4-value lane, then float32 operations lane by lane in the
    kernel's order (16 lanes per pair of blocks; fused multiply-adds; the reduction tree; block minimums)."""
    f32 = np.float32
    x = np.asarray(x, f32)
    nb, n_rows = x.size // 32, bq.rows
    blocks = x.reshape(nb, 32)
    xsum = np.zeros(nb, f32)
    for b in range(nb):
        for v in blocks[b]:
            xsum[b] = f32(xsum[b] + v)
    ints, inv = np.zeros((nb, 32), np.int64), np.zeros(nb, f32)
    for b in range(nb):
        amax = f32(np.abs(blocks[b]).max())
        biased = int(amax.view(np.uint32)) >> 23
        e = min(23 - (biased - 126 if biased else -126), 126)
        if f32(amax * f32(2.0 ** e)) > f32(127 << 16):
            e -= 1
        ints[b] = np.rint(blocks[b] * f32(2.0 ** e)).astype(np.int64)
        inv[b] = f32(2.0 ** -e)
    y = np.zeros(n_rows, f32)
    for n in range(n_rows):
        acc = np.zeros(16, f32)
        for p in range((nb + 1) // 2):
            for t in bq.terms:
                lane_int, lane_scale = np.zeros(16, np.int64), np.zeros(16, f32)
                for h in range(2):
                    b = 2 * p + h
                    if b >= nb:
                        continue
                    for odd in range(2):
                        q = t.q[n, b, odd::2].astype(np.int64) - t.zero_point  # even (odd) elements
                        lanes = slice(8 * odd + 4 * h, 8 * odd + 4 * h + 4)
                        lane_int[lanes] = (q * ints[b, odd::2]).reshape(4, 4).sum(axis=1)
                        lane_scale[lanes] = f32(t.scales[n, b]) * inv[b]
                acc = _fma32(lane_int.astype(f32), lane_scale, acc)
        t8 = acc[8:] + acc[:8]
        t4 = t8[4:] + t8[:4]
        t2 = t4[:2] + t4[2:]
        total = f32(t2[0] + t2[1])
        mr = f32(0)
        if bq.mins is not None:
            if _is_half(bq.mins):  # float16 copies: even and odd blocks in two lanes
                two = np.zeros(2, f32)
                for b in range(nb):
                    two[b % 2] = _fma32(bq.mins[n, b], xsum[b], two[b % 2])
                mr = f32(f32(0) + f32(two[0] + two[1]))
            else:  # float32: one sequential chain
                chain = f32(0)
                for b in range(nb):
                    chain = _fma32(bq.mins[n, b], xsum[b], chain)
                mr = f32(chain + f32(0))
        y[n] = f32(total + mr)
    return y


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0], ids=lambda q: q.name)
def test_every_integer_build_computes_the_stated_algorithm_bit_for_bit(tmp_path: Path, monkeypatch, qtype: QT) -> None:
    """Independent of which instruction sets this CPU has: each integer build's rows equal a numpy model of the
    algorithm as documented (quantization, exact lane sums, float32 order), bit for bit."""
    libs = _integer_libraries(monkeypatch)
    rng = np.random.default_rng(40 + int(qtype))
    for cols, factor in ((96, 1.0), (128, 1.0001)):
        raw = _random_gguf_rows(qtype, 9, cols, rng)
        bq = from_gguf(raw, qtype, cols).scaled(np.float32(factor))
        path = _standard_graph(qtype, raw, cols, tmp_path / f"{cols}", factor)
        sessions = {march: _session_with(path, lib, 2) for march, lib in libs.items()}
        for trial in range(4):
            x = (rng.standard_normal(cols) * np.exp(rng.uniform(-8, 8, cols))).astype(np.float32)
            x[rng.integers(0, cols, 3)] = 0.0
            expected = _integer_decode_row(bq, x)
            for march, session in sessions.items():
                got = session.run(None, {"x": x[None, None]})[0][0, 0]
                assert np.array_equal(_bits(got), _bits(expected)), (march, cols, factor, trial)


def test_a_source_that_fails_for_this_cpu_builds_portable_and_says_why(tmp_path: Path, monkeypatch) -> None:
    """A kernel source that does not compile with -march=native (a bug in its AVX-512 code, say) still gives a
    working library, built without the CPU's instructions, several times slower: that is logged with the
    compiler's first error, never silent (a broken AVX-512 block once fell back unnoticed by the tests that do
    not look at the library's instruction set)."""
    import io
    import json

    from p2pinfer import log

    monkeypatch.setenv("P2PINFER_KERNEL_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "probe.c"
    source.write_text("#if defined(__SSE4_2__)\n#error this CPU's instructions break it\n#endif\n"
                      "int p2pinfer_probe(void) { return 1; }\n")
    stream = io.StringIO()
    log.configure(json=True, level="warning", stream=stream)
    try:
        built = kernels._build(kernels._compiler(), "native", sources=(source,), stem="probe")
    finally:
        log.configure()
    assert built is not None and built.is_file()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    warned = [r for r in records if r["event"] == "kernel.built_without_march"]
    assert len(warned) == 1 and "this CPU's instructions break it" in warned[0]["error"], records
    # a source that builds for this CPU says nothing of the kind
    source.write_text("int p2pinfer_probe(void) { return 2; }\n")
    stream = io.StringIO()
    log.configure(json=True, level="warning", stream=stream)
    try:
        assert kernels._build(kernels._compiler(), "native", sources=(source,), stem="probe") is not None
    finally:
        log.configure()
    assert "kernel.built_without_march" not in stream.getvalue()


def test_a_library_that_builds_but_does_not_load_is_reported_and_rebuilt_next_time(tmp_path: Path, monkeypatch) -> None:
    """A source that compiles but leaves a symbol undefined (C still accepts an undeclared function, as a stray macro
    name once was) gives a library that the loader refuses: reported as ``load_failed`` and None (the standard
    graph then serves), never an exception out of model loading; the file leaves the cache, so that a fixed
    source or a damaged file is built anew."""
    monkeypatch.setenv("P2PINFER_KERNEL_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "probe.c"
    source.write_text("void p2pinfer_missing(void);\nint p2pinfer_probe(void) { p2pinfer_missing(); return 1; }\n")
    reports: list[tuple[str, str]] = []
    args = dict(hold=True, disabled="off", no_compiler="no compiler")
    got = kernels._library_path("P2PINFER_PROBE_KERNEL", "probe-unloadable", (source,),
                                lambda reason, detail: reports.append((reason, detail)), **args)
    assert got is None
    assert [r for r, _ in reports] == ["load_failed"] and "p2pinfer_missing" in reports[0][1], reports
    assert not list((tmp_path / "cache").glob("probe-unloadable-*.so")), "the unloadable file stays in the cache"
    source.write_text("int p2pinfer_probe(void) { return 2; }\n")
    got = kernels._library_path("P2PINFER_PROBE_KERNEL", "probe-loadable", (source,),
                                lambda reason, detail: reports.append((reason, detail)), **args)
    assert got is not None and got.is_file() and len(reports) == 1
