"""The ONNX decoder-with-past graph of a Llama model, in Optimum's input/output layout.

Pure construction with ``onnx.helper``: given a :class:`LlamaSpec` and the weight tensors (already
:class:`onnx.TensorProto` objects, usually pointing at external data), it returns a ``ModelProto``.
Node and value names are fixed strings derived from layer numbers, so the same spec gives the same bytes.

Layout choices, for CPU speed and for agreement with Hugging Face's Llama:

* weights are stored pre-transposed (``[in, out]``) for ``MatMul``; Q, K and V share one matrix, as do
  gate and up, so a layer is three weight MatMuls plus the output projection;
* the attention scale ``1/sqrt(head_dim)`` is folded into the Q columns (exact when head_dim is a power of 4);
* RoPE is the rotate-half form (the importer un-permutes llama.cpp's Q/K rows), applied to Q and K in one go;
* grouped-query attention reshapes Q to ``[b, kv_heads, groups*s, d]`` instead of repeating K/V;
* RMSNorm is written as Pow/ReduceMean/Add/Sqrt/Div/Mul, the pattern onnxruntime fuses into
  ``SimplifiedLayerNormalization``;
* tied embeddings are stored once: the LM head is ``Gemm(transB=1)`` over the embedding matrix.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .reader import LlamaSpec

OPSET = 18
IR_VERSION = 8
PRODUCER = "p2pinfer.gguf"

FLOAT_MIN = float(np.finfo(np.float32).min)


def weight_names(spec: LlamaSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Initializer names and shapes of the weights, in the order they are stored."""
    h, hd = spec.hidden_size, spec.head_dim
    qkv = (spec.n_heads + 2 * spec.n_kv_heads) * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab_size, h))]
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.qkv_proj.weight_t", (h, qkv)),
            (p + "self_attn.o_proj.weight_t", (spec.n_heads * hd, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_up_proj.weight_t", (h, 2 * spec.intermediate_size)),
            (p + "mlp.down_proj.weight_t", (spec.intermediate_size, h)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not spec.tie_word_embeddings:
        out.append(("lm_head.weight", (spec.vocab_size, h)))
    return out


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[onnx.TensorProto] = []
        self._const_names: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def ops(self, op_type: str, inputs: list[str], outputs: list[str], **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=outputs[0], **attrs))
        return outputs

    def const(self, value, dtype) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_names:
            name = f"const.{len(self._const_names)}"
            self._const_names[key] = name
            self.consts.append(numpy_helper.from_array(arr, name))
        return self._const_names[key]

    def i64(self, value) -> str:
        return self.const(value, np.int64)

    def f32(self, value) -> str:
        return self.const(value, np.float32)


def _rms_norm(g: _Graph, x: str, weight: str, eps: float, prefix: str) -> str:
    sq = g.op("Pow", [x, g.f32(2.0)], prefix + "/pow")
    var = g.op("ReduceMean", [sq, g.i64([-1])], prefix + "/mean", keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.f32(eps)], prefix + "/add_eps")], prefix + "/sqrt")
    normed = g.op("Div", [x, std], prefix + "/div")
    return g.op("Mul", [weight, normed], prefix + "/mul_weight")


