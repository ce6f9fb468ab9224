"""Issue 13, attack 8: the tolerance is a measurement, not a floor.

On every shared fixture, calibration measures honest drift (threads x optimization levels x KV decode vs
prefill) and sets ``tolerance = max(1e-5, 4 x drift)``. An executor running the same model with its weights
rounded to fp16, or with 0.1 % multiplicative weight noise (variants built here from the fixture's own
weights), is rejected, by more than another safety factor (deviation > 4 x tolerance); honest variants are
accepted. Before, the 1e-3 floor accepted both on tiny-qwen2 and tiny-gpt2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from p2pinfer.runtime import SamplingParams, calibrate, generate, load_model, sampling_seed, verify_result
from p2pinfer.runtime.calibrate import MIN_TOLERANCE, SAFETY_FACTOR

FIXTURES = ["tiny-qwen2", "tiny-gpt2", "tiny-llama", "tiny-llama-trained"]
PROMPT = "def parse_args(argv):\n    parser = argparse."
N = 16


def _variant(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    graph = onnx.load(str(dst / "model.onnx"))
    for init in graph.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            weights = numpy_helper.to_array(init)
            if weights.ndim >= 1 and weights.size > 1:  # weights and norms, not scalar constants
                init.CopyFrom(numpy_helper.from_array(change(weights).astype(np.float32), init.name))
    onnx.save(graph, str(dst / "model.onnx"))
    return dst


@pytest.fixture(scope="module", params=FIXTURES)
def calibrated(request, shared_models):
    model = load_model(shared_models / request.param, providers=["CPUExecutionProvider"])
    result = calibrate(model, new_tokens=16)
    assert (MIN_TOLERANCE, SAFETY_FACTOR) == (1e-5, 4.0)  # the stated rule (docs/models.md, "Tolerance")
    assert result.tolerance == max(1e-5, 4 * result.worst_drift)
    model.tolerance = result.tolerance
    return model


def _verdict(verifier, executor, params: SamplingParams, seed: bytes):
    prompt_ids = verifier.encode(PROMPT)
    out = generate(executor, prompt_ids, max_tokens=N, params=params, seed_material=seed, stop_at_eos=False)
    return verify_result(verifier, prompt_ids=prompt_ids, output_ids=out.output_ids,
                         fingerprint=out.fingerprint_bytes, params=params, seed_material=seed, max_tokens=N,
                         finish_reason=out.finish_reason, commitment=out.commitment, stop_at_eos=False)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8)], ids=["greedy", "T0.8"])
def test_fp16_weights_and_noise_are_rejected_honest_variants_accepted(calibrated, params, tmp_path) -> None:
    model = calibrated
    seed = sampling_seed(bytes(32), 5)
    rng = np.random.default_rng(0)
    cheats = {
        "fp16-weights": _variant(model.path, tmp_path / "fp16", lambda w: w.astype(np.float16)),
        "noise-0.1%": _variant(model.path, tmp_path / "noise",
                               lambda w: w * (1 + 1e-3 * rng.standard_normal(w.shape))),
    }
    for name, folder in cheats.items():
        verdict = _verdict(model, load_model(folder, providers=["CPUExecutionProvider"]), params, seed)
        assert not verdict.accept, (name, model.tolerance, verdict.max_deviation)
        # with room: still rejected if honest drift were another safety factor larger than calibration saw
        assert verdict.max_deviation > SAFETY_FACTOR * model.tolerance, (name, model.tolerance, verdict.max_deviation)
    for threads, optimization in ((1, "disable"), (2, "basic"), (1, "all")):
        verdict = _verdict(model, model.with_session(threads=threads, optimization=optimization), params, seed)
        assert verdict.accept, (threads, optimization, verdict.reason)
