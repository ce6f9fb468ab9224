"""The float64 reference never holds a large float32 weight widened whole (docs/models.md, "Serving memory").

A tied embedding (``Gather`` of the token rows, then the LM head ``Gemm(transB=1)`` over the same matrix,
as the GGUF importer writes fp32 models) and an untied head (``MatMul``) are run by
:class:`~p2pinfer.runtime.reference.ReferenceModel` from external data; the rows equal a plain float64 numpy
computation to float64 rounding, and the Python-heap peak of the run (numpy's allocations, traced) stays far
below the weight's float64 size: the old code widened the whole matrix at each node that read it.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from p2pinfer.runtime.reference import ReferenceModel

VOCAB, HIDDEN = 8192, 640  # 21 MB of float32: 42 MB widened, above the reference's 16 MB block


def _write_model(folder: Path, head: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Writes the graph; returns the embedding, the head as float64 ``[hidden, vocab]`` and the bias."""
    embedding = rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32)
    bias = rng.standard_normal(VOCAB, dtype=np.float32)
    inits = [numpy_helper.from_array(embedding, "embed.weight"), numpy_helper.from_array(bias, "head.bias"),
             numpy_helper.from_array(np.array([-1, HIDDEN], dtype=np.int64), "flat_shape"),
             numpy_helper.from_array(np.array([1, -1, VOCAB], dtype=np.int64), "logits_shape")]
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["hidden"], axis=0),
             helper.make_node("Reshape", ["hidden", "flat_shape"], ["flat"])]
    if head == "gemm":  # tied: the same matrix, transposed by the node
        nodes.append(helper.make_node("Gemm", ["flat", "embed.weight", "head.bias"], ["flat_logits"], transB=1))
        weight = embedding
    else:  # an untied head stored [hidden, vocab]
        weight = np.ascontiguousarray(rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32).T)
        inits.append(numpy_helper.from_array(weight, "head.weight_t"))
        nodes += [helper.make_node("MatMul", ["flat", "head.weight_t"], ["product"]),
                  helper.make_node("Add", ["product", "head.bias"], ["flat_logits"])]
    nodes.append(helper.make_node("Reshape", ["flat_logits", "logits_shape"], ["logits"]))
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"]),
                        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    head_t = weight.astype(np.float64).T if head == "gemm" else weight.astype(np.float64)
    return embedding, head_t, bias


@pytest.mark.parametrize("head", ["gemm", "matmul"])
def test_large_float_weights_are_widened_a_block_at_a_time(tmp_path: Path, head: str) -> None:
    rng = np.random.default_rng(7)
    embedding, head_t, bias = _write_model(tmp_path, head, rng)
    ids = [5, 8000, 17, 4095, 4096, 1]
    ref = ReferenceModel(tmp_path / "model.onnx", kv_heads=1, head_dim=1)
    tracemalloc.start()
    try:
        rows = ref.logprobs(ids, last=len(ids))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    logits = embedding.astype(np.float64)[ids] @ head_t + bias.astype(np.float64)
    expected = logits - logits.max(axis=-1, keepdims=True)
    expected -= np.log(np.exp(expected).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(rows, expected, rtol=0, atol=1e-10)
    widened = VOCAB * HIDDEN * 8
    assert peak < widened // 2, (peak, widened)  # one widened block (16 MB) and the rows, never the matrix


def test_attention_scores_are_computed_a_block_of_queries_at_a_time() -> None:
    """GroupQueryAttention over 1,024 positions: the same context as the whole-matrix formula (to float64
    rounding), with a heap peak below the whole score matrix (heads x positions x positions float64 values,
    5.4 GB at SmolLM2's 8,192-position context)."""
    heads, kv_heads, head_dim, s = 4, 2, 16, 1024
    node = helper.make_node("GroupQueryAttention", ["query", "key", "value", "", "", "seqlens_k", "total"],
                            ["ctx", "present_key", "present_value"], domain="com.microsoft", num_heads=heads,
                            kv_num_heads=kv_heads, scale=0.25)
    f = TensorProto.DOUBLE
    graph = helper.make_graph(
        [node], "gqa",
        [helper.make_tensor_value_info("query", f, [1, s, heads * head_dim]),
         helper.make_tensor_value_info("key", f, [1, s, kv_heads * head_dim]),
         helper.make_tensor_value_info("value", f, [1, s, kv_heads * head_dim]),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
         helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("ctx", f, [1, s, heads * head_dim])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    from onnx.reference import ReferenceEvaluator

    from p2pinfer.runtime.reference import CONTRIB_OPS

    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, s, heads * head_dim))
    k = rng.standard_normal((1, s, kv_heads * head_dim))
    v = rng.standard_normal((1, s, kv_heads * head_dim))
    evaluator = ReferenceEvaluator(model, new_ops=list(CONTRIB_OPS))
    tracemalloc.start()
    try:
        ctx = evaluator.run(["ctx"], {"query": q, "key": k, "value": v, "seqlens_k": np.array([s - 1], np.int32),
                                      "total": np.array(s, np.int32)})[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    qh = q.reshape(s, heads, head_dim).transpose(1, 0, 2)
    kh = np.repeat(k.reshape(s, kv_heads, head_dim).transpose(1, 0, 2), heads // kv_heads, axis=0)
    vh = np.repeat(v.reshape(s, kv_heads, head_dim).transpose(1, 0, 2), heads // kv_heads, axis=0)
    scores = qh @ kh.transpose(0, 2, 1) * 0.25
    scores[:, np.triu(np.ones((s, s), dtype=bool), 1)] = -np.inf
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    expected = (probs @ vh).transpose(1, 0, 2).reshape(1, s, heads * head_dim)
    np.testing.assert_allclose(ctx, expected, rtol=0, atol=1e-12)
    whole = heads * s * s * 8  # 32 MB
    assert peak < whole * 3 // 4, (peak, whole)  # one block of queries (16 MB), never the whole matrix
