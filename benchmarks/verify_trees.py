"""Verification time of the same requests on two source trees (before/after a change), interleaved.

    python benchmarks/verify_trees.py OLD_TREE [NEW_TREE] [--requests greedy:128,greedy:512,1.0:128]
                                      [--rounds 3] [--rows 64,128] [--tolerance 1.79e-3] [--threads 2]
                                      [--weights native|fp32]

``OLD_TREE`` is a checkout of the code to compare against (e.g. ``git archive main | tar -x -C /tmp/old``);
``NEW_TREE`` defaults to this one. The default model (SmolLM2-135M-Instruct Q4_1 GGUF) is imported once into a
temporary folder (``--weights fp32`` for the float32 class). Each round runs one fresh subprocess per side
(the order alternates between rounds, so load hits both alike); a side loads the model from its own tree,
generates each request (``greedy``, a temperature or ``TEMPERATURE/TOP_P``, and the output length) and verifies it 3 times,
keeping the best time; before each, a tree that keeps prompt prefixes (runtime/prefix_kv) holds another user's
request's (only the chat template shared), as a verifier serving many users does. ``--rows`` also runs the NEW tree with those rows per pass (``rows_per_pass``).

It prints, per request and side, the verification seconds and verify / generate of each round, and the time
ratio OLD / NEW of the same request in the same round (the figure that holds under load: the two sides
verify the same tokens). The tolerance is fixed (``--tolerance``, the same on both sides), so that no side
calibrates; every verification must accept. A request that meets a near tie (a float64 reference row) spends
most of its time in the reference, the same code on both sides unless the change is there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SIDE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from p2pinfer import log
from p2pinfer.runtime import GREEDY, SamplingParams, generate, load_model, verify_result
log.configure(level="warning")
m = load_model(Path(sys.argv[2]), threads=int(sys.argv[3]), providers=["CPUExecutionProvider"])
m.tolerance = float(sys.argv[4])
rows = {"rows_per_pass": int(sys.argv[6])} if len(sys.argv) > 6 else {}
prompt = m.prompt_ids(messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper who "
                                                            "finds a message in a bottle."}])
out = {}
for spec in sys.argv[5].split(","):
    label, n = spec.split(":")
    t, _, top_p = label.partition("/")  # TEMPERATURE or TEMPERATURE/TOP_P
    params = GREEDY if label == "greedy" else SamplingParams(temperature=float(t), top_p=float(top_p or 1.0))
    r = generate(m, prompt, max_tokens=int(n), params=params, seed_material=bytes(32), stop_at_eos=False)
    best, ties = 1e9, 0
    for _ in range(3):
        if hasattr(m, "prefix_kv"):  # as after another user's request: only the chat template kept (prefix_kv)
            from p2pinfer.runtime.verify import recompute_logprobs
            m.prefix_kv.clear()
            recompute_logprobs(m, m.prompt_ids(messages=[{"role": "user", "content": "Explain how tides work."}]), [0])
        t = time.perf_counter()
        v = verify_result(m, prompt_ids=prompt, output_ids=r.output_ids, fingerprint=r.fingerprint_bytes,
                          params=params, seed_material=bytes(32), max_tokens=int(n), finish_reason=r.finish_reason,
                          stop_at_eos=False, **rows)
        best = min(best, time.perf_counter() - t)
        assert v.accept, v.reason
    out[spec] = {"verify": best, "generate": r.prefill_seconds + r.decode_seconds, "tokens": r.output_ids}
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old", type=Path, help="the tree to compare against")
    ap.add_argument("new", type=Path, nargs="?", default=REPO, help="the tree under test (default: this one)")
    ap.add_argument("--requests", default="greedy:128,greedy:512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default="", help="also run NEW with these rows per pass, comma-separated")
    ap.add_argument("--tolerance", type=float, default=1.79e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="native", choices=["native", "fp32"])
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from p2pinfer.gguf import find_default_gguf, import_gguf

    sides = {"old": (args.old, None), "new": (args.new, None)}
    sides.update({f"new, {r} rows": (args.new, r) for r in args.rows.split(",") if r})
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start; {args.threads} threads; "
          f"tolerance {args.tolerance:g}; old {args.old}; new {args.new}")
    with tempfile.TemporaryDirectory(prefix="p2pinfer-verify-trees-") as tmp:
        folder = import_gguf(find_default_gguf(), Path(tmp) / args.weights, weights=args.weights).out_dir
        results: dict[str, list[dict]] = {k: [] for k in sides}
        for round_ in range(args.rounds):
            for name in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
                tree, rows = sides[name]
                cmd = [sys.executable, "-c", SIDE, str(tree), str(folder), str(args.threads), repr(args.tolerance),
                       args.requests] + ([str(rows)] if rows else [])
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    print("\n| request | side | verify s per round | verify / generate per round | old / side, same round |\n"
          "|---|---|---|---|---|")
    for spec in args.requests.split(","):
        same = all(r[spec]["tokens"] == results["old"][0][spec]["tokens"] for v in results.values() for r in v)
        for name, runs in results.items():
            ratios = " ".join(f"{r[spec]['verify'] / r[spec]['generate']:.3f}" for r in runs)
            speed = "" if name == "old" else " ".join(
                f"{o[spec]['verify'] / r[spec]['verify']:.2f}" for o, r in zip(results["old"], runs))
            seconds = " ".join(f"{r[spec]['verify']:.3f}" for r in runs)
            print(f"| {spec}{'' if same else ' (tokens differ!)'} | {name} | {seconds} | {ratios} | {speed} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (the machine may be shared: only same-round "
          f"ratios are robust)")


if __name__ == "__main__":
    main()
