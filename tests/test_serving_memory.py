"""A serving SmolLM2 process's verification peaks, measured as the benchmark measures them.

``benchmarks/default_model.py``'s ``memory_probe`` runs a fresh process that imports the peer's modules, loads
the model, generates and verifies a greedy and a sampled (T = 0.8, top-p 0.95) request, and reads ``VmHWM``
(reset before each verification through ``/proc/self/clear_refs``) against the model files. The goal (#15) is
files + 300 MB; this asserts files + 275 MB for 128-token requests, which measured files + 206-235 MB on both
classes (docs/models.md, "Serving memory"): a margin of 40-70 MB against glibc's run-to-run scatter of
+-10-25 MB. Memory does not depend on the machine's load. The 512-token requests (files + 212-262 MB) are
left to the benchmark: they take minutes on a loaded machine. The process's peak (loading the model included)
must stay within files + 300 MB too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from p2pinfer.gguf import import_gguf

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 275e6  # above the model files
SERVING_LIMIT_BYTES = 300e6
# the calibrated pair tolerances of the two classes (docs/models.md): honest requests must be accepted at them
TOLERANCE = {"native": 1.79e-3, "fp32": 5.21e-4}


def _benchmark():
    spec = importlib.util.spec_from_file_location("default_model_benchmark", REPO / "benchmarks" / "default_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("weights", ["native", "fp32"])
def test_verification_peaks_stay_within_the_files_plus_275_mb(tmp_path: Path, smollm2_gguf: Path, weights: str):
    if not Path("/proc/self/clear_refs").exists():
        pytest.fail("/proc/self/clear_refs is missing: this test reads a verification's peak through it (Linux)")
    bench = _benchmark()
    folder = import_gguf(smollm2_gguf, tmp_path / weights, weights=weights).out_dir
    files = bench.folder_bytes(folder)
    probe = bench.memory_probe(folder, threads=2, tokens=128, tolerance=TOLERANCE[weights])
    assert probe["accept"] == [True, True], probe
    stages = probe["stages"]
    for label in ("greedy", "sampled"):
        verified = stages[f"verified {label}"]
        assert verified["reset"], "the peak could not be reset before the verification"
        assert verified["peak"] - files <= LIMIT_BYTES, (label, (verified["peak"] - files) / 1e6, stages)
    assert stages["released sampled"]["rss"] - files <= SERVING_LIMIT_BYTES, stages
    # and the process's own peak, loading included: creating the fp32 session (every weight page mapped beside
    # its pre-packed copy) set it at files + 301 MB until the library pages were dropped before it (now ~260)
    assert probe["peak"] - files <= SERVING_LIMIT_BYTES, (probe["peak"] - files) / 1e6
