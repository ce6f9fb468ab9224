"""The MLP activation as one custom op (p2pinfer/kernels/swiglu.c) and its load-time rewrite.

The op must give onnxruntime's own bits: against the graph it replaces (Split, Sigmoid, Mul, Mul) run by
onnxruntime at ENABLE_ALL (where it fuses gate * Sigmoid(gate) into QuickGelu) and with no optimization (Sigmoid
and Mul nodes: on an AVX-512 CPU another clamp, 20 of the 2^32 gates give another bit), over every kind of
float32 (random bit patterns, zeros, infinities, NaNs and their payloads, subnormals, the logistic's clamps), on
every build of the library (AVX-512, AVX2, the portable scalar path), any thread and row count. Whole models
must give the same logits with and without the rewrite, bit for bit, in many-row passes and decode steps, at
both kinds of optimization level: on the Q4_1 and Q4_0 fixture models and on SmolLM2. The rewrite takes
exactly the pattern gguf.graph emits and leaves anything else alone. (All 2^32 gate values were checked once
against onnxruntime 1.32 on an AVX-512 CPU with each build: docs/models.md.)"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType as QT
from onnx import TensorProto, helper, numpy_helper

from p2pinfer import kernels
from p2pinfer.gguf import import_gguf
from p2pinfer.runtime import load_model

from gguf_fixtures import TinyLlama, write_tiny_llama
from kernel_builds import library_for


@pytest.fixture(autouse=True)
def _kernel_enabled(monkeypatch) -> None:
    """A developer's P2PINFER_DECODE_KERNEL=0 or P2PINFER_KERNEL_MARCH must not change what these tests run."""
    monkeypatch.delenv("P2PINFER_DECODE_KERNEL", raising=False)
    monkeypatch.delenv("P2PINFER_KERNEL_MARCH", raising=False)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _activation_graph(inter: int, *, fused: bool, threads: int = 1, quick_gelu: bool = True) -> bytes:
    """x [1, rows, 2 * inter] -> silu(gate) * up: one SwiGLU node, or the nodes gguf.graph emits."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "rows", 2 * inter])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "rows", inter])
    if fused:
        nodes = [helper.make_node("SwiGLU", ["x"], ["y"], domain=kernels.DOMAIN, inter=inter, rank=3, threads=threads,
                                  quick_gelu=int(quick_gelu))]
        inits = []
    else:
        nodes = [helper.make_node("Split", ["x", "sizes"], ["gate", "up"], axis=2),
                 helper.make_node("Sigmoid", ["gate"], ["sigmoid"]),
                 helper.make_node("Mul", ["gate", "sigmoid"], ["act"]),
                 helper.make_node("Mul", ["act", "up"], ["y"])]
        inits = [numpy_helper.from_array(np.array([inter, inter], np.int64), "sizes")]
    model = helper.make_model(helper.make_graph(nodes, "swiglu", [x], [y], inits), ir_version=8,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)])
    return model.SerializeToString()


def _session(graph: bytes, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, lib: Path | None = None,
             threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if lib is not None:
        options.register_custom_ops_library(str(lib))
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _libraries(monkeypatch) -> dict[str, Path]:
    """The builds whose activation code differs: this CPU's (AVX-512 where it has it), x86-64-v3 (AVX2 + FMA:
    8 lanes and a scalar tail) and x86-64 (the portable scalar path, which asks the CPU what onnxruntime runs)."""
    return {march: library_for(monkeypatch, march) for march in ("native", "x86-64-v3", "x86-64")}


_EDGES = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1.1754942e-38, -1.1754942e-38,
                   1.1754944e-38, 3.4028235e38, -3.4028235e38, 1e-30, -1e-30, 1.0, -1.0, 0.5, -0.5,
                   np.nextafter(np.float32(18), np.float32(0)), np.float32(18), np.nextafter(np.float32(18), np.float32(99)),
                   -np.nextafter(np.float32(18), np.float32(0)), np.float32(-18), -np.nextafter(np.float32(18), np.float32(99)),
                   87.0, -87.0, 88.8, -104.0, 1e20, -1e20], dtype=np.float32)
#: gates where onnxruntime's two sigmoids differ on an AVX-512 CPU (its QuickGelu clamps s to 1, Sigmoid does not)
_CLAMP_EDGES = np.array([0x418BDB45, 0x418D0C5A, 0x418D90BF, 0x418E1C52, 0x418E768E], dtype=np.uint32).view(np.float32)
_NAN_PAYLOADS = np.array([0x7FC00001, 0xFFC12345, 0x7FBFFFFF, 0xFF800001], dtype=np.uint32).view(np.float32)


def _hostile_values(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random float32 bit patterns (every exponent equally likely: NaNs, infinities, subnormals, huge and tiny
    values), the edge values above, and ordinary activations (normal, the magnitudes the model feeds)."""
    values = rng.integers(0, 2**32, count, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values[: count // 3] = (rng.standard_normal(count // 3) * rng.choice([0.01, 1.0, 4.0, 30.0], count // 3))
    edges = np.concatenate([_EDGES, _NAN_PAYLOADS, _CLAMP_EDGES])
    if count < 2 * len(edges):  # a short row: some of them
        edges = rng.choice(edges, count // 2, replace=False)
    values[rng.choice(count, len(edges), replace=False)] = edges
    return values


@pytest.mark.parametrize("inter", [1536, 37, 8], ids=lambda i: f"inter{i}")
def test_op_is_bit_identical_to_onnxruntime_on_every_build(monkeypatch, inter: int) -> None:
    """SwiGLU gives the bits of onnxruntime's QuickGelu + Mul (quick_gelu=1) and of its unfused Sigmoid + Mul +
    Mul (quick_gelu=0), NaN payloads included, for gates and ups of every kind, on the AVX-512, AVX2 and portable
    builds, with 1 and 3 threads, 1 row (decode), a few and many rows (inter 37: a partial vector on every
    path)."""
    libs = _libraries(monkeypatch)
    rng = np.random.default_rng(inter)
    theirs = {True: _session(_activation_graph(inter, fused=False)),
              False: _session(_activation_graph(inter, fused=False), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)}
    ours = {(march, threads, quick): _session(_activation_graph(inter, fused=True, threads=threads, quick_gelu=quick),
                                              lib=lib)
            for march, lib in libs.items() for threads in (1, 3) for quick in (True, False)}
    for rows in (1, 3, 160):
        x = _hostile_values(rng, rows * 2 * inter).reshape(1, rows, 2 * inter)
        if rows == 3:
            x[0, :, inter:] = 1.0  # up = 1: the activation itself, exactly
        want = {quick: session.run(None, {"x": x})[0] for quick, session in theirs.items()}
        for (march, threads, quick), session in ours.items():
            got = session.run(None, {"x": x})[0]
            assert got.shape == (1, rows, inter)
            assert np.array_equal(_bits(got), _bits(want[quick])), (march, threads, quick, rows)


def test_onnxruntime_clamps_its_two_sigmoids_differently_here() -> None:
    """Why the op has two variants: on an AVX-512 CPU onnxruntime's QuickGelu clamps the logistic to 1 and its
    Sigmoid does not, so at a few gates near 17.5 the two graphs differ by an ulp (elsewhere, and without
    AVX-512F, they agree)."""
    from p2pinfer.kernels import _cpu_identity

    x = np.concatenate([_CLAMP_EDGES, np.ones_like(_CLAMP_EDGES)]).reshape(1, 1, -1)
    n = len(_CLAMP_EDGES)
    quick = _session(_activation_graph(n, fused=False)).run(None, {"x": x})[0][0, 0]
    plain = _session(_activation_graph(n, fused=False), ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0][0, 0]
    if "avx512f" in _cpu_identity().split():
        assert np.array_equal(quick, _CLAMP_EDGES)  # x * 1
        assert (plain > _CLAMP_EDGES).all()  # x * (1 + an ulp)
    else:
        assert np.array_equal(_bits(quick), _bits(plain))


def test_op_matches_onnxruntime_for_any_inputs_hypothesis() -> None:
    """Property: for any float32 gate and up values (any shape of row count and width), bit for bit."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    from hypothesis.extra.numpy import arrays

    lib = kernels.library_path()
    assert lib is not None
    sessions: dict[int, tuple[ort.InferenceSession, ort.InferenceSession]] = {}

    def pair(inter: int):
        if inter not in sessions:
            sessions[inter] = (_session(_activation_graph(inter, fused=True, threads=2), lib=lib),
                               _session(_activation_graph(inter, fused=False)))
        return sessions[inter]

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data(), inter=st.sampled_from([1, 5, 16, 17, 33]), rows=st.integers(1, 6))
    def check(data, inter: int, rows: int) -> None:
        x = data.draw(arrays(np.float32, (1, rows, 2 * inter), elements=st.floats(width=32)))
        ours, theirs = pair(inter)
        assert np.array_equal(_bits(ours.run(None, {"x": x})[0]), _bits(theirs.run(None, {"x": x})[0]))

    check()


def test_op_refuses_a_shape_it_was_not_built_for() -> None:
    """A last axis other than 2 * inter, or another rank than the rewrite promised, fails the run (onnxruntime
    reports the missing output) instead of reading out of bounds."""
    lib = kernels.library_path()
    session = _session(_activation_graph(8, fused=True), lib=lib)
    with pytest.raises(Exception):
        session.run(None, {"x": np.zeros((1, 2, 18), np.float32)})
    assert session.run(None, {"x": np.zeros((1, 2, 16), np.float32)})[0].shape == (1, 2, 8)


# ---- whole models ----------------------------------------------------------------------------------------

def _graph_ops(path: Path, swiglu: bool) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    kernels.kernel_model(model, path.parent, 2, swiglu=swiglu)
    return [n.op_type for n in model.graph.node]


def _sessions(folder: Path, monkeypatch, swiglu: bool, kinds: tuple[str, ...]) -> dict:
    """Kernel sessions of the model in ``folder``, with or without the SwiGLU rewrite (``swiglu=False``: the
    kernel runs onnxruntime's own activation nodes): 1 and 2 threads, the many-row path on float32 FMA instead
    of AMX tiles, the optimization levels where onnxruntime runs Sigmoid + Mul, the float32 decode path."""
    with monkeypatch.context() as patch:
        if not swiglu:
            patch.setattr(kernels, "kernel_model", functools.partial(kernels.kernel_model, swiglu=False))
        cpu = ["CPUExecutionProvider"]
        base = load_model(folder, threads=2, providers=cpu)
        made = {"threads2": base}
        for kind in kinds:
            if kind == "threads1":
                made[kind] = base.with_session(threads=1, providers=cpu)
            elif kind == "amx_off":
                made[kind] = base.with_session(threads=2, providers=cpu, amx=False)
            elif kind in ("basic", "disable"):
                made[kind] = base.with_session(threads=2, providers=cpu, optimization=kind)
            elif kind == "float_decode":
                patch.setenv("P2PINFER_DECODE_KERNEL", "float")
                made[kind] = base.with_session(threads=2, providers=cpu)
                patch.delenv("P2PINFER_DECODE_KERNEL")
    assert all(m.runs_kernel for m in made.values())
    return made


def _same_rows(fused, plain, ids: list[int], decode_steps: int) -> None:
    """Many-row passes (a prompt, then a second pass continuing it) and decode steps: the same logits, bit for
    bit, and the same KV cache."""
    a_logits, a_cache = fused.forward(ids, fused.empty_cache())
    b_logits, b_cache = plain.forward(ids, plain.empty_cache())
    assert np.array_equal(_bits(a_logits), _bits(b_logits))
    more = ids[::-1][:9]
    a2, a_cache = fused.forward(more, a_cache)
    b2, b_cache = plain.forward(more, b_cache)
    assert np.array_equal(_bits(a2), _bits(b2))
    token = int(a2[-1].argmax())
    for step in range(decode_steps):
        a1, a_cache = fused.forward([token], a_cache)
        b1, b_cache = plain.forward([token], b_cache)
        assert np.array_equal(_bits(a1), _bits(b1)), step
        token = int(a1[-1].argmax())
    for x, y in zip(a_cache.arrays, b_cache.arrays):
        assert np.array_equal(_bits(x), _bits(y))


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q4_0], ids=lambda q: q.name)
def test_fixture_model_rows_are_bit_identical_with_and_without_the_rewrite(tmp_path: Path, monkeypatch,
                                                                           qtype: QT) -> None:
    """Every layer's activation becomes one SwiGLU node (no Split or Sigmoid left), and the kernel session's
    logits do not change by one bit: prompts of 1, 5 and 40 tokens, a continuing pass, decode steps, with 1 and
    2 threads, on the AMX and float32 many-row paths, both decode paths, and at the optimization levels where
    onnxruntime would run Sigmoid + Mul instead of QuickGelu."""
    cfg = TinyLlama(matrix_type=qtype, n_kv_heads=2)
    write_tiny_llama(tmp_path / "m.gguf", cfg)
    import_gguf(tmp_path / "m.gguf", tmp_path / "m")
    ops = _graph_ops(tmp_path / "m" / "model.onnx", True)
    assert ops.count("SwiGLU") == cfg.n_layers and "Sigmoid" not in ops and "Split" not in ops
    assert _graph_ops(tmp_path / "m" / "model.onnx", False).count("Sigmoid") == cfg.n_layers
    kinds = ("threads1", "amx_off", "basic", "disable", "float_decode")
    fused = _sessions(tmp_path / "m", monkeypatch, True, kinds)
    plain = _sessions(tmp_path / "m", monkeypatch, False, kinds)
    rng = np.random.default_rng(int(qtype))
    for kind in fused:
        for length in ((1, 5, 40) if kind in ("threads1", "threads2") else (30,)):
            ids = [int(i) for i in rng.integers(3, cfg.vocab, length)]
            _same_rows(fused[kind], plain[kind], ids, decode_steps=4)


def test_smollm2_rows_are_bit_identical_with_and_without_the_rewrite(smollm2_gguf: Path, tmp_path_factory,
                                                                      monkeypatch) -> None:
    """The default model (its 4-bit class): 30 SwiGLU nodes, and a chat prompt's logits, a continuing pass and
    decode steps the same bits as with onnxruntime's nodes."""
    folder = tmp_path_factory.mktemp("smollm2-swiglu") / "m"
    import_gguf(smollm2_gguf, folder, weights="native")
    assert _graph_ops(folder / "model.onnx", True).count("SwiGLU") == 30
    fused = _sessions(folder, monkeypatch, True, ())["threads2"]
    plain = _sessions(folder, monkeypatch, False, ())["threads2"]
    ids = fused.prompt_ids(messages=[{"role": "user", "content": "Name three rivers and say where they flow."}])
    _same_rows(fused, plain, ids, decode_steps=6)


# ---- the rewrite takes the exact pattern, nothing else -----------------------------------------------------

def _layer0(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Layer 0's MLP activation nodes, by role."""
    nodes = {n.output[0]: n for n in model.graph.node}
    return {"split": next(n for n in model.graph.node if n.op_type == "Split" and n.output[0] == "layer0/gate"),
            "sigmoid": nodes["layer0/gate_sigmoid"], "act": nodes["layer0/gate_silu"], "mul": nodes["layer0/swiglu"]}


def _mutations():
    def other_output(m):  # the activation is also a graph output
        m.graph.output.append(helper.make_tensor_value_info("layer0/gate_silu", TensorProto.FLOAT, None))

    def gate_used_elsewhere(m):
        m.graph.node.append(helper.make_node("Identity", ["layer0/gate"], ["layer0/gate_copy"]))
        m.graph.output.append(helper.make_tensor_value_info("layer0/gate_copy", TensorProto.FLOAT, None))

    def sigmoid_of_up(m):
        _layer0(m)["sigmoid"].input[0] = "layer0/up"

    def product_with_gate(m):  # silu(gate) * gate
        _layer0(m)["mul"].input[1] = "layer0/gate"

    def unequal_halves(m):
        split = _layer0(m)["split"]
        sizes = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == split.input[1]))
        m.graph.initializer.append(numpy_helper.from_array(np.array([sizes[0] - 4, sizes[1] + 4], np.int64), "odd"))
        split.input[1] = "odd"

    def first_axis(m):
        for a in _layer0(m)["split"].attribute:
            a.i = 0

    def swapped_halves(m):  # silu(up) * gate: the second half is the gate
        split = _layer0(m)["split"]
        split.output[0], split.output[1] = "layer0/up", "layer0/gate"

    return [other_output, gate_used_elsewhere, sigmoid_of_up, product_with_gate, unequal_halves, first_axis,
            swapped_halves]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_rewrite_leaves_anything_else_alone(tmp_path_factory, mutate) -> None:
    """One layer's activation altered: that layer keeps its nodes untouched, the other layer is still fused."""
    folder = tmp_path_factory.getbasetemp() / "swiglu-rewrite-model"
    if not (folder / "m" / "model.onnx").exists():
        folder.mkdir(exist_ok=True)
        write_tiny_llama(folder / "m.gguf", TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=2))
        import_gguf(folder / "m.gguf", folder / "m")
    model = onnx.load(str(folder / "m" / "model.onnx"), load_external_data=False)
    mutate(model)
    before = [onnx.helper.printable_node(n) for n in model.graph.node if n.output[0].startswith("layer0/")
              and n.op_type in ("Split", "Sigmoid", "Mul")]
    kernels.kernel_model(model, folder / "m", 2)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("SwiGLU") == 1
    fused = next(n for n in model.graph.node if n.op_type == "SwiGLU")
    assert fused.output[0] == "layer1/swiglu"
    after = [onnx.helper.printable_node(n) for n in model.graph.node if n.output[0].startswith("layer0/")
             and n.op_type in ("Split", "Sigmoid", "Mul")]
    assert after == before


def test_rewrite_also_takes_the_products_in_the_other_order(tmp_path: Path) -> None:
    """Mul(up, act) and Mul(Sigmoid(gate), gate) are the same products (IEEE multiplication commutes)."""
    write_tiny_llama(tmp_path / "m.gguf", TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=2))
    import_gguf(tmp_path / "m.gguf", tmp_path / "m")
    model = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    layer = _layer0(model)
    layer["mul"].input.reverse()
    layer["act"].input.reverse()
    kernels.kernel_model(model, tmp_path / "m", 2)
    assert [n.op_type for n in model.graph.node].count("SwiGLU") == 2
