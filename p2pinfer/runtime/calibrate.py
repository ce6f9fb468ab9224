"""Calibration: measure honest numeric drift and set a model's tolerance from it.

The baseline is the loaded session decoding greedily over the KV cache (what an executor does). Each honest
variant recomputes the same positions: intra-op threads 1 and 2, graph optimization levels
disable/basic/all, each as a KV-cache decode and as one full prefill (what a verifier does). The drift is the
largest absolute difference of any log-prob in the full vocabulary between a variant and the baseline.

    tolerance = max(MIN_TOLERANCE, SAFETY_FACTOR * worst drift) = max(1e-5, 4 * worst drift)

Why these numbers. The tolerance is both the allowance for each claimed log-prob and, through the sampler
check, the executor's only freedom (``2 * tolerance / T`` of key slack), so it must cover honest drift and no
more. The safety factor 4 covers what a 64-position calibration does not see: on SmolLM2, 800 sampled
positions drift up to 8.9e-5 where the built-in prompts measure 3.4e-5 (2.6x), and onnxruntime 1.19 vs 1.32
drifted 5.1e-5. The 1e-5 floor is float32 rounding, not a policy: a logit of magnitude 64 is stored to
7.6e-6, so two exact-but-differently-ordered float32 sums can differ by that much on another CPU (the random
fixtures measure 3e-7 here). Weights in fp16 or 0.1 % weight noise move log-probs by 1.4e-4 or more on every
shared fixture, an order of magnitude above both floors' reach (tests/test_tolerance_measured.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from ..log import get_logger
from .generate import generate
from .model import LoadedModel
from .sampling import log_softmax
from .verify import recompute_logprobs

def _log():  # bound per call, so that log.configure() made later still applies
    return get_logger("p2pinfer.runtime.calibrate")

MIN_TOLERANCE = 1e-5
SAFETY_FACTOR = 4.0
DEFAULT_PROMPTS = (
    "The history of the lighthouse begins with fires lit on hills to guide ships home.",
    "def parse_args(argv):\n    parser = argparse.ArgumentParser()",
)
THREADS = (1, 2)
OPTIMIZATIONS = ("disable", "basic", "all")


@dataclass
class CalibrationResult:
    worst_drift: float
    tolerance: float
    variants: dict[str, float] = field(default_factory=dict)
    positions: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def tolerance_from_drift(drift: float) -> float:
    return max(MIN_TOLERANCE, SAFETY_FACTOR * drift)


def kv_decode_logprobs(model: LoadedModel, ids: Sequence[int], first_row: int) -> np.ndarray:
    """Rows ``first_row ..`` computed the executor's way: prefill ``ids[:first_row+1]``, then one token a step."""
    cache = model.empty_cache()
    logits, cache = model.forward(list(ids[:first_row + 1]), cache)
    rows = [log_softmax(logits[-1])]
    for t in ids[first_row + 1:]:
        logits, cache = model.forward([t], cache)
        rows.append(log_softmax(logits[-1]))
    return np.stack(rows)


def calibrate(model: LoadedModel, *, prompts: Sequence[str] = DEFAULT_PROMPTS, new_tokens: int = 32) -> CalibrationResult:
    t0 = time.perf_counter()
    variants: dict[str, float] = {}
    positions = 0
    sessions = {(th, opt): model.with_session(threads=th, optimization=opt) for th in THREADS for opt in OPTIMIZATIONS}
    for prompt in prompts:
        prompt_ids = model.encode(prompt)
        room = model.context_length - len(prompt_ids) - 1
        out = generate(model, prompt_ids, max_tokens=max(1, min(new_tokens, room)), stop_at_eos=False)
        seq = prompt_ids + out.output_ids
        first_row = len(prompt_ids) - 1
        base = kv_decode_logprobs(model, seq[:-1] + seq[-1:], first_row)[: len(out.output_ids)]
        positions += len(out.output_ids)
        for (th, opt), variant in sessions.items():
            for mode in ("kv", "prefill"):
                if mode == "kv":
                    rows = kv_decode_logprobs(variant, seq, first_row)[: len(out.output_ids)]
                else:
                    rows = recompute_logprobs(variant, prompt_ids, out.output_ids)
                key = f"threads={th},opt={opt},{mode}"
                variants[key] = max(variants.get(key, 0.0), float(np.max(np.abs(rows - base))))
    worst = max(variants.values())
    result = CalibrationResult(worst, tolerance_from_drift(worst), variants, positions, new_tokens,
                               time.perf_counter() - t0)
    _log().info("calibrate.done", model=model.digest_hex[:16], worst_drift=f"{worst:.3g}",
             tolerance=f"{result.tolerance:.3g}", seconds=f"{result.seconds:.2f}")
    return result
