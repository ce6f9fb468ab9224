"""The kernel's many-row path on AMX tiles (p2pinfer/kernels/qgemm_amx.c) and its float32 fallback.

Both many-row paths (AMX bfloat16 tiles with three-limb splitting where the CPU has them, float32 FMA
otherwise or with ``amx=False`` / ``P2PINFER_AMX=0``) against a float64 product of the same 4-bit weights, row
determinism of each (rows, row counts that cross the tile padding, the 32-row groups and the 256-row chunks,
thread counts), and the switch that forces the fallback. On a CPU without AMX both sessions run float32 FMA:
the tests then check the fallback alone (and say so in their assertion messages)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType as QT

from p2pinfer import kernels
from p2pinfer.gguf import import_gguf
from p2pinfer.gguf.blockquant import from_gguf
from p2pinfer.runtime import load_model

from gguf_fixtures import TinyLlama, write_tiny_llama
from test_decode_kernel import _random_gguf_rows, _standard_graph


@pytest.fixture(autouse=True)
def _kernel_enabled(monkeypatch) -> None:
    """A developer's P2PINFER_DECODE_KERNEL=0 or P2PINFER_AMX=0 must not change what these tests run."""
    monkeypatch.delenv("P2PINFER_DECODE_KERNEL", raising=False)
    monkeypatch.delenv("P2PINFER_AMX", raising=False)


def _session(path: Path, threads: int, amx: bool) -> ort.InferenceSession:
    model = onnx.load(str(path), load_external_data=False)
    assert kernels.kernel_model(model, path.parent, threads, amx=amx) == 1
    assert all(a.i == int(amx) for n in model.graph.node for a in n.attribute if a.name == "amx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.register_custom_ops_library(str(kernels.library_path()))
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q4_0, QT.Q8_0], ids=lambda q: q.name)
def test_both_many_row_paths_match_the_weights_and_are_row_deterministic(tmp_path: Path, qtype: QT) -> None:
    assert kernels.library_path() is not None, "the C compiler should be present (CI installs gcc)"
    rng = np.random.default_rng(100 + int(qtype))
    rows, cols = 70, 96  # 70 output columns: not a multiple of the 16-column tiles or the 32-column panels
    raw = _random_gguf_rows(qtype, rows, cols, rng)
    path = _standard_graph(qtype, raw, cols, tmp_path / qtype.name)
    tiles, tiles3, plain = _session(path, 1, True), _session(path, 3, True), _session(path, 1, False)
    m = 300  # crosses the 16-row tile padding, the 32-row groups and the 256-row chunks of activation limbs
    x = rng.standard_normal((1, m, cols)).astype(np.float32)
    x[0, 7] *= 1e-3  # rows of very different magnitude: each row's limbs are its own
    x[0, 40, :32] = 0.0
    exact = x[0].astype(np.float64) @ from_gguf(raw, qtype, cols).dequantize().astype(np.float64).T
    scale = np.abs(exact).max(axis=1, keepdims=True)  # per row: a row is judged by its own magnitude
    ours, fallback = tiles.run(None, {"x": x})[0][0], plain.run(None, {"x": x})[0][0]
    assert (np.abs(fallback - exact) < 1e-5 * scale).all()
    assert (np.abs(ours - exact) < 1e-5 * scale).all()
    if kernels.amx_available():  # the tiles really ran: their rounding differs from float32 FMA
        assert not np.array_equal(ours, fallback)
    assert np.array_equal(tiles3.run(None, {"x": x})[0][0], ours)
    assert np.array_equal(_session(path, 3, False).run(None, {"x": x})[0][0], fallback)
    for start, stop in ((0, 4), (5, 21), (17, 50), (31, 64), (250, 300), (3, 300)):  # >= 4 rows: the GEMM path
        part = x[:, start:stop]
        assert np.array_equal(tiles.run(None, {"x": part})[0][0], ours[start:stop]), (start, stop)
        assert np.array_equal(plain.run(None, {"x": part})[0][0], fallback[start:stop]), (start, stop)


def test_amx_can_be_turned_off(tmp_path: Path, monkeypatch) -> None:
    """``amx=False`` and ``P2PINFER_AMX=0`` give the float32 path (bit for bit the same): a machine without AMX
    serves with it, and it stays the kernel."""
    cfg = TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=2)
    write_tiny_llama(tmp_path / "m.gguf", cfg)
    import_gguf(tmp_path / "m.gguf", tmp_path / "m")
    model = load_model(tmp_path / "m", threads=2, providers=["CPUExecutionProvider"])
    assert model.runs_kernel and model.runs_amx == kernels.amx_available()
    off = model.with_session(threads=2, providers=["CPUExecutionProvider"], amx=False)
    assert off.runs_kernel and not off.runs_amx
    monkeypatch.setenv("P2PINFER_AMX", "0")
    env_off = load_model(tmp_path / "m", threads=2, providers=["CPUExecutionProvider"])
    assert env_off.runs_kernel and not env_off.runs_amx
    ids = [5, 77, 200, 3, 260, 261, 99, 12, 140, 33, 7, 18, 250, 41, 9, 60, 111, 2, 180]
    ours, _ = model.forward(ids, model.empty_cache())
    fallback, _ = off.forward(ids, off.empty_cache())
    assert np.array_equal(env_off.forward(ids, env_off.empty_cache())[0], fallback)
    np.testing.assert_allclose(ours, fallback, atol=5e-5, rtol=1e-5)
    assert np.array_equal(ours.argmax(-1), fallback.argmax(-1))
