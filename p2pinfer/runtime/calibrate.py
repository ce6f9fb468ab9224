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

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..log import get_logger
from .generate import PREFILL_CHUNK, generate
from .model import LoadedModel
from .reference import ReferenceUnsupported, reference_for
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
#: Tokens per prompt when a model is calibrated because it is about to be served (store and peer start-up).
SERVING_TOKENS = 16
#: The checkpointed step that runs one float64 reference row (see :func:`reference_drift`).
REFERENCE_STEP = "reference"


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
    logits, cache = model.forward(list(ids[:first_row + 1]), cache, last=1)
    rows = [log_softmax(logits[-1])]
    for t in ids[first_row + 1:]:
        logits, cache = model.forward([t], cache)
        rows.append(log_softmax(logits[-1]))
    return np.stack(rows)


def executor_logprobs(model: LoadedModel, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> np.ndarray:
    """The rows ``[len(output_ids), vocab]`` that predict each output token, computed the way a serving executor
    computes them (:class:`~.generate.Generation`): the prompt prefilled in chunks of ``PREFILL_CHUNK`` (its last
    row only), then one token a step through the in-place KV decoder."""
    prompt_ids, output_ids = list(prompt_ids), list(output_ids)
    cache = model.empty_cache()
    for lo in range(0, len(prompt_ids), PREFILL_CHUNK):
        logits, cache = model.forward(prompt_ids[lo:lo + PREFILL_CHUNK], cache, last=1)
    rows = [log_softmax(logits[-1])]
    decoder = model.decoder(cache, min(model.context_length, len(prompt_ids) + len(output_ids)))
    for t in output_ids[:-1]:
        rows.append(log_softmax(decoder.step(t)))
    return np.stack(rows)


def reference_drift(model: LoadedModel, prompt_ids: Sequence[int]) -> float:
    """Run the float64 reference (:mod:`.reference`, the arbiter of near ties) on one row, the last of
    ``prompt_ids``, and return its largest distance to the session's float32 row over the vocabulary.

    A model whose graph the reference cannot run would otherwise fail only at its first near tie, in the middle
    of serving a request; calibration runs this first, so such a model is refused before it is ever served
    (:class:`~.reference.ReferenceUnsupported`, one line naming the model and the reason).
    """
    prompt_ids = list(prompt_ids)
    cache = model.empty_cache()
    for lo in range(0, len(prompt_ids), PREFILL_CHUNK):
        logits, cache = model.forward(prompt_ids[lo:lo + PREFILL_CHUNK], cache, last=1)
    try:
        exact = reference_for(model).logprobs(prompt_ids, last=1)[0]
    except ReferenceUnsupported as exc:
        _log().warning("calibrate.refused", model=model.digest_hex[:16], reason="reference_unsupported",
                       detail=str(exc))
        reason = " ".join(str(exc).split())  # one line, whatever the operator's message holds
        raise ReferenceUnsupported(
            f"model {model.name!r} ({model.digest_hex[:12]}) cannot be served: {reason} (near ties are settled by "
            f"a float64 pass of the graph, which runs standard ONNX operators and the com.microsoft "
            f"MatMulNBits, GroupQueryAttention and SkipSimplifiedLayerNormalization)") from None
    return float(np.max(np.abs(log_softmax(logits[-1]) - exact)))


class _Checkpoint:
    """Measurements saved after every step, so that an interrupted calibration resumes where it stopped.

    The file names the model digest, numeric class, prompts and token count it belongs to; any mismatch
    (or an unreadable file) starts over.
    """

    def __init__(self, path: Path | None, model: LoadedModel, prompts: Sequence[str], new_tokens: int) -> None:
        self.path = path
        self.key = {"digest": model.digest_hex, "numeric_class": model.numeric_class, "prompts": list(prompts),
                    "new_tokens": new_tokens}
        self.done: dict[str, float] = {}
        self.positions: dict[str, int] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("key") == self.key:
                    self.done = {str(k): float(v) for k, v in data["done"].items()}
                    self.positions = {str(k): int(v) for k, v in data["positions"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self.done, self.positions = {}, {}

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "done": self.done, "positions": self.positions}),
                       encoding="utf-8")
        os.replace(tmp, self.path)


