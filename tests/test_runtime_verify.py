"""Verification against the fixtures: honest variants accepted, every dishonest one rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from p2pinfer.runtime import (
    GREEDY, GenerationResult, SamplingParams, calibrate, generate, load_model, sample, sampling_seed, verify_result,
)
from p2pinfer.runtime.fingerprint import commitment
from p2pinfer.runtime.verify import recompute_logprobs

PROMPT = "def parse_args(argv):\n    parser = argparse."
SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.95)
SEED = sampling_seed(bytes(range(32)), None)
N = 48


def _verify(model, result: GenerationResult, params: SamplingParams, **overrides):
    args = dict(prompt_ids=result.prompt_ids, output_ids=result.output_ids, fingerprint=result.fingerprint_bytes,
                params=params, seed_material=SEED, max_tokens=N, finish_reason=result.finish_reason,
                commitment=result.commitment)
    args.update(overrides)
    return verify_result(model, **args)


@pytest.fixture(scope="module")
def prompt_ids(trained_model) -> list[int]:
    return trained_model.encode(PROMPT)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("optimization", ["disable", "basic", "all"])
def test_honest_executor_variants_are_accepted(trained_model, prompt_ids, params, threads, optimization) -> None:
    executor = trained_model.with_session(threads=threads, optimization=optimization)
    result = generate(executor, prompt_ids, max_tokens=N, params=params, seed_material=SEED, stop_at_eos=False)
    verdict = _verify(trained_model, result, params)
    assert verdict.accept, verdict.reason
    assert verdict.positions_checked == N
    assert verdict.max_deviation < 1e-4


def test_prefill_fingerprint_is_accepted(trained_model, prompt_ids) -> None:
    """An executor whose rows come from one full prefill (not KV decode) is accepted as well."""
    ref = generate(trained_model, prompt_ids, max_tokens=N, params=SAMPLED, seed_material=SEED, stop_at_eos=False)
    verifier = trained_model.with_session(threads=1, optimization="disable")
    rows = recompute_logprobs(trained_model, prompt_ids, ref.output_ids)
    from p2pinfer.runtime.fingerprint import FingerprintBuilder

    b = FingerprintBuilder()
    for r in rows:
        b.add(r)
    assert [sample(r, SAMPLED, SEED, i) for i, r in enumerate(rows)] == ref.output_ids
    v = _verify(verifier, ref, SAMPLED, fingerprint=b.build().pack(), commitment=None)
    assert v.accept, v.reason


@pytest.mark.parametrize("control", ["tiny-llama-trained-seed1", "tiny-llama-trained-perturbed"])
def test_other_models_are_rejected(trained_model, shared_models: Path, prompt_ids, control: str) -> None:
    other = load_model(shared_models / control)
    for params in (GREEDY, SAMPLED):
        result = generate(other, prompt_ids, max_tokens=N, params=params, seed_material=SEED, stop_at_eos=False)
        verdict = _verify(trained_model, result, params, stop_at_first=False)
        assert not verdict.accept
        assert verdict.first_bad_position == 0
        assert verdict.positions_failed >= N - 2
        assert verdict.max_deviation > 1e-2


def test_int8_quantized_copy_is_rejected(trained_model, shared_models: Path, tmp_path: Path, prompt_ids) -> None:
    import shutil

    folder = tmp_path / "int8"
    shutil.copytree(shared_models / "tiny-llama-trained", folder, ignore=shutil.ignore_patterns("model.onnx"))
    quantize_dynamic(str(shared_models / "tiny-llama-trained" / "model.onnx"), str(folder / "model.onnx"),
                     weight_type=QuantType.QInt8)
    int8 = load_model(folder)
    result = generate(int8, prompt_ids, max_tokens=N, seed_material=SEED, stop_at_eos=False)
    verdict = _verify(trained_model, result, GREEDY, stop_at_first=False)
    assert not verdict.accept and verdict.first_bad_position == 0
    assert verdict.positions_failed >= N // 2


@pytest.fixture(scope="module")
def honest(trained_model, prompt_ids) -> GenerationResult:
    return generate(trained_model, prompt_ids, max_tokens=N, params=SAMPLED, seed_material=SEED, stop_at_eos=False)


def test_changed_prompt_token_is_rejected(trained_model, honest) -> None:
    prompt = list(honest.prompt_ids)
    prompt[-3] = (prompt[-3] + 1) % 1024
    v = _verify(trained_model, honest, SAMPLED, prompt_ids=prompt)
    assert not v.accept and v.first_bad_position == 0


def test_changed_output_token_is_rejected(trained_model, honest) -> None:
    out = list(honest.output_ids)
    out[10] = int(honest.fingerprint.ids[10][-1])  # the 8th most likely token: plausible but not sampled
    assert out[10] != honest.output_ids[10]
    v = _verify(trained_model, honest, SAMPLED, output_ids=out)
    assert not v.accept and v.first_bad_position == 10


def test_truncated_output_is_rejected(trained_model, honest) -> None:
    short = honest.output_ids[:-5]
    v = _verify(trained_model, honest, SAMPLED, output_ids=short)
    assert not v.accept and "rows" in v.reason
    fp = honest.fingerprint.truncated(len(short))
    data = fp.pack()
    v = _verify(trained_model, honest, SAMPLED, output_ids=short, fingerprint=data, commitment=commitment(data))
    assert not v.accept and "truncated" in v.reason


def test_token_the_seeded_sampler_would_not_pick_is_rejected(trained_model, honest) -> None:
    """Swap the last token for another top-8 token: every fingerprint row stays true, only the sampler
    check can notice."""
    last = len(honest.output_ids) - 1
    alternatives = [int(t) for t in honest.fingerprint.ids[last] if t != honest.output_ids[last]]
    rows = recompute_logprobs(trained_model, honest.prompt_ids, honest.output_ids)
    from p2pinfer.runtime.sampling import is_acceptable

    wrong = next(t for t in alternatives
                 if not is_acceptable(rows[last], SAMPLED, SEED, last, t, trained_model.tolerance)[0])
    out = honest.output_ids[:-1] + [wrong]
    v = _verify(trained_model, honest, SAMPLED, output_ids=out)
    assert not v.accept and v.first_bad_position == last and "sampler" in v.reason
    # the same claim checked with another seed than the request's is rejected too
    v = _verify(trained_model, honest, SAMPLED, seed_material=sampling_seed(bytes(32), 1))
    assert not v.accept


def test_commitment_format_and_finish_reason_are_checked(trained_model, honest) -> None:
    v = _verify(trained_model, honest, SAMPLED, commitment=bytes(32))
    assert not v.accept and "commitment" in v.reason
    v = _verify(trained_model, honest, SAMPLED, fingerprint_format="other/1")
    assert not v.accept
    v = _verify(trained_model, honest, SAMPLED, finish_reason="eos")
    assert not v.accept and "EOS" in v.reason
    v = _verify(trained_model, honest, SAMPLED, fingerprint=b"\x01", commitment=None)
    assert not v.accept and "malformed" in v.reason
    text = trained_model.decode(honest.output_ids[:10])
    v = _verify(trained_model, honest, SAMPLED, stop=[text[-3:]] if text.strip() else ["x"])
    assert not v.accept


def test_calibration_sets_tolerance_from_drift(trained_model) -> None:
    result = calibrate(trained_model, new_tokens=8)
    assert 0 < result.worst_drift < 1e-4
    assert result.tolerance == max(1e-5, 4 * result.worst_drift)
    assert set(result.variants) == {"reference"} | {f"threads={t},opt={o},{m}" for t in (1, 2)
                                                    for o in ("disable", "basic", "all") for m in ("kv", "prefill")}
    # the worst honest executor/verifier pair, bounded through the baseline (triangle inequality)
    assert result.worst_drift == max(result.worst_executor_drift + result.worst_verifier_drift,
                                     result.variants["reference"])
    assert result.worst_executor_drift == max(d for k, d in result.variants.items() if k.endswith(",kv"))
    assert result.worst_verifier_drift == max(d for k, d in result.variants.items() if k.endswith(",prefill"))
