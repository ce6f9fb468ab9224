"""The 4-bit numeric class (``q4_1-cpu``, the default model as served) keeps honest and cheating apart.

The verifier runs SmolLM2-135M-Instruct imported with its GGUF weights kept 4-bit, at the tolerance its own
calibration measured. Honest executors that run the same weights another way (threads, optimization level,
one prefill instead of KV decode, or the exact fp32 dequantization of those weights) are accepted; the 4-bit
weights perturbed by 0.1 % are rejected, greedy and sampled. The original fp32 weights and other
quantizations (Q4_0, Q8_0) claimed under a Q4_1 digest are rejected on a tiny Llama whose float weights we
have (SmolLM2's are not available offline). Real models, real onnxruntime sessions; nothing is patched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from p2pinfer.gguf import import_gguf
from p2pinfer.kernels import DecodePath
from p2pinfer.runtime import GREEDY, SamplingParams, calibrate, generate, load_model, sampling_seed, verify_result
from p2pinfer.runtime.fingerprint import FingerprintBuilder
from p2pinfer.runtime.reference import reference_for
from p2pinfer.runtime.sampling import log_softmax
from p2pinfer.runtime.verify import recompute_logprobs

SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.95)
SEED = sampling_seed(bytes(range(32)), None)
TOKENS = 12
MESSAGES = [{"role": "user", "content": "Name three things a lighthouse keeper does every night."}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("q4class")
    return {weights: import_gguf(smollm2_gguf, root / weights, weights=weights).out_dir for weights in ("native", "fp32")}


@pytest.fixture(scope="module")
def verifier(folders: dict[str, Path]):
    model = load_model(folders["native"], providers=["CPUExecutionProvider"], threads=2)
    assert model.runtime_numeric_class == "q4_1-cpu"
    result = calibrate(model, new_tokens=4)
    model.tolerance = result.tolerance
    assert result.tolerance < 0.01, result.variants  # small enough to tell 0.1 % apart
    return model


@pytest.fixture(scope="module")
def prompt(verifier) -> list[int]:
    return verifier.prompt_ids(messages=MESSAGES)


def _verify(verifier, result, params):
    return verify_result(verifier, prompt_ids=result.prompt_ids, output_ids=result.output_ids,
                         fingerprint=result.fingerprint_bytes, params=params, seed_material=SEED,
                         max_tokens=TOKENS, finish_reason=result.finish_reason, stop_at_first=False)


def _claim(folder: Path, verifier, **session):
    """An executor serving ``folder`` while announcing the verifier's (4-bit) digest."""
    return load_model(folder, digest=verifier.digest, name=verifier.name, numeric_class=verifier.numeric_class,
                      providers=["CPUExecutionProvider"], **session)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("threads,optimization,kernel,amx,decode", [
    (1, "disable", True, True, None), (2, "basic", True, True, None), (2, "all", True, False, None),
    (2, "all", False, False, None), (2, "all", True, True, DecodePath.FLOAT)])
