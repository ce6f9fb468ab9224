"""Loading an ONNX causal LM folder and running it on onnxruntime.

A model folder holds ``model.onnx`` (weights embedded, or in external data files such as ``model.onnx.data``),
``tokenizer.json``, ``config.json`` and optionally ``generation_config.json``, ``tokenizer_config.json`` and
``chat_template.jinja``. The graph must have Hugging Face Optimum's "decoder with past" I/O, matched by name:
inputs ``input_ids``, ``attention_mask``, optional ``position_ids``, ``past_key_values.N.key/.value``; outputs
``logits``, ``present.N.key/.value``. An optional input ``logits_to_keep`` (int64 ``[1]``, as the GGUF importer
writes it) lets :meth:`LoadedModel.forward` compute the LM head for the rows it returns only.

Execution providers: CUDA when onnxruntime offers it (the ``gpu`` extra on a machine with a GPU), else CPU.
Override with ``providers=[...]`` or the environment variable ``P2PINFER_ORT_PROVIDERS`` (comma-separated).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ..errors import P2PInferError
from ..log import get_logger
from .chat import encode_chat, render_chat, render_chat_spans
from .digest import ONNX_FILE, TOKENIZER_FILE, ModelFormatError, compute_digest
from .memory import drop_clean_file_pages, drop_library_pages, lazy_zeros, map_clean_file_pages_singly
from .prefix_kv import PrefixStore
from .tie_tolerance import TieTolerances

if TYPE_CHECKING:  # the kernels module is imported when a session is made (it loads onnx)
    from ..kernels import DecodePath

def _log():  # bound per call, so that log.configure() made later still applies
    return get_logger("p2pinfer.runtime.model")

LOGITS_TO_KEEP = "logits_to_keep"
DEFAULT_CONTEXT = 2048
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}
_LAYOUT_HINT = ("expected Hugging Face Optimum's decoder-with-past layout (input_ids, attention_mask, optional "
                "position_ids, past_key_values.N.key/.value -> logits, present.N.key/.value)")


class ModelLayoutError(ModelFormatError):
    """The ONNX graph's inputs or outputs are not the layout p2pinfer runs."""


class ModelNotCalibratedError(P2PInferError):
    """A tolerance was needed (to verify, or to check a possession proof) and the model has none measured.

    There is no default: a tolerance is only ever a calibration's measurement (docs/models.md, "Tolerance").
    """


def default_providers() -> list[str]:
    env = os.environ.get("P2PINFER_ORT_PROVIDERS")
    if env:
        return [p.strip() for p in env.split(",") if p.strip()]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def create_session(onnx_path: Path, *, providers: Sequence[str] | None = None, threads: int | None = None,
                   optimization: str = "all", kernel: bool = True, amx: bool = True,
                   decode: DecodePath | None = None) -> ort.InferenceSession:
    """An onnxruntime session. ``threads`` is the intra-op thread count (None: onnxruntime's default).

    On the CPU provider the 4-bit layers run the kernel of :mod:`p2pinfer.kernels` (one session for decode,
    prefill and verification, the weights read from the mapped file) when it is available and ``kernel`` is
    true (``amx=False``: its many-row path on float32 FMA even where the CPU has AMX tiles; ``decode``: its
    :class:`~p2pinfer.kernels.DecodePath`, None: from the environment); else, and for every other graph, the
    standard graph."""
    return open_session(onnx_path, providers=providers, threads=threads, optimization=optimization,
                        kernel=kernel, amx=amx, decode=decode)[0]


