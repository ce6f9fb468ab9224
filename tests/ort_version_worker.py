"""One side of the cross-onnxruntime-version test (tests/test_ort_versions.py), run in-process or as a script.

As a script it runs under another onnxruntime, installed with ``pip --target`` into a folder put first on
``sys.path`` before anything imports onnxruntime::

    python tests/ort_version_worker.py ORT_DIR JOB.json OUT_DIR

It executes every job on that onnxruntime (what an executor on another version sends), verifies the other
side's results with its own calibrated tolerance (what a verifier on another version judges), and writes the
log-prob rows both ways, so the test can measure the cross-version drift. Output: ``OUT_DIR/result.json``
and ``OUT_DIR/rows.npz``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PROVIDERS = ["CPUExecutionProvider"]


def load(model_dir: str) -> Any:
    """The model, calibrated on this process's onnxruntime (each verifier measures its own tolerance)."""
    from p2pinfer.runtime import ensure_tolerance, load_model

    model = load_model(Path(model_dir), providers=PROVIDERS)
    ensure_tolerance(model)
    return model


def params_of(job: dict[str, Any]) -> Any:
    from p2pinfer.runtime import SamplingParams

    return SamplingParams(temperature=job["temperature"], top_p=job.get("top_p", 1.0))


def seed_of(job: dict[str, Any]) -> bytes:
    from p2pinfer.runtime import sampling_seed

    return sampling_seed(bytes(32), job["seed"])


def execute(model: Any, job: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Generate as an executor does (KV-cache decode, fingerprints); also its KV log-prob rows."""
    from p2pinfer.runtime import generate
    from p2pinfer.runtime.calibrate import executor_logprobs

    prompt_ids = model.encode(job["prompt"])
    out = generate(model, prompt_ids, max_tokens=job["max_tokens"], params=params_of(job),
                   seed_material=seed_of(job), stop_at_eos=False)
    rows = executor_logprobs(model, prompt_ids, out.output_ids)
    claim = {**job, "prompt_ids": prompt_ids, "output_ids": out.output_ids, "finish_reason": out.finish_reason,
             "fingerprint": out.fingerprint_bytes.hex(), "commitment": out.commitment.hex()}
    return claim, rows


def verify(model: Any, claim: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Judge a claim as a verifier does, at the model's calibrated tolerance; also the prefill rows."""
    from p2pinfer.runtime import verify_result
    from p2pinfer.runtime.verify import recompute_logprobs

    verdict = verify_result(model, prompt_ids=claim["prompt_ids"], output_ids=claim["output_ids"],
                            fingerprint=bytes.fromhex(claim["fingerprint"]), params=params_of(claim),
                            seed_material=seed_of(claim), max_tokens=claim["max_tokens"],
                            finish_reason=claim["finish_reason"], commitment=bytes.fromhex(claim["commitment"]),
                            stop_at_eos=False)
    rows = recompute_logprobs(model, claim["prompt_ids"], claim["output_ids"])
    return {"accept": bool(verdict.accept), "reason": verdict.reason, "max_deviation": verdict.max_deviation,
            "tolerance": model.tolerance}, rows


def main(job_path: Path, out_dir: Path) -> None:
    import numpy as np
    import onnxruntime

    job = json.loads(job_path.read_text(encoding="utf-8"))
    models = {d: load(d) for d in job["model_dirs"]}
    claims, verdicts, rows = [], [], {}
    for i, task in enumerate(job["tasks"]):
        claim, kv = execute(models[task["model_dir"]], task)
        claims.append(claim)
        rows[f"kv{i}"] = kv
    for i, claim in enumerate(job["claims"]):  # the other side's results
        verdict, prefill = verify(models[claim["model_dir"]], claim)
        verdicts.append(verdict)
        rows[f"prefill{i}"] = prefill
    np.savez(out_dir / "rows.npz", **rows)
    (out_dir / "result.json").write_text(json.dumps({
        "onnxruntime": onnxruntime.__version__, "onnxruntime_file": onnxruntime.__file__,
        "tolerances": {d: m.tolerance for d, m in models.items()}, "claims": claims, "verdicts": verdicts,
    }), encoding="utf-8")


if __name__ == "__main__":
    ort_dir, job_file, out = sys.argv[1:4]
    sys.path.insert(0, ort_dir)  # before anything imports onnxruntime: this process runs the other version
    main(Path(job_file), Path(out))
