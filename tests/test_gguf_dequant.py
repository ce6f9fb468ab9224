"""Dequantization of every supported GGML tensor type against hand-written llama.cpp reference math."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from p2pinfer.gguf.errors import UnsupportedTensorTypeError
from p2pinfer.gguf.reader import SUPPORTED_TENSOR_TYPES, GGUFModel, unpermute_qk

from gguf_fixtures import random_raw_blocks, ref_dequant


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, QT | None]]) -> GGUFModel:
    w = gguf.GGUFWriter(path, "llama")
    for name, (data, raw_dtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFModel(path)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K])
def test_block_quant_types_match_reference_math(tmp_path: Path, qtype: QT) -> None:
    rng = np.random.default_rng(int(qtype))
    raw = random_raw_blocks(rng, rows=3, cols=512, qtype=qtype)
    model = _write(tmp_path / "q.gguf", {"w": (raw, qtype)})
    assert model.tensor_type("w") == qtype
    assert model.tensor_shape("w") == (3, 512)
    got = model.dequantize("w")
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, ref_dequant(raw, qtype), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16])
def test_float_types_match_reference_math(tmp_path: Path, qtype: QT) -> None:
    rng = np.random.default_rng(7)
    values = rng.normal(0, 3, size=(4, 64)).astype(np.float32)
    if qtype == QT.F32:
        data, raw_dtype, raw = values, None, values.view(np.uint8)
    elif qtype == QT.F16:
        data, raw_dtype = values.astype(np.float16), None
        raw = data.view(np.uint8)
    else:
        data = raw = gguf.quants.quantize(values, QT.BF16)
        raw_dtype = QT.BF16
    model = _write(tmp_path / "f.gguf", {"w": (data, raw_dtype)})
    assert model.tensor_type("w") == qtype
    expected = ref_dequant(raw.reshape(4, -1), qtype)
    np.testing.assert_array_equal(model.dequantize("w"), expected)
    if qtype != QT.F32:  # lossy, but close to the source values
        np.testing.assert_allclose(expected, values, rtol=1e-2)


def test_quantize_then_dequantize_is_close(tmp_path: Path) -> None:
    """Sanity check of the whole path: the usual types reproduce float weights within their resolution."""
    rng = np.random.default_rng(3)
    values = rng.normal(0, 0.05, size=(8, 256)).astype(np.float32)
    tensors = {q.name: (gguf.quants.quantize(values, q), q) for q in (QT.Q8_0, QT.Q4_0, QT.Q4_1)}
    model = _write(tmp_path / "rt.gguf", tensors)
    for name, tol in (("Q8_0", 0.002), ("Q4_0", 0.03), ("Q4_1", 0.02)):
        assert np.abs(model.dequantize(name) - values).max() < tol, name


def test_unsupported_type_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(2, 24), dtype=np.uint8)  # one Q5_1 block per row
    model = _write(tmp_path / "u.gguf", {"odd.weight": (raw, QT.Q5_1)})
    assert QT.Q5_1 not in SUPPORTED_TENSOR_TYPES
    with pytest.raises(UnsupportedTensorTypeError, match=r"'odd\.weight'.*Q5_1"):
        model.dequantize("odd.weight")


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    """``convert_hf_to_gguf.py``'s permute followed by ours is the identity, for Q (9 heads) and K (3)."""
    rng = np.random.default_rng(0)
    for heads in (9, 3):
        hf = rng.normal(size=(heads * 8, 5)).astype(np.float32)
        gguf_layout = hf.reshape(heads, 2, 4, 5).swapaxes(1, 2).reshape(hf.shape)
        np.testing.assert_array_equal(unpermute_qk(gguf_layout, heads), hf)
