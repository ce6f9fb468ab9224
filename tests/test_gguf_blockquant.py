"""GGUF block-quantized tensors kept quantized: MatMulNBits repacking against llama.cpp's dequantization.

Three implementations are compared: ``gguf.quants.dequantize`` (llama.cpp's Python port), the hand-written
reference in ``gguf_fixtures`` (from ggml-quants.c) and what onnxruntime actually computes from our
MatMulNBits / quantized-Gather nodes (an identity activation makes MatMulNBits return the weights).
"""

from __future__ import annotations

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType as QT
from onnx import TensorProto, helper, numpy_helper

from p2pinfer.gguf import blockquant, graph

from gguf_fixtures import random_raw_blocks, ref_dequant

#: Types whose repacking is bit-identical; Q6_K may differ by one float32 rounding (see blockquant's table).
EXACT = (QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K)
ALL = (QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q6_K)


def _raw(qtype: QT, rows: int = 6, cols: int = 512, seed: int = 0) -> np.ndarray:
    return random_raw_blocks(np.random.default_rng(seed + int(qtype)), rows=rows, cols=cols, qtype=qtype)


def _llama_cpp(raw: np.ndarray, qtype: QT, cols: int) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).reshape(raw.shape[0], cols).astype(np.float32)


def _assert_close_to_llama_cpp(got: np.ndarray, want: np.ndarray, qtype: QT) -> None:
    if qtype in EXACT:
        np.testing.assert_array_equal(got, want)
    else:  # one float32 rounding of the block's magnitude
        bound = 4 * np.finfo(np.float32).eps * (np.abs(want).max() + 1e-30)
        assert np.abs(got - want).max() <= bound, (qtype.name, np.abs(got - want).max(), bound)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_repacked_values_equal_llama_cpp_dequantization(qtype: QT) -> None:
    raw = _raw(qtype)
    bq = blockquant.from_gguf(raw, qtype, 512)
    want = _llama_cpp(raw, qtype, 512)
    np.testing.assert_array_equal(want, ref_dequant(raw, qtype))  # the two references agree
    assert all(t.q.max() < 16 for t in bq.terms)
    _assert_close_to_llama_cpp(bq.dequantize(), want, qtype)


def _session(nodes: list[onnx.NodeProto], consts: list[onnx.TensorProto], inputs, outputs) -> ort.InferenceSession:
    g = helper.make_graph(nodes, "t", inputs, outputs, initializer=consts)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", graph.OPSET),
                                                helper.make_opsetid(graph.CONTRIB_DOMAIN, 1)],
                              ir_version=graph.IR_VERSION)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _initializers(part: graph.LinearPart, bq: blockquant.BlockQuantized) -> list[onnx.TensorProto]:
    arrays = []
    for term in bq.terms:
        arrays += [term.packed, term.scales.reshape(-1)]
        if term.packed_zero_points is not None:
            arrays.append(term.packed_zero_points)
    if bq.mins is not None:
        arrays.append(np.ascontiguousarray(bq.mins.T))
    out = []
    for (name, shape, _), array in zip(part.initializers(), arrays, strict=True):
        assert tuple(array.shape) == shape
        out.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return out


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_onnxruntime_matmulnbits_and_quantized_gather_reproduce_the_weights(qtype: QT) -> None:
    rows, cols = 6, 512
    raw = _raw(qtype, rows, cols, seed=5)
    bq = blockquant.from_gguf(raw, qtype, cols)
    part = graph.LinearPart("w", rows, cols, bq.block_size, tuple(t.zero_point for t in bq.terms), bq.mins is not None)
    g = graph._Graph()
    graph._linear(g, "x", [part], "y")
    graph._embed(g, part, "ids")
    sess = _session(g.nodes, _initializers(part, bq) + g.consts,
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cols, cols]),
                     helper.make_tensor_value_info("ids", TensorProto.INT64, [1, rows])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                     helper.make_tensor_value_info("embed", TensorProto.FLOAT, None)])
    y, embedded = sess.run(None, {"x": np.eye(cols, dtype=np.float32)[None],
                                  "ids": np.arange(rows, dtype=np.int64)[None]})
    want = _llama_cpp(raw, qtype, cols)
    _assert_close_to_llama_cpp(y[0].T, want, qtype)       # identity @ W.T == W.T
    _assert_close_to_llama_cpp(embedded[0], want, qtype)  # Gather of the quantized table


def test_stacked_and_permuted_rows_keep_their_values() -> None:
    a, b = (blockquant.from_gguf(_raw(QT.Q4_1, seed=s), QT.Q4_1, 512) for s in (1, 2))
    order = np.array([5, 4, 3, 2, 1, 0])
    stacked = blockquant.stack_rows([a.take_rows(order), b.scaled(np.float32(0.125))])
    want = np.concatenate([a.dequantize()[order], b.dequantize() * np.float32(0.125)])
    np.testing.assert_array_equal(stacked.dequantize(), want)
    with pytest.raises(ValueError):
        blockquant.stack_rows([a, blockquant.from_gguf(_raw(QT.Q8_0), QT.Q8_0, 512)])


def test_zero_points_pack_two_per_byte() -> None:
    term = blockquant.Term(np.zeros((2, 3, 32), np.uint8), np.ones((2, 3), np.float32), 2)
    assert term.packed_zero_points.tolist() == [0x22, 0x02, 0x22, 0x02]
    assert blockquant.Term(term.q, term.scales).packed_zero_points is None
