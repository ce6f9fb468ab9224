"""Importing synthetic tiny Llama GGUFs: graph numerics, KV cache, padding, determinism, tokenizer, errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from p2pinfer.cli.gguf import import_gguf as import_gguf_cli
from p2pinfer.gguf import (GGUFImportError, UnsupportedArchitectureError, UnsupportedTensorTypeError,
                           UnsupportedTokenizerError, import_gguf)
from p2pinfer.runtime import load_model

from gguf_fixtures import TinyLlama, reference_logits, tiny_vocab, write_tiny_llama


def _session(folder: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
         past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                          **past})))
    return out["logits"], {n.replace("present.", "past_key_values."): v for n, v in out.items() if n != "logits"}


def _empty_past(cfg: TinyLlama, batch: int = 1) -> dict[str, np.ndarray]:
    return {f"past_key_values.{i}.{kind}": np.zeros((batch, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
            for i in range(cfg.n_layers) for kind in ("key", "value")}


def _prefill(sess, cfg, ids: list[int]) -> np.ndarray:
    arr = np.array([ids], np.int64)
    logits, _ = _run(sess, arr, np.ones_like(arr), np.arange(len(ids), dtype=np.int64)[None], _empty_past(cfg))
    return logits[0]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _import(tmp_path: Path, cfg: TinyLlama, name: str = "m", **options) -> tuple[Path, dict[str, np.ndarray]]:
    src = tmp_path / f"{name}.gguf"
    weights = write_tiny_llama(src, cfg)
    out = tmp_path / f"{name}-onnx"
    import_gguf(src, out, **options)
    return out, weights


IDS = [5, 77, 200, 3, 260, 261, 99, 12, 140, 33, 7]


@pytest.mark.parametrize("cfg", [
    TinyLlama(matrix_type=QT.F32),
    TinyLlama(matrix_type=QT.F16, tied=False),
    TinyLlama(matrix_type=QT.Q8_0),
    TinyLlama(matrix_type=QT.Q4_0, n_kv_heads=4),
    TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=1, rope_theta=100000.0),
], ids=["f32-gqa", "f16-untied", "q8_0", "q4_0-mha", "q4_1-mqa"])
def test_logits_match_independent_reference(tmp_path: Path, cfg: TinyLlama) -> None:
    out, weights = _import(tmp_path, cfg)
    logits = _prefill(_session(out), cfg, IDS)
    expected = reference_logits(weights, cfg, IDS)
    assert logits.shape == (len(IDS), cfg.vocab) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=1e-4)


def test_kv_cache_steps_equal_full_pass(tmp_path: Path) -> None:
    cfg = TinyLlama(matrix_type=QT.Q8_0)
    out, _ = _import(tmp_path, cfg)
    sess = _session(out)
    full = _prefill(sess, cfg, IDS)
    past, rows = _empty_past(cfg), []
    for start, end in ((0, 4), (4, 5), (5, 9), (9, 10), (10, 11)):  # mixed chunk sizes
        chunk = np.array([IDS[start:end]], np.int64)
        logits, past = _run(sess, chunk, np.ones((1, end), np.int64),
                            np.arange(start, end, dtype=np.int64)[None], past)
        rows.append(logits[0])
        assert past["past_key_values.0.key"].shape == (1, cfg.n_kv_heads, end, cfg.head_dim)
    np.testing.assert_allclose(np.concatenate(rows), full, atol=1e-5)


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["kernel", "standard-graph"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-attention", "portable-attention"])
def test_in_place_kv_decoder_equals_forward(tmp_path: Path, fused: bool, kernel: str, monkeypatch) -> None:
    """The decode loop's KVDecoder (one buffer bound as past and present) computes exactly what forward()
    computes step by step, with the 4-bit kernel and without (one session serves both); graphs whose attention
    cannot share the buffer fall back to forward()."""
    monkeypatch.setenv("P2PINFER_DECODE_KERNEL", kernel)
    cfg = TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=2)
    out, _ = _import(tmp_path, cfg, fused_attention=fused)
    model = load_model(out, threads=1, providers=["CPUExecutionProvider"])
    assert model.shares_kv_buffer is fused
    assert model.runs_kernel is (kernel == "1")
    _, cache = model.forward(IDS[:4], model.empty_cache(), last=1)
    decoder = model.decoder(cache, capacity=len(IDS))
    for position, token in enumerate(IDS[4:], start=4):
        logits, cache = model.forward([token], cache)
        assert np.array_equal(decoder.step(token), logits[-1]), position
        assert decoder.length == cache.length == position + 1
    with pytest.raises(ValueError, match="no room") if fused else contextlib.nullcontext():
        decoder.step(IDS[0])


@pytest.mark.parametrize("fused", [True, False], ids=["fused-attention", "portable-attention"])
@pytest.mark.parametrize("weights", ["native", "fp32"])
def test_logits_match_independent_reference_either_attention(tmp_path: Path, fused: bool, weights: str) -> None:
    cfg = TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=2)
    out, ref_weights = _import(tmp_path, cfg, fused_attention=fused, weights=weights)
    np.testing.assert_allclose(_prefill(_session(out), cfg, IDS), reference_logits(ref_weights, cfg, IDS),
                               atol=2e-4, rtol=1e-4)


def test_left_padding_is_masked(tmp_path: Path) -> None:
    """A left-padded batch row gives the same logits as the same prompt alone (portable attention: the
    fused GroupQueryAttention form assumes unpadded rows, as the p2pinfer runtime always feeds)."""
    cfg = TinyLlama()
    out, _ = _import(tmp_path, cfg, fused_attention=False)
    sess = _session(out)
    short = IDS[:6]
    pad = len(IDS) - len(short)
    ids = np.array([IDS, [0] * pad + short], np.int64)
    mask = np.array([[1] * len(IDS), [0] * pad + [1] * len(short)], np.int64)
    positions = np.array([list(range(len(IDS))), [0] * pad + list(range(len(short)))], np.int64)
    logits, past = _run(sess, ids, mask, positions, _empty_past(cfg, batch=2))
    np.testing.assert_allclose(logits[0], _prefill(sess, cfg, IDS), atol=1e-5)
    np.testing.assert_allclose(logits[1, pad:], _prefill(sess, cfg, short), atol=1e-5)
    # one decode step on top of the padded cache
    step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    step_logits, _ = _run(sess, np.array([[42], [42]], np.int64), step_mask,
                          np.array([[len(IDS)], [len(short)]], np.int64), past)
    np.testing.assert_allclose(step_logits[1, 0], _prefill(sess, cfg, short + [42])[-1], atol=1e-5)


def test_import_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    cfg = TinyLlama(matrix_type=QT.Q4_1)
    src = tmp_path / "m.gguf"
    write_tiny_llama(src, cfg)
    import_gguf(src, tmp_path / "a")
    import_gguf(src, tmp_path / "b")
    first = _hashes(tmp_path / "a")
    assert set(first) == {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
                          "config.json", "generation_config.json"}
    assert _hashes(tmp_path / "b") == first


def test_single_file_import_is_equivalent(tmp_path: Path) -> None:
    cfg = TinyLlama(matrix_type=QT.Q4_0)
    src = tmp_path / "m.gguf"
    write_tiny_llama(src, cfg)
    import_gguf(src, tmp_path / "split")
    import_gguf(src, tmp_path / "one", single_file=True)
    import_gguf(src, tmp_path / "one-again", single_file=True)
    assert not (tmp_path / "one" / "model.onnx.data").exists()
    assert _hashes(tmp_path / "one") == _hashes(tmp_path / "one-again")
    np.testing.assert_array_equal(_prefill(_session(tmp_path / "one"), cfg, IDS),
                                  _prefill(_session(tmp_path / "split"), cfg, IDS))


def test_model_files_and_configs(tmp_path: Path) -> None:
    cfg = TinyLlama(tied=False)
    out, _ = _import(tmp_path, cfg)
    sess = _session(out)
    assert [i.name for i in sess.get_inputs()][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in sess.get_outputs()][:3] == ["logits", "present.0.key", "present.0.value"]
    assert len(sess.get_inputs()) == 3 + 2 * cfg.n_layers
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"], config["vocab_size"]) == (2, 64, 4, 2, 16, cfg.vocab)
    assert config["tie_word_embeddings"] is False
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"]) == ("<s>", "</s>", "<|endoftext|>")
    assert tok_config["chat_template"].startswith("{% for m in messages %}")
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                         "pad_token_id": 0}
    # the data file is only float32 weights (aligned), nothing inline in the graph but small constants
    data_size = (out / "model.onnx.data").stat().st_size
    assert (out / "model.onnx").stat().st_size < 64 * 1024 < data_size


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out, _ = _import(tmp_path_factory.mktemp("tok"), TinyLlama())
    return Tokenizer.from_file(str(out / "tokenizer.json"))


def test_tokenizer_from_gguf_metadata(tmp_path: Path) -> None:
    out, _ = _import(tmp_path, TinyLlama())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokens, _ = tiny_vocab()
    ids = tok.encode("<s>the thin 42<tool>", add_special_tokens=False).ids
    pieces = [tokens[i] for i in ids]
    # specials and user tokens stay whole; BPE merges by rank; "smollm" splits digits one by one
    assert pieces == ["<s>", "t", "he", "Ġt", "h", "in", "Ġ", "4", "2", "<tool>"]
    assert tok.decode(ids, skip_special_tokens=False) == "<s>the thin 42<tool>"
    assert tok.encode("the", add_special_tokens=True).ids == tok.encode("the", add_special_tokens=False).ids


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    src = tmp_path / "gpt2.gguf"
    write_tiny_llama(src, TinyLlama(arch="gpt2"))
    with pytest.raises(UnsupportedArchitectureError, match="architecture 'gpt2' is not supported"):
        import_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    src = tmp_path / "q5.gguf"
    cfg = TinyLlama(matrix_type=QT.Q5_0)
    write_tiny_llama(src, cfg)
    with pytest.raises(UnsupportedTensorTypeError, match=r"'blk\.0\.attn_k\.weight'.*Q5_0"):
        import_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [src]  # no half-written folder left behind


def test_per_layer_head_counts(tmp_path: Path) -> None:
    uniform = TinyLlama(kv_heads_per_layer=[2, 2])
    out, weights = _import(tmp_path, uniform, "uniform")
    np.testing.assert_allclose(_prefill(_session(out), uniform, IDS), reference_logits(weights, uniform, IDS),
                               atol=2e-4, rtol=1e-4)
    src = tmp_path / "varying.gguf"
    write_tiny_llama(src, TinyLlama(kv_heads_per_layer=[2, 1]))
    with pytest.raises(UnsupportedArchitectureError, match=r"per-layer values of llama\.attention\.head_count_kv"):
        import_gguf(src, tmp_path / "out")


def test_extra_tensors_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "bias.gguf"
    cfg = TinyLlama(extra_tensors={"blk.0.attn_q.bias": (np.zeros(64, np.float32), QT.F32)})
    write_tiny_llama(src, cfg)
    with pytest.raises(UnsupportedArchitectureError, match=r"blk\.0\.attn_q\.bias"):
        import_gguf(src, tmp_path / "out")


def test_unknown_tokenizer_model_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "bert.gguf"
    write_tiny_llama(src, TinyLlama(tokenizer_model="bert"))
    with pytest.raises(UnsupportedTokenizerError, match="tokenizer model 'bert' is not supported"):
        import_gguf(src, tmp_path / "out")


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "pre.gguf"
    write_tiny_llama(src, TinyLlama(pre="deepseek-coder"))
    with pytest.raises(UnsupportedTokenizerError, match="'deepseek-coder'"):
        import_gguf(src, tmp_path / "out")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    src = tmp_path / "junk.gguf"
    src.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFImportError, match="not a readable GGUF"):
        import_gguf(src, tmp_path / "out")


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.99])
def test_truncated_gguf_file(tmp_path: Path, keep: float) -> None:
    src = tmp_path / "m.gguf"
    write_tiny_llama(src, TinyLlama())
    data = src.read_bytes()
    src.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(GGUFImportError, match="not a readable GGUF file"):
        import_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    src = tmp_path / "m.gguf"
    write_tiny_llama(src, TinyLlama())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GGUFImportError, match="already exists"):
        import_gguf(src, out)
    assert (out / "keep.txt").read_text() == "mine"
    import_gguf(src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()


def test_progress_reports_every_byte(tmp_path: Path) -> None:
    src = tmp_path / "m.gguf"
    write_tiny_llama(src, TinyLlama())
    calls: list[tuple[int, int]] = []
    result = import_gguf(src, tmp_path / "out", progress=lambda done, total: calls.append((done, total)))
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and calls[-1][0] == calls[-1][1]
    per_layer = 2 * 64 + 64 * (64 + 2 * 32) + 64 * 64 + 64 * 2 * 96 + 96 * 64  # norms, qkv, o, gate+up, down
    assert calls[-1][1] == 4 * (264 * 64 + 2 * per_layer + 64)
    assert result.data_bytes >= calls[-1][1]


def test_cli_command(tmp_path: Path) -> None:
    src = tmp_path / "m.gguf"
    write_tiny_llama(src, TinyLlama())
    runner = CliRunner()
    result = runner.invoke(import_gguf_cli, [str(src), "--out", str(tmp_path / "cli-out")])
    assert result.exit_code == 0, result.output
    assert "imported m.gguf" in result.output
    assert (tmp_path / "cli-out" / "model.onnx").is_file()
    again = runner.invoke(import_gguf_cli, [str(src), "--out", str(tmp_path / "cli-out")])
    assert isinstance(again.exception, GGUFImportError)
    forced = runner.invoke(import_gguf_cli, [str(src), "--out", str(tmp_path / "cli-out"), "--force"])
    assert forced.exit_code == 0, forced.output


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=40))
def test_byte_level_tokenizer_round_trips_any_text(tiny_tokenizer: Tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text, add_special_tokens=False).ids
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_huge_declared_context_is_refused_before_tables_are_built(tmp_path: Path) -> None:
    import gguf as gguf_pkg

    src = tmp_path / "m.gguf"
    write_tiny_llama(src, TinyLlama())
    reader = gguf_pkg.GGUFReader(src, "r+")  # patch the declared context length in place: 2**31 positions
    field = reader.fields["llama.context_length"]
    field.parts[field.data[0]][0] = 2 ** 31
    del reader
    with pytest.raises(GGUFImportError, match="context length 2,147,483,648"):
        import_gguf(src, tmp_path / "out")
