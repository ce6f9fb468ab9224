"""Loading the fixture models: reference continuations and log-probs, both graph layouts, clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from p2pinfer.runtime import ModelLayoutError, generate, load_model
from p2pinfer.runtime.generate import IncrementalDecoder
from p2pinfer.runtime.verify import recompute_logprobs

MODELS = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-llama-trained", "tiny-llama-trained-seed1",
          "tiny-llama-trained-perturbed"]


def _reference(folder: Path) -> dict:
    return json.loads((folder / "reference.json").read_text())


def _check_rows(lp: np.ndarray, ids: list[list[int]], values: list[list[float]], atol: float) -> float:
    """Reference top-8 rows against full log-prob rows: values within atol, nothing else above the 8th."""
    worst = 0.0
    for row, rid, rval in zip(lp, ids, values):
        worst = max(worst, float(np.max(np.abs(row[rid] - np.array(rval)))))
        others = row.copy()
        others[rid] = -np.inf
        assert others.max() <= rval[-1] + atol
    assert worst <= atol, worst
    return worst


@pytest.mark.parametrize("name", MODELS)
def test_fixture_matches_pytorch_reference(shared_models: Path, name: str) -> None:
    folder = shared_models / name
    ref = _reference(folder)
    assert hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest() == ref["model_onnx"]["sha256"]
    model = load_model(folder, providers=["CPUExecutionProvider"])
    assert model.eos_token_ids == (2,) and model.context_length == 256
    for case in ref["cases"]:
        prompt = case["prompt_ids"]
        text = case["prompt_text"]
        encoded = ([1] if case["prompt_has_bos"] else []) + model.encode(text)
        assert encoded == prompt
        out = generate(model, prompt, max_tokens=16, stop_at_eos=False)
        assert out.output_ids == case["continuation_ids"], case["name"]
        assert out.finish_reason == "length"
        # one teacher-forced pass: every reference row (prompt and continuation) within 1e-4
        full = recompute_logprobs(model, prompt[:1], prompt[1:] + case["continuation_ids"] + [0])
        _check_rows(full, case["topk_ids"], case["topk_logprobs"], 1e-4)
        # the KV-cache loop's fingerprint rows (quantized to 2**-16) agree with the reference too
        p = len(prompt)
        assert np.array_equal(out.fingerprint.ids, np.array(case["topk_ids"][p - 1:p + 15]))
        assert np.max(np.abs(out.fingerprint.logprobs - np.array(case["topk_logprobs"][p - 1:p + 15]))) <= 1e-4


def test_gpt2_inputs_are_matched_by_name(shared_models: Path) -> None:
    model = load_model(shared_models / "tiny-gpt2")
    order = [i.name for i in model.session.get_inputs()]
    assert order[1].startswith("past_key_values.") and order[-1] == "position_ids"
    assert model.io.num_layers == 4 and model.io.kv_heads == 4 and model.io.has_position_ids


def _without_position_ids(src: Path, dst: Path) -> None:
    """Rewrite a graph so that it computes position_ids itself (the onnxruntime-genai style layout)."""
    shutil.copytree(src, dst)
    m = onnx.load(str(src / "model.onnx"))
    g = m.graph
    pos = next(i for i in g.input if i.name == "position_ids")
    g.input.remove(pos)
    nodes = [
        helper.make_node("Shape", ["past_key_values.0.key"], ["pk_shape"]),
        helper.make_node("Gather", ["pk_shape", "two"], ["past_len"], axis=0),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "one"], ["seq_len"], axis=0),
        helper.make_node("Add", ["past_len", "seq_len"], ["end"]),
        helper.make_node("Range", ["past_len", "end", "one"], ["pos_1d"]),
        helper.make_node("Unsqueeze", ["pos_1d", "zero_axes"], ["position_ids"]),
    ]
    g.initializer.extend([
        helper.make_tensor("two", TensorProto.INT64, [], [2]),
        helper.make_tensor("one", TensorProto.INT64, [], [1]),
        helper.make_tensor("zero_axes", TensorProto.INT64, [1], [0]),
    ])
    for n in reversed(nodes):
        g.node.insert(0, n)
    onnx.save(m, str(dst / "model.onnx"))


def test_layout_without_position_ids(shared_models: Path, tmp_path: Path) -> None:
    src = shared_models / "tiny-llama-trained"
    _without_position_ids(src, tmp_path / "m")
    model = load_model(tmp_path / "m")
    assert not model.io.has_position_ids
    for case in _reference(src)["cases"]:
        out = generate(model, case["prompt_ids"], max_tokens=16, stop_at_eos=False)
        assert out.output_ids == case["continuation_ids"]


def test_missing_input_is_named(shared_models: Path, tmp_path: Path) -> None:
    src = shared_models / "tiny-llama"
    shutil.copytree(src, tmp_path / "m")
    m = onnx.load(str(src / "model.onnx"))
    for i in m.graph.input:
        if i.name == "attention_mask":
            i.name = "mask"
    for n in m.graph.node:
        for j, name in enumerate(n.input):
            if name == "attention_mask":
                n.input[j] = "mask"
    onnx.save(m, str(tmp_path / "m" / "model.onnx"))
    with pytest.raises(ModelLayoutError, match="'attention_mask' is missing"):
        load_model(tmp_path / "m")


def test_missing_files_give_clear_errors(shared_models: Path, tmp_path: Path) -> None:
    from p2pinfer.runtime import ModelFormatError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="model.onnx"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelFormatError, match="not a directory"):
        load_model(tmp_path / "nowhere")


def test_incremental_decoder_matches_full_decode(trained_model) -> None:
    ids = trained_model.encode("héllo wörld — ünïcode ✓ " * 3)
    dec = IncrementalDecoder(trained_model)
    text = "".join(dec.push(t) for t in ids) + dec.flush()
    assert text == trained_model.decode(ids)