def open_session(onnx_path: Path, *, providers: Sequence[str] | None = None, threads: int | None = None,
                 optimization: str = "all", kernel: bool = True, amx: bool = True,
                 decode: DecodePath | None = None) -> tuple[ort.InferenceSession, DecodePath | None]:
    """:func:`create_session`, and the kernel's decode path where the session runs the kernel (else None)."""
    opts = ort.SessionOptions()
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}")
    chosen = list(providers) if providers is not None else default_providers()

    def weight_files():  # model.onnx and its external data files
        return (p for p in Path(onnx_path).parent.iterdir() if p.name.startswith(Path(onnx_path).name))

    if kernel and chosen[:1] == ["CPUExecutionProvider"]:
        from .. import kernels  # compiles the kernel on first use

        made = kernels.kernel_session(Path(onnx_path), threads=threads,
                                      graph_optimization_level=OPTIMIZATION_LEVELS[optimization], amx=amx,
                                      decode=decode)
        if made is not None:
            session, path = made
            # the kernel reads the 4-bit weights from the mapping on every run; what else session creation read
            # (the few pre-packed non-4-bit weights) is dropped as below and faults back in when used
            drop_clean_file_pages(weight_files())
            return session, path
    opts.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # No CPU arena: onnxruntime's arena keeps every region it ever grew to, so one 512-token verification
    # (LM-head buffers of 100 MB each) left a serving peer ~330 MB larger for good (docs/models.md, "Memory").
    # Without it the big buffers go straight back to the OS; decode and verify speed are unchanged (measured).
    opts.enable_cpu_mem_arena = False
    source: str | bytes = str(onnx_path)
    rewritten = _standard_graph(Path(onnx_path))
    if rewritten is not None:
        source = rewritten
        # the weights stay in the model folder: external data is resolved (mapped) there, not copied
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(Path(onnx_path).parent))
    try:
        session = ort.InferenceSession(source, sess_options=opts, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelFormatError(f"onnxruntime could not load {onnx_path}: {exc}") from None
    del source, rewritten  # the serialized graph is not needed once the session exists
    # pre-packing read every page of the mapped weights; the packed copies are what runs now, and the mapping
    # a Gather still reads (the embedding, tied to the head) needs a few KB a token, not all its pages: dropped,
    # and read a page at a time from now on (a read fault maps a whole large page-cache folio otherwise)
    map_clean_file_pages_singly(weight_files())
    return session, None


def _standard_graph(onnx_path: Path) -> bytes | None:
    """The graph of ``onnx_path`` as the standard session runs it, serialized, or None where it is the file's own
    (or cannot be read here: onnxruntime then loads the file and reports what is wrong). Two rewrites, in memory:
    the stored file, and so the model digest, is unchanged, and every value computed is the same (tests compare
    the rows bit for bit with a session of the file as stored).

    * ``logits_to_keep`` loses its default and becomes a plain input that every run feeds, as the kernel's graph
      has it (:func:`p2pinfer.kernels.kernel_model`). onnxruntime's I/O binding accepts graph inputs only, and an
      input with a default is an overridable initializer to it, fed by ``run()`` alone. As a plain input it
      binds, so the verifier's passes extend one in-place KV cache keeping only the rows they need
      (:class:`KVPasses`). The default selected every row, which ``forward`` and ``KVPasses`` ask for by feeding
      the row count.
    * ``logits`` is the LM head's ``Gemm`` output itself, ``[rows, vocab]``, where the graph had it reshaped to
      ``[1, rows, vocab]`` (the GGUF importer's float head: a Gemm over the flattened rows). A graph output is
      written into its own buffer: the Reshape copied the Gemm's buffer into it, so two buffers of logits existed
      at a verification pass's peak (12.6 MB each at 64 SmolLM2 rows, 25 MB at 128). The Gemm now writes the
      bound buffer. :attr:`GraphIO.logits_flat` tells the callers."""
    import onnx  # the graph structure only: external weights are not read

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:
        return None
    changed = _drop_logits_to_keep_default(model.graph)
    changed = _flatten_logits(model.graph) or changed
    return model.SerializeToString() if changed else None


def _drop_logits_to_keep_default(g) -> bool:
    if not any(i.name == LOGITS_TO_KEEP for i in g.input):
        return False
    kept = [t for t in g.initializer if t.name != LOGITS_TO_KEEP]
    if len(kept) == len(g.initializer):
        return False  # already a plain input
    del g.initializer[:]
    g.initializer.extend(kept)
    return True


def _flatten_logits(g) -> bool:
    """``Gemm -> Reshape -> logits`` (the Gemm's output read by the Reshape alone) becomes ``Gemm -> logits``
    ``[rows, vocab]``; the nodes that only computed the Reshape's shape go too."""
    import onnx

    producer = {o: n for n in g.node for o in n.output}
    reshape = producer.get("logits")
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain not in ("", "ai.onnx"):
        return False
    gemm = producer.get(reshape.input[0])
    readers = [n for n in g.node if gemm is not None and gemm.output[0] in n.input]
    if gemm is None or gemm.op_type != "Gemm" or gemm.domain not in ("", "ai.onnx") or readers != [reshape] \
            or any(o.name == gemm.output[0] for o in g.output):
        return False
    out = next(o for o in g.output if o.name == "logits")
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 3:
        return False
    vocab = onnx.TensorShapeProto.Dimension()
    vocab.CopyFrom(dims[2])
    gemm.output[0] = "logits"
    nodes = [n for n in g.node if n is not reshape]
    while True:  # drop what no longer feeds anything (the Reshape's shape computation)
        used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
        live = [n for n in nodes if any(o in used for o in n.output if o)]
        if len(live) == len(nodes):
            break
        nodes = live
    del g.node[:]
    g.node.extend(nodes)
    rows = onnx.TensorShapeProto.Dimension(dim_param="logits_rows")
    del dims[:]
    dims.extend([rows, vocab])
    return True


@dataclass(frozen=True)
class GraphIO:
    """What the graph's inputs and outputs say, by name."""

    num_layers: int
    has_position_ids: bool
    ids_dtype: Any
    kv_dtype: Any
    past_names: tuple[str, ...]  # past_key_values.0.key, .0.value, 1.key, ...
    present_names: tuple[str, ...]
    kv_heads: int | None
    head_dim: int | None
    has_logits_to_keep: bool = False
    logits_to_keep_required: bool = False  # a plain input (the kernel's graph), fed on every run; else a default
    logits_flat: bool = False  # logits [rows, vocab] (the standard session's rewrite: _flatten_logits), else [1, rows, vocab]


def inspect_graph(session: ort.InferenceSession, where: str = "model.onnx") -> GraphIO:
    inputs = {i.name: i for i in session.get_inputs()}
    overridable = {i.name for i in session.get_overridable_initializers()}
    outputs = {o.name: o for o in session.get_outputs()}
    for required in ("input_ids", "attention_mask"):
        if required not in inputs:
            raise ModelLayoutError(f"{where}: required input {required!r} is missing (inputs: "
                                   f"{', '.join(inputs)}); {_LAYOUT_HINT}")
    layers: dict[int, set[str]] = {}
    for name in inputs:
        if name in ("input_ids", "attention_mask", "position_ids", LOGITS_TO_KEEP):
            continue
        m = _PAST_RE.match(name)
        if not m:
            raise ModelLayoutError(f"{where}: unexpected input {name!r}; {_LAYOUT_HINT}")
        layers.setdefault(int(m.group(1)), set()).add(m.group(2))
    if not layers:
        raise ModelLayoutError(f"{where}: no past_key_values.N.key/.value inputs (a graph without KV cache "
                               f"cannot decode step by step); {_LAYOUT_HINT}")
    n = max(layers) + 1
    for i in range(n):
        for kind in ("key", "value"):
            if kind not in layers.get(i, ()):
                raise ModelLayoutError(f"{where}: required input 'past_key_values.{i}.{kind}' is missing; "
                                       f"{_LAYOUT_HINT}")
    past = tuple(f"past_key_values.{i}.{kind}" for i in range(n) for kind in ("key", "value"))
    present = tuple(p.replace("past_key_values.", "present.") for p in past)
    for name in ("logits", *present):
        if name not in outputs:
            raise ModelLayoutError(f"{where}: required output {name!r} is missing (outputs: "
                                   f"{', '.join(outputs)}); {_LAYOUT_HINT}")
    ids_type = inputs["input_ids"].type
    kv_type = inputs[past[0]].type
    if ids_type not in ("tensor(int64)", "tensor(int32)"):
        raise ModelLayoutError(f"{where}: input 'input_ids' has type {ids_type}, expected int64 or int32")
    if kv_type not in ("tensor(float)", "tensor(float16)"):
        raise ModelLayoutError(f"{where}: input {past[0]!r} has type {kv_type}, expected float32 or float16")
    shape = inputs[past[0]].shape
    kv_heads = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else None
    head_dim = shape[3] if len(shape) == 4 and isinstance(shape[3], int) else None
    keep = LOGITS_TO_KEEP in inputs or LOGITS_TO_KEEP in overridable
    return GraphIO(n, "position_ids" in inputs, _NP_TYPES[ids_type], _NP_TYPES[kv_type], past, present,
                   kv_heads, head_dim, keep, **session_binding(session))


def session_binding(session: ort.InferenceSession) -> dict[str, bool]:
    """The :class:`GraphIO` fields that differ between sessions of one model (the kernel's graph, the standard
    graph as rewritten at load: :func:`_standard_graph`): whether ``logits_to_keep`` is a plain input, and
    whether ``logits`` is ``[rows, vocab]``."""
    return {"logits_to_keep_required": any(i.name == LOGITS_TO_KEEP for i in session.get_inputs()),
            "logits_flat": len(next(o for o in session.get_outputs() if o.name == "logits").shape) == 2}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


@dataclass
class KVCache:
    """The past keys/values, in the graph's past_key_values order; ``length`` positions so far."""

    arrays: list[np.ndarray]
    length: int


def _in_place_kv_buffers(model: "LoadedModel", cache: KVCache,
                         capacity: int) -> tuple[list[np.ndarray], int, type] | None:
    """For :class:`KVDecoder` and :class:`KVPasses`: one buffer per key/value of ``capacity`` positions holding
    ``cache``, to bind as past and present, with the logits output's vocabulary size and numpy type; None where
    the session cannot update the cache in place (they fall back to ``forward``)."""
    if capacity > model.context_length:
        raise ValueError(f"capacity {capacity} exceeds the model's context length {model.context_length}")
    logits_out = next(o for o in model.session.get_outputs() if o.name == "logits")
    vocab = logits_out.shape[-1]
    if not model.shares_kv_buffer or capacity <= cache.length or not isinstance(vocab, int) \
            or logits_out.type not in _NP_TYPES:
        return None
    shape = cache.arrays[0].shape
    # in one anonymous mapping: resident memory grows with the positions written (np.zeros from glibc's heap
    # would clear, so map, every position at once)
    buffers = lazy_zeros([(shape[0], shape[1], capacity, shape[3])] * len(cache.arrays), cache.arrays[0].dtype)
    for buffer, past in zip(buffers, cache.arrays):
        buffer[:, :, :cache.length] = past
    return buffers, vocab, _NP_TYPES[logits_out.type]


class _InPlaceKV:
    """What :class:`KVDecoder` and :class:`KVPasses` share: the KV cache moved into buffers of ``capacity``
    positions (:func:`_in_place_kv_buffers`), each bound as both its past input and its present output of one
    I/O binding of the model's session, and the attention mask whose length tells GroupQueryAttention the total
    sequence length. Where the session cannot update the cache in place, ``_binding`` is None and
    :meth:`_forward` runs ``forward`` on the cache instead."""

    def __init__(self, model: "LoadedModel", cache: KVCache, capacity: int) -> None:
        shared = _in_place_kv_buffers(model, cache, capacity)
        self._model = model
        self.length = cache.length
        self._capacity = capacity
        self._cache: KVCache | None = cache
        self._binding = None
        if shared is None:
            return
        self._buffers, self._vocab, self._logits_dtype = shared
        self._mask = np.ones((1, capacity), dtype=np.int64)
        self._session = model.session
        binding = self._session.io_binding()
        for past, present, buffer in zip(model.io.past_names, model.io.present_names, self._buffers):
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self._binding = binding
        self._cache = None  # the buffers hold it now

    def keys_values(self, n: int) -> list[np.ndarray]:
        """Copies of the keys and values of the first ``n`` positions (``n <= length``), in the past inputs'
        order."""
        if not 0 <= n <= self.length:
            raise ValueError(f"{n} positions asked of a cache of {self.length}")
        if self._binding is None:
            assert self._cache is not None
            return [a[:, :, :n].copy() for a in self._cache.arrays]
        return [b[:, :, :n].copy() for b in self._buffers]

    def _forward(self, ids: Sequence[int], last: int | None = None) -> np.ndarray:
        """The fallback: ``forward`` over the cache, which it replaces with the grown copy."""
        assert self._cache is not None
        logits, self._cache = self._model.forward(ids, self._cache, last=last)
        self.length = self._cache.length
        return logits


class KVDecoder(_InPlaceKV):
    """Token-by-token decoding that keeps the KV cache in place.

    ``forward`` hands every past key/value to onnxruntime and gets a grown copy back on every step (for a
    135M model at 200 positions that is ~9 MB copied twice per token, plus 60 numpy <-> OrtValue
    conversions). When every ``present`` output is written by a ``GroupQueryAttention`` node from its
    ``past`` input (the GGUF importer's fused graph), this binds one preallocated buffer per key/value
    ``[1, kv_heads, capacity, head_dim]`` as both past input and present output: GroupQueryAttention then
    appends the new position in place (``past_present_share_buffer``), and the logits land in a reused
    buffer. Each step computes exactly what ``forward([token], cache)`` computes (the attention reads the
    same positions; tests compare the two). Other graphs, and non-CPU providers, fall back to ``forward``.
    The steps run the model's session, the same one ``forward`` runs: with the kernel (:mod:`p2pinfer.kernels`)
    a decode row takes the kernel's one-row path and ``forward`` over many rows its GEMM path (float32 rounding
    apart); without it each step is ``forward``'s, bit for bit.
    """

    def __init__(self, model: "LoadedModel", cache: KVCache, capacity: int) -> None:
        super().__init__(model, cache, capacity)
        if self._binding is None:
            return
        self._logits = np.zeros((1, self._vocab) if model.io.logits_flat else (1, 1, self._vocab),
                                dtype=self._logits_dtype)
        self._ids = np.zeros((1, 1), dtype=model.io.ids_dtype)
        self._positions = np.zeros((1, 1), dtype=np.int64)
        self._binding.bind_cpu_input("input_ids", self._ids)
        if model.io.has_position_ids:
            self._binding.bind_cpu_input("position_ids", self._positions)
        if model.io.logits_to_keep_required:  # the one row of a step (held: the binding reads this array)
            self._keep_one = np.ones(1, dtype=np.int64)
            self._binding.bind_cpu_input(LOGITS_TO_KEEP, self._keep_one)
        self._binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits))

    def step(self, token: int) -> np.ndarray:
        """Run one token; returns its float32 logits row (valid until the next step)."""
        if self._binding is None:
            return self._forward([token])[-1]
        if self.length >= self._capacity:
            raise ValueError(f"the KV buffer holds {self._capacity} positions; no room for another token")
        self._ids[0, 0] = token
        self._positions[0, 0] = self.length
        # the mask's length tells GroupQueryAttention the total sequence length (a contiguous view, no copy)
        self._binding.bind_cpu_input("attention_mask", self._mask[:, :self.length + 1])
        self._session.run_with_iobinding(self._binding)
        self.length += 1
        row = self._logits[0] if self._model.io.logits_flat else self._logits[0, 0]
        return np.asarray(row, dtype=np.float32)  # as forward() returns it (no copy for float32)


