"""The 4-bit kernel (p2pinfer/kernels): the custom op (decode rows and the many-row GEMM) against a float64
product and against MatMulNBits, row determinism, the kernel session against the standard graph, and the
fallback without a compiler or when turned off."""

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
from p2pinfer.gguf import import_gguf
from p2pinfer.gguf.blockquant import from_gguf
from p2pinfer.runtime import load_model

from gguf_fixtures import TinyLlama, write_tiny_llama

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


def _standard_graph(qtype: QT, raw: np.ndarray, cols: int, folder: Path) -> Path:
    """One linear layer written as the importer writes it (MatMulNBits terms, Q4_1 block sums x minimums)."""
    bq = from_gguf(raw, qtype, cols)
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


def _kernel_session(path: Path, threads: int) -> tuple[ort.InferenceSession, int]:
    model = onnx.load(str(path), load_external_data=False)
    rewritten = kernels.kernel_model(model, path.parent, threads)
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


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q4_0, QT.Q8_0], ids=lambda q: q.name)
def test_decoder_runs_the_kernel_within_float32_rounding_of_forward(tmp_path: Path, qtype: QT) -> None:
    cfg = TinyLlama(matrix_type=qtype, n_kv_heads=2)
    write_tiny_llama(tmp_path / "m.gguf", cfg)
    import_gguf(tmp_path / "m.gguf", tmp_path / "m")
    model = load_model(tmp_path / "m", threads=2, providers=["CPUExecutionProvider"])
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
