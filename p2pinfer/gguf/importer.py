"""Import a Llama-family GGUF file into a model folder the runtime can load.

The folder holds:

* ``model.onnx`` — the decoder-with-past graph (:mod:`.graph`), weights as external data in
* ``model.onnx.data`` — every weight as float32, in :func:`graph.weight_names` order, each tensor starting
  at a multiple of 4096 bytes (zero padding), so the layout is a pure function of the GGUF;
* ``tokenizer.json``, ``tokenizer_config.json`` (with ``chat_template``), ``config.json`` (Hugging Face
  LlamaConfig fields) and ``generation_config.json``.

Every file is a deterministic function of the GGUF's bytes (no timestamps, fixed names, sorted JSON), so
peers that import the same GGUF independently get byte-identical folders and thus the same model digest.
The folder is written under a temporary name next to the destination and renamed at the end: a failed
import leaves nothing behind.
"""

from __future__ import annotations

import contextlib
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
from . import graph
from .errors import GGUFImportError
from .reader import GGUFModel, LlamaSpec, read_llama_spec, unpermute_qk
from .tokenizer import TokenizerFiles, build_tokenizer

log = get_logger("p2pinfer.gguf")

#: Bump when the produced files change for the same GGUF input (the model digest changes with it).
IMPORTER_FORMAT = "p2pinfer-gguf-import/1"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ALIGNMENT = 4096
#: Protobuf cannot serialize messages of 2 GiB or more; leave room for the graph itself.
SINGLE_FILE_LIMIT = 2_000_000_000

#: ``progress(done_bytes, total_bytes)``, called as weight data is written.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImportResult:
    out_dir: Path
    spec: LlamaSpec
    gguf_sha256: str
    data_bytes: int
    seconds: float


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _weight_arrays(model: GGUFModel, spec: LlamaSpec):
    """Yield ``(name, float32 array)`` in :func:`graph.weight_names` order, already in graph layout."""
    scale = np.float32(1.0 / np.sqrt(spec.head_dim))
    yield "model.embed_tokens.weight", model.dequantize("token_embd.weight")
    for i in range(spec.n_layers):
        blk, p = f"blk.{i}.", f"model.layers.{i}."
        yield p + "input_layernorm.weight", model.dequantize(blk + "attn_norm.weight")
        q = unpermute_qk(model.dequantize(blk + "attn_q.weight"), spec.n_heads) * scale
        k = unpermute_qk(model.dequantize(blk + "attn_k.weight"), spec.n_kv_heads)
        v = model.dequantize(blk + "attn_v.weight")
        yield p + "self_attn.qkv_proj.weight_t", np.concatenate([q, k, v], axis=0).T
        yield p + "self_attn.o_proj.weight_t", model.dequantize(blk + "attn_output.weight").T
        yield p + "post_attention_layernorm.weight", model.dequantize(blk + "ffn_norm.weight")
        gate_up = np.concatenate([model.dequantize(blk + "ffn_gate.weight"),
                                  model.dequantize(blk + "ffn_up.weight")], axis=0)
        yield p + "mlp.gate_up_proj.weight_t", gate_up.T
        yield p + "mlp.down_proj.weight_t", model.dequantize(blk + "ffn_down.weight").T
    yield "model.norm.weight", model.dequantize("output_norm.weight")
    if not spec.tie_word_embeddings:
        yield "lm_head.weight", model.dequantize("output.weight")


def spec_parameter_count(spec: LlamaSpec) -> int:
    """Number of float32 parameters the imported graph stores (tied embeddings counted once)."""
    return sum(int(np.prod(shape)) for _, shape in graph.weight_names(spec))


def _external_tensor(name: str, shape: tuple[int, ...], offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape),
                    data_location=TensorProto.EXTERNAL)
    for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _write_weights(model: GGUFModel, spec: LlamaSpec, data_path: Path | None,
                   progress: Progress | None) -> tuple[list[TensorProto], int]:
    """Dequantize every weight into ``data_path`` (or inline, when it is None) and describe it."""
    expected = graph.weight_names(spec)
    total = sum(4 * int(np.prod(shape)) for _, shape in expected)
    tensors: list[TensorProto] = []
    offset = written = 0
    with open(data_path, "wb") if data_path is not None else contextlib.nullcontext() as fh:
        for (want_name, want_shape), (name, array) in zip(expected, _weight_arrays(model, spec), strict=True):
            if name != want_name or array.shape != want_shape:
                raise AssertionError(f"weight order mismatch: {name} {array.shape} vs {want_name} {want_shape}")
            if not np.isfinite(array).all():
                raise GGUFImportError(f"{model.path.name}: weight {name!r} contains NaN or infinite values")
            raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
            if fh is None:
                tensors.append(TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(want_shape),
                                           raw_data=raw))
            else:
                pad = -offset % ALIGNMENT
                if pad:
                    fh.write(b"\0" * pad)
                    offset += pad
                fh.write(raw)
                tensors.append(_external_tensor(name, want_shape, offset, len(raw)))
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
                overwrite: bool = False, single_file: bool = False) -> ImportResult:
    """Convert the Llama-family GGUF ``src`` into the model folder ``out_dir``.

    Weights go to ``model.onnx.data`` beside ``model.onnx`` (ONNX external data), or, with
    ``single_file``, inline into ``model.onnx`` (only possible below protobuf's 2 GiB limit).

    ``out_dir`` must not exist (or must be empty) unless ``overwrite`` is true. Raises
    :class:`~p2pinfer.gguf.errors.GGUFImportError` (or a subclass naming what is unsupported).
    """
    started = time.perf_counter()
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
        if single_file and 4 * spec_parameter_count(spec) > SINGLE_FILE_LIMIT:
            raise GGUFImportError(f"{src.name}: {spec_parameter_count(spec):,} float32 parameters do not fit in "
                                  f"one ONNX file (protobuf's 2 GiB limit); import without single_file")
        weights, data_bytes = _write_weights(model, spec, None if single_file else tmp / DATA_FILE, progress)
        metadata = {"p2pinfer.importer": IMPORTER_FORMAT, "p2pinfer.source_gguf_sha256": sha,
                    "p2pinfer.source_gguf_name": str(model.get("general.name", src.stem))}
        proto = graph.build_model(spec, weights, metadata=metadata,
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
    log.info("gguf.import.done", out=str(out_dir), data_bytes=data_bytes, seconds=round(seconds, 2))
    return ImportResult(out_dir=out_dir, spec=spec, gguf_sha256=sha, data_bytes=data_bytes, seconds=seconds)
