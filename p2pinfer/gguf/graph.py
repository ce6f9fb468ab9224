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
  ``SimplifiedLayerNormalization``; in the fused graph every residual Add and the RMSNorm after it are one
  com.microsoft ``SkipSimplifiedLayerNormalization`` (onnxruntime does not fuse them itself, since the sum
  is also the next residual), and ``GroupQueryAttention`` takes the packed QKV projection as it is (no
  Split): ~90 fewer nodes per decode step for SmolLM2;
* tied embeddings are stored once: the LM head is ``Gemm(transB=1)`` over the embedding matrix (or
  ``MatMulNBits`` over the same quantized table);
* block-quantized weights (:mod:`.blockquant`) stay quantized: a linear layer is a sum of 4-bit
  ``MatMulNBits`` terms (plus block sums times the block minimums for Q4_1/Q4_K), one group per part (parts of
  one fused layer with different GGUF types are concatenated on the output axis); a quantized embedding is
  a ``Gather`` of the table's blocks, dequantized in the graph for the ``s`` rows used;
* the optional input ``logits_to_keep`` (int64 ``[1]``, default: every row) computes the LM head for the
  last ``n`` positions only: a decode step or a verifier needs the rows it reads, not the prompt's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .reader import LlamaSpec

OPSET = 18
IR_VERSION = 8
PRODUCER = "p2pinfer.gguf"

FLOAT_MIN = float(np.finfo(np.float32).min)
CONTRIB_DOMAIN = "com.microsoft"
LOGITS_TO_KEEP = "logits_to_keep"
#: ``logits_to_keep``'s default: more rows than any sequence has, so Slice keeps them all.
ALL_ROWS = 2 ** 62
#: MatMulNBits ``accuracy_level``: 0 computes in float32 from the dequantized blocks (the reproducible choice;
#: 4 quantizes the activations to int8 per call, which makes KV decode and prefill disagree).
ACCURACY_LEVEL = 0


