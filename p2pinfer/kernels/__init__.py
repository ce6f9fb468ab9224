"""The 4-bit kernel: a 4-bit x float32 matmul (``qmatmul.c``) as an onnxruntime custom op, built on first use.

onnxruntime 1.32's ``MatMulNBits`` hardly uses a second thread for ONE activation row at small shapes, a Q4_1
layer costs the standard graph five nodes (the 4-bit term, block sums, minimums, Sum), and its session keeps a
pre-packed anonymous copy of every 4-bit weight. :func:`kernel_model` rewrites each such group into one
``p2pinfer`` custom node that reads the SAME initializers (the model files and digest are unchanged) straight
from onnxruntime's mapping of the weights file: decode rows split the output rows over the kernel's own
threads; many rows (prefill, verification) run a cache-blocked GEMM over dequantized float32 panels, or, where
the CPU has AMX tiles (``qgemm_amx.c``), the same product on bfloat16 tiles with every float32 value split
exactly into two or three bfloat16 limbs (float32-grade results). One session then serves decode, prefill and
verification, and the 4-bit weights are resident once, as file pages.

Numerics: float32 activations and accumulation (never int8; the integer decode path below rounds each
activation block to 22-23 bits, float32's own resolution at the block's largest value), the same weight values
as ``MatMulNBits`` (``(q - zp) * scale`` plus ``min * block sum``), summed in another order: float32 rounding
drift, the same numeric class. Each output element is computed by one instruction sequence whatever the thread count
(row-deterministic within the decode path and within the many-row path).

The library is compiled with the system C compiler (``$CC``, else ``gcc``, else ``cc``; ``-O3 -march=native``,
or ``-march=$P2PINFER_KERNEL_MARCH``, e.g. ``x86-64-v3`` to build for an older CPU) into
``$P2PINFER_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/p2pinfer/kernels``), keyed by the source, the compiler, the
CPU and ``-march``. It is on by default; ``P2PINFER_DECODE_KERNEL=0`` turns it off. Without it or without a
compiler the model runs the standard graph (logged once as ``kernel.unavailable``).

Decode rows on a CPU with AVX-512 VNNI, or AVX2 + FMA + F16C (x86-64-v3; ``qdecode_avx2.c``: ``vpmaddubsw``, or
AVX-VNNI's 256-bit ``vpdpbusd`` where built with it, the same algorithm and the same rows bit for bit), take the
integer path (:attr:`DecodePath.INTEGER`): the activation is
rounded per 32-element block to a 22-23-bit fixed-point integer (the only rounding beyond float32's, at most
2^-22 of the block's largest value), split into three signed bytes, and multiplied by the 4-bit codes with
``vpdpbusd``, exactly; scales and minimums then apply in float32, read from float16 copies (the same values:
GGUF stores them as float16; a matrix whose values are not all float16 keeps float32). Other CPUs, and
``P2PINFER_DECODE_KERNEL=float``, take the float32 one-row path (:attr:`DecodePath.FLOAT`). Both are honest
executors of the same numeric class; calibration measures both. The ``kernel.session`` log line says which
(``decode=``, and ``isa=`` from :func:`library_isa`).

On CPUs with AMX tiles the many-row path runs on bfloat16 tiles (``qgemm_amx.c``); ``P2PINFER_AMX=0``
keeps it on float32 FMA even where AMX is available (the path of a peer without AMX).

Attention (``qattn.c``, :func:`kernel_attention`): in a graph the kernel applies to, each com.microsoft
``GroupQueryAttention`` node of the importer's form becomes the library's ``GQAttention`` (same inputs, outputs
and semantics): each query row against the keys before it only (onnxruntime's CPU node multiplies by every key of
the pass), on the kernel's threads, float32, every row computed by the same instruction sequence whatever the pass
(a decode step's row equals the same position's row of a many-row pass, bit for bit). ``P2PINFER_KERNEL_ATTENTION=0``
keeps onnxruntime's node. The ``kernel.session`` log line counts the rewritten attention nodes (``attention=``).

The same library has a ``SwiGLU`` op (``swiglu.c``): each MLP activation after a kernel node (onnxruntime's
Split, QuickGelu and Mul) becomes one node (:func:`_fuse_swiglu`) that computes onnxruntime's own bits (its
sigmoid's rational approximation, clamps and operation order, as onnxruntime runs them at the session's
optimization level on this CPU): the kernel session's rows do not change.

The near-tie reference's float64 kernels (``ref64.c``: products, attention, normalization, activation; used by
``runtime/reference.py`` through :mod:`.ref64`) are a library of their own, compiled and cached the same way
(:func:`ref64_library_path`); ``P2PINFER_REF64_KERNEL=0`` keeps the reference on numpy.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import log
from .patterns import replace_nodes, silu_gates

SOURCE = Path(__file__).with_name("qmatmul.c")
AMX_SOURCE = Path(__file__).with_name("qgemm_amx.c")  # #included by SOURCE
AVX2_SOURCE = Path(__file__).with_name("qdecode_avx2.c")  # #included by SOURCE
ATTENTION_SOURCE = Path(__file__).with_name("qattn.c")  # #included by SOURCE
SWIGLU_SOURCE = Path(__file__).with_name("swiglu.c")  # #included by SOURCE
ROWSTATS_SOURCE = Path(__file__).with_name("rowstats.c")  # #included by SOURCE
PHILOX_SOURCE = Path(__file__).with_name("philox.c")  # #included by SOURCE
EXP64_HEADER = Path(__file__).with_name("exp64.h")  # #included by rowstats.c and ref64.c
_SOURCES = (SOURCE, AMX_SOURCE, AVX2_SOURCE, ATTENTION_SOURCE, SWIGLU_SOURCE, ROWSTATS_SOURCE, PHILOX_SOURCE,
            EXP64_HEADER)
#: the float64 products of the near-tie reference (runtime/reference.py): a library of its own, loaded with ctypes
REF64_SOURCE = Path(__file__).with_name("ref64.c")
DOMAIN = "p2pinfer"
_CONTRIB = "com.microsoft"
_lock = threading.Lock()
_built: dict[tuple[str, str, str], Path | None] = {}  # (compiler, -march, library stem) -> library
_reported: set[str] = set()
_held: list = []  # the loaded library, never unloaded (see _build)
_handles: dict[Path, ctypes.CDLL] = {}  # library path -> its handle in _held


class DecodePath(Enum):
    """How the kernel computes a decode row (one activation row)."""

    INTEGER = "integer"  # integer dot products (AVX-512 VNNI, AVX-VNNI, AVX2) where the library has them, else FLOAT
    FLOAT = "float"      # float32 products and sums


def decode_path_from_env() -> DecodePath:
    """``P2PINFER_DECODE_KERNEL=float`` asks for the float32 one-row path; anything else the integer one."""
    return DecodePath.FLOAT if os.environ.get("P2PINFER_DECODE_KERNEL", "1").strip().lower() == "float" \
        else DecodePath.INTEGER


def library_has_integer_path(lib: Path) -> bool:
    """Whether the compiled library has the integer decode path (built for a CPU with AVX-512 VNNI, or with
    AVX2 + FMA + F16C: ``qdecode_avx2.c``, the same rows bit for bit)."""
    return _library_flag(lib, "p2pinfer_qmatmul_int_dot")


def library_isa(lib: Path) -> str:
    """The instruction set the library's one-row path was built for: ``avx512-vnni``, ``avx-vnni`` or ``avx2``
    (integer decode path; ``avx2`` also on AVX-512 without VNNI), ``avx2-float`` (AVX2 without F16C) or
    ``portable`` (float32 only); ``unknown`` where it cannot say."""
    try:
        probe = ctypes.CDLL(str(lib)).p2pinfer_qmatmul_isa
    except (OSError, AttributeError):
        return "unknown"
    probe.restype = ctypes.c_char_p
    return (probe() or b"unknown").decode("ascii", "replace")


def _library_flag(lib: Path, symbol: str) -> bool:
    """The answer of one of the library's ``int f(void)`` probes; False where it cannot load or lacks it."""
    try:
        probe = getattr(ctypes.CDLL(str(lib)), symbol)  # already loaded: dlopen hands back the same handle
    except (OSError, AttributeError):
        return False
    probe.restype = ctypes.c_int
    return bool(probe())