def test_honest_4bit_variants_are_accepted(verifier, prompt, params, threads, optimization, kernel, amx,
                                           decode) -> None:
    """Another session, the kernel without AMX tiles (a peer whose CPU lacks them: float32 FMA for many rows), the
    standard graph (a peer without the 4-bit kernel) and the kernel's float32 decode path (a peer without AVX-512
    VNNI) against the kernel's verifier (on AMX tiles where this CPU has them), and the other way round."""
    assert verifier.runs_kernel, "the 4-bit kernel should be available here (CI installs gcc)"
    executor = verifier.with_session(threads=threads, optimization=optimization, kernel=kernel, amx=amx,
                                     decode=decode)
    assert executor.runs_kernel == kernel
    assert executor.runs_amx == (amx and verifier.runs_amx)
    r = generate(executor, prompt, max_tokens=TOKENS, params=params, seed_material=SEED, stop_at_eos=False)
    v = _verify(verifier, r, params)
    assert v.accept, (v.reason, v.max_deviation, verifier.tolerance)
    if not kernel or not amx or decode is not None:  # a verifier without the kernel (or AMX, or the integer
        # decode path) accepts the kernel's output
        theirs = generate(verifier, prompt, max_tokens=TOKENS, params=params, seed_material=SEED, stop_at_eos=False)
        executor.tolerance = verifier.tolerance
        v = _verify(executor, theirs, params)
        assert v.accept, (v.reason, v.max_deviation, verifier.tolerance)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_an_avx2_peer_decoding_on_the_integer_path_is_accepted(verifier, folders, prompt, params,
                                                               monkeypatch) -> None:
    """A peer whose CPU has AVX2 but not AVX-512 (the kernel built for x86-64-v3: integer decode rows on
    vpmaddubsw, many rows on float32 FMA) serves and is verified by this CPU's verifier, and verifies it back."""
    from p2pinfer import kernels

    monkeypatch.setenv("P2PINFER_KERNEL_MARCH", "x86-64-v3")
    executor = _claim(folders["native"], verifier, threads=2)
    assert kernels.library_isa(kernels.library_path()) == "avx2"
    monkeypatch.delenv("P2PINFER_KERNEL_MARCH")
    assert executor.decode_path is DecodePath.INTEGER and not executor.runs_amx
    r = generate(executor, prompt, max_tokens=TOKENS, params=params, seed_material=SEED, stop_at_eos=False)
    v = _verify(verifier, r, params)
    assert v.accept, (v.reason, v.max_deviation, verifier.tolerance)
    theirs = generate(verifier, prompt, max_tokens=TOKENS, params=params, seed_material=SEED, stop_at_eos=False)
    executor.tolerance = verifier.tolerance
    v = _verify(executor, theirs, params)
    assert v.accept, (v.reason, v.max_deviation, verifier.tolerance)


def test_decode_rows_are_within_tolerance_of_the_float64_reference(verifier, prompt) -> None:
    """Each decode path's KV rows against the float64 reference pass of the same graph: well inside the calibrated
    tolerance (the integer path rounds the activation to 2^-22 of each block's largest value, nothing else)."""
    tokens = generate(verifier, prompt, max_tokens=3, stop_at_eos=False).output_ids
    reference = reference_for(verifier)
    exact = [reference.logprobs(prompt + tokens[:k], last=1)[0] for k in (1, 3)]
    paths = [verifier] + ([verifier.with_session(threads=2, decode=DecodePath.FLOAT)]
                          if verifier.decode_path is DecodePath.INTEGER else [])
    for model in paths:
        _, cache = model.forward(prompt, model.empty_cache(), last=1)
        decoder = model.decoder(cache, capacity=len(prompt) + len(tokens))
        rows = [decoder.step(token).copy() for token in tokens]  # the row predicting the next token
        drift = max(float(np.abs(log_softmax(rows[i]) - exact[j]).max()) for i, j in ((0, 0), (2, 1)))
        assert drift < verifier.tolerance / 2, (model.decode_path, drift, verifier.tolerance)


def test_prefill_fingerprint_is_accepted(verifier, prompt) -> None:
    honest = generate(verifier, prompt, max_tokens=TOKENS, params=SAMPLED, seed_material=SEED, stop_at_eos=False)
    rows = recompute_logprobs(verifier.with_session(threads=1, optimization="disable"), prompt, honest.output_ids)
    builder = FingerprintBuilder()
    for row in rows:
        builder.add(row)
    v = verify_result(verifier, prompt_ids=prompt, output_ids=honest.output_ids, fingerprint=builder.build().pack(),
                      params=SAMPLED, seed_material=SEED, max_tokens=TOKENS, finish_reason=honest.finish_reason)
    assert v.accept, (v.reason, v.max_deviation)


