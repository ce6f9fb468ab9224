"""Tiny synthetic GGUF files written with ``gguf.GGUFWriter``, plus independent reference math.

The reference dequantizers and the numpy Llama forward pass are written from llama.cpp's C definitions
(``ggml-quants.c``, ``llama.cpp``'s rope mode 0), not from ``gguf.quants`` or our graph, so the tests
compare two independent implementations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT


# -- reference dequantization (llama.cpp ggml-quants.c, one block at a time) ------------------------------
def _f16(raw: np.ndarray) -> np.float32:
    return np.float32(np.frombuffer(raw.tobytes(), dtype="<f2")[0])


def ref_dequant_row(row: np.ndarray, qtype: QT) -> np.ndarray:
    """Dequantize one row of raw bytes (uint8) of the given type, block by block, in float32."""
    out: list[np.float32] = []
    if qtype == QT.F32:
        return np.frombuffer(row.tobytes(), dtype="<f4").copy()
    if qtype == QT.F16:
        return np.frombuffer(row.tobytes(), dtype="<f2").astype(np.float32)
    if qtype == QT.BF16:
        bits = np.frombuffer(row.tobytes(), dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    size = {QT.Q8_0: 34, QT.Q4_0: 18, QT.Q4_1: 20, QT.Q4_K: 144, QT.Q6_K: 210}[qtype]
    for start in range(0, len(row), size):
        b = row[start:start + size]
        if qtype == QT.Q8_0:
            d, qs = _f16(b[0:2]), b[2:34].view(np.int8)
            out += [d * np.float32(q) for q in qs]
        elif qtype == QT.Q4_0:
            d, qs = _f16(b[0:2]), b[2:18]
            out += [np.float32((int(q) & 0xF) - 8) * d for q in qs]
            out += [np.float32((int(q) >> 4) - 8) * d for q in qs]
        elif qtype == QT.Q4_1:
            d, m, qs = _f16(b[0:2]), _f16(b[2:4]), b[4:20]
            out += [np.float32(int(q) & 0xF) * d + m for q in qs]
            out += [np.float32(int(q) >> 4) * d + m for q in qs]
        elif qtype == QT.Q4_K:
            d, dmin, scales, qs = _f16(b[0:2]), _f16(b[2:4]), [int(x) for x in b[4:16]], b[16:144]

            def scale_min(j: int) -> tuple[int, int]:
                if j < 4:
                    return scales[j] & 63, scales[j + 4] & 63
                return ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
                        (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))

            for group, j in enumerate(range(0, 256, 64)):
                sc1, m1 = scale_min(2 * group)
                sc2, m2 = scale_min(2 * group + 1)
                d1, mm1, d2, mm2 = d * np.float32(sc1), dmin * np.float32(m1), d * np.float32(sc2), dmin * np.float32(m2)
                q = qs[group * 32:(group + 1) * 32]
                out += [d1 * np.float32(int(x) & 0xF) - mm1 for x in q]
                out += [d2 * np.float32(int(x) >> 4) - mm2 for x in q]
        elif qtype == QT.Q6_K:
            ql, qh, sc, d = b[0:128], b[128:192], b[192:208].view(np.int8), _f16(b[208:210])
            y = [np.float32(0)] * 256
            for half in range(2):
                l_, h_, s_ = ql[64 * half:], qh[32 * half:], sc[8 * half:]
                for l in range(32):
                    is_ = l // 16
                    q1 = ((int(l_[l]) & 0xF) | (((int(h_[l]) >> 0) & 3) << 4)) - 32
                    q2 = ((int(l_[l + 32]) & 0xF) | (((int(h_[l]) >> 2) & 3) << 4)) - 32
                    q3 = ((int(l_[l]) >> 4) | (((int(h_[l]) >> 4) & 3) << 4)) - 32
                    q4 = ((int(l_[l + 32]) >> 4) | (((int(h_[l]) >> 6) & 3) << 4)) - 32
                    base = 128 * half
                    y[base + l] = d * np.float32(s_[is_]) * np.float32(q1)
                    y[base + l + 32] = d * np.float32(s_[is_ + 2]) * np.float32(q2)
                    y[base + l + 64] = d * np.float32(s_[is_ + 4]) * np.float32(q3)
                    y[base + l + 96] = d * np.float32(s_[is_ + 6]) * np.float32(q4)
            out += y
    return np.array(out, dtype=np.float32)


def ref_dequant(raw: np.ndarray, qtype: QT) -> np.ndarray:
    return np.stack([ref_dequant_row(r, qtype) for r in raw])


def random_raw_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: QT) -> np.ndarray:
    """Random raw bytes of a ``rows x cols`` tensor of ``qtype`` with finite, moderate float16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale_offsets = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q4_K: [0, 2], QT.Q6_K: [208]}[qtype]
    for off in scale_offsets:
        scales = rng.uniform(-0.05, 0.05, size=(rows, cols // block)).astype("<f2")
        raw[:, :, off:off + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


# -- a tiny byte-level BPE vocabulary --------------------------------------------------------------------
def bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


SPECIALS = ["<|endoftext|>", "<s>", "</s>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]
USER_TOKENS = ["<tool>"]


def tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = SPECIALS + bytes_to_unicode() + [m.replace(" ", "") for m in MERGES] + USER_TOKENS
    types = [3] * len(SPECIALS) + [1] * (256 + len(MERGES)) + [4] * len(USER_TOKENS)
    return tokens, types


# -- a tiny Llama GGUF -----------------------------------------------------------------------------------
@dataclass
class TinyLlama:
    n_layers: int = 2
    hidden: int = 64
    intermediate: int = 96
    n_heads: int = 4
    n_kv_heads: int = 2
    rope_theta: float = 10000.0
    eps: float = 1e-5
    tied: bool = True
    matrix_type: QT = QT.F32
    arch: str = "llama"
    tokenizer_model: str = "gpt2"
    pre: str = "smollm"
    extra_tensors: dict[str, tuple[np.ndarray, QT]] = field(default_factory=dict)
    kv_heads_per_layer: list[int] | None = None  # written as an array, as some GGUFs do
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def vocab(self) -> int:
        return len(tiny_vocab()[0])


def _encode_matrix(w: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray]:
    """(data to write, float32 values the reader should see) for a float32 matrix stored as ``qtype``."""
    if qtype == QT.F32:
        return w, w
    if qtype == QT.F16:
        h = w.astype(np.float16)
        return h, h.astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    if qtype not in (QT.Q8_0, QT.Q4_0, QT.Q4_1):  # e.g. a type the importer refuses: nothing to compare
        return raw, w
    return raw, ref_dequant(raw, qtype)


def write_tiny_llama(path: Path, cfg: TinyLlama) -> dict[str, np.ndarray]:
    """Write the GGUF and return the float32 weights (GGUF names, numpy/row-major shapes) it holds."""
    rng = np.random.default_rng(cfg.seed)
    w = gguf.GGUFWriter(path, cfg.arch)
    a = cfg.arch
    w.add_string("general.name", "tiny-llama-test")
    w.add_uint32(f"{a}.block_count", cfg.n_layers)
    w.add_uint32(f"{a}.context_length", 256)
    w.add_uint32(f"{a}.embedding_length", cfg.hidden)
    w.add_uint32(f"{a}.feed_forward_length", cfg.intermediate)
    w.add_uint32(f"{a}.attention.head_count", cfg.n_heads)
    if cfg.kv_heads_per_layer is None:
        w.add_uint32(f"{a}.attention.head_count_kv", cfg.n_kv_heads)
    else:
        w.add_array(f"{a}.attention.head_count_kv", cfg.kv_heads_per_layer)
    w.add_float32(f"{a}.rope.freq_base", cfg.rope_theta)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg.eps)
    w.add_uint32(f"{a}.rope.dimension_count", cfg.head_dim)
    tokens, types = tiny_vocab()
    w.add_tokenizer_model(cfg.tokenizer_model)
    w.add_tokenizer_pre(cfg.pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")

    weights: dict[str, np.ndarray] = {}

    def matrix(name: str, rows: int, cols: int, scale: float = 0.08) -> None:
        data, seen = _encode_matrix(rng.normal(0, scale, size=(rows, cols)).astype(np.float32), cfg.matrix_type)
        w.add_tensor(name, data, raw_dtype=None if data.dtype != np.uint8 else cfg.matrix_type)
        weights[name] = seen

    def vector(name: str) -> None:
        v = (1.0 + rng.normal(0, 0.1, size=(cfg.hidden,))).astype(np.float32)
        w.add_tensor(name, v)
        weights[name] = v

    h, hd, kv = cfg.hidden, cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    matrix("token_embd.weight", cfg.vocab, h, 0.5)
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        vector(b + "attn_norm.weight")
        matrix(b + "attn_q.weight", cfg.n_heads * hd, h)
        matrix(b + "attn_k.weight", kv, h)
        matrix(b + "attn_v.weight", kv, h)
        matrix(b + "attn_output.weight", h, cfg.n_heads * hd)
        vector(b + "ffn_norm.weight")
        matrix(b + "ffn_gate.weight", cfg.intermediate, h)
        matrix(b + "ffn_up.weight", cfg.intermediate, h)
        matrix(b + "ffn_down.weight", h, cfg.intermediate)
    vector("output_norm.weight")
    if not cfg.tied:
        matrix("output.weight", cfg.vocab, h, 0.5)
    for name, (data, qtype) in cfg.extra_tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


# -- reference forward pass: llama.cpp's formulation (interleaved RoPE on the stored Q/K rows) ------------
def reference_logits(weights: dict[str, np.ndarray], cfg: TinyLlama, ids: list[int]) -> np.ndarray:
    """Full-sequence logits [s, vocab] in float64, computed directly from the GGUF-layout weights."""
    W = {k: v.astype(np.float64) for k, v in weights.items()}
    s, hd, nh, nkv = len(ids), cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    x = W["token_embd.weight"][ids]

    def rms(v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.eps) * g

    pos = np.arange(s)[:, None]
    theta = pos * cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)  # [s, hd/2]
    cos, sin = np.cos(theta), np.sin(theta)

    def rope_interleaved(t: np.ndarray) -> np.ndarray:  # t [s, heads, hd]; pairs (2i, 2i+1)
        even, odd = t[..., 0::2], t[..., 1::2]
        out = np.empty_like(t)
        out[..., 0::2] = even * cos[:, None] - odd * sin[:, None]
        out[..., 1::2] = even * sin[:, None] + odd * cos[:, None]
        return out

    causal = np.triu(np.full((s, s), -np.inf), 1)
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        hn = rms(x, W[b + "attn_norm.weight"])
        q = rope_interleaved((hn @ W[b + "attn_q.weight"].T).reshape(s, nh, hd))
        k = rope_interleaved((hn @ W[b + "attn_k.weight"].T).reshape(s, nkv, hd))
        v = (hn @ W[b + "attn_v.weight"].T).reshape(s, nkv, hd)
        ctx = np.empty((s, nh, hd))
        for head in range(nh):
            kvh = head // (nh // nkv)
            scores = q[:, head] @ k[:, kvh].T / np.sqrt(hd) + causal
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            ctx[:, head] = p @ v[:, kvh]
        x = x + ctx.reshape(s, nh * hd) @ W[b + "attn_output.weight"].T
        hn = rms(x, W[b + "ffn_norm.weight"])
        gate = hn @ W[b + "ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (hn @ W[b + "ffn_up.weight"].T)) @ W[b + "ffn_down.weight"].T
    x = rms(x, W["output_norm.weight"])
    head_w = W["token_embd.weight"] if cfg.tied else W["output.weight"]
    return x @ head_w.T