def calibrate(model: LoadedModel, *, prompts: Sequence[str] = DEFAULT_PROMPTS, new_tokens: int = 32,
              progress: Callable[[int, int], None] | None = None, checkpoint: Path | None = None) -> CalibrationResult:
    """Measure the worst honest drift. ``progress(done, total)`` after every step; with ``checkpoint`` (a
    file path) every step's result is saved there and a later call resumes from it.

    One variant session exists at a time (each holds a copy of the weights), so memory stays at two sessions.
    """
    t0 = time.perf_counter()
    saved = _Checkpoint(checkpoint, model, prompts, new_tokens)
    keys = [(th, opt) for th in THREADS for opt in OPTIMIZATIONS]
    total = 1 + len(keys) * 2 * len(prompts)
    # first, before anything slow: a graph the float64 reference cannot run is refused here, not at its first
    # near tie while serving; its distance to the float32 row is one more honest drift
    if REFERENCE_STEP not in saved.done:
        saved.done[REFERENCE_STEP] = reference_drift(model, model.encode(prompts[0]))
        saved.save()
    if progress is not None:
        progress(1, total)
    cases = []  # (prompt_ids, output_ids, baseline rows) per prompt, only when a step still needs them
    for index, prompt in enumerate(prompts):
        if all(f"{index}|threads={th},opt={opt},{mode}" in saved.done
               for th, opt in keys for mode in ("kv", "prefill")):
            cases.append(None)
            continue
        prompt_ids = model.encode(prompt)
        room = model.context_length - len(prompt_ids) - 1
        out = generate(model, prompt_ids, max_tokens=max(1, min(new_tokens, room)), stop_at_eos=False)
        seq = prompt_ids + out.output_ids
        base = kv_decode_logprobs(model, seq, len(prompt_ids) - 1)[: len(out.output_ids)]
        saved.positions[str(index)] = len(out.output_ids)
        cases.append((prompt_ids, out.output_ids, base))
    steps = 1
    # Each honest way to compute the same rows is one named step below; a new drift source (for example the
    # float64 reference pass at ambiguous sampler positions, measured against this fp32 baseline) is one more
    # step with its own name, so that it is saved, resumed and reported like these.
    for th, opt in keys:
        variant: LoadedModel | None = None
        for mode in ("kv", "prefill"):
            for index, case in enumerate(cases):
                steps += 1
                name = f"{index}|threads={th},opt={opt},{mode}"
                if name not in saved.done:
                    assert case is not None
                    prompt_ids, output_ids, base = case
                    variant = variant or model.with_session(threads=th, optimization=opt)
                    if mode == "kv":
                        rows = kv_decode_logprobs(variant, prompt_ids + output_ids, len(prompt_ids) - 1)
                        rows = rows[: len(output_ids)]
                    else:
                        rows = recompute_logprobs(variant, prompt_ids, output_ids)
                    saved.done[name] = float(np.max(np.abs(rows - base)))
                    saved.save()
                if progress is not None:
                    progress(steps, total)
        del variant  # free this session's weights before the next one loads
    variants: dict[str, float] = {}
    for name, drift in saved.done.items():
        key = name.split("|", 1)[-1]
        variants[key] = max(variants.get(key, 0.0), drift)
    positions = sum(saved.positions.values())
    worst = max(variants.values())
    result = CalibrationResult(worst, tolerance_from_drift(worst), variants, positions, new_tokens,
                               time.perf_counter() - t0)
    _log().info("calibrate.done", model=model.digest_hex[:16], worst_drift=f"{worst:.3g}",
             tolerance=f"{result.tolerance:.3g}", seconds=f"{result.seconds:.2f}")
    return result


_one_at_a_time = threading.Lock()  # peers sharing a model object calibrate it once, not concurrently


def ensure_tolerance(model: LoadedModel, *, new_tokens: int = SERVING_TOKENS,
                     progress: Callable[[int, int], None] | None = None) -> float:
    """The model's tolerance: measured now (and set on ``model``) when it has none, else the one it has.

    For models loaded outside the store (the library API, tests); a store's models are calibrated once per
    digest and numeric class by :meth:`~p2pinfer.runtime.store.ModelStore.ensure_calibrated` instead.
    """
    with _one_at_a_time:
        if model.tolerance is None:
            model.tolerance = calibrate(model, new_tokens=new_tokens, progress=progress).tolerance
        return model.tolerance