class KVPasses(_InPlaceKV):
    """Multi-token passes that extend the KV cache in place, the logits of a pass's last rows returned: a
    verifier's row-bounded passes over prompt and output (:func:`~p2pinfer.runtime.verify.verification_passes`).

    ``forward`` hands onnxruntime the whole past and gets a grown copy back: past, present and onnxruntime's
    output copy exist together, ~50 MB at 557 SmolLM2 positions and growing with the sequence, which was most of
    a row-bounded pass's transient memory. Where :class:`KVDecoder` shares the KV buffer (a GroupQueryAttention
    graph on CPU), this binds one buffer per key/value ``[1, kv_heads, capacity, head_dim]`` as past and present
    (GroupQueryAttention appends a pass of any length in place, from an empty cache too) and the logits land in a
    reused buffer of ``rows`` rows; where the graph has ``logits_to_keep`` it is bound on every pass, so that a
    pass of more tokens than ``rows`` (a prompt chunk) computes the LM head for the rows it keeps only. Each pass
    computes what ``forward(ids, cache, last=keep)`` computes (tests compare them bit for bit). Other graphs fall
    back to ``forward``. Runs :attr:`LoadedModel.session` (the graph prefill uses)."""

    def __init__(self, model: "LoadedModel", cache: KVCache, capacity: int, rows: int) -> None:
        super().__init__(model, cache, capacity)
        self._rows = rows
        if self._binding is not None:
            shape = (min(rows, capacity), self._vocab)
            self._logits = np.zeros(shape if model.io.logits_flat else (1, *shape), dtype=self._logits_dtype)
        # logits_to_keep as an input that I/O binding accepts (an overridable initializer is fed by run() only)
        self._keep = np.zeros(1, dtype=np.int64) if self._binding is not None and model.io.logits_to_keep_required \
            else None

    @property
    def keeps_rows(self) -> bool:
        """Whether a pass can keep fewer rows than it runs in place (``run(ids, keep=...)``)."""
        return self._keep is not None

    def run(self, ids: Sequence[int], keep: int | None = None) -> np.ndarray:
        """Run ``ids`` after the cache; float32 logits of the last ``keep`` of them (default: all, at most
        ``rows``) ``[keep, vocab]``, valid until the next run. More tokens than ``rows`` only where the graph has
        ``logits_to_keep`` (the LM head runs for the kept rows only)."""
        n = len(ids)
        keep = n if keep is None else keep
        if self._binding is None:
            return self._forward(ids, last=keep)
        if not 1 <= keep <= min(n, self._rows) or self.length + n > self._capacity \
                or (keep < n and self._keep is None):
            raise ValueError(f"a pass keeps 1..{self._rows} rows of its tokens within {self._capacity} positions "
                             f"(more tokens than kept rows only with logits_to_keep); got {keep} of {n} after "
                             f"{self.length}")
        self._binding.bind_cpu_input("input_ids", np.asarray([ids], dtype=self._model.io.ids_dtype))
        if self._model.io.has_position_ids:
            self._binding.bind_cpu_input("position_ids", np.arange(self.length, self.length + n, dtype=np.int64)[None])
        self._binding.bind_cpu_input("attention_mask", self._mask[:, :self.length + n])  # its length: the total
        if self._keep is not None:  # bound on every pass (a binding stays): keep == n computes every row's head
            self._keep[0] = keep
            self._binding.bind_cpu_input(LOGITS_TO_KEEP, self._keep)
        flat = self._model.io.logits_flat
        logits = self._logits[:keep] if flat else self._logits[:, :keep]  # the first keep rows: contiguous
        self._binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self._session.run_with_iobinding(self._binding)
        self.length += n
        return np.asarray(logits if flat else logits[0], dtype=np.float32)  # as forward() returns it (no copy for float32)


