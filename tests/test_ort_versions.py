"""Issue 13: 0 false rejects when executor and verifier run different onnxruntime versions.

An older onnxruntime (:data:`OLD_ORT`, the release line the issue-13 audit used) is installed from PyPI with ``pip --target`` into the pytest cache (a
temporary folder when the cache is off) and put first on ``sys.path`` of a subprocess
(tests/ort_version_worker.py). On every shared fixture, greedy and sampled, over several prompts:

* the old version executes (KV-cache decode, fingerprints) and this process verifies on the installed
  onnxruntime, at the tolerance it calibrated for itself: every result accepted;
* the reverse: this process executes and the old version verifies at the tolerance *it* calibrated;
* the cross-version drift (largest difference of any log-prob in the vocabulary, executor's KV decode vs the
  other version's prefill) stays within both sides' calibrated tolerances.

A result with one token changed is rejected across versions too, so the check is not vacuous. If the
download fails, the test fails and says so: it never skips.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

import ort_version_worker as worker

OLD_ORT = "1.19.2"  # the oldest line that imports under numpy 2 (1.18 does not); runs every fixture graph
FIXTURES = ["tiny-llama-trained", "tiny-qwen2", "tiny-gpt2", "tiny-llama"]
PROMPTS = ["def parse_args(argv):\n    parser = argparse.", "The history of the lighthouse begins", "import os\n"]
PARAMS = [{"temperature": 0.0}, {"temperature": 0.8}, {"temperature": 1.5, "top_p": 0.95}]
TOKENS = 16
WORKER = Path(worker.__file__)


@pytest.fixture(scope="module")
def old_onnxruntime(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(request.config, "cache", None)
    base = cache.mkdir("onnxruntime") if cache is not None else tmp_path_factory.mktemp("onnxruntime")
    target = base / f"{OLD_ORT}-{sys.implementation.cache_tag}-{platform.machine()}"
    if (target / "onnxruntime" / "__init__.py").is_file():
        return target
    partial = base / f".{target.name}.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                          "--no-deps", "--target", str(partial), f"onnxruntime=={OLD_ORT}"],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        said = [line.strip() for line in (pip.stderr or pip.stdout).splitlines() if line.strip()]
        why = next((line for line in reversed(said) if line.startswith("ERROR")), said[-1] if said else "?")[:300]
        pytest.fail(f"could not install onnxruntime {OLD_ORT} from PyPI for the cross-version test ({why}); "
                    f"it needs network access to PyPI", pytrace=False)
    try:
        os.replace(partial, target)
    except OSError:  # another session installed it first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _drift(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def test_executor_and_verifier_on_different_onnxruntime_versions(shared_models: Path, old_onnxruntime: Path,
                                                                   tmp_path: Path) -> None:
    assert onnxruntime.__version__ != OLD_ORT
    dirs = [str(shared_models / name) for name in FIXTURES]
    tasks = [{"model_dir": d, "prompt": p, "max_tokens": TOKENS, "seed": i, **params}
             for d in dirs for i, p in enumerate(PROMPTS) for params in PARAMS]
    models = {d: worker.load(d) for d in dirs}  # calibrated here, on this onnxruntime
    ours = [worker.execute(models[t["model_dir"]], t) for t in tasks]

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model_dirs": dirs, "tasks": tasks, "claims": [c for c, _ in ours]}))
    run = subprocess.run([sys.executable, str(WORKER), str(old_onnxruntime), str(job), str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads((tmp_path / "result.json").read_text())
    assert theirs["onnxruntime"] == OLD_ORT
    assert Path(theirs["onnxruntime_file"]).resolve().is_relative_to(old_onnxruntime.resolve())
    rows = np.load(tmp_path / "rows.npz")

    drift: dict[str, float] = {}
    for i, (claim, task) in enumerate(zip(theirs["claims"], tasks)):  # old executes, we verify
        assert len(claim["output_ids"]) == TOKENS
        verdict, prefill = worker.verify(models[task["model_dir"]], claim)
        assert verdict["accept"], (OLD_ORT, "->", onnxruntime.__version__, task, verdict)
        name = Path(task["model_dir"]).name
        drift[name] = max(drift.get(name, 0.0), _drift(rows[f"kv{i}"], prefill))
    for i, (verdict, task) in enumerate(zip(theirs["verdicts"], tasks)):  # we execute, old verifies
        assert verdict["accept"], (onnxruntime.__version__, "->", OLD_ORT, task, verdict)
        name = Path(task["model_dir"]).name
        drift[name] = max(drift.get(name, 0.0), _drift(ours[i][1], rows[f"prefill{i}"]))

    same = sum(c["output_ids"] == o["output_ids"] for c, (o, _) in zip(theirs["claims"], ours))
    for d in dirs:
        name = Path(d).name
        ours_tol, theirs_tol = models[d].tolerance, theirs["tolerances"][d]
        print(f"{name}: cross-version drift {drift[name]:.3g}, tolerance {ours_tol:.3g} "
              f"(onnxruntime {onnxruntime.__version__}) / {theirs_tol:.3g} (onnxruntime {OLD_ORT})")
        assert drift[name] <= min(ours_tol, theirs_tol), (name, drift[name], ours_tol, theirs_tol)
    print(f"{same}/{len(tasks)} results token-identical across versions")

    # not vacuous: a sampled result from the old version with one token changed is rejected here
    claim = dict(theirs["claims"][1])
    claim["output_ids"] = [*claim["output_ids"][:-1], (claim["output_ids"][-1] + 1) % 64]
    verdict, _ = worker.verify(models[tasks[1]["model_dir"]], claim)
    assert not verdict["accept"], verdict
