"""Calibration: measure honest numeric drift and set a model's tolerance from it.

The baseline is the loaded session generating as a serving executor does (chunked prefill, then the in-place
KV decoder), over three built-in prompts (prose, code, a longer letter) with 48 new tokens each, greedy and
sampled, its rows kept as it goes. Each honest variant recomputes the same positions in its own session
(intra-op threads 1 and 2 x graph optimization levels disable/basic/all): as a KV decode (another executor; the
first 8 positions of each output) and as one teacher-forced prefill (a verifier; every position). A step's
drift is the largest absolute difference of any log-prob in the full vocabulary between its rows and the
baseline's. An executor and a verifier are never compared through the baseline only: for any honest pair,
``|e - v| <= |e - baseline| + |baseline - v|``, so the worst drift is bounded by

    worst = max over KV steps + max over prefill steps     (and never below the float64 reference row's drift)
    tolerance = max(MIN_TOLERANCE, SAFETY_FACTOR * worst) = max(1e-5, 4 * worst)

Why these numbers. The tolerance is both the allowance for each claimed log-prob and, through the sampler
check, the executor's only freedom (``2 * tolerance / T`` of key slack), so it must cover honest drift and no
more. On SmolLM2 (``benchmarks/calibration_margin.py``, docs/models.md) the drift is a property of the rows,
not of the position or the thread count: KV decode gives bit-identical rows at 1, 2 and 4 threads, prefill
likewise, and only the optimization level and KV-vs-prefill move them; the worst row over thousands of
served positions is 1.5-3x the worst of a few dozen. So calibration looks at more rows (144 positions, from
sampled text too) and the factor 4 covers the tail beyond them, another onnxruntime version (cross-version
drift 0.36x of the tolerance) and the summation order of another CPU. The 1e-5 floor is float32 rounding,
not a policy: a logit of magnitude 64 is stored to 7.6e-6. Weights in fp16 or 0.1 % weight noise move
log-probs by 1.4e-4 or more on every shared fixture, an order of magnitude above both floors' reach
(tests/test_tolerance_measured.py, tests/test_quantized_verification.py).

Before any of this, one float64 reference row (:mod:`.reference`) is run: a graph the near-tie arbiter cannot
run is refused here (:class:`~.reference.ReferenceUnsupported`), not at its first near tie while serving.

The tie tolerances. The near-tie detector (:mod:`.tiebreak`) needs less than the pair bound: only that each
party's own float32 row is within its detector's width of the exact-arithmetic row. So the float64 reference
also runs once per prompt over all its output positions (one pass, ~2-5x one float32 prefill of the same tokens),
every step above measures its rows' distance to those reference rows too, and per path a session can run
(:mod:`.tie_tolerance`: standard graph, or kernel with AMX / FMA many-row and integer / float decode rows)

    own drift(path) = max over that path's KV steps (and the baseline's own rows, when it runs that path)
                      and over the prefill steps of its many-row path (and the ``reference`` row)
    tie tolerance(path) = max(MIN_TOLERANCE, SAFETY_FACTOR * own drift(path))

the same factor and floor, for the same reasons (the tail beyond the rows measured, another onnxruntime version).
A path with no measured KV or prefill steps gets no entry: it uses the pair tolerance.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..kernels import DecodePath
from ..log import get_logger
from .generate import PREFILL_CHUNK
from .model import LoadedModel
from .reference import ReferenceUnsupported, reference_for
from .sampling import GREEDY, SamplingParams, log_softmax, sample
from .tie_tolerance import many_row_path, record, session_path
from .verify import recompute_logprobs

def _log():  # bound per call, so that log.configure() made later still applies
    return get_logger("p2pinfer.runtime.calibrate")

MIN_TOLERANCE = 1e-5
SAFETY_FACTOR = 4.0
#: Bumped whenever what calibration measures changes: a stored calibration of another format counts as none,
#: so the model is calibrated again before it is next served (and a partial file of another format restarts).
# 3: a model that runs the 4-bit kernel also measures the standard graph's variants; 4: and, where its decode rows
# take the kernel's integer path, the float32 one-row path's KV decode (peers without AVX2, or forced to it); 5: the
# same steps, bumped because AVX2 / AVX-VNNI CPUs now decode on the integer path: their format-4 calibration had the
# float32 decode path as its baseline and no `decode=float` steps; 6: every step also measures its distance to the
# float64 reference rows, and the record holds the tie tolerances per path (format 5 records have none); 7: the
# same steps, bumped because the 4-bit kernel session computes attention itself (kernels/qattn.c: another
# summation order and exp than onnxruntime's node, so other drifts)
CALIBRATION_FORMAT = 7
DEFAULT_PROMPTS = (
    "The history of the lighthouse begins with fires lit on hills to guide ships home.",
    "def parse_args(argv):\n    parser = argparse.ArgumentParser()",
    "Dear neighbours,\n\nThe village library will be closed on Monday while the roof is repaired. Books "
    "borrowed before the closure can be returned on Tuesday without a late fee, and the reading group will meet "
    "in the school hall instead. We are also looking for volunteers to help move the children's shelves back "
    "into place on Wednesday morning; tea and cake will be provided. If you have questions about the repairs, "
    "the opening hours or the summer reading programme, please write to",
)
#: How each prompt's output is picked (cycled): greedy text is peaked; sampled text reaches flatter rows,
#: where a verifier sees more of the distribution.
CALIBRATION_SAMPLING = (GREEDY, SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.95))
THREADS = (1, 2)
OPTIMIZATIONS = ("disable", "basic", "all")
MODES = ("kv", "prefill")
#: Tokens per prompt when a model is calibrated because it is about to be served (store and peer start-up).
SERVING_TOKENS = 48
#: Positions per prompt that the other executors (KV decode in another session) recompute: a KV step costs a
#: decode step per position, a verifier's prefill covers every position at once.
EXECUTOR_ROWS = 8
#: The checkpointed step that runs one float64 reference row (see :func:`reference_drift`).
REFERENCE_STEP = "reference"
#: The step name (after ``<prompt index>|``) of the baseline's own rows, measured against the reference only.
BASELINE_STEP = "baseline,kv"


@dataclass
class CalibrationResult:
    worst_drift: float  # the bound on any honest executor/verifier pair (see calibrate)
    tolerance: float
    variants: dict[str, float] = field(default_factory=dict)
    positions: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    worst_executor_drift: float = 0.0  # the KV steps' largest distance to the baseline
    worst_verifier_drift: float = 0.0  # the prefill steps' largest distance to the baseline
    format: int = CALIBRATION_FORMAT
    #: path (:mod:`.tie_tolerance`) -> that path's near-tie detector width (see the module docstring)
    tie_tolerances: dict[str, float] = field(default_factory=dict)
    #: step (variant) -> its rows' largest distance to the float64 reference rows
    reference_drifts: dict[str, float] = field(default_factory=dict)
    #: step (variant) -> the path its session ran (:func:`.tie_tolerance.session_path`)
    paths: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


#: The kernel's float32 one-row path, measured where the model's own session decodes on the integer path: only as a
#: KV executor (its prefill and verification rows are the GEMM's, measured by the kernel's own variants) and only
#: at the optimization level "all" (the level changes the other operators, measured by the other variants).
FLOAT_DECODE_OPTIMIZATIONS = ("all",)


def _step_name(index: int, threads: int, optimization: str, mode: str, kernel: bool = True, amx: bool = True,
               float_decode: bool = False) -> str:
    graph = ("decode=float," if float_decode else "" if amx else "graph=no-amx,") if kernel else "graph=standard,"
    return f"{index}|threads={threads},opt={optimization},{graph}{mode}"


def tolerance_from_drift(drift: float) -> float:
    return max(MIN_TOLERANCE, SAFETY_FACTOR * drift)


def _executor_rows(model: LoadedModel, prompt_ids: Sequence[int], n: int, pick: Callable[[int, np.ndarray], int],
                   capacity: int | None = None) -> tuple[list[int], np.ndarray]:
    """``n`` output tokens and the rows ``[n, vocab]`` they were picked from, computed the way a serving executor
    computes them (:class:`~.generate.Generation`): the prompt prefilled in chunks of ``PREFILL_CHUNK`` (its last
    row only), then one token a step through the in-place KV decoder. ``pick(index, row)`` gives each token;
    ``capacity`` the decoder's room (as a request of that many positions in all would have it)."""
    prompt_ids = list(prompt_ids)
    cache = model.empty_cache()
    for lo in range(0, len(prompt_ids), PREFILL_CHUNK):
        logits, cache = model.forward(prompt_ids[lo:lo + PREFILL_CHUNK], cache, last=1)
    decoder = model.decoder(cache, min(model.context_length, capacity or len(prompt_ids) + n))
    row = log_softmax(logits[-1])
    output_ids, rows = [], []
    for i in range(n):
        rows.append(row)
        output_ids.append(int(pick(i, row)))
        if i + 1 < n:
            row = log_softmax(decoder.step(output_ids[-1]))
    return output_ids, np.stack(rows)