@dataclass
class ModelInfo:
    """Static facts read from the folder's JSON files and tokenizer."""

    config: dict[str, Any]
    generation_config: dict[str, Any]
    tokenizer_config: dict[str, Any]
    chat_template: str | None
    bos_token: str
    eos_token: str
    eos_token_ids: tuple[int, ...]
    context_length: int
    vocab_size: int | None


def read_model_info(model_dir: Path, tokenizer: Tokenizer) -> ModelInfo:
    config = _read_json(model_dir / "config.json")
    gen = _read_json(model_dir / "generation_config.json")
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    template_file = model_dir / "chat_template.jinja"
    template: str | None = None
    if template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    elif isinstance(tok_cfg.get("chat_template"), str):
        template = tok_cfg["chat_template"]
    bos = _token_text(tok_cfg.get("bos_token")) or ""
    eos = _token_text(tok_cfg.get("eos_token")) or ""
    eos_ids = _as_ids(gen.get("eos_token_id")) or _as_ids(config.get("eos_token_id"))
    if not eos_ids and eos and tokenizer.token_to_id(eos) is not None:
        eos_ids = [tokenizer.token_to_id(eos)]
    if not eos and eos_ids:
        eos = tokenizer.id_to_token(eos_ids[0]) or ""
    bos_ids = _as_ids(gen.get("bos_token_id")) or _as_ids(config.get("bos_token_id"))
    if not bos and bos_ids:
        bos = tokenizer.id_to_token(bos_ids[0]) or ""
    ctx = next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx")
                if isinstance(config.get(k), int)), DEFAULT_CONTEXT)
    vocab = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None
    return ModelInfo(config, gen, tok_cfg, template, bos, eos, tuple(dict.fromkeys(eos_ids)), int(ctx), vocab)