def build_model(spec: LlamaSpec, weights: list[onnx.TensorProto], *,
                doc_string: str = "", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """The decoder-with-past ModelProto. ``weights`` must follow :func:`weight_names` exactly."""
    expected = weight_names(spec)
    got = [(w.name, tuple(w.dims)) for w in weights]
    if got != expected:
        raise ValueError("weights do not match weight_names(spec)")
    g = _Graph()
    h, hd, nh, nkv, ng = spec.hidden_size, spec.head_dim, spec.n_heads, spec.n_kv_heads, spec.n_groups
    inter = spec.intermediate_size

    # -- inputs and outputs (Optimum layout) ----------------------------------------------------------
    b, s, p, t = "batch_size", "sequence_length", "past_sequence_length", "past_sequence_length + sequence_length"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [b, s]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [b, t]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [b, s])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [b, s, spec.vocab_size])]
    for i in range(spec.n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        [b, nkv, p, hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         [b, nkv, t, hd]))

    # -- shared: additive attention mask [b, 1, groups*s, T] ------------------------------------------
    zero, one = g.i64(0), g.i64(1)
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"], "shape/input_ids"), one], "shape/s", axis=0)
    total_len = g.op("Gather", [g.op("Shape", ["attention_mask"], "shape/mask"), one], "shape/T", axis=0)
    past_len = g.op("Sub", [total_len, seq_len], "shape/past")
    key_pos = g.op("Range", [zero, total_len, one], "mask/key_pos")
    query_pos = g.op("Range", [past_len, total_len, one], "mask/query_pos")
    future = g.op("Greater", [g.op("Unsqueeze", [key_pos, g.i64([0])], "mask/key_row"),
                              g.op("Unsqueeze", [query_pos, g.i64([1])], "mask/query_col")], "mask/future")
    padded = g.op("Unsqueeze", [g.op("Equal", ["attention_mask", zero], "mask/is_pad"), g.i64([1])],
                  "mask/pad_b1T")
    blocked = g.op("Or", [g.op("Unsqueeze", [future, g.i64([0])], "mask/future_1sT"), padded], "mask/blocked")
    additive = g.op("Where", [blocked, g.f32(FLOAT_MIN), g.f32(0.0)], "mask/additive")
    if ng > 1:
        additive = g.op("Tile", [additive, g.i64([1, ng, 1])], "mask/tiled")
    attn_mask = g.op("Unsqueeze", [additive, g.i64([1])], "mask/attn")

    # -- shared: rotary tables [b, s, 1, hd] -----------------------------------------------------------
    exponents = (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)).astype(np.float32)
    inv_freq = g.op("Reciprocal", [g.op("Pow", [g.f32(spec.rope_theta), g.f32(exponents)], "rope/base_pow")],
                    "rope/inv_freq")
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], "rope/pos_f", to=TensorProto.FLOAT), g.i64([2])],
               "rope/pos_bs1")
    freqs = g.op("Mul", [pos, inv_freq], "rope/freqs")
    cos_half = g.op("Cos", [freqs], "rope/cos_half")
    sin_half = g.op("Sin", [freqs], "rope/sin_half")
    cos = g.op("Unsqueeze", [g.op("Concat", [cos_half, cos_half], "rope/cos_bsd", axis=-1), g.i64([2])], "rope/cos")
    # rotate_half(x) * sin == concat(x2, x1) * concat(-sin, sin): the sign moves into the table.
    sin_signed = g.op("Concat", [g.op("Neg", [sin_half], "rope/neg_sin"), sin_half], "rope/sin_bsd", axis=-1)
    sin = g.op("Unsqueeze", [sin_signed, g.i64([2])], "rope/sin")

    # -- decoder layers --------------------------------------------------------------------------------
    x = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], "embed", axis=0)
    half = hd // 2
    for i in range(spec.n_layers):
        w = f"model.layers.{i}."
        n = f"layer{i}/"
        normed = _rms_norm(g, x, w + "input_layernorm.weight", spec.rms_norm_eps, n + "attn_norm")
        qkv = g.op("MatMul", [normed, w + "self_attn.qkv_proj.weight_t"], n + "qkv")
        qkv = g.op("Reshape", [qkv, g.i64([0, 0, nh + 2 * nkv, hd])], n + "qkv_heads")
        qk, v = g.ops("Split", [qkv, g.i64([nh + nkv, nkv])], [n + "qk", n + "v"], axis=2)
        x1, x2 = g.ops("Split", [qk, g.i64([half, half])], [n + "qk_x1", n + "qk_x2"], axis=3)
        swapped = g.op("Concat", [x2, x1], n + "qk_swapped", axis=3)
        qk = g.op("Add", [g.op("Mul", [qk, cos], n + "qk_cos"), g.op("Mul", [swapped, sin], n + "qk_sin")],
                  n + "qk_rope")
        q, k = g.ops("Split", [qk, g.i64([nh, nkv])], [n + "q", n + "k"], axis=2)
        q = g.op("Transpose", [q], n + "q_bhsd", perm=[0, 2, 1, 3])
        q = g.op("Reshape", [q, g.i64([0, nkv, -1, hd])], n + "q_grouped")
        k = g.op("Transpose", [k], n + "k_bhsd", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [v], n + "v_bhsd", perm=[0, 2, 1, 3])
        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
        v_all = g.op("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
        k_t = g.op("Transpose", [k_all], n + "k_t", perm=[0, 1, 3, 2])
        scores = g.op("Add", [g.op("MatMul", [q, k_t], n + "scores_raw"), attn_mask], n + "scores")
        probs = g.op("Softmax", [scores], n + "probs", axis=-1)
        ctx = g.op("MatMul", [probs, v_all], n + "ctx_grouped")
        ctx = g.op("Reshape", [ctx, g.i64([0, nh, -1, hd])], n + "ctx_bhsd")
        ctx = g.op("Transpose", [ctx], n + "ctx_bshd", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.i64([0, 0, nh * hd])], n + "ctx")
        x = g.op("Add", [x, g.op("MatMul", [ctx, w + "self_attn.o_proj.weight_t"], n + "o_proj")], n + "resid_attn")

        normed = _rms_norm(g, x, w + "post_attention_layernorm.weight", spec.rms_norm_eps, n + "mlp_norm")
        gate_up = g.op("MatMul", [normed, w + "mlp.gate_up_proj.weight_t"], n + "gate_up")
        gate, up = g.ops("Split", [gate_up, g.i64([inter, inter])], [n + "gate", n + "up"], axis=2)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], n + "gate_sigmoid")], n + "gate_silu")
        down = g.op("MatMul", [g.op("Mul", [act, up], n + "swiglu"), w + "mlp.down_proj.weight_t"], n + "down")
        x = g.op("Add", [x, down], n + "resid_mlp")

    x = _rms_norm(g, x, "model.norm.weight", spec.rms_norm_eps, "final_norm")
    head = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
    flat = g.op("Reshape", [x, g.i64([-1, h])], "lm_head/flat")
    flat_logits = g.op("Gemm", [flat, head], "lm_head/gemm", transB=1)
    out_shape = g.op("Concat", [g.op("Shape", [x], "lm_head/shape_bsh", end=2), g.i64([spec.vocab_size])],
                     "lm_head/shape", axis=0)
    g.op("Reshape", [flat_logits, out_shape], "logits")

    graph = helper.make_graph(g.nodes, "llama_decoder_with_past", inputs, outputs,
                              initializer=list(weights) + g.consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name=PRODUCER, ir_version=IR_VERSION, doc_string=doc_string)
    for key_, value in sorted((metadata or {}).items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key_, value
    return model