def executor_logprobs(model: LoadedModel, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> np.ndarray:
    """The rows ``[len(output_ids), vocab]`` that predict each output token, computed as a serving executor
    computes them (chunked prefill, then the in-place KV decoder)."""
    output_ids = list(output_ids)
    return _executor_rows(model, prompt_ids, len(output_ids), lambda i, row: output_ids[i])[1]


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

    The file names the calibration format, model digest, numeric class, prompts and token counts it belongs to;
    any mismatch
    (or an unreadable file) starts over.
    """

    def __init__(self, path: Path | None, model: LoadedModel, prompts: Sequence[str], new_tokens: int) -> None:
        self.path = path
        self.key = {"format": CALIBRATION_FORMAT, "digest": model.digest_hex, "numeric_class": model.numeric_class,
                    "prompts": list(prompts), "new_tokens": new_tokens, "executor_rows": EXECUTOR_ROWS}
        self.done: dict[str, float] = {}  # step -> distance to the baseline's rows
        self.own: dict[str, float] = {}  # step -> distance to the float64 reference rows
        self.paths: dict[str, str] = {}  # step -> the path its session ran (tie_tolerance.session_path)
        self.positions: dict[str, int] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("key") == self.key:
                    self.done = {str(k): float(v) for k, v in data["done"].items()}
                    self.own = {str(k): float(v) for k, v in data["own"].items()}
                    self.paths = {str(k): str(v) for k, v in data["paths"].items()}
                    self.positions = {str(k): int(v) for k, v in data["positions"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self.done, self.own, self.paths, self.positions = {}, {}, {}, {}

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "done": self.done, "own": self.own, "paths": self.paths,
                                   "positions": self.positions}), encoding="utf-8")
        os.replace(tmp, self.path)


def calibrate(model: LoadedModel, *, prompts: Sequence[str] = DEFAULT_PROMPTS, new_tokens: int = SERVING_TOKENS,
              progress: Callable[[int, int], None] | None = None, checkpoint: Path | None = None) -> CalibrationResult:
    """Measure the worst honest executor/verifier drift. ``progress(done, total)`` after every step; with
    ``checkpoint`` (a file path) every step's result is saved there and a later call resumes from it.

    One variant session exists at a time (each holds a copy of the weights), so memory stays at two sessions.
    """
    t0 = time.perf_counter()
    saved = _Checkpoint(checkpoint, model, prompts, new_tokens)
    # a model served through the 4-bit kernel (p2pinfer.kernels) is also served by peers without it (no compiler,
    # P2PINFER_DECODE_KERNEL=0): both graphs are honest executors and verifiers of it; where this machine runs the
    # kernel's many-row path on AMX tiles, peers without AMX (or with P2PINFER_AMX=0) run it on float32 FMA; where
    # it decodes on the integer path (AVX-512 VNNI, AVX-VNNI or AVX2: the same rows), peers without AVX2 (or with
    # P2PINFER_DECODE_KERNEL=float) decode on the float32 one-row path
    graphs = [(True, True)]  # (kernel, amx)
    if model.runs_amx:
        graphs.append((True, False))
    if model.runs_kernel:
        graphs.append((False, False))
    # (threads, optimization, kernel, amx, float_decode, modes)
    keys = [(th, opt, kernel, amx, False, MODES) for kernel, amx in graphs for th in THREADS for opt in OPTIMIZATIONS]
    if model.decode_path is DecodePath.INTEGER:
        keys += [(th, opt, True, True, True, ("kv",)) for th in THREADS for opt in FLOAT_DECODE_OPTIMIZATIONS]
    total = 1 + sum(len(modes) for *_, modes in keys) * len(prompts)
    # first, before anything slow: a graph the float64 reference cannot run is refused here, not at its first
    # near tie while serving; its distance to the float32 row is one more honest drift
    if REFERENCE_STEP not in saved.done:
        saved.done[REFERENCE_STEP] = saved.own[REFERENCE_STEP] = reference_drift(model, model.encode(prompts[0]))
        saved.paths[REFERENCE_STEP] = session_path(model)  # the session's own prefill row
        saved.save()
    if progress is not None:
        progress(1, total)
    # (prompt_ids, output_ids, executor rows, reference rows - executor rows) per prompt, only when a step needs them
    cases = []
    for index, prompt in enumerate(prompts):
        if all(_step_name(index, th, opt, mode, kernel, amx, fd) in saved.done
               for th, opt, kernel, amx, fd, modes in keys for mode in modes) \
                and f"{index}|{BASELINE_STEP}" in saved.own:
            cases.append(None)
            continue
        prompt_ids = model.encode(prompt)
        room = model.context_length - len(prompt_ids) - 1
        params = CALIBRATION_SAMPLING[index % len(CALIBRATION_SAMPLING)]
        seed = hashlib.sha256(f"p2pinfer/calibration/{index}".encode()).digest()
        # the baseline: this session generating as a serving executor does, its rows kept as it goes
        output_ids, rows = _executor_rows(model, prompt_ids, max(1, min(new_tokens, room)),
                                          lambda i, row: sample(row, params, seed, i))
        saved.positions[str(index)] = len(output_ids)
        # the exact rows (float64 reference, ~1e-12 from exact arithmetic) of the same positions, in one pass
        exact = reference_for(model).logprobs(prompt_ids + output_ids[:-1], last=len(output_ids)) - rows
        baseline = f"{index}|{BASELINE_STEP}"
        saved.own[baseline] = float(np.max(np.abs(exact)))
        saved.paths[baseline] = session_path(model)
        saved.save()
        # kept as its small difference to the baseline, in float32 (~1e-4 nats: rounded to ~1e-11, half the memory)
        cases.append((prompt_ids, output_ids, rows, exact.astype(np.float32)))
    steps = 1
    # Each honest way to compute the same rows is one named, checkpointed step: a KV decode in another session
    # (another executor, over the first EXECUTOR_ROWS positions) and one prefill (a verifier, every position).
    for th, opt, kernel, amx, float_decode, modes in keys:
        variant: LoadedModel | None = None
        for mode in modes:
            for index, case in enumerate(cases):
                steps += 1
                name = _step_name(index, th, opt, mode, kernel, amx, float_decode)
                if name not in saved.done:
                    assert case is not None
                    prompt_ids, output_ids, base, exact_offset = case
                    variant = variant or model.with_session(threads=th, optimization=opt, kernel=kernel, amx=amx,
                                                            decode=DecodePath.FLOAT if float_decode else None)
                    if mode == "kv":
                        head = output_ids[:EXECUTOR_ROWS]
                        rows = _executor_rows(variant, prompt_ids, len(head), lambda i, row: head[i],
                                              capacity=len(prompt_ids) + len(output_ids))[1]
                        base, exact_offset = base[:len(head)], exact_offset[:len(head)]
                    else:
                        rows = recompute_logprobs(variant, prompt_ids, output_ids)
                    drift = rows - base
                    saved.done[name] = float(np.max(np.abs(drift)))
                    saved.own[name] = float(np.max(np.abs(drift - exact_offset)))  # rows - reference rows
                    saved.paths[name] = session_path(variant)
                    saved.save()
                if progress is not None:
                    progress(steps, total)
        del variant  # free this session's weights before the next one loads
    variants: dict[str, float] = {}
    for name, drift in saved.done.items():
        key = name.split("|", 1)[-1]
        variants[key] = max(variants.get(key, 0.0), drift)
    executors = max((d for k, d in variants.items() if k.endswith(",kv")), default=0.0)
    verifiers = max((d for k, d in variants.items() if k.endswith(",prefill")), default=0.0)
    # any honest executor e and verifier v: |e - v| <= |e - baseline| + |baseline - v| (triangle inequality)
    worst = max(executors + verifiers, variants.get(REFERENCE_STEP, 0.0))
    positions = sum(saved.positions.values())
    reference_drifts: dict[str, float] = {}
    paths: dict[str, str] = {}
    for name, drift in saved.own.items():
        key = name.split("|", 1)[-1]
        reference_drifts[key] = max(reference_drifts.get(key, 0.0), drift)
        paths[key] = saved.paths[name]
    result = CalibrationResult(worst, tolerance_from_drift(worst), variants, positions, new_tokens,
                               time.perf_counter() - t0, worst_executor_drift=executors,
                               worst_verifier_drift=verifiers, tie_tolerances=tie_tolerances(reference_drifts, paths),
                               reference_drifts=reference_drifts, paths=paths)
    record(model, result.tolerance, result.tie_tolerances)
    _log().info("calibrate.done", model=model.digest_hex[:16], worst_drift=f"{worst:.3g}",
                executors=f"{executors:.3g}", verifiers=f"{verifiers:.3g}", positions=positions,
                tolerance=f"{result.tolerance:.3g}", tie_tolerance=f"{result.tie_tolerances.get(session_path(model))}",
                seconds=f"{result.seconds:.2f}")
    return result


def tie_tolerances(reference_drifts: dict[str, float], paths: dict[str, str]) -> dict[str, float]:
    """Per path: ``tolerance_from_drift`` of the worst distance to the float64 reference of its own KV rows and of
    its many-row path's prefill rows (the module docstring). ``reference_drifts`` and ``paths`` are keyed by step;
    a step is a KV step when its name ends in ``,kv``, else a prefill (a verifier's rows, or the reference row)."""
    kv: dict[str, float] = {}
    prefill: dict[str, float] = {}
    for step, drift in reference_drifts.items():
        path = paths[step]
        if step.endswith(",kv"):
            kv[path] = max(kv.get(path, 0.0), drift)
        else:
            many = many_row_path(path)
            prefill[many] = max(prefill.get(many, 0.0), drift)
    return {path: tolerance_from_drift(max(drift, prefill[many_row_path(path)]))
            for path, drift in sorted(kv.items()) if many_row_path(path) in prefill}


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
