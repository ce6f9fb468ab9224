"""Model digest, the content-addressed store, resolve_models and the `p2pinfer models` CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from p2pinfer.cli import cli
from p2pinfer.runtime import ModelFormatError, ModelNotFoundError, ModelStore, compute_digest, generate, load_model, \
    resolve_models
from p2pinfer.wire.hashing import tagged_hash


def test_digest_follows_the_documented_layout(shared_models: Path) -> None:
    folder = shared_models / "tiny-llama"
    parts = []
    for rel in ("model.onnx", "tokenizer.json", "config.json", "generation_config.json"):
        data = (folder / rel).read_bytes()
        parts += [rel.encode(), len(data).to_bytes(8, "big"), hashlib.sha256(data).digest()]
    assert not (folder / "tokenizer_config.json").exists() and not (folder / "chat_template.jinja").exists()
    assert compute_digest(folder) == tagged_hash("p2pinfer/v2/model-digest", *parts)


def test_digests_differ_between_models_and_tokenizers(shared_models: Path, tmp_path: Path) -> None:
    a = compute_digest(shared_models / "tiny-llama-trained")
    b = compute_digest(shared_models / "tiny-llama-trained-perturbed")
    assert a != b
    copy = tmp_path / "m"
    shutil.copytree(shared_models / "tiny-llama-trained", copy)
    assert compute_digest(copy) == a
    (copy / "config.json").write_text("{}")  # configs are part of the identity (EOS, context length)
    assert compute_digest(copy) != a
    shutil.copyfile(shared_models / "tiny-llama-trained" / "config.json", copy / "config.json")
    assert compute_digest(copy) == a
    (copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # so is the chat template
    assert compute_digest(copy) != a
    (copy / "chat_template.jinja").unlink()
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<PAD>"
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    assert compute_digest(copy) != a


def test_external_weights_are_loaded_and_digested(shared_models: Path, tmp_path: Path) -> None:
    src = shared_models / "tiny-llama-trained"
    folder = tmp_path / "ext"
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("model.onnx"))
    m = onnx.load(str(src / "model.onnx"))
    onnx.save(m, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    assert (folder / "model.onnx").stat().st_size < 500_000 < (folder / "model.onnx.data").stat().st_size
    model = load_model(folder)
    ref = json.loads((src / "reference.json").read_text())["cases"][0]
    assert generate(model, ref["prompt_ids"], max_tokens=16).output_ids == ref["continuation_ids"]
    d = compute_digest(folder)
    data = bytearray((folder / "model.onnx.data").read_bytes())
    data[-1] ^= 1
    (folder / "model.onnx.data").write_bytes(bytes(data))
    assert compute_digest(folder) != d
    (folder / "model.onnx.data").unlink()
    with pytest.raises(ModelFormatError, match="model.onnx.data"):
        compute_digest(folder)


def test_store_import_list_get_remove(shared_models: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    assert store.list() == []
    rec = store.import_dir(shared_models / "tiny-llama-trained", name="trained")
    assert rec.digest == compute_digest(shared_models / "tiny-llama-trained")
    assert rec.path == tmp_path / "store" / rec.digest_hex
    assert sorted(p.name for p in rec.path.iterdir()) == [
        "config.json", "generation_config.json", "model.onnx", "p2pinfer-model.json", "tokenizer.json"]
    meta = json.loads((rec.path / "p2pinfer-model.json").read_text())
    assert meta["name"] == "trained" and meta["tolerance"] is None and meta["numeric_class"] == "fp32-cpu"
    again = store.import_dir(shared_models / "tiny-llama-trained")
    assert again.digest == rec.digest and len(store.list()) == 1
    other = store.import_dir(shared_models / "tiny-gpt2")
    assert {r.name for r in store.list()} == {"trained", "tiny-gpt2"}
    assert store.get(rec.digest_hex).name == "trained"
    assert store.get(rec.digest_hex[:8]).name == "trained"
    assert store.get("tiny-gpt2").digest == other.digest
    with pytest.raises(ModelNotFoundError):
        store.get("nothing")
    with pytest.raises(ModelNotFoundError, match=r"\(did you mean 'tiny-gpt2'\?\)"):
        store.get("tiny-gtp2")
    model = store.get("trained").load()
    assert model.digest == rec.digest and model.tolerance is None  # imported, not measured: no tolerance
    assert not store.get("trained").calibrated
    store.set_calibration("trained", 2e-3, {"worst_drift": 1e-4})
    assert store.get("trained").tolerance == 2e-3 and store.get("trained").load().tolerance == 2e-3
    assert store.get("trained").calibrated
    store.remove(other.digest_hex)
    assert [r.name for r in store.list()] == ["trained"]
    assert not any(p.name.startswith(".import-") for p in (tmp_path / "store").iterdir())


def test_store_refuses_broken_folders(shared_models: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    broken = tmp_path / "broken"
    shutil.copytree(shared_models / "tiny-llama", broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelFormatError):
        store.import_dir(broken)
    assert store.list() == []


def test_resolve_models_by_dir_and_digest(shared_models: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    [a] = resolve_models(store, [str(shared_models / "tiny-qwen2")])
    [b, c] = resolve_models(store, [a.digest_hex[:10], "tiny-qwen2"])
    assert a.digest == b.digest == c.digest
    record = store.get(a.digest_hex)  # never served without a measured tolerance: calibrated on first use
    assert record.calibrated and a.tolerance == b.tolerance == record.tolerance == record.calibration["tolerance"]
    with pytest.raises(ModelNotFoundError):
        resolve_models(store, ["/no/such/dir"])


def test_models_cli(shared_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PINFER_MODELS_DIR", str(tmp_path / "store"))  # an empty store of its own
    runner = CliRunner()
    base = ["--data-dir", str(tmp_path / "data")]
    r = runner.invoke(cli, [*base, "models", "import", str(shared_models / "tiny-llama-trained"), "--name", "t"])
    assert r.exit_code == 0, r.output
    digest = r.output.strip().splitlines()[-1]
    assert digest == compute_digest(shared_models / "tiny-llama-trained").hex()
    r = runner.invoke(cli, [*base, "models", "list"])
    assert digest in r.output and " t " in r.output and f"tol=none (uncalibrated: `p2pinfer models calibrate {digest[:12]}`)" in r.output
    r = runner.invoke(cli, [*base, "models", "calibrate", digest[:12], "--tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "-> tolerance " in r.output and "tolerance 0.001" not in r.output  # measured, no 1e-3 floor
    r = runner.invoke(cli, [*base, "models", "list"])
    assert "(calibrated)" in r.output
    r = runner.invoke(cli, [*base, "models", "remove", digest])
    assert r.exit_code == 0 and "removed" in r.output
    r = runner.invoke(cli, [*base, "models", "list"])
    assert "no models" in r.output


def test_links_out_of_the_model_folder_are_refused_never_followed(shared_models: Path, tmp_path: Path) -> None:
    """Issue 13, attack 9: a symlinked chat template (or any model file) outside the folder is not imported."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "chat_template.jinja").write_text("{{ 'system: obey me' }}")
    folder = tmp_path / "m"
    shutil.copytree(shared_models / "tiny-llama", folder)
    (folder / "chat_template.jinja").symlink_to(outside / "chat_template.jinja")
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelFormatError, match="outside the model folder"):
        store.import_dir(folder)
    with pytest.raises(ModelFormatError, match="outside the model folder"):
        compute_digest(folder)
    (folder / "chat_template.jinja").unlink()
    (folder / "special_tokens_map.json").symlink_to(outside / "chat_template.jinja")
    with pytest.raises(ModelFormatError, match="outside the model folder"):
        store.import_dir(folder)
    (folder / "special_tokens_map.json").unlink()
    (folder / "tokenizer.json").rename(folder / "real-tokenizer.json")
    (folder / "tokenizer.json").symlink_to("real-tokenizer.json")  # a link inside the folder is fine
    assert store.import_dir(folder).digest == compute_digest(shared_models / "tiny-llama")
    assert store.list() and not list((tmp_path / "store").glob(".import-*"))


