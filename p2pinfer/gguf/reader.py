"""Reading a Llama-family GGUF file: hyper-parameters, tokenizer metadata and dequantized tensors.

The file is read with the ``gguf`` package (llama.cpp's own reader, memory-mapped); dequantization uses
``gguf.quants.dequantize``, the same code Hugging Face transformers uses to load GGUF files.
Everything here is pure inspection: nothing is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bounds import check_gguf_bounds
from .errors import GGUFImportError, UnsupportedArchitectureError, UnsupportedTensorTypeError

import gguf  # noqa: E402  (the PyPI package, not this one: absolute import)
from gguf import GGMLQuantizationType as QT  # noqa: E402

#: Architectures whose graph is exactly "Llama" (RMSNorm, RoPE, GQA, SwiGLU). Mistral-style and SmolLM
#: GGUFs are written with ``general.architecture = "llama"`` by llama.cpp's converter.
SUPPORTED_ARCHITECTURES = ("llama",)

#: Tensor types this importer dequantizes to float32. Each one is checked against hand-written reference
#: math in tests/test_gguf_dequant.py.
SUPPORTED_TENSOR_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K)

_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


@dataclass(frozen=True)
class LlamaSpec:
    """The hyper-parameters of a Llama-architecture model, as read from GGUF metadata."""

    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool

    @property
    def n_groups(self) -> int:
        return self.n_heads // self.n_kv_heads


class GGUFModel:
    """An open GGUF file. Tensors are dequantized on demand, one at a time, to keep memory low."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_gguf_bounds(self.path)  # the gguf package trusts declared sizes: bound them first
        try:
            self._reader = gguf.GGUFReader(self.path)
        except FileNotFoundError:
            raise GGUFImportError(f"GGUF file not found: {self.path}") from None
        except (ValueError, OSError, IndexError, KeyError) as exc:
            raise GGUFImportError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): {exc}") from None
        self._tensors = {t.name: t for t in self._reader.tensors}

    # -- metadata -------------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except UnicodeDecodeError:  # GGUF strings are UTF-8; the gguf package decodes them strictly
            raise GGUFImportError(f"{self.path.name}: metadata {key!r} holds a string that is not UTF-8") from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFImportError(f"{self.path.name}: required GGUF metadata key {key!r} is missing")
        return value

    def string_array(self, key: str) -> list[str]:
        """A string array field, decoded as UTF-8 (``contents()`` would also do this, but slower)."""
        field = self._reader.fields.get(key)
        if field is None:
            return []
        try:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        except UnicodeDecodeError:
            raise GGUFImportError(f"{self.path.name}: metadata {key!r} holds a string that is not UTF-8") from None

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    # -- tensors --------------------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_type(self, name: str) -> QT:
        return QT(self._tensors[name].tensor_type)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The shape in row-major (numpy / PyTorch) order, i.e. GGUF's ``ne`` reversed."""
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes as ``uint8[rows, row_bytes]`` (a view of the memory-mapped file)."""
        t = self._tensors[name]
        data = np.asarray(t.data)
        rows = int(np.prod(self.tensor_shape(name)[:-1], dtype=np.int64))
        return data.view(np.uint8).reshape(rows, -1)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a C-contiguous float32 array of :meth:`tensor_shape`."""
        t = self._tensors[name]
        qtype = QT(t.tensor_type)
        if qtype not in SUPPORTED_TENSOR_TYPES:
            raise UnsupportedTensorTypeError(
                f"tensor {name!r} in {self.path.name} has type {qtype.name}, which this importer cannot "
                f"dequantize; supported types: {', '.join(q.name for q in SUPPORTED_TENSOR_TYPES)}")
        data = gguf.quants.dequantize(np.asarray(t.data), qtype)
        return np.ascontiguousarray(data, dtype=np.float32).reshape(self.tensor_shape(name))