def _log():
    return log.get_logger("p2pinfer.kernels")


def cache_dir() -> Path:
    env = os.environ.get("P2PINFER_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "p2pinfer" / "kernels"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(lines))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def library_path() -> Path | None:
    """The compiled custom-op library, building it on first use; None (reason logged once) when unavailable."""
    return _library_path("P2PINFER_DECODE_KERNEL", "qmatmul", _SOURCES, _unavailable, hold=True,
                         disabled="P2PINFER_DECODE_KERNEL=0: the standard graph runs",
                         no_compiler="no C compiler found; install gcc (or set CC) for faster decoding")


def library() -> ctypes.CDLL | None:
    """The kernel library as loaded in this process (built on first use), for its plain C functions
    (``rowstats.c``: :mod:`p2pinfer.runtime.row_stats`; ``philox.c``: :mod:`p2pinfer.runtime.philox`); None where
    :func:`library_path` is."""
    path = library_path()
    return None if path is None else _handles.get(path)


_by_switch: dict[str, ctypes.CDLL | None] = {}  # P2PINFER_DECODE_KERNEL's value -> library() then


def library_functions(signatures: "Mapping[str, tuple[tuple, object]]") -> ctypes.CDLL | None:
    """:func:`library` with the plain C functions ``signatures`` names typed (``name -> (argtypes, restype)``),
    looked up once per value of ``P2PINFER_DECODE_KERNEL``: :func:`library` searches PATH for a compiler (~0.4 ms),
    and the check asks per pass and per row (:mod:`p2pinfer.runtime.row_stats`, :mod:`p2pinfer.runtime.philox`)."""
    switch = os.environ.get("P2PINFER_DECODE_KERNEL", "1")
    if switch not in _by_switch:
        _by_switch[switch] = library()
    lib = _by_switch[switch]
    if lib is not None:
        typed = lib.__dict__.setdefault("_p2pinfer_typed", set())  # per handle: each loaded library is typed once
        if not typed.issuperset(signatures):
            with _lock:
                for name, (argtypes, restype) in signatures.items():
                    function = getattr(lib, name)
                    function.argtypes, function.restype = argtypes, restype
                    typed.add(name)
    return lib


def ref64_library_path() -> Path | None:
    """The float64 product library of the near-tie reference (``ref64.c``), built on first use with the same
    compiler, flags and cache as the 4-bit kernel; None (reason logged once, ``kernel.unavailable`` with a
    ``ref64_`` reason) without a compiler or with ``P2PINFER_REF64_KERNEL=0``: the reference then multiplies
    with numpy. A library built for a CPU without AVX-512 reports itself unavailable (``p2pinfer_ref64_available``)."""
    return _library_path("P2PINFER_REF64_KERNEL", "ref64", (REF64_SOURCE, EXP64_HEADER),
                         lambda reason, detail: _unavailable("ref64_" + reason, detail), hold=False,
                         disabled="P2PINFER_REF64_KERNEL=0: the float64 reference multiplies with numpy",
                         no_compiler="no C compiler found; the float64 reference multiplies with numpy")


def _library_path(switch: str, stem: str, sources: tuple[Path, ...], report: "Callable[[str, str], None]", *,
                  hold: bool, disabled: str, no_compiler: str) -> Path | None:
    """The library ``stem`` built from ``sources`` for this compiler and ``-march``, once per process (None when
    ``switch`` is ``0``, without a compiler or when the build fails: reported through ``report``). ``hold``: keep
    it loaded here (:func:`library` hands out that handle); a library that does not load is reported
    (``load_failed``), removed from the cache and None."""
    if os.environ.get(switch, "1").strip() == "0":
        report("disabled", disabled)
        return None
    cc = _compiler()
    if cc is None:
        report("no_compiler", no_compiler)
        return None
    with _lock:
        key = (cc, _march(), stem)
        if key not in _built:
            _built[key] = path = _build(cc, key[1], sources=sources, stem=stem, report=report)
            if hold and path is not None:
                try:
                    handle = ctypes.CDLL(str(path))  # held open here, whatever the linker did with nodelete
                except OSError as exc:  # built but not loadable (an undefined symbol, a damaged cache file)
                    report("load_failed", f"{path.name}: {exc}")
                    path.unlink(missing_ok=True)  # so that the next process builds it anew
                    _built[key] = None
                else:
                    _held.append(handle)
                    _handles[path] = handle
        return _built[key]


#: changes whenever the compile flags below change (part of the cache key)
_BUILD_RECIPE = "O3 march=native z-nodelete pthread v1"


def _march() -> str:
    """The CPU the library is built for: this one, unless ``P2PINFER_KERNEL_MARCH`` names another."""
    return os.environ.get("P2PINFER_KERNEL_MARCH", "").strip() or "native"


def _build(cc: str, march: str = "native", *, sources: tuple[Path, ...] = _SOURCES, stem: str = "qmatmul",
           report: "Callable[[str, str], None] | None" = None) -> Path | None:
    """Compile ``sources[0]`` (which #includes the others) into the cache; None on failure, reported through
    ``report(reason, detail)`` (default: :func:`_unavailable`)."""
    fail = report or _unavailable
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        fail("compiler_failed", f"{cc} --version failed: {exc}")
        return None
    key = hashlib.sha256(b"\0".join(source.read_bytes() for source in sources)
                         + b"\0" + version.encode()
                         + b"\0" + _cpu_identity().encode() + b"\0" + _BUILD_RECIPE.encode()
                         + b"\0" + march.encode()).hexdigest()
    target = cache_dir() / f"{stem}-{key[:24]}.so"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            out = Path(tmp) / target.name
            # -z nodelete: onnxruntime dlcloses the library with each session's options; the kernel's worker
            # threads live on, so its code and state must stay loaded (a reload would reset the pool under them)
            first_error = ""
            for flags in ([f"-march={march}", "-Wl,-z,nodelete"], ["-Wl,-z,nodelete"], []):
                done = subprocess.run([cc, "-O3", *flags, "-fPIC", "-shared", "-pthread", str(sources[0]), "-o", str(out)],
                                      capture_output=True, text=True, timeout=300)
                if done.returncode == 0:
                    break
                first_error = first_error or _first_error(done.stderr)
            else:
                fail("compile_failed", done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
                return None
            if first_error:  # works, but without this CPU's instructions: several times slower, so say why
                _log().warning("kernel.built_without_march", march=march, stem=stem, error=first_error)
            os.replace(out, target)  # atomic: concurrent builders each write their own file
    except (OSError, subprocess.SubprocessError) as exc:
        fail("compile_failed", str(exc))
        return None
    _log().info("kernel.built", path=str(target))
    return target


def _first_error(stderr: str) -> str:
    """The compiler's first error line (the cause; later ones often follow from it), else its last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return next((ln for ln in lines if "error" in ln), lines[-1] if lines else "failed")


def amx_wanted() -> bool:
    """Whether sessions may run the many-row path on AMX tiles (``P2PINFER_AMX=0``: never)."""
    return os.environ.get("P2PINFER_AMX", "1") != "0"


def amx_available() -> bool:
    """Whether the built kernel runs its many-row path on AMX tiles in this process: compiled for them, the CPU
    has them and Linux granted this process the tile state. False without the kernel."""
    lib = library_path()
    return lib is not None and _library_flag(lib, "p2pinfer_qmatmul_amx")


def _unavailable(reason: str, detail: str) -> None:
    if reason not in _reported:
        _reported.add(reason)
        level = "info" if reason == "disabled" else "warning"
        getattr(_log(), level)("kernel.unavailable", reason=reason, detail=detail)


# ---- graph rewrite ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Term:
    a: str
    qweight: str
    scales: str
    zero_point: int
    n: int
    k: int
    node: onnx.NodeProto


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


LOGITS_TO_KEEP = "logits_to_keep"  # as runtime.model names it (that module imports this one lazily)


def kernel_model(model: onnx.ModelProto, folder: Path, threads: int, decode: DecodePath = DecodePath.INTEGER,
                 amx: bool = True, swiglu: bool = True, quick_gelu: bool = True) -> int:
    """Rewrite ``model`` (loaded without external data; ``folder`` holds it) in place: every group
    of 4-bit ``MatMulNBits`` terms (block 32, accuracy 0) summed with at most one block-minimum term becomes one
    ``p2pinfer`` custom node over the same initializers (``amx=False``: its many-row path never uses AMX tiles;
    ``decode``: how its decode rows are computed; the library takes FLOAT where it has no integer path). A
    ``logits_to_keep`` input loses its default: callers feed it on every run (runtime.model does). Where that
    rewrote anything, each MLP activation after such a node becomes one ``SwiGLU`` node (:func:`_fuse_swiglu`;
    ``swiglu=False``: not) with the bits of the onnxruntime nodes it replaces: ``quick_gelu`` says which those
    are (True: the session's optimization level is ORT_ENABLE_EXTENDED or above, where onnxruntime fuses
    ``gate * Sigmoid(gate)`` into ``QuickGelu``). Returns the number of nodes rewritten."""
    int_dot = int(decode is DecodePath.INTEGER)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    uses = Counter(i for n in g.node for i in n.input)
    uses.update(o.name for o in g.output)

    def const_ints(name: str) -> list[int] | None:
        t = inits.get(name)
        return None if t is None or t.data_type != onnx.TensorProto.INT64 else numpy_helper.to_array(t).tolist()

    def term(name: str) -> _Term | None:
        node = producer.get(name)
        if node is None or node.op_type != "MatMulNBits" or node.domain != _CONTRIB or len(node.input) not in (3, 4):
            return None
        at = _attrs(node)
        if at.get("bits") != 4 or at.get("block_size") != 32 or at.get("accuracy_level", 0) != 0:
            return None
        n, k = int(at["N"]), int(at["K"])
        q, s = inits.get(node.input[1]), inits.get(node.input[2])
        if q is None or s is None or list(q.dims) != [n, k // 32, 16] or list(s.dims) != [n * (k // 32)] \
                or q.data_type != onnx.TensorProto.UINT8 or s.data_type != onnx.TensorProto.FLOAT or k % 32:
            return None
        zp = 8
        if len(node.input) == 4 and node.input[3]:
            zt = inits.get(node.input[3])
            if zt is None:
                return None
            packed = numpy_helper.to_array(zt, base_dir=str(folder)).reshape(n, -1)
            nibbles = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, -1)[:, :k // 32]
            if nibbles.size == 0 or (nibbles != nibbles.flat[0]).any():
                return None  # one zero point for every block is what the kernel takes
            zp = int(nibbles.flat[0])
        return _Term(node.input[0], node.input[1], node.input[2], zp, n, k, node)

    def mins_term(name: str, a: str, n: int, k: int) -> tuple[str, list[onnx.NodeProto]] | None:
        mm = producer.get(name)
        if mm is None or mm.op_type != "MatMul" or mm.input[1] not in inits:
            return None
        mins = inits[mm.input[1]]
        rs = producer.get(mm.input[0])
        if list(mins.dims) != [k // 32, n] or mins.data_type != onnx.TensorProto.FLOAT or rs is None \
                or rs.op_type != "ReduceSum" or _attrs(rs).get("keepdims", 1) != 0 or len(rs.input) < 2 \
                or const_ints(rs.input[1]) != [-1]:
            return None
        rh = producer.get(rs.input[0])
        if rh is None or rh.op_type != "Reshape" or rh.input[0] != a or const_ints(rh.input[1]) != [0, 0, k // 32, 32]:
            return None
        if uses[mm.input[0]] != 1 or uses[rs.input[0]] != 1 or uses[name] != 1:
            return None
        return mins.name, [mm, rs, rh]

    replace: dict[int, onnx.NodeProto] = {}  # id(old node) -> new node
    drop: set[int] = set()
    for node in g.node:
        if node.op_type == "Sum" and len(node.input) in (2, 3):
            terms = [term(i) for i in node.input]
            found = [t for t in terms if t is not None]
            if not found or len({t.a for t in found}) != 1 or len({(t.n, t.k) for t in found}) != 1:
                continue
            t0 = found[0]
            rest = [i for i, t in zip(node.input, terms) if t is None]
            mins = None
            if len(rest) == 1:
                mins = mins_term(rest[0], t0.a, t0.n, t0.k)
                if mins is None:
                    continue
            elif rest:
                continue
            if any(uses[t.node.output[0]] != 1 for t in found) or (len(found), mins is not None) not in ((1, True), (2, False)):
                continue
            inputs = [t0.a]
            for t in found:
                inputs += [t.qweight, t.scales]
            op = "QMatMul2" if len(found) == 2 else "QMatMul1M"
            if mins is not None:
                inputs.append(mins[0])
                drop.update(id(x) for x in mins[1])
            zps = {f"zp{j}": t.zero_point for j, t in enumerate(found)}
            replace[id(node)] = helper.make_node(op, inputs, [node.output[0]], name=node.name or node.output[0],
                                                 domain=DOMAIN, K=t0.k, N=t0.n, threads=threads, amx=int(amx),
                                                 int_dot=int_dot, **zps)
            drop.update(id(t.node) for t in found)
    for node in g.node:  # a lone term: its own node
        t = term(node.output[0]) if node.op_type == "MatMulNBits" else None
        if t is not None and id(node) not in drop:
            replace[id(node)] = helper.make_node("QMatMul1", [t.a, t.qweight, t.scales], [node.output[0]],
                                                 name=node.name or node.output[0], domain=DOMAIN, K=t.k, N=t.n,
                                                 threads=threads, zp0=t.zero_point, amx=int(amx),
                                                 int_dot=int_dot)
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    fused = _fuse_swiglu(g, threads, quick_gelu) if replace and swiglu else 0
    attention = kernel_attention(model, threads) if replace else 0  # a 4-bit kernel session's attention only
    if replace and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    if replace and any(i.name == LOGITS_TO_KEEP for i in g.input):
        # an input with a default (an initializer) cannot be bound through onnxruntime's I/O binding, which the
        # verifier's in-place passes use (runtime.model.KVPasses): here it is a plain input every run feeds
        kept = [t for t in g.initializer if t.name != LOGITS_TO_KEEP]
        if len(kept) < len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(kept)
    return len(replace) + fused + attention


def _fuse_swiglu(g: onnx.GraphProto, threads: int, quick_gelu: bool) -> int:
    """Replace each ``Split(h) -> gate, up;  Mul(Mul(gate, Sigmoid(gate)), up)`` (the MLP activation
    gguf.graph emits) whose ``h`` is a 4-bit kernel node's output by one ``SwiGLU`` node (swiglu.c): in one
    pass, the float32 bits of onnxruntime's own nodes (``quick_gelu``: as it runs them fused into
    ``QuickGelu``, else as ``Sigmoid`` and ``Mul``). Only that exact pattern (:func:`.patterns.silu_gates`):
    two equal halves of the last axis, every intermediate used by the pattern alone and no graph output;
    anything else stays as it is. Returns the number of activations fused."""
    inits = {t.name: t for t in g.initializer}

    def halves(split: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> tuple[int, int] | None:
        """(inter, the rank the op checks: 3 for axis 2, 0 for axis -1) of a Split into two equal
        halves of the last axis of a kernel node's output, else None."""
        sizes = inits.get(split.input[1])
        if sizes is None or sizes.data_type != onnx.TensorProto.INT64:
            return None
        sizes = numpy_helper.to_array(sizes).tolist()
        source = producer.get(split.input[0])
        if len(sizes) != 2 or sizes[0] != sizes[1] or sizes[0] <= 0 or source is None or source.domain != DOMAIN \
                or not source.op_type.startswith("QMatMul") or _attrs(source).get("N") != 2 * sizes[0]:
            return None
        axis = _attrs(split).get("axis", 0)  # the last axis of the [batch, rows, 2 * inter] gguf.graph emits
        return (sizes[0], 0 if axis == -1 else 3) if axis in (-1, 2) else None

    nodes = list(g.node)
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for gate in silu_gates(g, nodes, halves, sole_reader_of_input=True):
        inter, rank = gate.halves
        replace[id(gate.mul)] = helper.make_node("SwiGLU", [gate.parts[0].input[0]], [gate.mul.output[0]],
                                                 name=gate.mul.name or gate.mul.output[0], domain=DOMAIN,
                                                 inter=inter, rank=rank, threads=threads,
                                                 quick_gelu=int(quick_gelu))
        drop.update(id(n) for n in gate.parts)
    replace_nodes(g, nodes, replace, drop)
    return len(replace)


#: GroupQueryAttention attributes :func:`kernel_attention` takes, with the values it supports (None: any)
_GQA_ATTRIBUTES = {"num_heads": None, "kv_num_heads": None, "scale": None, "do_rotary": 1, "rotary_interleaved": 0,
                   "local_window_size": -1, "softcap": 0.0, "smooth_softmax": 0, "qk_output": 0}


def attention_wanted() -> bool:
    """Whether kernel sessions run attention on the kernel's ``GQAttention`` (``P2PINFER_KERNEL_ATTENTION=0``: on
    onnxruntime's GroupQueryAttention, as before)."""
    return os.environ.get("P2PINFER_KERNEL_ATTENTION", "1").strip() != "0"


def kernel_attention(model: onnx.ModelProto, threads: int) -> int:
    """Rewrite ``model`` in place: every com.microsoft ``GroupQueryAttention`` node in the form the GGUF importer
    writes (packed QKV, past and present KV whose declared shape states the head size, rotate-half rotary from
    constant cos/sin caches covering the whole head, no softcap / local window / smooth softmax / extra inputs)
    becomes the kernel's ``GQAttention`` over the same inputs and outputs (``qattn.c``: the same semantics; causal
    work only, on the kernel's threads). Any other
    GroupQueryAttention stays as it is. Returns the number of nodes rewritten (0 with
    ``P2PINFER_KERNEL_ATTENTION=0``)."""
    if not attention_wanted():
        return 0
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    shapes = {v.name: v.type.tensor_type.shape for v in [*g.input, *g.value_info]}

    def declared_head(name: str) -> int | None:
        """The head size a past key's declared shape [batch, kv_heads, positions, head] states, if it does."""
        shape = shapes.get(name)
        if shape is None or len(shape.dim) != 4 or not shape.dim[3].HasField("dim_value"):
            return None
        return int(shape.dim[3].dim_value)

    count = 0
    for i, node in enumerate(g.node):
        if node.op_type != "GroupQueryAttention" or node.domain != _CONTRIB or len(node.input) != 9 \
                or len(node.output) != 3 or node.input[1] or node.input[2] \
                or not all(node.input[j] for j in (0, 3, 4, 5, 6, 7, 8)) or not all(node.output):
            continue
        at = _attrs(node)
        if at.get("do_rotary") != 1 or any(name not in _GQA_ATTRIBUTES or _GQA_ATTRIBUTES[name] not in (None, value)
                                           for name, value in at.items()):
            continue
        nh, nkv = int(at.get("num_heads", 0)), int(at.get("kv_num_heads", 0))
        cos, sin = inits.get(node.input[7]), inits.get(node.input[8])
        if nh <= 0 or nkv <= 0 or nh % nkv or cos is None or sin is None or len(cos.dims) != 2 \
                or list(cos.dims) != list(sin.dims) or {cos.data_type, sin.data_type} != {onnx.TensorProto.FLOAT}:
            continue
        head = 2 * int(cos.dims[1])  # rotary over the whole head (a partial rotary_dim is not supported)
        if head <= 0 or head % 16 or head > 256 or declared_head(node.input[3]) != head:
            continue
        g.node[i].CopyFrom(helper.make_node(
            "GQAttention", [node.input[j] for j in (0, 3, 4, 5, 6, 7, 8)], list(node.output),
            name=node.name or node.output[0], domain=DOMAIN, num_heads=nh, kv_num_heads=nkv, head_size=head,
            scale=float(at.get("scale", 0.0)), threads=threads))
        count += 1
    return count


def kernel_threads(threads: int | None) -> int:
    """The kernel's thread count: the session's intra-op threads, else the CPUs this process may use."""
    if threads:
        return int(threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def kernel_session(onnx_path: Path, *, threads: int | None, graph_optimization_level,
                   amx: bool = True, decode: DecodePath | None = None,
                   ) -> "tuple[ort.InferenceSession, DecodePath] | None":
    """An onnxruntime session of ``onnx_path`` with the kernel and the decode path it runs, or None (reason
    logged) when the library is unavailable or the graph has nothing it applies to. Its inputs and outputs are
    the graph's own. ``amx`` (and :func:`amx_wanted`) allow the many-row path on AMX tiles where the CPU has
    them. ``decode`` None: :func:`decode_path_from_env`; INTEGER falls back to FLOAT where the library has no
    integer path."""
    import onnxruntime as ort

    lib = library_path()
    if lib is None:
        return None
    decode = decode or decode_path_from_env()
    if not library_has_integer_path(lib):
        decode = DecodePath.FLOAT
    folder = Path(onnx_path).parent
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
        rewritten = kernel_model(model, folder, kernel_threads(threads), amx=amx and amx_wanted(), decode=decode,
                                 quick_gelu=int(graph_optimization_level) >= int(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED))
    except Exception as exc:  # an unreadable graph: the standard path reports it to the user (ModelFormatError)
        _log().debug("kernel.graph_unreadable", path=str(onnx_path), error=type(exc).__name__)
        return None
    if rewritten == 0:
        return None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = graph_optimization_level
    if threads is not None:
        opts.intra_op_num_threads = threads  # the other operators (attention over many rows above all)
    opts.inter_op_num_threads = 1
    # onnxruntime's workers sleep between operators instead of spinning: the kernel's own pool runs on the same
    # cores between them (measured: decode as fast as with one onnxruntime thread, prefill faster)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False  # as in runtime.model.create_session: an arena keeps its peak for good
    opts.register_custom_ops_library(str(lib))
    # the weights stay in the model folder: external data is resolved (mapped) there, not copied
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    try:
        session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types; the standard graph still serves
        _unavailable("session_failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
    attention = sum(n.op_type == "GQAttention" and n.domain == DOMAIN for n in model.graph.node)
    _log().info("kernel.session", nodes=rewritten, attention=attention, threads=kernel_threads(threads),
                decode=decode.value, isa=library_isa(lib), amx=amx and amx_wanted() and amx_available(),
                path=str(onnx_path))
    return session, decode