@dataclass
class LoadedModel:
    """A model ready to run: session, tokenizer, configuration and its identity."""

    path: Path
    digest: bytes
    name: str
    numeric_class: str
    tolerance: float | None  # measured by calibration (runtime/calibrate.py); None until then
    session: ort.InferenceSession
    io: GraphIO
    tokenizer: Tokenizer
    info: ModelInfo
    session_options: dict[str, Any] = field(default_factory=dict)
    #: the calibration's near-tie detector widths per path (runtime/tie_tolerance.py), None until calibrated
    tie_tolerances: TieTolerances | None = None
    #: the keys and values of a recent prompt's start, for the next verification that starts alike (prefix_kv);
    #: every LoadedModel (so every session: the bits are the session's) has its own
    prefix_kv: PrefixStore = field(default_factory=PrefixStore, init=False, repr=False, compare=False)

    @property
    def digest_hex(self) -> str:
        return self.digest.hex()

    def measured_tolerance(self) -> float:
        """The calibrated tolerance; :class:`ModelNotCalibratedError` when it was never measured."""
        if self.tolerance is None:
            raise ModelNotCalibratedError(
                f"model {self.name} ({self.digest_hex[:12]}) has no measured tolerance; calibrate it first: "
                f"`p2pinfer models calibrate {self.digest_hex[:12]}`, or p2pinfer.runtime.ensure_tolerance(model)")
        return self.tolerance

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.info.eos_token_ids

    @property
    def context_length(self) -> int:
        return self.info.context_length

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def runtime_numeric_class(self) -> str:
        """The numeric class this session actually computes in (e.g. fp32-cpu, fp32-cuda, q4_1-cpu)."""
        declared = self.session.get_modelmeta().custom_metadata_map.get("p2pinfer.numeric_class", "")
        if declared and not declared.startswith("fp"):  # quantized weights: <type>-<device>
            device = "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"
            return f"{declared.rsplit('-', 1)[0]}-{device}"
        dtype = "fp16" if self.io.kv_dtype == np.float16 else "fp32"
        device = "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"
        return f"{dtype}-{device}"

    @property
    def runs_kernel(self) -> bool:
        """Whether the session runs the 4-bit kernel of :mod:`p2pinfer.kernels` (else the standard graph)."""
        return self.session_options.get("kernel") is not None

    def drop_weight_pages(self) -> int:
        """Unmap the pages of this model's weight files that a request faulted into the process (returns the bytes
        unmapped; they stay in the page cache). On the standard graph only the embedding's ``Gather`` reads the
        mapping (the other weights run from onnxruntime's packed copies): every token a request read or wrote
        maps its row's page (and cached neighbours within the kernel's fault-around window), held until the
        process ends; ``open_session`` made the mapping read a page at a time (before, a token mapped its whole
        page-cache folio, up to 2 MB: 40-60 MB of an fp32 model after a 512-token request). The kernel reads its
        4-bit weights from the
        mapping on every run, so those stay (they are the model files, and unmapping them would only make the
        next run fault them in again)."""
        if self.runs_kernel:
            return 0
        return drop_clean_file_pages(p for p in Path(self.path).iterdir() if p.name.startswith(ONNX_FILE))

    @property
    def decode_path(self) -> DecodePath | None:
        """The kernel's :class:`~p2pinfer.kernels.DecodePath` for decode rows, None without the kernel."""
        return self.session_options.get("kernel")

    @property
    def runs_amx(self) -> bool:
        """Whether the kernel's many-row path runs on AMX tiles in this session (else float32 FMA)."""
        return bool(self.session_options.get("amx"))

    @cached_property
    def shares_kv_buffer(self) -> bool:
        """True when the session can update the KV cache in place (see :class:`KVDecoder`)."""
        if self.providers[:1] != ["CPUExecutionProvider"]:
            return False
        return graph_shares_kv_buffer(self.path / ONNX_FILE, self.io)

    # ---- running the graph --------------------------------------------------------------------------

    def empty_cache(self) -> KVCache:
        kv_heads = self.io.kv_heads or _config_kv_heads(self.info.config)
        head_dim = self.io.head_dim or _config_head_dim(self.info.config)
        arrays = [np.zeros((1, kv_heads, 0, head_dim), dtype=self.io.kv_dtype) for _ in self.io.past_names]
        return KVCache(arrays, 0)

    def forward(self, ids: Sequence[int], cache: KVCache, *, last: int | None = None) -> tuple[np.ndarray, KVCache]:
        """Run ``ids`` after ``cache``; returns float32 logits ``[len(ids), vocab]`` and the extended cache.

        ``last``: return (and, when the graph has ``logits_to_keep``, compute) the last ``last`` rows only —
        a prefill needs one row, a verifier the rows of the output tokens, not the prompt's.
        """
        s = len(ids)
        if s == 0:
            raise ValueError("forward needs at least one token")
        keep = s if last is None else min(s, last)
        if keep < 1:
            raise ValueError("forward must return at least one row")
        past = cache.length
        if past + s > self.context_length:
            raise ValueError(f"{past + s} positions exceed the model's context length {self.context_length}")
        feed: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], dtype=self.io.ids_dtype),
            "attention_mask": np.ones((1, past + s), dtype=np.int64),
        }
        if self.io.has_position_ids:
            feed["position_ids"] = np.arange(past, past + s, dtype=np.int64)[None]
        if self.io.has_logits_to_keep and (keep < s or self.io.logits_to_keep_required):
            feed[LOGITS_TO_KEEP] = np.array([keep], dtype=np.int64)
        feed.update(zip(self.io.past_names, cache.arrays))
        out = self.session.run(["logits", *self.io.present_names], feed)
        logits = np.asarray((out[0] if self.io.logits_flat else out[0][0])[-keep:], dtype=np.float32)
        return logits, KVCache(list(out[1:]), past + s)

    def passes(self, cache: KVCache, capacity: int, rows: int) -> KVPasses:
        """A :class:`KVPasses` continuing ``cache``: passes of up to ``rows`` tokens, ``capacity`` positions."""
        return KVPasses(self, cache, capacity, rows)

    def decoder(self, cache: KVCache, capacity: int) -> KVDecoder:
        """A :class:`KVDecoder` continuing ``cache``, with room for ``capacity`` positions in all."""
        return KVDecoder(self, cache, capacity)

    # ---- text ------------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        return render_chat(self.info.chat_template, messages, bos_token=self.info.bos_token,
                           eos_token=self.info.eos_token, add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, prompt: str | None = None,
                   messages: Sequence[Mapping[str, str]] | None = None) -> list[int]:
        """The token IDs for a plain prompt (tokenizer's own special tokens) or chat messages (template; the
        messages' content is plain text: control-token strings in it are not control tokens)."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if messages is not None:
            rendered = render_chat_spans(self.info.chat_template, messages, bos_token=self.info.bos_token,
                                         eos_token=self.info.eos_token, add_generation_prompt=True)
            return encode_chat(self.tokenizer, self.plain_tokenizer, rendered)
        return self.encode(prompt or "", add_special_tokens=True)

    @cached_property
    def plain_tokenizer(self) -> Tokenizer:
        """The tokenizer reading control-token strings as plain text (for user content)."""
        plain = Tokenizer.from_str(self.tokenizer.to_str())
        plain.encode_special_tokens = True
        return plain

    def with_session(self, *, threads: int | None = None, optimization: str = "all",
                     providers: Sequence[str] | None = None, kernel: bool = True, amx: bool = True,
                     decode: DecodePath | None = None) -> "LoadedModel":
        """The same model with a new session (other threads / optimization level / providers; ``kernel=False``:
        the standard graph even where the kernel is available; ``amx=False``: the kernel's many-row path on
        float32 FMA even where the CPU has AMX tiles; ``decode``: the kernel's decode path)."""
        session, used = open_session(self.path / ONNX_FILE, providers=providers, threads=threads,
                                     optimization=optimization, kernel=kernel, amx=amx, decode=decode)
        io = replace(self.io, **session_binding(session))  # as this session's graph has them
        return LoadedModel(self.path, self.digest, self.name, self.numeric_class, self.tolerance, session,
                           io, self.tokenizer, self.info,
                           {"threads": threads, "optimization": optimization, "providers": providers, "kernel": used,
                            "amx": _runs_amx(used, amx)}, self.tie_tolerances)


def graph_shares_kv_buffer(onnx_path: Path, io: GraphIO) -> bool:
    """Whether every ``present.N.key/.value`` is an output of a GroupQueryAttention node that reads
    ``past_key_values.N.key/.value`` and nothing else reads the past: then past and present can be one buffer."""
    import onnx  # only the graph structure is read, not the weights

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception:  # unreadable here means: do not share, forward() still works
        return False
    pasts = set(io.past_names)
    writers: dict[str, tuple[str, str]] = {}
    for node in graph.node:
        readers = [name for name in node.input if name in pasts]
        if not readers:
            continue
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.input) < 5 \
                or len(node.output) < 3 or list(node.input[3:5]) != readers:
            return False
        writers[node.output[1]], writers[node.output[2]] = (node.input[3], "key"), (node.input[4], "value")
    for past, present in zip(io.past_names, io.present_names):
        if writers.get(present, (None,))[0] != past:
            return False
    return True


