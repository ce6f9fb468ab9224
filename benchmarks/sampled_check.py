"""The sampled check's CPU cost (``sampling.judge_rows``) on real SmolLM2 rows: this tree against another, in one
process, interleaved, best of N.

    python benchmarks/sampled_check.py OLD_TREE [--rounds 5] [--tolerance 1.79e-3] [--logits FILE.npz]

``OLD_TREE`` is a checkout to compare against (``git archive main | tar -x -C /tmp/old``); its
``p2pinfer/runtime/sampling.py`` and ``philox.py`` are loaded beside this tree's (the old sampling module then
reads the old philox module; its other relative imports resolve to this tree's ``row_halves``/``wire``/
``row_stats``, which the check only adds to). The default model (SmolLM2-135M-Instruct,
``q4_1-cpu``) generates 128 tokens for each of three chat prompts under each sampling setting (T = 0.8 with
top-p 0.95, plain T = 1, T = 0.8 with top-k 40; seed material all zeros); the verifier's forward gives their
float32 logits (``--logits`` caches them). Each request's 128 rows then go through both trees' ``judge_rows``
from the same ``LogProbRows``, alternating, and the verdicts (accept and near tie, every row) must be equal.
Printed: best milliseconds per 128 rows of each side, and old / new.
"""

from __future__ import annotations

import argparse
import math
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a long story about a lighthouse keeper who finds a message in a bottle.",
           "Explain how tides work.", "List ten fruits and describe each in a sentence."]


def _requests():
    from p2pinfer.runtime import SamplingParams

    return {"T=0.8 top-p 0.95": SamplingParams(temperature=0.8, top_p=0.95),
            "T=1": SamplingParams(temperature=1.0),
            "T=0.8 top-k 40": SamplingParams(temperature=0.8, top_k=40),
            "greedy": SamplingParams()}


def _logits() -> dict[str, np.ndarray]:
    from p2pinfer import log
    from p2pinfer.gguf import find_default_gguf, import_gguf
    from p2pinfer.runtime import generate, load_model
    from p2pinfer.runtime.verify import _checked_rows

    log.configure(level="warning")
    out = {}
    with tempfile.TemporaryDirectory(prefix="p2pinfer-sampled-check-") as tmp:
        folder = import_gguf(find_default_gguf(), Path(tmp) / "native", weights="native").out_dir
        m = load_model(folder, threads=2, providers=["CPUExecutionProvider"])
        for name, params in _requests().items():
            for j, text in enumerate(PROMPTS):
                prompt = m.prompt_ids(messages=[{"role": "user", "content": text}])
                r = generate(m, prompt, max_tokens=128, params=params, seed_material=bytes(32), stop_at_eos=False)
                seq = [*prompt, *r.output_ids[:-1]]
                rows = [np.array(x, dtype=np.float32) for _, x in _checked_rows(m, prompt, seq, None)]
                out[f"{name}|{j}|logits"] = np.concatenate(rows)
                out[f"{name}|{j}|tokens"] = np.asarray(r.output_ids, dtype=np.int64)
        del m
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old", type=Path, help="the tree to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=1.79e-3)
    ap.add_argument("--logits", type=Path, help="cache of the requests' logits (made if absent)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from p2pinfer.runtime import sampling as new

    spec = importlib.util.spec_from_file_location("p2pinfer.runtime._sampling_old",
                                                  args.old / "p2pinfer" / "runtime" / "sampling.py")
    old = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(old)
    old_philox = args.old / "p2pinfer" / "runtime" / "philox.py"
    if old_philox.exists():  # the old tree's Philox words too (numpy's, before kernels/philox.c)
        spec = importlib.util.spec_from_file_location("p2pinfer.runtime._philox_old", old_philox)
        old.philox = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old.philox)
    if args.logits and args.logits.exists():
        data = dict(np.load(args.logits))
    else:
        data = _logits()
        if args.logits:
            np.savez(args.logits, **data)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; tolerance {args.tolerance:g}; "
          f"old {args.old}; best of {args.rounds}")
    print("\n| request | prompt | old ms / 128 rows | new ms / 128 rows | old / new | near ties |\n"
          "|---|---|---|---|---|---|")
    totals = {"old": 0.0, "new": 0.0}
    for name, params in _requests().items():
        for j in range(len(PROMPTS)):
            if f"{name}|{j}|logits" not in data:
                continue
            logits, tokens = data[f"{name}|{j}|logits"], data[f"{name}|{j}|tokens"]
            rows = {"new": new.LogProbRows.from_logits(logits)}
            rows["old"] = old.LogProbRows(rows["new"].values, rows["new"].shift, rows["new"].log_norm)  # its own class
            best = {"old": math.inf, "new": math.inf}
            verdicts = {}
            for round_ in range(args.rounds):
                for side in (("old", "new") if round_ % 2 == 0 else ("new", "old")):
                    module = old if side == "old" else new
                    t = time.perf_counter()
                    verdicts[side] = module.judge_rows(rows[side], params, bytes(32), 0, tokens, args.tolerance)
                    best[side] = min(best[side], time.perf_counter() - t)
            for a, b in zip(verdicts["old"], verdicts["new"]):
                if not np.array_equal(a, b):
                    sys.exit(f"verdicts differ: {name}, prompt {j}")
            totals["old"] += best["old"]
            totals["new"] += best["new"]
            print(f"| {name} | {j} | {best['old'] * 1e3:.1f} | {best['new'] * 1e3:.1f} | "
                  f"{best['old'] / best['new']:.2f} | {int(verdicts['new'][1].sum())} |", flush=True)
    print(f"\nall requests: old / new {totals['old'] / totals['new']:.2f}; load average {os.getloadavg()[0]:.1f} "
          "at the end (a shared machine: only the same-run ratio is robust)")


if __name__ == "__main__":
    main()
