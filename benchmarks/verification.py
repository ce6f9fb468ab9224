"""Verification cost on the default model: verification time / generation time for 128 tokens, and
fingerprint bytes per token (recorded in docs/incentives.md).

    python benchmarks/verification.py [--tokens 128] [--repeats 3] [--data-dir DIR]

Generation is greedy decoding of ``--tokens`` tokens (EOS ignored) with fingerprints; verification is
:func:`p2pinfer.fraud.recheck_result`'s work: one teacher-forced prefill over prompt + output and the
fingerprint check. Both run on CPU in this process. The median of ``--repeats`` runs is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from p2pinfer.config import default_data_dir
from p2pinfer.gguf.default_model import ensure_default_model
from p2pinfer.runtime import GREEDY, ModelStore, generate, verify_result

PROMPT = [{"role": "user", "content": "Explain in detail how a peer-to-peer network shares work fairly."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    args = parser.parse_args()
    model = ensure_default_model(ModelStore(args.data_dir / "models")).load(providers=["CPUExecutionProvider"])
    prompt_ids = model.prompt_ids(messages=PROMPT)
    gen_s, ver_s = [], []
    result = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = generate(model, prompt_ids, max_tokens=args.tokens, params=GREEDY, seed_material=bytes(32),
                          stop_at_eos=False)
        gen_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        verdict = verify_result(model, prompt_ids=prompt_ids, output_ids=result.output_ids,
                                fingerprint=result.fingerprint_bytes, params=GREEDY, seed_material=bytes(32),
                                max_tokens=args.tokens, finish_reason=result.finish_reason,
                                commitment=result.commitment, stop_at_eos=False)
        ver_s.append(time.perf_counter() - t0)
        assert verdict.accept, verdict.reason
    assert result is not None
    g, v = statistics.median(gen_s), statistics.median(ver_s)
    n = len(result.output_ids)
    print(f"model {model.name} ({model.numeric_class}), prompt {len(prompt_ids)} tokens, output {n} tokens")
    print(f"generation   {g:.3f} s  ({n / g:.1f} tokens/s)")
    print(f"verification {v:.3f} s  (one prefill of {len(prompt_ids) + n - 1} tokens + fingerprint check)")
    print(f"verification / generation = {v / g:.3f}")
    print(f"fingerprint: {len(result.fingerprint_bytes)} bytes = {len(result.fingerprint_bytes) / n:.1f} bytes/token")


if __name__ == "__main__":
    main()
