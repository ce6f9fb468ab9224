"""Tie tolerances: how calibration turns distances to the float64 reference into per-path widths, and how the
model record keeps them (runtime/calibrate.py, runtime/store.py, runtime/tie_tolerance.py).

A record of an older calibration format has no tie tolerances: it counts as uncalibrated and is calibrated again
before it is served. A record whose tie tolerances are missing or malformed (hand-edited), a path calibration did
not measure, and a model loaded with a tolerance given by hand all fall back to the pair tolerance.
"""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.runtime import ModelStore, calibrate, load_model
from p2pinfer.runtime.calibrate import CALIBRATION_FORMAT, MIN_TOLERANCE, SAFETY_FACTOR, tie_tolerances
from p2pinfer.runtime.store import METADATA_FILE
from p2pinfer.runtime.tie_tolerance import (STANDARD, many_row_path, path_label, session_path,
                                           tie_tolerance)
from p2pinfer.runtime.tie_tolerance import record as tie_record
from p2pinfer.kernels import DecodePath

PATHS = [STANDARD] + [path_label(True, amx, decode) for amx in (True, False) for decode in DecodePath]
drift = st.floats(0.0, 1e-2, allow_nan=False)
steps = st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(["kv", "prefill"]), drift), max_size=12)


@settings(max_examples=200, deadline=None)
@given(steps=steps)
def test_a_paths_width_covers_its_own_kv_and_its_many_row_prefill_steps(steps) -> None:
    drifts = {f"s{n},{mode}": d for n, (_, mode, d) in enumerate(steps)}
    paths = {f"s{n},{mode}": path for n, (path, mode, _) in enumerate(steps)}
    widths = tie_tolerances(drifts, paths)
    kv_paths = {path for path, mode, _ in steps if mode == "kv"}
    prefilled = {many_row_path(path) for path, mode, _ in steps if mode == "prefill"}
    assert set(widths) == {p for p in kv_paths if many_row_path(p) in prefilled}  # measured both ways, or none
    for path, width in widths.items():
        own = [d for p, mode, d in steps if (p == path and mode == "kv")
               or (many_row_path(p) == many_row_path(path) and mode == "prefill")]
        assert width == max(MIN_TOLERANCE, SAFETY_FACTOR * max(own))


def _write(record, **changes) -> None:
    data = json.loads((record.path / METADATA_FILE).read_text())
    data.update(changes)
    (record.path / METADATA_FILE).write_text(json.dumps(data))


def test_the_record_keeps_the_widths_and_a_session_uses_its_paths(shared_models, tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    record = store.import_dir(shared_models / "tiny-llama-trained")
    model = record.load(providers=["CPUExecutionProvider"])
    result = calibrate(model, new_tokens=6)
    record = store.set_calibration(record.digest_hex, result.tolerance, result.to_json())
    assert record.calibrated and set(record.tie_tolerances) == {STANDARD}  # an fp32 graph: the standard path
    reread = store.get(record.digest_hex)
    assert reread.tie_tolerances == result.tie_tolerances
    served = reread.load(providers=["CPUExecutionProvider"])
    assert session_path(served) == STANDARD and tie_tolerance(served) == result.tie_tolerances[STANDARD]
    assert tie_tolerance(served.with_session(threads=1)) == result.tie_tolerances[STANDARD]
    # the premise, as calibration measured it: every step's rows within the width of the float64 reference
    assert max(result.reference_drifts.values()) * SAFETY_FACTOR <= result.tie_tolerances[STANDARD]

    tie_record(served, served.tolerance, {path_label(True, True, DecodePath.INTEGER): 1e-5})
    assert tie_tolerance(served) == served.tolerance  # a record without this session's path: the pair tolerance
    tie_record(served, served.tolerance, result.tie_tolerances)

    by_hand = load_model(shared_models / "tiny-llama-trained", digest=record.digest, numeric_class=record.numeric_class,
                         tolerance=0.2)
    assert tie_tolerance(by_hand) == 0.2  # a tolerance given by hand is not the calibration's: one width

    for malformed in ({}, {STANDARD: -1.0}, {STANDARD: "1e-4"}, {STANDARD: math.inf}, {STANDARD: True}, []):
        # a hand-edited record: that path (or every path) falls back to the pair tolerance
        _write(store.get(record.digest_hex), calibration={**result.to_json(), "format": CALIBRATION_FORMAT,
                                                          "numeric_class": record.numeric_class,
                                                          "tie_tolerances": malformed})
        edited = store.get(record.digest_hex)
        assert edited.calibrated
        assert tie_tolerance(edited.load(providers=["CPUExecutionProvider"])) == edited.tolerance, malformed


def test_an_older_calibration_format_is_calibrated_again(shared_models, tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    record = store.import_dir(shared_models / "tiny-llama-trained")
    older = {"format": CALIBRATION_FORMAT - 1, "worst_drift": 1e-4, "tolerance": 4e-4, "variants": {},
             "numeric_class": record.numeric_class}  # format 5: a pair tolerance, no tie tolerances
    _write(record, tolerance=4e-4, calibration=older)
    stale = store.get(record.digest_hex)
    assert not stale.calibrated and stale.calibration_outdated and stale.tolerance is None
    assert stale.tie_tolerances == {}
    model = stale.load(providers=["CPUExecutionProvider"])
    assert tie_tolerance(model) is None  # nothing is served or verified before it is measured again
