"""Import a Llama-family GGUF file into a model folder the runtime can load.

The folder holds:

* ``model.onnx`` — the decoder-with-past graph (:mod:`.graph`), weights as external data in
* ``model.onnx.data`` — every weight in :func:`graph.storage_plan` order, each tensor starting at a multiple
  of 4096 bytes (zero padding), so the layout is a pure function of the GGUF: Q4_0/Q4_1/Q8_0/Q4_K/Q6_K
  tensors as ``MatMulNBits`` blocks (:mod:`.blockquant`), everything else (and, with ``weights="fp32"``,
  everything) as float32;
* ``tokenizer.json``, ``tokenizer_config.json`` (with ``chat_template``), ``config.json`` (Hugging Face
  LlamaConfig fields) and ``generation_config.json``.

Every file is a deterministic function of the GGUF's bytes (no timestamps, fixed names, sorted JSON), so
peers that import the same GGUF independently get byte-identical folders and thus the same model digest.
The folder is written under a temporary name next to the destination and renamed at the end: a failed
import leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ..log import get_logger
from . import blockquant, graph
from .blockquant import NATIVE_TYPES, BlockQuantized
from .errors import GGUFImportError
from .reader import GGUFModel, LlamaSpec, read_llama_spec, unpermute_qk
from .tokenizer import TokenizerFiles, build_tokenizer

log = get_logger("p2pinfer.gguf")

#: Bump when the produced files change for the same GGUF input (the model digest changes with it).
IMPORTER_FORMAT = "p2pinfer-gguf-import/3"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ALIGNMENT = 4096
#: Protobuf cannot serialize messages of 2 GiB or more; leave room for the graph itself.
SINGLE_FILE_LIMIT = 2_000_000_000

#: Positions the fused attention's rotary cos/sin tables cover (stored in model.onnx: 2 x 4 x head_dim/2 bytes
#: each): Llama 3.1's 131,072 with head_dim 128 is 64 MB; a GGUF declaring more is refused, not allocated.
MAX_FUSED_CONTEXT = 131_072
#: ONNX metadata key naming the numeric class the imported graph computes in (read by the model store).
NUMERIC_CLASS_KEY = "p2pinfer.numeric_class"
#: ``progress(done_bytes, total_bytes)``, called as weight data is written.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImportResult:
    out_dir: Path
    spec: LlamaSpec
    gguf_sha256: str
    data_bytes: int
    seconds: float
    numeric_class: str = "fp32-cpu"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class WeightMode(str, enum.Enum):
    """How GGUF weights are stored in the imported graph."""

    #: Q4_0/Q4_1/Q8_0/Q4_K/Q6_K stay block-quantized (MatMulNBits); other types become float32.
    NATIVE = "native"
    #: Everything dequantized to float32 (the ``fp32-cpu`` numeric class).
    FP32 = "fp32"


# Where each logical linear layer's rows come from: (GGUF tensor suffix, Q/K head count to un-permute, Q scale)
def _linear_sources(spec: LlamaSpec) -> dict[str, list[tuple[str, int, bool]]]:
    out: dict[str, list[tuple[str, int, bool]]] = {"model.embed_tokens": [("token_embd.weight", 0, False)]}
    for i in range(spec.n_layers):
        blk, p = f"blk.{i}.", f"model.layers.{i}."
        out[p + "self_attn.qkv_proj"] = [(blk + "attn_q.weight", spec.n_heads, True),
                                         (blk + "attn_k.weight", spec.n_kv_heads, False),
                                         (blk + "attn_v.weight", 0, False)]
        out[p + "self_attn.o_proj"] = [(blk + "attn_output.weight", 0, False)]
        out[p + "mlp.gate_up_proj"] = [(blk + "ffn_gate.weight", 0, False), (blk + "ffn_up.weight", 0, False)]
        out[p + "mlp.down_proj"] = [(blk + "ffn_down.weight", 0, False)]
    if not spec.tie_word_embeddings:
        out["lm_head"] = [("output.weight", 0, False)]
    return out


def _source(model: GGUFModel, spec: LlamaSpec, name: str, heads: int, is_q: bool,
            mode: WeightMode) -> BlockQuantized | np.ndarray:
    """One GGUF tensor in graph row order: block-quantized when kept so, else float32 ``[rows, cols]``."""
    scale = np.float32(1.0 / np.sqrt(spec.head_dim))
    qtype = model.tensor_type(name)
    if mode == WeightMode.NATIVE and qtype in NATIVE_TYPES:
        rows, cols = model.tensor_shape(name)
        bq = blockquant.from_gguf(model.raw(name), qtype, cols)
        if heads:
            bq = bq.take_rows(unpermute_qk(np.arange(rows), heads))
        if is_q:
            bq = bq.scaled(scale)
        return bq
    array = model.dequantize(name)
    if heads:
        array = unpermute_qk(array, heads)
    if is_q:
        array = array * scale
    return array


def _group(items: list[BlockQuantized | np.ndarray]) -> list[BlockQuantized | np.ndarray]:
    """Merge neighbouring sources that can share one node (same quantized kind, or both float)."""
    out: list[BlockQuantized | np.ndarray] = []
    for item in items:
        last = out[-1] if out else None
        if isinstance(item, np.ndarray) and isinstance(last, np.ndarray):
            out[-1] = np.concatenate([last, item], axis=0)
        elif isinstance(item, BlockQuantized) and isinstance(last, BlockQuantized) and item.kind == last.kind:
            out[-1] = blockquant.stack_rows([last, item])
        else:
            out.append(item)
    return out


@dataclass
class _Plan:
    linears: dict[str, tuple[graph.LinearPart, ...]]
    arrays: dict[str, list[BlockQuantized | np.ndarray]]
    quantized_types: dict[str, int]  # GGUF type name -> parameters kept in it


def _plan(model: GGUFModel, spec: LlamaSpec, mode: WeightMode) -> _Plan:
    """Read every linear layer (in GGUF order) and decide how each part is stored."""
    linears: dict[str, tuple[graph.LinearPart, ...]] = {}
    arrays: dict[str, list[BlockQuantized | np.ndarray]] = {}
    kept: dict[str, int] = {}
    for logical, sources in _linear_sources(spec).items():
        parts = _group([_source(model, spec, n, heads, is_q, mode) for n, heads, is_q in sources])
        table = logical in ("model.embed_tokens", "lm_head")
        described = []
        for j, part in enumerate(parts):
            base = logical if len(parts) == 1 else f"{logical}.part{j}"
            if isinstance(part, BlockQuantized):
                described.append(graph.LinearPart(base, part.rows, part.cols, part.block_size,
                                                  tuple(t.zero_point for t in part.terms), part.mins is not None))
                kept[part.qtype.name] = kept.get(part.qtype.name, 0) + part.rows * part.cols
            else:
                described.append(graph.LinearPart(base + (".weight" if table else ".weight_t"), *part.shape))
        linears[logical] = tuple(described)
        arrays[logical] = parts
    return _Plan(linears, arrays, kept)


def numeric_class_of(quantized_types: dict[str, int]) -> str:
    """``fp32-cpu``, or ``<type>-cpu`` after the GGUF type holding most of the kept parameters."""
    if not quantized_types:
        return "fp32-cpu"
    top = max(sorted(quantized_types), key=lambda k: quantized_types[k])
    return f"{top.lower()}-cpu"


def _weight_arrays(model: GGUFModel, spec: LlamaSpec, plan: _Plan):
    """Yield ``(initializer name, array)`` in :func:`graph.storage_plan` order, in graph layout."""
    def lin(logical: str):
        for described, data in zip(plan.linears[logical], plan.arrays[logical], strict=True):
            if isinstance(data, BlockQuantized):
                for j, term in enumerate(data.terms):
                    yield f"{described.name}.t{j}.qweight", term.packed
                    yield f"{described.name}.t{j}.scales", term.scales.reshape(-1)
                    if term.packed_zero_points is not None:
                        yield f"{described.name}.t{j}.zero_points", term.packed_zero_points
                if data.mins is not None:
                    yield described.name + ".mins", np.ascontiguousarray(data.mins.T)
            elif logical in ("model.embed_tokens", "lm_head"):
                yield described.name, data
            else:
                yield described.name, data.T

    yield from lin("model.embed_tokens")
    for i in range(spec.n_layers):
        blk, p = f"blk.{i}.", f"model.layers.{i}."
        yield p + "input_layernorm.weight", model.dequantize(blk + "attn_norm.weight")
        yield from lin(p + "self_attn.qkv_proj")
        yield from lin(p + "self_attn.o_proj")
        yield p + "post_attention_layernorm.weight", model.dequantize(blk + "ffn_norm.weight")
        yield from lin(p + "mlp.gate_up_proj")
        yield from lin(p + "mlp.down_proj")
    yield "model.norm.weight", model.dequantize("output_norm.weight")
    if not spec.tie_word_embeddings:
        yield from lin("lm_head")


_NP_DTYPES = {TensorProto.FLOAT: "<f4", TensorProto.UINT8: "u1"}


def spec_parameter_count(spec: LlamaSpec) -> int:
    """Number of float32 parameters an all-float32 import stores (tied embeddings counted once)."""
    return sum(int(np.prod(shape)) for _, shape in graph.weight_names(spec))


def _plan_bytes(spec: LlamaSpec, plan: _Plan) -> int:
    return sum(int(np.prod(shape)) * (4 if dtype == TensorProto.FLOAT else 1)
               for _, shape, dtype in graph.storage_plan(spec, plan.linears))


def _external_tensor(name: str, shape: tuple[int, ...], dtype: int, offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=dtype, dims=list(shape), data_location=TensorProto.EXTERNAL)
    for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _write_weights(model: GGUFModel, spec: LlamaSpec, plan: _Plan, data_path: Path | None,
                   progress: Progress | None) -> tuple[list[TensorProto], int]:
    """Write every weight into ``data_path`` (or inline, when it is None) and describe it."""
    expected = graph.storage_plan(spec, plan.linears)
    total = _plan_bytes(spec, plan)
    tensors: list[TensorProto] = []
    offset = written = 0
    with open(data_path, "wb") if data_path is not None else contextlib.nullcontext() as fh:
        for (want_name, want_shape, dtype), (name, array) in zip(expected, _weight_arrays(model, spec, plan),
                                                                 strict=True):
            if name != want_name or array.shape != want_shape:
                raise AssertionError(f"weight order mismatch: {name} {array.shape} vs {want_name} {want_shape}")
            if dtype == TensorProto.FLOAT and not np.isfinite(array).all():
                raise GGUFImportError(f"{model.path.name}: weight {name!r} contains NaN or infinite values")
            raw = np.ascontiguousarray(array, dtype=_NP_DTYPES[dtype]).tobytes()
            if fh is None:
                tensors.append(TensorProto(name=name, data_type=dtype, dims=list(want_shape), raw_data=raw))
            else:
                pad = -offset % ALIGNMENT
                if pad:
                    fh.write(b"\0" * pad)
                    offset += pad
                fh.write(raw)
                tensors.append(_external_tensor(name, want_shape, dtype, offset, len(raw)))
                offset += len(raw)
            written += len(raw)
            if progress is not None:
                progress(written, total)
    return tensors, written


def _json_text(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _config(spec: LlamaSpec, tok: TokenizerFiles) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.context_length, "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_theta": spec.rope_theta, "rope_type": "default"},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": spec.tie_word_embeddings, "torch_dtype": "float32", "use_cache": True,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
    }


def _tokenizer_config(spec: LlamaSpec, tok: TokenizerFiles) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "pad_token": tok.pad_token, "unk_token": tok.unk_token, "add_bos_token": tok.add_bos_token,
        "add_eos_token": False, "chat_template": tok.chat_template, "clean_up_tokenization_spaces": False,
        "model_max_length": spec.context_length,
    }


def _generation_config(tok: TokenizerFiles) -> dict:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def import_gguf(src: str | Path, out_dir: str | Path, *, progress: Progress | None = None,
                overwrite: bool = False, single_file: bool = False,
                weights: WeightMode | str = WeightMode.NATIVE, fused_attention: bool = True) -> ImportResult:
    """Convert the Llama-family GGUF ``src`` into the model folder ``out_dir``.

    Weights go to ``model.onnx.data`` beside ``model.onnx`` (ONNX external data), or, with
    ``single_file``, inline into ``model.onnx`` (only possible below protobuf's 2 GiB limit).
    ``weights``: :attr:`WeightMode.NATIVE` keeps block-quantized tensors quantized (the numeric class is
    then ``<type>-cpu``, e.g. ``q4_1-cpu``); :attr:`WeightMode.FP32` dequantizes everything (``fp32-cpu``).
    ``fused_attention`` (default) writes onnxruntime's GroupQueryAttention (faster decode; inputs must not be
    padded, as p2pinfer never pads); False writes the portable ``ai.onnx`` attention, which masks padding.

    ``out_dir`` must not exist (or must be empty) unless ``overwrite`` is true. Raises
    :class:`~p2pinfer.gguf.errors.GGUFImportError` (or a subclass naming what is unsupported).
    """
    started = time.perf_counter()
    mode = WeightMode(weights)
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise GGUFImportError(f"output folder {out_dir} already exists and is not empty; choose another "
                              f"output folder, or replace it (overwrite=True, --force on the command line)")
    model = GGUFModel(src)
    spec = read_llama_spec(model)
    tok = build_tokenizer(model)
    n_tokens = len(model.string_array("tokenizer.ggml.tokens"))
    if n_tokens > spec.vocab_size:
        raise GGUFImportError(f"{src.name}: the tokenizer has {n_tokens} tokens but the embedding only "
                              f"{spec.vocab_size} rows")
    sha = file_sha256(src)
    log.info("gguf.import.start", src=str(src), sha256=sha, layers=spec.n_layers, hidden=spec.hidden_size,
             vocab=spec.vocab_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing-", dir=out_dir.parent))
    try:
        if fused_attention and spec.context_length > MAX_FUSED_CONTEXT:
            raise GGUFImportError(f"{src.name}: context length {spec.context_length:,} is above the {MAX_FUSED_CONTEXT:,} "
                                  f"positions whose rotary tables the fused attention stores in model.onnx; "
                                  f"import with fused_attention=False")
        plan = _plan(model, spec, mode)
        numeric_class = numeric_class_of(plan.quantized_types)
        if single_file and _plan_bytes(spec, plan) > SINGLE_FILE_LIMIT:
            raise GGUFImportError(f"{src.name}: {_plan_bytes(spec, plan):,} bytes of weights do not fit in "
                                  f"one ONNX file (protobuf's 2 GiB limit); import without single_file")
        tensors, data_bytes = _write_weights(model, spec, plan, None if single_file else tmp / DATA_FILE, progress)
        metadata = {"p2pinfer.importer": IMPORTER_FORMAT, "p2pinfer.source_gguf_sha256": sha,
                    "p2pinfer.source_gguf_name": str(model.get("general.name", src.stem)),
                    NUMERIC_CLASS_KEY: numeric_class,
                    "p2pinfer.quantized_types": ",".join(sorted(plan.quantized_types)) or "none"}
        metadata["p2pinfer.attention"] = "fused" if fused_attention else "portable"
        proto = graph.build_model(spec, tensors, linears=plan.linears, metadata=metadata,
                                  fused_attention=fused_attention,
                                  doc_string=f"Imported from GGUF (sha256 {sha}) by {IMPORTER_FORMAT}")
        (tmp / MODEL_FILE).write_bytes(proto.SerializeToString())
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        (tmp / "tokenizer.json").write_text(tok.tokenizer_json, encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(_json_text(_tokenizer_config(spec, tok)), encoding="utf-8")
        (tmp / "config.json").write_text(_json_text(_config(spec, tok)), encoding="utf-8")
        (tmp / "generation_config.json").write_text(_json_text(_generation_config(tok)), encoding="utf-8")
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    log.info("gguf.import.done", out=str(out_dir), data_bytes=data_bytes, numeric_class=numeric_class,
             seconds=round(seconds, 2))
    return ImportResult(out_dir=out_dir, spec=spec, gguf_sha256=sha, data_bytes=data_bytes, seconds=seconds,
                        numeric_class=numeric_class)