def _config_kv_heads(config: Mapping[str, Any]) -> int:
    for key in ("num_key_value_heads", "num_attention_heads", "n_head"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ModelFormatError("cannot tell the number of KV heads: the graph's past shapes are symbolic and "
                           "config.json has no num_key_value_heads")


def _config_head_dim(config: Mapping[str, Any]) -> int:
    if isinstance(config.get("head_dim"), int):
        return int(config["head_dim"])
    hidden = config.get("hidden_size", config.get("n_embd"))
    heads = config.get("num_attention_heads", config.get("n_head"))
    if isinstance(hidden, int) and isinstance(heads, int) and heads:
        return hidden // heads
    raise ModelFormatError("cannot tell the head dimension: the graph's past shapes are symbolic and "
                           "config.json has no head_dim")


def _runs_amx(kernel_used: DecodePath | None, amx: bool) -> bool:
    """Whether a kernel session opened with ``amx`` runs its many-row path on AMX tiles."""
    if kernel_used is None or not amx:
        return False
    from .. import kernels

    return kernels.amx_wanted() and kernels.amx_available()


def load_model(model_dir: Path, *, digest: bytes | None = None, name: str | None = None,
               numeric_class: str = "fp32-cpu", tolerance: float | None = None,
               providers: Sequence[str] | None = None, threads: int | None = None,
               optimization: str = "all", kernel: bool = True, amx: bool = True,
               decode: DecodePath | None = None) -> LoadedModel:
    """Load a model folder. ``digest`` is computed when not given (the store passes its verified one).

    ``tolerance`` is the model's calibrated one (the store passes it); without it the model can run but not
    verify until :func:`~p2pinfer.runtime.calibrate.ensure_tolerance` measures one."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFormatError(f"{model_dir} is not a directory")
    for required in (ONNX_FILE, TOKENIZER_FILE):
        if not (model_dir / required).is_file():
            raise ModelFormatError(f"{model_dir} has no {required}; a model folder needs model.onnx, "
                                   f"tokenizer.json and config.json")
    try:
        tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    except Exception as exc:
        raise ModelFormatError(f"{model_dir}/tokenizer.json does not load: {exc}") from None
    info = read_model_info(model_dir, tokenizer)
    if digest is None:  # before the session: its read() fills the page cache with the large folios open_session evicts
        digest = compute_digest(model_dir)
    # and before the session, too: creating an fp32 session holds every mapped weight page beside its pre-packed
    # copies, the process's peak; the library pages imports touched (~40 MB) need not add to it (fp32 SmolLM2:
    # peak files + 301 -> 260 MB, docs/models.md "Serving memory")
    drop_library_pages()
    session, used = open_session(model_dir / ONNX_FILE, providers=providers, threads=threads,
                                 optimization=optimization, kernel=kernel, amx=amx, decode=decode)
    io = inspect_graph(session, str(model_dir / ONNX_FILE))
    model = LoadedModel(model_dir, digest, name or model_dir.name, numeric_class, tolerance, session, io,
                        tokenizer, info, {"threads": threads, "optimization": optimization, "providers": providers,
                                          "kernel": used, "amx": _runs_amx(used, amx)})
    # a serving process loads its model once, after its imports: the library pages that only imports and session
    # creation read (~55-65 MB on SmolLM2's peer) go; what serving runs faults back in (docs/models.md, "Serving memory")
    drop_library_pages()
    _log().info("model.loaded", name=model.name, digest=digest.hex()[:16], layers=io.num_layers,
             position_ids=io.has_position_ids, providers=",".join(model.providers),
             kernel=used.value if used is not None else "off", amx=model.runs_amx)
    return model
