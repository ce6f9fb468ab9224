"""The float64 reference forward pass (runtime/reference.py) agrees with onnxruntime and with PyTorch.

The tie-break rule (runtime/tiebreak.py) is sound only if every honest float32 row lies within its calibrated
tie tolerance (runtime/tie_tolerance.py) of the exact-arithmetic log-probs, which the reference stands for. So:
on every fixture graph (ai.onnx operators from PyTorch exports) and on the GGUF-imported SmolLM2 (com.microsoft
MatMulNBits and GroupQueryAttention), the reference is within the session's tie tolerance of onnxruntime's rows,
and within the (pair) tolerance (plus the files' 1e-6 rounding) of the PyTorch reference log-probs shipped with
the fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from p2pinfer.gguf import import_gguf
from p2pinfer.runtime import calibrate, load_model
from p2pinfer.runtime.reference import ReferenceModel, reference_for
from p2pinfer.runtime.tie_tolerance import tie_tolerance
from p2pinfer.runtime.verify import recompute_logprobs

FIXTURES = ("tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-llama-trained")
ROUNDING = 1e-6  # reference.json stores log-probs with 6 decimals


def _pytorch_rows(ref: ReferenceModel, case: dict) -> np.ndarray:
    """The reference rows of one case, in the file's layout (row r predicts token r + 1)."""
    ids = list(case["prompt_ids"]) + list(case["continuation_ids"])
    return ref.logprobs(ids[:case["n_positions"]], last=case["n_positions"])


def _check_against_pytorch(rows: np.ndarray, case: dict, bound: float) -> float:
    worst = 0.0
    for r, (top_ids, top_lp) in enumerate(zip(case["topk_ids"], case["topk_logprobs"])):
        got = rows[r][np.asarray(top_ids)]
        worst = max(worst, float(np.max(np.abs(got - np.asarray(top_lp)))))
    assert worst <= bound + ROUNDING, worst
    return worst


@pytest.fixture(scope="module", params=FIXTURES)
def fixture_model(request, shared_models):
    model = load_model(shared_models / request.param, providers=["CPUExecutionProvider"])
    model.tolerance = calibrate(model, new_tokens=8).tolerance
    return model


def test_reference_matches_onnxruntime_and_pytorch_on_fixtures(fixture_model, shared_models) -> None:
    model = fixture_model
    ref = reference_for(model)
    prompt = model.encode("def parse_args(argv):\n    parser = argparse.ArgumentParser()\n")
    output = prompt[:12]  # any tokens: teacher-forced rows
    fp32 = recompute_logprobs(model, prompt, output)
    rows = ref.logprobs(prompt + output[:-1], last=len(output))
    assert rows.dtype == np.float64 and rows.shape == fp32.shape
    assert np.allclose(np.exp(rows).sum(axis=1), 1.0, atol=1e-12)
    assert float(np.max(np.abs(rows - fp32))) <= tie_tolerance(model)  # the near-tie rule's premise, own width
    cases = json.loads((shared_models / model.path.name / "reference.json").read_text())["cases"]
    for case in cases:
        _check_against_pytorch(_pytorch_rows(ref, case), case, model.tolerance)


def test_reference_is_one_pass_per_request_and_keeps_no_float64_weights(trained_model) -> None:
    """Rows do not depend on how many are requested (one prefill, no cache) beyond float64 rounding (BLAS
    blocks a longer product differently), and the weights the reference holds are the stored arrays, not
    float64 copies."""
    ref = reference_for(trained_model)
    ids = trained_model.encode("import os\nimport sys\n\ndef main():\n")
    all_rows = ref.logprobs(ids, last=len(ids))
    for n in (1, 5, len(ids)):
        np.testing.assert_allclose(ref.logprobs(ids[:n], last=1)[0], all_rows[n - 1], rtol=0, atol=1e-10)
    assert all(value.dtype != np.float64 for value in ref._inits.values())
    assert reference_for(trained_model) is ref


def test_reference_refuses_bad_requests(trained_model) -> None:
    ref = reference_for(trained_model)
    with pytest.raises(ValueError):
        ref.logprobs([], last=1)
    with pytest.raises(ValueError):
        ref.logprobs([5, 6], last=3)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, smollm2_gguf):
    folder = tmp_path_factory.mktemp("smollm2-ref") / "SmolLM2-135M-Instruct"
    import_gguf(smollm2_gguf, folder)
    model = load_model(folder, providers=["CPUExecutionProvider"])
    model.tolerance = calibrate(model, new_tokens=8).tolerance
    return model


def test_reference_matches_onnxruntime_and_pytorch_on_smollm2(smollm2, shared_models) -> None:
    """The GGUF graph: 4-bit MatMulNBits (plus block minimums), a quantized embedding, GroupQueryAttention."""
    model = smollm2
    ref = reference_for(model)
    data = json.loads((shared_models / "smollm2-reference.json").read_text())
    case = data["cases"][0]
    prompt, output = list(case["prompt_ids"]), list(case["continuation_ids"])
    fp32 = recompute_logprobs(model, prompt, output)
    all_rows = _pytorch_rows(ref, case)  # one reference pass serves both comparisons
    worst = _check_against_pytorch(all_rows, case, max(model.tolerance, 1e-3))
    rows = all_rows[len(prompt) - 1:len(prompt) - 1 + len(output)]
    drift = float(np.max(np.abs(rows - fp32)))
    assert drift <= tie_tolerance(model), (drift, tie_tolerance(model), model.tolerance, worst)