def _perturbed_copy(src: Path, dst: Path, relative: float, seed: int = 7) -> int:
    """Copy ``src`` and multiply every 4-bit block scale by ``1 + relative * N(0, 1)`` (each weight moves by
    about ``relative`` of itself: what a cheaper, slightly different model looks like)."""
    shutil.copytree(src, dst)
    proto = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    rng = np.random.default_rng(seed)
    changed = 0
    with open(dst / "model.onnx.data", "r+b") as fh:
        for tensor in proto.graph.initializer:
            if not tensor.name.endswith(".scales") or ".layers." not in tensor.name:
                continue
            ext = {e.key: e.value for e in tensor.external_data}
            fh.seek(int(ext["offset"]))
            values = np.frombuffer(fh.read(int(ext["length"])), dtype="<f4").copy()
            values *= 1 + relative * rng.standard_normal(values.shape).astype(np.float32)
            fh.seek(int(ext["offset"]))
            fh.write(values.astype("<f4").tobytes())
            changed += values.size
    return changed


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_perturbed_4bit_weights_are_rejected(verifier, folders, prompt, params, tmp_path: Path) -> None:
    assert _perturbed_copy(folders["native"], tmp_path / "perturbed", 0.001) > 0
    cheat = _claim(tmp_path / "perturbed", verifier, threads=2)
    r = generate(cheat, prompt, max_tokens=TOKENS, params=params, seed_material=SEED, stop_at_eos=False)
    v = _verify(verifier, r, params)
    assert not v.accept and v.max_deviation > verifier.tolerance, (v.reason, v.max_deviation)


def test_fp32_dequantization_of_the_same_4bit_weights_is_the_same_model(verifier, folders, prompt) -> None:
    """Not a cheat: ``--weights fp32`` holds the very values of the 4-bit weights (llama.cpp's numerics), so
    an executor running it computes the same function and passes (the digests differ, so it is announced
    under its own digest and class in practice)."""
    executor = _claim(folders["fp32"], verifier, threads=2)
    r = generate(executor, prompt, max_tokens=TOKENS, params=SAMPLED, seed_material=SEED, stop_at_eos=False)
    v = _verify(verifier, r, SAMPLED)
    assert v.accept and v.max_deviation < verifier.tolerance, (v.reason, v.max_deviation)


# -- original fp32 weights and other quantizations: a tiny Llama whose float weights we have ----------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same float weights (same seed) written as F32 (the original), Q4_1 (the served 4-bit class),
    Q4_0 and Q8_0 (other quantizations), each imported with its weights kept as stored."""
    from gguf import GGMLQuantizationType as QT

    from gguf_fixtures import TinyLlama, write_tiny_llama

    root = tmp_path_factory.mktemp("tinyq")
    out = {}
    for qtype in (QT.F32, QT.Q4_1, QT.Q4_0, QT.Q8_0):
        src = root / f"{qtype.name}.gguf"
        write_tiny_llama(src, TinyLlama(matrix_type=qtype, hidden=128, intermediate=256, n_layers=2))
        out[qtype.name] = import_gguf(src, root / qtype.name).out_dir
    return out


@pytest.fixture(scope="module")
def tiny_verifier(tiny: dict[str, Path]):
    model = load_model(tiny["Q4_1"], providers=["CPUExecutionProvider"], threads=2)
    assert model.runtime_numeric_class == "q4_1-cpu"
    model.tolerance = calibrate(model, prompts=("the the in he", "<tool> inthe"), new_tokens=8).tolerance
    return model


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("executor", ["Q4_1", "F32", "Q4_0", "Q8_0"])
def test_original_fp32_or_another_quantization_under_the_4bit_digest_is_rejected(tiny, tiny_verifier, executor,
                                                                                params) -> None:
    prompt = tiny_verifier.encode("the in he the")
    model = _claim(tiny[executor], tiny_verifier, threads=1)
    r = generate(model, prompt, max_tokens=TOKENS, params=params, seed_material=SEED, stop_at_eos=False)
    v = verify_result(tiny_verifier, prompt_ids=prompt, output_ids=r.output_ids, fingerprint=r.fingerprint_bytes,
                      params=params, seed_material=SEED, max_tokens=TOKENS, finish_reason=r.finish_reason,
                      stop_at_first=False)
    if executor == "Q4_1":  # the honest control: same weights, another session
        assert v.accept, (v.reason, v.max_deviation)
    else:
        assert not v.accept and v.max_deviation > tiny_verifier.tolerance, (executor, v.reason, v.max_deviation)
