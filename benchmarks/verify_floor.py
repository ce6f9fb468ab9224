"""How far below the arithmetic floor of this CPU a verification runs, and where that floor is against generation.

    python benchmarks/verify_floor.py [--requests greedy:128,greedy:512] [--weights native|fp32] [--threads 2]
                                      [--rounds 3]

A verification recomputes every position of prompt + output in the numeric class's float32-grade arithmetic
(a prefill), while generation reads the weights once a token. So on a CPU whose decode is fast beside its
multiply-add rate, verification / generation has a floor that no code can go under without cheaper
arithmetic (another numeric class). This prints it:

* the float32 multiply-add peak of this CPU (``fma_peak.c``, built here with the system C compiler for
  ``-march=native``: 12 independent FMA chains a thread on the widest vectors, the threads started together),
  on one thread and on ``--threads``;
* per request (the default model, generated as the other benchmarks do, then verified ``--rounds`` times as a
  verifier serving many users is: holding another user's kept prompt prefix, as ``default_model.py`` does):
  the positions the verification computes, the rows it checks, its multiply-adds (:func:`verification_flops`,
  from the model's ``config.json``), the time they take at the peak (**the floor**), generation time, the
  floor / generate and verify / generate ratios and the share of the peak the verification runs at.

The floor counts the weight products and attention only (no normalization, no activation, no check): it is a
lower bound on the verification's time, not an estimate of it. Without a C compiler the peak (and the floor)
are not printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("fma_peak.c")


def fma_peak(threads: int, rounds: int = 3) -> float | None:
    """This CPU's float32 multiply-add peak in GFLOP/s over ``threads`` threads (best of ``rounds`` runs of
    ``fma_peak.c``), or None without a C compiler or where the probe does not build."""
    from p2pinfer.kernels import _compiler  # the kernel's own choice of compiler ($CC, gcc, cc)

    cc = _compiler()
    if cc is None:
        return None
    with tempfile.TemporaryDirectory(prefix="p2pinfer-fma-peak-") as tmp:
        exe = Path(tmp) / "fma_peak"
        built = subprocess.run([cc, "-O2", "-march=native", "-pthread", str(PROBE), "-o", str(exe)],
                               capture_output=True, text=True)
        if built.returncode != 0:
            return None
        best = 0.0
        for _ in range(rounds):
            out = subprocess.run([str(exe), str(threads)], capture_output=True, text=True, check=True).stdout
            best = max(best, float(out.strip().splitlines()[-1].split()[1]))
    return best


@dataclass(frozen=True)
class Shape:
    """What a Llama-style decoder's multiply-adds depend on (from a Hugging Face ``config.json``)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, folder: Path) -> "Shape":
        c = json.loads((Path(folder) / "config.json").read_text())
        heads = int(c["num_attention_heads"])
        return cls(hidden=int(c["hidden_size"]), intermediate=int(c["intermediate_size"]),
                   layers=int(c["num_hidden_layers"]), heads=heads,
                   kv_heads=int(c.get("num_key_value_heads", heads)),
                   head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads), vocab=int(c["vocab_size"]))

    @property
    def layer_macs_per_position(self) -> int:
        """The weight products of every layer for one position: q/k/v, o, gate and up, down."""
        h, i, d = self.hidden, self.intermediate, self.head_dim
        return self.layers * (h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h + 3 * h * i)

    @property
    def attention_macs_per_pair(self) -> int:
        """Query-key and probability-value products of one (position, attended position) pair, all layers."""
        return self.layers * 2 * self.heads * self.head_dim


def verification_flops(shape: Shape, start: int, end: int, checked_rows: int) -> int:
    """Floating-point operations (a multiply-add = 2) of a verification that computes positions ``start`` to
    ``end - 1`` (the earlier ones kept) and the head for ``checked_rows`` of them: the weight products of
    every computed position, causal attention over positions 0..p for each, the head's rows."""
    positions = end - start
    attended = sum(p + 1 for p in range(start, end))
    macs = (positions * shape.layer_macs_per_position + attended * shape.attention_macs_per_pair
            + checked_rows * shape.hidden * shape.vocab)
    return 2 * macs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", default="greedy:128,greedy:512",
                    help="greedy or TEMPERATURE[/TOP_P], a colon, the output tokens; comma-separated")
    ap.add_argument("--weights", default="native", choices=["native", "fp32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None, help="a model folder (default: the default model imported here)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).parent))
    from default_model import CHAT, after_another_request
    from model_folder import model_folder

    from p2pinfer import log
    from p2pinfer.runtime import GREEDY, SamplingParams, ensure_tolerance, generate, load_model, verify_result
    from p2pinfer.runtime.verify import MIN_PASS_ROWS

    log.configure(level="warning")
    one, peak = fma_peak(1), fma_peak(args.threads)
    print(f"float32 multiply-add peak (fma_peak.c, -march=native): "
          + (f"{one:.0f} GFLOP/s on 1 thread, {peak:.0f} on {args.threads}" if peak else "n/a (no C compiler)")
          + f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="p2pinfer-floor-") as tmp:
        folder = model_folder(args.model, tmp, weights=args.weights)
        shape = Shape.from_config(folder)
        model = load_model(folder, threads=args.threads, providers=["CPUExecutionProvider"])
        ensure_tolerance(model)
        prompt = model.prompt_ids(messages=CHAT)
        print(f"\n{model.runtime_numeric_class}: {shape.layer_macs_per_position / 1e6:.1f} M multiply-adds a "
              f"position in the layers, {shape.hidden * shape.vocab / 1e6:.1f} M a checked row in the head\n")
        print("| request | positions computed | rows checked | GFLOP | floor s | generate s | floor / generate | "
              "verify s | verify / generate | share of peak |\n|---|---|---|---|---|---|---|---|---|---|")
        for spec in args.requests.split(","):
            label, n = spec.split(":")
            t, _, top_p = label.partition("/")
            params = GREEDY if label == "greedy" else SamplingParams(temperature=float(t), top_p=float(top_p or 1))
            r = generate(model, prompt, max_tokens=int(n), params=params, seed_material=bytes(32), stop_at_eos=False)
            generated = r.prefill_seconds + r.decode_seconds
            best, kept = float("inf"), 0
            for _ in range(args.rounds):
                after_another_request(model)
                # the positions the verification will skip, as runtime.verify looks them up
                kept = model.prefix_kv.lookup(model.session, prompt, limit=len(prompt) - MIN_PASS_ROWS)[0]
                t0 = time.perf_counter()
                v = verify_result(model, prompt_ids=prompt, output_ids=r.output_ids, fingerprint=r.fingerprint_bytes,
                                  params=params, seed_material=bytes(32), max_tokens=int(n),
                                  finish_reason=r.finish_reason, stop_at_eos=False)
                best = min(best, time.perf_counter() - t0)
                assert v.accept, v.reason
            end = len(prompt) + len(r.output_ids) - 1  # the last token's own row is never computed
            flops = verification_flops(shape, kept, end, len(r.output_ids))
            floor = flops / (peak * 1e9) if peak else float("nan")
            print(f"| {spec} | {end - kept} ({kept} kept) | {len(r.output_ids)} | {flops / 1e9:.1f} | {floor:.3f} | "
                  f"{generated:.3f} | **{floor / generated:.3f}** | {best:.3f} | {best / generated:.3f} | "
                  f"{floor / best:.0%} |")


if __name__ == "__main__":
    main()
