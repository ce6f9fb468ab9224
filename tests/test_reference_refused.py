"""A model whose graph the float64 reference cannot run is refused at calibration, not at its first near tie.

Near ties of the seeded sampler are settled by a float64 pass of the served graph (runtime/reference.py). A
graph with an operator the reference does not implement used to serve normally until its first near tie and
then fail that request. Calibration now runs one reference row before anything else, so such a model never
gets a tolerance, and a peer refuses to start serving it, with one line that names the model and the operator.

The graph here is real: the tiny-llama fixture with one ``Sigmoid`` turned into onnxruntime's contrib
``com.microsoft.QuickGelu``, which onnxruntime runs and ``onnx.reference`` does not know.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import helper

from p2pinfer.runtime import GREEDY, ModelStore, ensure_tolerance, generate, load_model, resolve_models
from p2pinfer.runtime.calibrate import REFERENCE_STEP, calibrate
from p2pinfer.runtime.reference import ReferenceUnsupported
from p2pinfer.runtime.store import CALIBRATION_PARTIAL_FILE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def contrib_model(shared_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("quickgelu") / "tiny-llama-quickgelu"
    shutil.copytree(shared_models / "tiny-llama", folder)
    proto = onnx.load(str(folder / "model.onnx"))
    node = next(n for n in proto.graph.node if n.op_type == "Sigmoid")
    node.op_type, node.domain = "QuickGelu", "com.microsoft"
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(proto, str(folder / "model.onnx"))
    return folder


def _assert_refusal(message: str) -> None:
    assert "\n" not in message
    assert "cannot be served" in message and "QuickGelu" in message


def test_onnxruntime_runs_the_graph_but_calibration_refuses_it(contrib_model: Path) -> None:
    model = load_model(contrib_model, name="quickgelu")
    out = generate(model, model.encode("import os\n"), max_tokens=4, params=GREEDY)  # a servable graph to onnxruntime
    assert len(out.output_ids) == 4
    with pytest.raises(ReferenceUnsupported) as caught:
        ensure_tolerance(model)
    _assert_refusal(str(caught.value))
    assert "'quickgelu'" in str(caught.value) and model.digest_hex[:12] in str(caught.value)
    assert model.tolerance is None  # nothing measured, nothing served


def test_a_peer_refuses_to_serve_it_and_the_store_keeps_it_uncalibrated(contrib_model: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    steps: list[tuple[int, int]] = []
    with pytest.raises(ReferenceUnsupported) as caught:
        resolve_models(store, [str(contrib_model)],
                       calibration_progress=lambda name: lambda done, total: steps.append((done, total)))
    _assert_refusal(str(caught.value))
    assert steps == []  # refused at the first step, before any slow one
    [record] = store.list()
    assert not record.calibrated and record.tolerance is None
    assert not (record.path / CALIBRATION_PARTIAL_FILE).exists()


def test_the_cli_says_why_in_one_line(contrib_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "P2PINFER_MODELS_DIR": str(tmp_path / "store")}
    base = [sys.executable, "-m", "p2pinfer", "--data-dir", str(tmp_path / "data"), "models"]
    imported = subprocess.run([*base, "import", str(contrib_model)], env=env, cwd=REPO, capture_output=True,
                              text=True)
    assert imported.returncode == 0, imported.stderr
    digest = imported.stdout.strip().splitlines()[-1]
    refused = subprocess.run([*base, "calibrate", digest[:12], "--tokens", "4"], env=env, cwd=REPO,
                             capture_output=True, text=True)
    assert refused.returncode == 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, refused.stderr
    _assert_refusal(errors[0])
    assert digest[:12] in errors[0]


def test_a_supported_graph_measures_its_reference_row(shared_models: Path) -> None:
    model = load_model(shared_models / "tiny-llama-trained")
    result = calibrate(model, new_tokens=4)
    # the float64 row is one more honest computation: inside the tolerance calibration sets
    assert 0.0 < result.variants[REFERENCE_STEP] <= result.worst_drift < result.tolerance