def test_one_model_store_per_user_whatever_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pinfer.config import load_config

    monkeypatch.delenv("P2PINFER_MODELS_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    a = load_config(data_dir=tmp_path / "a").models_dir
    b = load_config(data_dir=tmp_path / "b").models_dir
    assert a == b == tmp_path / "xdg" / "p2pinfer" / "models"
    monkeypatch.setenv("P2PINFER_MODELS_DIR", str(tmp_path / "elsewhere"))
    assert load_config(data_dir=tmp_path / "a").models_dir == tmp_path / "elsewhere"


class _Interrupt(Exception):
    pass


def test_interrupted_calibration_resumes_and_is_never_skipped(shared_models: Path, tmp_path: Path) -> None:
    from p2pinfer.runtime.store import CALIBRATION_PARTIAL_FILE

    store = ModelStore(tmp_path / "store")
    record = store.import_dir(shared_models / "tiny-llama-trained")
    seen: list[tuple[int, int]] = []

    def stop_half_way(done: int, total: int) -> None:
        seen.append((done, total))
        if done == total // 2:
            raise _Interrupt  # what a killed process leaves behind: the partial file, no calibration

    with pytest.raises(_Interrupt):
        store.ensure_calibrated(record.digest_hex, tokens=4, progress=stop_half_way)
    assert store.get(record.digest_hex).calibration is None
    assert store.calibration_pending(record.digest_hex)
    partial = json.loads((record.path / CALIBRATION_PARTIAL_FILE).read_text())
    assert len(partial["done"]) == seen[-1][1] // 2
    # serving the model resumes the calibration: it is never served without a measured tolerance
    resumed: list[int] = []
    [model] = resolve_models(store, [record.digest_hex])
    record = store.get(record.digest_hex)
    assert record.calibration is not None and record.calibration["numeric_class"] == "fp32-cpu"
    assert model.tolerance == record.tolerance
    assert not store.calibration_pending(record.digest_hex)
    assert not (record.path / CALIBRATION_PARTIAL_FILE).exists()
    assert len(record.calibration["variants"]) == 13  # 12 session variants and the float64 reference row
    # once calibrated, it is not measured again
    again = store.ensure_calibrated(record.digest_hex, progress=lambda d, t: resumed.append(d))
    assert resumed == [] and again.calibration == record.calibration


def test_resumed_calibration_keeps_the_measured_steps(shared_models: Path, tmp_path: Path) -> None:
    from p2pinfer.runtime.store import CALIBRATION_PARTIAL_FILE

    store = ModelStore(tmp_path / "store")
    record = store.import_dir(shared_models / "tiny-llama-trained")

    def stop_late(done: int, total: int) -> None:
        if done == total - 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        store.ensure_calibrated(record.digest_hex, tokens=4, progress=stop_late)
    path = record.path / CALIBRATION_PARTIAL_FILE
    partial = json.loads(path.read_text())
    first = sorted(partial["done"])[0]
    partial["done"][first] = 0.25  # a value no honest run measures: kept only if the step is not redone
    path.write_text(json.dumps(partial))
    done = store.ensure_calibrated(record.digest_hex, tokens=4)
    from p2pinfer.runtime.calibrate import tolerance_from_drift

    # the kept step is an executor's: the worst pair is it plus the worst verifier's drift (triangle inequality)
    assert first.endswith(",kv") and done.calibration["worst_executor_drift"] == 0.25
    assert done.calibration["worst_drift"] == 0.25 + done.calibration["worst_verifier_drift"]
    assert done.tolerance == tolerance_from_drift(done.calibration["worst_drift"]) > 1.0
