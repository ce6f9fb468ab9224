"""Runtime benchmark.

    python benchmarks/runtime.py [--threads 2] [--rounds 5] ...          # the default model vs llama.cpp
    python benchmarks/runtime.py --model tiny-llama-trained [--models DIR] [--threads 2] [--tokens 128]

Without ``--model`` (or with ``--model default``) it runs :mod:`default_model`: SmolLM2-135M-Instruct
imported 4-bit and fp32 against llama.cpp on the same GGUF (decode/prefill tokens/s and ratios, verification
ratio, memory). With a fixture model it prints prefill/decode speed, verification cost, fingerprint size and
the detection table.

DIR defaults to ``shared/models`` beside the repository or ``$P2PINFER_SHARED_MODELS``. Figures depend on
the machine and on what else runs on it; run it on an idle machine for numbers worth quoting.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pinfer import log  # noqa: E402
from p2pinfer.runtime import (  # noqa: E402
    GREEDY, SamplingParams, ensure_tolerance, generate, load_model, sampling_seed, verify_result,
)
from p2pinfer.runtime.fingerprint import FingerprintBuilder, bytes_per_token  # noqa: E402
from p2pinfer.runtime.sampling import is_acceptable  # noqa: E402
from p2pinfer.runtime.verify import recompute_logprobs  # noqa: E402

PROMPT = ("def parse_args(argv):\n    parser = argparse.ArgumentParser(description='Process some files.')\n"
          "    parser.add_argument('--verbose', action='store_true')\n")
SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.95)
SEED = sampling_seed(bytes(range(32)), None)


def models_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    beside = REPO.parent / "shared" / "models"
    return beside if beside.is_dir() else Path(os.environ.get("P2PINFER_SHARED_MODELS", "shared/models"))


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=None)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    args, rest = ap.parse_known_args()
    if args.model == "default":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from default_model import main as default_model_main

        default_model_main(["--threads", str(args.threads), "--tokens", str(args.tokens), *rest])
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    log.configure(level="warning")
    root = models_dir(args.models)
    model = load_model(root / args.model, threads=args.threads, providers=["CPUExecutionProvider"])
    ensure_tolerance(model)  # it verifies below: only with a measured tolerance
    n = args.tokens
    prompt = model.encode(PROMPT)
    print(f"model {args.model}  digest {model.digest_hex[:16]}  threads {args.threads}  prompt {len(prompt)} tokens  "
          f"output {n} tokens")

    # prefill speed over prompt + n tokens (what a verifier runs)
    seq = (prompt * 8)[: len(prompt) + n]
    t_pre = best(lambda: model.forward(seq, model.empty_cache()), args.repeat)
    print(f"prefill: {len(seq) / t_pre:,.0f} tokens/s ({len(seq)} tokens in {t_pre * 1e3:.1f} ms)")

    print("\n| sampling | generate s | decode tokens/s | verify s | verify/generate |")
    print("|---|---|---|---|---|")
    for label, params in (("greedy", GREEDY), ("T=0.8 top-k 40 top-p 0.95", SAMPLED),
                          ("T=0.8", SamplingParams(temperature=0.8))):
        gens, vers, decode = [], [], []
        for _ in range(args.repeat):
            r = generate(model, prompt, max_tokens=n, params=params, seed_material=SEED, stop_at_eos=False)
            gens.append(r.prefill_seconds + r.decode_seconds)
            decode.append((n - 1) / r.decode_seconds)
            t = time.perf_counter()
            v = verify_result(model, prompt_ids=prompt, output_ids=r.output_ids, fingerprint=r.fingerprint_bytes,
                              params=params, seed_material=SEED, max_tokens=n, finish_reason=r.finish_reason,
                              commitment=r.commitment)
            vers.append(time.perf_counter() - t)
            assert v.accept, v.reason
        g, ver = statistics.median(gens), statistics.median(vers)
        print(f"| {label} | {g:.3f} | {statistics.median(decode):,.0f} | {ver:.4f} | {ver / g:.3f} |")
    print(f"\nfingerprint: {bytes_per_token()} bytes per generated token (+2-byte header); "
          f"{2 + bytes_per_token() * n} bytes for {n} tokens")

    # detection table, checked by the reference model at its tolerance
    print(f"\n| variant (executor) | verdict | first bad | max deviation |\n|---|---|---|---|")
    honest = generate(model, prompt, max_tokens=n, params=SAMPLED, seed_material=SEED, stop_at_eos=False)

    def check(label: str, result=None, **over) -> None:
        r = result or honest
        kw = dict(prompt_ids=r.prompt_ids, output_ids=r.output_ids, fingerprint=r.fingerprint_bytes, params=SAMPLED,
                  seed_material=SEED, max_tokens=n, finish_reason=r.finish_reason, stop_at_first=False)
        kw.update(over)
        v = verify_result(model, **kw)
        pos = "-" if v.first_bad_position is None else str(v.first_bad_position)
        print(f"| {label} | {'accept' if v.accept else 'REJECT'} | {pos} | {v.max_deviation:.2g} |")

    for th in (1, 2):
        for opt in ("disable", "basic", "all"):
            ex = model.with_session(threads=th, optimization=opt)
            check(f"honest, {th} thread(s), optimization {opt}",
                  generate(ex, prompt, max_tokens=n, params=SAMPLED, seed_material=SEED, stop_at_eos=False))
    rows = recompute_logprobs(model.with_session(threads=1, optimization="disable"), prompt, honest.output_ids)
    b = FingerprintBuilder()
    for row in rows:
        b.add(row)
    check("honest, full prefill instead of KV decode", fingerprint=b.build().pack())
    for other in ("tiny-llama-trained-seed1", "tiny-llama-trained-perturbed"):
        if (root / other).is_dir() and other != args.model:
            m = load_model(root / other, threads=args.threads)
            check(other, generate(m, prompt, max_tokens=n, params=SAMPLED, seed_material=SEED, stop_at_eos=False))
    with tempfile.TemporaryDirectory() as tmp:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = Path(tmp) / "int8"
        shutil.copytree(root / args.model, q, ignore=shutil.ignore_patterns("model.onnx"))
        quantize_dynamic(str(root / args.model / "model.onnx"), str(q / "model.onnx"), weight_type=QuantType.QInt8)
        m = load_model(q, threads=args.threads)
        check("int8 dynamic quantization", generate(m, prompt, max_tokens=n, params=SAMPLED, seed_material=SEED,
                                                    stop_at_eos=False))
    p2 = list(prompt)
    p2[-2] = (p2[-2] + 1) % 1024
    check("one prompt token changed", prompt_ids=p2)
    out = list(honest.output_ids)
    out[n // 2] = int(honest.fingerprint.ids[n // 2][-1]) if honest.fingerprint.ids[n // 2][-1] != out[n // 2] \
        else int(honest.fingerprint.ids[n // 2][-2])
    check("one output token changed", output_ids=out)
    fp = honest.fingerprint.truncated(n - 8).pack()
    check("output truncated (fingerprint too)", output_ids=honest.output_ids[:-8], fingerprint=fp)
    last = n - 1
    lp = recompute_logprobs(model, prompt, honest.output_ids)[last]
    wrong = next(int(t) for t in honest.fingerprint.ids[last]
                 if not is_acceptable(lp, SAMPLED, SEED, last, int(t), model.tolerance)[0])
    check("last token not the seeded sampler's", output_ids=honest.output_ids[:-1] + [wrong])
    check("verified with another seed", seed_material=sampling_seed(bytes(32), 1))


if __name__ == "__main__":
    main()