@dataclass(frozen=True)
class LinearPart:
    """A slice of a linear layer's output rows, stored float or block-quantized (:mod:`.blockquant`).

    ``zero_points`` empty: a float32 initializer ``name`` of shape ``[cols, rows]`` (pre-transposed for
    MatMul; the embedding table is ``[rows=vocab, cols=hidden]`` instead). Otherwise one 4-bit MatMulNBits
    term per entry (its zero point): ``name.t<j>.qweight`` (uint8 ``[rows, cols/block, block/2]``),
    ``name.t<j>.scales`` (float32 ``[rows*cols/block]``), ``name.t<j>.zero_points`` unless the zero point
    is the default 8 (uint8, two per byte), and with ``mins`` a float32 ``name.mins`` ``[cols/block, rows]``.
    """

    name: str
    rows: int
    cols: int
    block_size: int = 0
    zero_points: tuple[int, ...] = ()
    mins: bool = False

    @property
    def quantized(self) -> bool:
        return bool(self.zero_points)

    def initializers(self) -> list[tuple[str, tuple[int, ...], int]]:
        """``(name, shape, onnx data type)`` of what this part stores, in storage order."""
        if not self.quantized:
            return [(self.name, (self.cols, self.rows), TensorProto.FLOAT)]
        n_blocks = self.cols // self.block_size
        out = []
        for j, zp in enumerate(self.zero_points):
            t = f"{self.name}.t{j}"
            out += [(t + ".qweight", (self.rows, n_blocks, self.block_size // 2), TensorProto.UINT8),
                    (t + ".scales", (self.rows * n_blocks,), TensorProto.FLOAT)]
            if zp != 8:
                out.append((t + ".zero_points", (self.rows * ((n_blocks + 1) // 2),), TensorProto.UINT8))
        if self.mins:
            out.append((self.name + ".mins", (n_blocks, self.rows), TensorProto.FLOAT))
        return out


#: Logical linear layers of a layer ``i``: name suffix -> (rows, cols) as functions of the spec.
def linear_shapes(spec: LlamaSpec) -> dict[str, tuple[int, int]]:
    """Every linear layer the graph has, by logical name: ``(output rows, input cols)``."""
    h, hd = spec.hidden_size, spec.head_dim
    out: dict[str, tuple[int, int]] = {"model.embed_tokens": (spec.vocab_size, h)}
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj"] = ((spec.n_heads + 2 * spec.n_kv_heads) * hd, h)
        out[p + "self_attn.o_proj"] = (h, spec.n_heads * hd)
        out[p + "mlp.gate_up_proj"] = (2 * spec.intermediate_size, h)
        out[p + "mlp.down_proj"] = (h, spec.intermediate_size)
    if not spec.tie_word_embeddings:
        out["lm_head"] = (spec.vocab_size, h)
    return out


def float_linears(spec: LlamaSpec) -> dict[str, tuple[LinearPart, ...]]:
    """The all-float32 layout (names as :func:`weight_names` gives them)."""
    out = {}
    for name, (rows, cols) in linear_shapes(spec).items():
        stored = name + (".weight" if name in ("model.embed_tokens", "lm_head") else ".weight_t")
        out[name] = (LinearPart(stored, rows, cols),)
    return out


def storage_plan(spec: LlamaSpec, linears: Mapping[str, Sequence[LinearPart]]) -> list[tuple[str, tuple[int, ...], int]]:
    """Every weight initializer ``(name, shape, onnx data type)`` in storage order."""
    def norm(name: str) -> list[tuple[str, tuple[int, ...], int]]:
        return [(name, (spec.hidden_size,), TensorProto.FLOAT)]

    def lin(name: str) -> list[tuple[str, tuple[int, ...], int]]:
        out = []
        for part in linears[name]:
            for entry in part.initializers():
                if name in ("model.embed_tokens", "lm_head") and not part.quantized:
                    entry = (entry[0], (part.rows, part.cols), entry[2])
                out.append(entry)
        return out

    out = lin("model.embed_tokens")
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        out += norm(p + "input_layernorm.weight") + lin(p + "self_attn.qkv_proj") + lin(p + "self_attn.o_proj")
        out += norm(p + "post_attention_layernorm.weight") + lin(p + "mlp.gate_up_proj") + lin(p + "mlp.down_proj")
    out += norm("model.norm.weight")
    if not spec.tie_word_embeddings:
        out += lin("lm_head")
    return out


def weight_names(spec: LlamaSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Initializer names and shapes of the all-float32 weights, in the order they are stored."""
    return [(name, shape) for name, shape, _ in storage_plan(spec, float_linears(spec))]


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


def _linear(g: _Graph, x: str, parts: Sequence[LinearPart], out: str) -> str:
    """``x @ W.T`` over the stored parts (concatenated on the last axis when there are several)."""
    outs = []
    for j, part in enumerate(parts):
        name = out if len(parts) == 1 else f"{out}/part{j}"
        if not part.quantized:
            outs.append(g.op("MatMul", [x, part.name], name))
            continue
        terms = []
        alone = len(part.zero_points) == 1 and not part.mins
        for t, zp in enumerate(part.zero_points):
            base = f"{part.name}.t{t}"
            inputs = [x, base + ".qweight", base + ".scales"] + ([base + ".zero_points"] if zp != 8 else [])
            terms.append(g.op("MatMulNBits", inputs, name if alone else f"{name}/t{t}", domain=CONTRIB_DOMAIN,
                              K=part.cols,
                              N=part.rows, bits=4, block_size=part.block_size, accuracy_level=ACCURACY_LEVEL))
        if part.mins:  # sum_b (sum of x over block b) * min[n, b]
            n_blocks = part.cols // part.block_size
            blocks = g.op("Reshape", [x, g.i64([0, 0, n_blocks, part.block_size])], f"{name}/x_blocks")
            sums = g.op("ReduceSum", [blocks, g.i64([-1])], f"{name}/x_block_sums", keepdims=0)
            terms.append(g.op("MatMul", [sums, part.name + ".mins"], f"{name}/mins"))
        outs.append(terms[0] if len(terms) == 1 else g.op("Sum", terms, name))
    return outs[0] if len(outs) == 1 else g.op("Concat", outs, out, axis=-1)


def _embed(g: _Graph, part: LinearPart, ids: str) -> str:
    """Rows ``ids`` of the embedding table, dequantized in the graph when it is block-quantized."""
    if not part.quantized:
        return g.op("Gather", [part.name, ids], "embed", axis=0)
    n_blocks = part.cols // part.block_size
    # block k of row r sits at r * n_blocks + k in the flat scale tables
    first = g.op("Mul", [g.op("Unsqueeze", [ids, g.i64([-1])], "embed/ids_1"), g.i64(n_blocks)], "embed/first")
    flat = g.op("Add", [first, g.i64(np.arange(n_blocks))], "embed/block_index")
    values = []
    for t, zp in enumerate(part.zero_points):
        base, n = f"{part.name}.t{t}", f"embed/t{t}"
        packed = g.op("Gather", [base + ".qweight", ids], n + "/blocks", axis=0)  # [b, s, nb, block/2]
        low = g.op("BitwiseAnd", [packed, g.const(15, np.uint8)], n + "/low")  # element 2i
        high = g.op("BitShift", [packed, g.const(4, np.uint8)], n + "/high", direction="RIGHT")  # 2i+1
        pairs = g.op("Concat", [g.op("Unsqueeze", [low, g.i64([-1])], n + "/low_1"),
                                g.op("Unsqueeze", [high, g.i64([-1])], n + "/high_1")], n + "/pairs", axis=-1)
        codes = g.op("Cast", [g.op("Reshape", [pairs, g.i64([0, 0, n_blocks, part.block_size])], n + "/codes")],
                     n + "/codes_f", to=TensorProto.FLOAT)
        scale = g.op("Unsqueeze", [g.op("Gather", [base + ".scales", flat], n + "/scales", axis=0),
                                   g.i64([-1])], n + "/scales_1")
        values.append(g.op("Mul", [g.op("Sub", [codes, g.f32(zp)], n + "/centered"), scale], n + "/values"))
    if part.mins:  # mins are stored [n_blocks, rows]
        mins = g.op("Transpose", [g.op("Gather", [part.name + ".mins", ids], "embed/mins_nbs", axis=1)],
                    "embed/mins", perm=[1, 2, 0])
        values.append(g.op("Unsqueeze", [mins, g.i64([-1])], "embed/mins_1"))
    total = values[0]
    for j, v in enumerate(values[1:]):  # left to right, as BlockQuantized.dequantize adds them
        total = g.op("Add", [total, v], f"embed/sum{j}")
    return g.op("Reshape", [total, g.i64([0, 0, part.cols])], "embed")


def rotary_caches(spec: LlamaSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[context_length, head_dim/2]`` float32 for GroupQueryAttention.

    The model file must be the same bytes on every machine, so nothing here goes through numpy's
    CPU-dispatched transcendental kernels (their last bit differs between SIMD paths): powers, cosines and
    sines are Python's ``math`` in double precision, rounded once to float32; the angle is the float32
    product ``position * inv_freq``, as the portable graph computes it.
    """
    half = spec.head_dim // 2
    inv = np.array([1.0 / math.pow(spec.rope_theta, float(np.float32(2 * j) / np.float32(spec.head_dim)))
                    for j in range(half)], dtype=np.float32)
    angles = (np.arange(spec.context_length, dtype=np.float32)[:, None] * inv[None, :]).astype(np.float32)
    flat = angles.astype(np.float64).ravel().tolist()
    cos = np.array([math.cos(a) for a in flat], dtype=np.float32).reshape(angles.shape)
    sin = np.array([math.sin(a) for a in flat], dtype=np.float32).reshape(angles.shape)
    return cos, sin


def _portable_attention_tables(g: _Graph, spec: LlamaSpec, total_len: str, exponents: np.ndarray):
    """Shared by every layer of the portable attention: the additive mask [b, 1, groups*s, T] (causal and
    padding) and the rotary tables [b, s, 1, hd] from ``position_ids``."""
    zero, one = g.i64(0), g.i64(1)
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"], "shape/input_ids"), one], "shape/s", axis=0)
    past_len = g.op("Sub", [total_len, seq_len], "shape/past")
    key_pos = g.op("Range", [zero, total_len, one], "mask/key_pos")
    query_pos = g.op("Range", [past_len, total_len, one], "mask/query_pos")
    future = g.op("Greater", [g.op("Unsqueeze", [key_pos, g.i64([0])], "mask/key_row"),
                              g.op("Unsqueeze", [query_pos, g.i64([1])], "mask/query_col")], "mask/future")
    padded = g.op("Unsqueeze", [g.op("Equal", ["attention_mask", zero], "mask/is_pad"), g.i64([1])],
                  "mask/pad_b1T")
    blocked = g.op("Or", [g.op("Unsqueeze", [future, g.i64([0])], "mask/future_1sT"), padded], "mask/blocked")
    additive = g.op("Where", [blocked, g.f32(FLOAT_MIN), g.f32(0.0)], "mask/additive")
    if spec.n_groups > 1:
        additive = g.op("Tile", [additive, g.i64([1, spec.n_groups, 1])], "mask/tiled")
    attn_mask = g.op("Unsqueeze", [additive, g.i64([1])], "mask/attn")

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
    return attn_mask, cos, sin


def _portable_attention(g: _Graph, qkv: str, i: int, spec: LlamaSpec, attn_mask: str, cos: str, sin: str) -> str:
    """Layer ``i``'s attention in ``ai.onnx`` operators: RoPE, KV concat, masked softmax; [b, s, nh*hd]."""
    nh, nkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    half, n = hd // 2, f"layer{i}/"
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
    return g.op("Reshape", [ctx, g.i64([0, 0, nh * hd])], n + "ctx")


def build_model(spec: LlamaSpec, weights: list[onnx.TensorProto], *,
                linears: Mapping[str, Sequence[LinearPart]] | None = None, fused_attention: bool = False,
                doc_string: str = "", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """The decoder-with-past ModelProto. ``weights`` must follow :func:`storage_plan` exactly (the
    all-float32 :func:`float_linears` layout when ``linears`` is None).

    ``fused_attention``: one com.microsoft ``GroupQueryAttention`` node per layer (RoPE inside, packed QKV,
    ~20 fewer nodes per layer, measurably faster decode on CPU) instead of the portable ``ai.onnx`` attention,
    and ``SkipSimplifiedLayerNormalization`` for each residual Add + RMSNorm. It
    requires an ``attention_mask`` of ones (no padding; positions follow the cache length), which is how the
    p2pinfer runtime runs every model; the portable form also masks left padding.
    """
    linears = dict(linears) if linears is not None else float_linears(spec)
    if set(linears) != set(linear_shapes(spec)):
        raise ValueError("linears do not name every linear layer of the spec")
    if len(linears["model.embed_tokens"]) != 1:
        raise ValueError("the embedding table must be stored as one part")
    expected = [(name, shape) for name, shape, _ in storage_plan(spec, linears)]
    got = [(w.name, tuple(w.dims)) for w in weights]
    if got != expected:
        raise ValueError("weights do not match storage_plan(spec, linears)")
    g = _Graph()
    h, hd, nh, nkv, ng = spec.hidden_size, spec.head_dim, spec.n_heads, spec.n_kv_heads, spec.n_groups
    inter = spec.intermediate_size

    # -- inputs and outputs (Optimum layout) ----------------------------------------------------------
    b, s, p, t = "batch_size", "sequence_length", "past_sequence_length", "past_sequence_length + sequence_length"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [b, s]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [b, t]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [b, s]),
              helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [b, s, spec.vocab_size])]
    for i in range(spec.n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        [b, nkv, p, hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         [b, nkv, t, hd]))

    one = g.i64(1)
    total_len = g.op("Gather", [g.op("Shape", ["attention_mask"], "shape/mask"), one], "shape/T", axis=0)
    exponents = (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)).astype(np.float32)
    if fused_attention:  # GroupQueryAttention: int32 lengths and rotary caches [positions, hd/2]
        lengths = g.op("ReduceSum", ["attention_mask", g.i64([1])], "gqa/lengths", keepdims=0)
        gqa_seqlens = g.op("Cast", [g.op("Sub", [lengths, one], "gqa/last")], "gqa/seqlens_k", to=TensorProto.INT32)
        gqa_total = g.op("Cast", [total_len], "gqa/total", to=TensorProto.INT32)
        gqa_cos, gqa_sin = (g.f32(table) for table in rotary_caches(spec))
    else:
        attn_mask, cos, sin = _portable_attention_tables(g, spec, total_len, exponents)

    # -- decoder layers --------------------------------------------------------------------------------
    def add_and_norm(x: str, delta: str, weight: str, prefix: str, resid: str) -> tuple[str, str]:
        """``x + delta`` (the residual stream) and its RMSNorm; fused into one node in the fused graph."""
        if not fused_attention:
            x = g.op("Add", [x, delta], resid)
            return x, _rms_norm(g, x, weight, spec.rms_norm_eps, prefix)
        normed, _, _, x = g.ops("SkipSimplifiedLayerNormalization", [delta, x, weight],
                                [prefix + "/normed", "", "", resid], domain=CONTRIB_DOMAIN, epsilon=spec.rms_norm_eps)
        return x, normed

    x = _embed(g, linears["model.embed_tokens"][0], "input_ids")
    normed = _rms_norm(g, x, "model.layers.0.input_layernorm.weight", spec.rms_norm_eps, "layer0/attn_norm")
    for i in range(spec.n_layers):
        w = f"model.layers.{i}."
        n = f"layer{i}/"
        qkv = _linear(g, normed, linears[w + "self_attn.qkv_proj"], n + "qkv")
        if fused_attention:  # packed QKV: GroupQueryAttention splits it itself
            ctx = g.ops("GroupQueryAttention", [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                                gqa_seqlens, gqa_total, gqa_cos, gqa_sin],
                        [n + "ctx", f"present.{i}.key", f"present.{i}.value"], domain=CONTRIB_DOMAIN,
                        num_heads=nh, kv_num_heads=nkv, scale=1.0, do_rotary=1, rotary_interleaved=0)[0]
        else:
            ctx = _portable_attention(g, qkv, i, spec, attn_mask, cos, sin)
        x, normed = add_and_norm(x, _linear(g, ctx, linears[w + "self_attn.o_proj"], n + "o_proj"),
                                 w + "post_attention_layernorm.weight", n + "mlp_norm", n + "resid_attn")
        gate_up = _linear(g, normed, linears[w + "mlp.gate_up_proj"], n + "gate_up")
        gate, up = g.ops("Split", [gate_up, g.i64([inter, inter])], [n + "gate", n + "up"], axis=2)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], n + "gate_sigmoid")], n + "gate_silu")
        down = _linear(g, g.op("Mul", [act, up], n + "swiglu"), linears[w + "mlp.down_proj"], n + "down")
        if i + 1 < spec.n_layers:
            x, normed = add_and_norm(x, down, f"model.layers.{i + 1}.input_layernorm.weight",
                                     f"layer{i + 1}/attn_norm", n + "resid_mlp")
        else:
            x, normed = add_and_norm(x, down, "model.norm.weight", "final_norm", n + "resid_mlp")
    x = normed
    # the last logits_to_keep positions only (Slice clamps the default ALL_ROWS to the whole sequence)
    start = g.op("Neg", [LOGITS_TO_KEEP], "lm_head/keep_start")
    x = g.op("Slice", [x, start, g.i64([ALL_ROWS]), g.i64([1])], "lm_head/kept")
    head_parts = linears["model.embed_tokens" if spec.tie_word_embeddings else "lm_head"]
    if head_parts[0].quantized or len(head_parts) > 1:
        if any(not p.quantized for p in head_parts):
            raise ValueError("a quantized LM head cannot mix float parts")
        _linear(g, x, head_parts, "logits")
    else:  # float [vocab, hidden]: one Gemm over the flattened rows
        flat = g.op("Reshape", [x, g.i64([-1, h])], "lm_head/flat")
        flat_logits = g.op("Gemm", [flat, head_parts[0].name], "lm_head/gemm", transB=1)
        out_shape = g.op("Concat", [g.op("Shape", [x], "lm_head/shape_bsh", end=2), g.i64([spec.vocab_size])],
                         "lm_head/shape", axis=0)
        g.op("Reshape", [flat_logits, out_shape], "logits")

    keep_default = numpy_helper.from_array(np.array([ALL_ROWS], dtype=np.int64), LOGITS_TO_KEEP)
    graph = helper.make_graph(g.nodes, "llama_decoder_with_past", inputs, outputs,
                              initializer=list(weights) + g.consts + [keep_default])
    opsets = [helper.make_opsetid("", OPSET)]
    if any(node.domain == CONTRIB_DOMAIN for node in g.nodes):
        opsets.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets,
                              producer_name=PRODUCER, ir_version=IR_VERSION, doc_string=doc_string)
    for key_, value in sorted((metadata or {}).items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key_, value
    return model
