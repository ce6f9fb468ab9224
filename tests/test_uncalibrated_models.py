"""Issue 13: a tolerance is only ever measured; an uncalibrated model is calibrated before it serves, or refused.

There is no default tolerance any more (it was 1e-3, a floor that let fp16 weights and 0.1 % weight noise
through). The library refuses to verify with a model that has none, with a one-line error saying how to
calibrate it; a store never hands out the old default; a serving peer measures a model's tolerance before it
announces, bids for or verifies it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from p2pinfer import log
from p2pinfer.localnet import local_network
from p2pinfer.request.client import AsyncClient
from p2pinfer.runtime import (
    GREEDY,
    ModelNotCalibratedError,
    ModelStore,
    ensure_tolerance,
    generate,
    load_model,
    resolve_models,
    sampling_seed,
    tolerance_from_drift,
    verify_result,
)
from p2pinfer.runtime.store import METADATA_FILE

MODEL_NAME = "tiny-llama-trained"


def _uncalibrated(shared_models: Path):
    return load_model(shared_models / MODEL_NAME, name=MODEL_NAME, providers=["CPUExecutionProvider"])


def test_verifying_without_a_measured_tolerance_is_a_clear_error(shared_models: Path) -> None:
    model = _uncalibrated(shared_models)
    assert model.tolerance is None
    prompt = model.encode("import os\n")
    seed = sampling_seed(bytes(32), 0)
    out = generate(model, prompt, max_tokens=4, params=GREEDY, seed_material=seed)  # running needs none
    args = dict(prompt_ids=prompt, output_ids=out.output_ids, fingerprint=out.fingerprint_bytes, params=GREEDY,
                seed_material=seed, max_tokens=4, finish_reason=out.finish_reason, commitment=out.commitment)
    with pytest.raises(ModelNotCalibratedError) as caught:
        verify_result(model, **args)
    message = str(caught.value)
    assert "\n" not in message and "no measured tolerance" in message
    assert f"p2pinfer models calibrate {model.digest_hex[:12]}" in message
    assert verify_result(model, tolerance=1e-4, **args).accept  # an explicit tolerance is the caller's choice
    measured = ensure_tolerance(model)
    assert model.tolerance == measured < 1e-3 and ensure_tolerance(model) == measured  # measured once
    assert verify_result(model, **args).accept


def test_a_store_never_serves_the_old_default(shared_models: Path, tmp_path: Path) -> None:
    """A store written before tolerances were always measured holds 0.001 beside "calibration": null."""
    store = ModelStore(tmp_path / "store")
    record = store.import_dir(shared_models / MODEL_NAME)
    assert record.tolerance is None and not record.calibrated
    meta_path = record.path / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["tolerance"] = 0.001
    meta_path.write_text(json.dumps(meta))
    old = store.get(record.digest_hex)
    assert old.tolerance is None and not old.calibrated and old.load().tolerance is None
    [served] = resolve_models(store, [record.digest_hex])
    record = store.get(record.digest_hex)
    assert record.calibrated and served.tolerance == record.tolerance
    assert served.tolerance == tolerance_from_drift(record.calibration["worst_drift"]) < 1e-3


def test_a_calibration_of_an_older_format_is_measured_again(shared_models: Path, tmp_path: Path) -> None:
    """A record calibrated by an older p2pinfer (format 1: distances to one baseline over 32 positions, no
    "format" field) is no measurement of today's calibration: not served with it, calibrated again, and a
    partial file of the older format is not resumed."""
    from p2pinfer.runtime.calibrate import CALIBRATION_FORMAT
    from p2pinfer.runtime.store import CALIBRATION_PARTIAL_FILE

    store = ModelStore(tmp_path / "store")
    record = store.import_dir(shared_models / MODEL_NAME)
    meta_path = record.path / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["tolerance"] = 0.25  # no honest run of this fixture measures that much: it must not survive
    meta["calibration"] = {"worst_drift": 0.0625, "tolerance": 0.25, "variants": {"threads=1,opt=all,kv": 0.0625},
                           "positions": 32, "new_tokens": 16, "seconds": 1.0, "numeric_class": "fp32-cpu"}
    meta_path.write_text(json.dumps(meta))
    (record.path / CALIBRATION_PARTIAL_FILE).write_text(json.dumps(
        {"key": {"digest": record.digest_hex}, "done": {"0|threads=1,opt=all,kv": 0.0625}, "positions": {"0": 16}}))
    old = store.get(record.digest_hex)
    assert not old.calibrated and old.calibration_outdated and old.tolerance is None
    assert old.load().tolerance is None  # never served with the old measurement
    [served] = resolve_models(store, [record.digest_hex])
    record = store.get(record.digest_hex)
    assert record.calibrated and not record.calibration_outdated
    assert record.calibration["format"] == CALIBRATION_FORMAT and "reference" in record.calibration["variants"]
    assert served.tolerance == record.tolerance == tolerance_from_drift(record.calibration["worst_drift"]) < 1e-3
    assert not (record.path / CALIBRATION_PARTIAL_FILE).exists()


async def test_a_peer_measures_the_tolerance_before_it_announces_or_verifies(shared_models: Path) -> None:
    model = _uncalibrated(shared_models)
    lines = io.StringIO()
    log.configure(json=True, level="info", stream=lines)
    try:
        async with local_network([model], peers=3) as net:
            assert model.tolerance is not None and model.tolerance < 1e-3
            async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
                completion = await client.generate(model=MODEL_NAME, prompt="import os\n", max_tokens=8,
                                                   temperature=0.8, verify="wait")
    finally:
        log.configure()
    v = completion.verification
    assert v is not None and v.outcome == "accepted", v
    records = [json.loads(line) for line in lines.getvalue().splitlines() if line.startswith("{")]
    events = [r["event"] for r in records]
    assert events.count("peer.model_calibrated") == 1  # three peers share the model object: measured once
    peer_started = [i for i, r in enumerate(records) if r["event"] == "node.started" and r.get("role") == "peer"]
    assert len(peer_started) == 3 and events.index("peer.model_calibrated") < peer_started[0]  # before joining