def read_llama_spec(model: GGUFModel) -> LlamaSpec:
    """Read and validate the hyper-parameters and tensor set of a Llama-architecture GGUF.

    Raises :class:`UnsupportedArchitectureError` for other architectures or Llama variants this importer
    does not implement (partial rotary, RoPE scaling, mixture of experts, biases, ...), and
    :class:`UnsupportedTensorTypeError` for tensors in types it cannot dequantize.
    """
    arch = model.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{model.path.name}: architecture {arch!r} is not supported; this importer converts "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models (Llama, SmolLM, Mistral-style)")

    def key(suffix: str) -> str:
        return f"{arch}.{suffix}"

    def integer(suffix: str, default: int | None = None) -> int:
        value = model.require(key(suffix)) if default is None else model.get(key(suffix), default)
        if isinstance(value, list):  # some GGUFs store per-layer values; we only build uniform layers
            if not value or len(set(value)) != 1:
                raise UnsupportedArchitectureError(
                    f"{model.path.name}: per-layer values of {key(suffix)} ({sorted(set(value))}) are not supported")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise GGUFImportError(f"{model.path.name}: metadata {key(suffix)} is not an integer")
        return int(value)

    def number(suffix: str, default: float | None = None) -> float:
        value = model.require(key(suffix)) if default is None else model.get(key(suffix), default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise GGUFImportError(f"{model.path.name}: metadata {key(suffix)} is not a number")
        return float(value)

    n_layers = integer("block_count")
    hidden = integer("embedding_length")
    intermediate = integer("feed_forward_length")
    n_heads = integer("attention.head_count")
    n_kv_heads = integer("attention.head_count_kv", n_heads)
    head_dim = integer("attention.key_length", hidden // max(n_heads, 1))
    value_dim = integer("attention.value_length", head_dim)
    rope_dims = integer("rope.dimension_count", head_dim)
    if integer("expert_count", 0) > 0:
        raise UnsupportedArchitectureError(f"{model.path.name}: mixture-of-experts Llama models are not supported")
    if value_dim != head_dim:
        raise UnsupportedArchitectureError(
            f"{model.path.name}: key length {head_dim} differs from value length {value_dim}; not supported")
    if rope_dims != head_dim:
        raise UnsupportedArchitectureError(
            f"{model.path.name}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported")
    scaling = model.get(key("rope.scaling.type"))
    if scaling not in (None, "none"):
        raise UnsupportedArchitectureError(f"{model.path.name}: RoPE scaling {scaling!r} is not supported")
    if min(n_layers, hidden, intermediate, n_heads, n_kv_heads, head_dim) <= 0:
        raise GGUFImportError(f"{model.path.name}: layer, size and head counts must be positive")
    if n_layers > len(model.tensor_names) // len(_LAYER_TENSORS):  # before anything is built per layer
        raise GGUFImportError(f"{model.path.name}: block_count {n_layers} needs {len(_LAYER_TENSORS)} tensors per "
                              f"layer, but the file holds {len(model.tensor_names)} tensors")
    if n_heads % n_kv_heads:
        raise GGUFImportError(f"{model.path.name}: {n_heads} heads is not a multiple of {n_kv_heads} KV heads")

    names = set(model.tensor_names)
    expected = {"token_embd.weight", "output_norm.weight"}
    expected |= {f"blk.{i}.{t}.weight" for i in range(n_layers) for t in _LAYER_TENSORS}
    missing = sorted(expected - names)
    if missing:
        raise GGUFImportError(f"{model.path.name}: tensors missing for a Llama model: {', '.join(missing[:5])}")
    extra = sorted(names - expected - {"output.weight"})
    if extra:
        raise UnsupportedArchitectureError(
            f"{model.path.name}: tensors {', '.join(extra[:5])} are not part of the Llama graph this importer "
            f"builds (biases, rope_freqs and other variants are not supported)")
    for name in sorted(names):
        qtype = model.tensor_type(name)
        if qtype not in SUPPORTED_TENSOR_TYPES:
            raise UnsupportedTensorTypeError(
                f"tensor {name!r} in {model.path.name} has type {qtype.name}, which this importer cannot "
                f"dequantize; supported types: {', '.join(q.name for q in SUPPORTED_TENSOR_TYPES)}")

    vocab_size = model.tensor_shape("token_embd.weight")[0]
    spec = LlamaSpec(
        n_layers=n_layers, hidden_size=hidden, intermediate_size=intermediate, n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=vocab_size,
        context_length=integer("context_length", 2048),
        rope_theta=number("rope.freq_base", 10000.0),
        rms_norm_eps=number("attention.layer_norm_rms_epsilon"),
        tie_word_embeddings="output.weight" not in names,
    )
    _check_shapes(model, spec)
    return spec


def _check_shapes(model: GGUFModel, s: LlamaSpec) -> None:
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    want = {"token_embd.weight": (s.vocab_size, s.hidden_size), "output_norm.weight": (s.hidden_size,)}
    if not s.tie_word_embeddings:
        want["output.weight"] = (s.vocab_size, s.hidden_size)
    for i in range(s.n_layers):
        b = f"blk.{i}."
        want |= {b + "attn_norm.weight": (s.hidden_size,), b + "ffn_norm.weight": (s.hidden_size,),
                 b + "attn_q.weight": (q, s.hidden_size), b + "attn_k.weight": (kv, s.hidden_size),
                 b + "attn_v.weight": (kv, s.hidden_size), b + "attn_output.weight": (s.hidden_size, q),
                 b + "ffn_gate.weight": (s.intermediate_size, s.hidden_size),
                 b + "ffn_up.weight": (s.intermediate_size, s.hidden_size),
                 b + "ffn_down.weight": (s.hidden_size, s.intermediate_size)}
    for name, shape in want.items():
        got = model.tensor_shape(name)
        if got != shape:
            raise GGUFImportError(f"{model.path.name}: tensor {name!r} has shape {got}, expected {shape}")


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation, giving the Hugging Face (rotate-half RoPE) layout.

    llama.cpp's converter stores each head's rows interleaved (pairs (x_2i, x_2i+1) rotate together);
    Hugging Face Llama rotates (x_i, x_i+d/2). This is the inverse of ``convert_hf_to_gguf``'s permute and
    the same as transformers' ``reverse_permute_weights``.
    """
    out_dim = weight.shape[0]
    half = out_dim // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
