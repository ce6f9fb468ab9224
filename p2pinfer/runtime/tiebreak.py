"""The one rule for which token an output index must hold: float32 where it decides, float64 where it cannot.

Why a second computation at all. The seeded sampler (:mod:`.sampling`) is a deterministic function of the
log-probs, and every honest party computes those in float32 with its own drift (threads, optimization levels,
KV decode or prefill, onnxruntime versions), bounded by its calibrated tolerance ``tol``. Any decision taken
from drifting values has an ambiguous band as wide as the drift: at a position whose two best Gumbel keys
are closer than ``2*tol/T``, an honest executor and an honest verifier can pick different tokens, so a check
that accepts every honest executor must accept both — and an executor that knows the noise can choose
(issue 13: 3 such positions in 10,000 on SmolLM2 at T = 0.8, however the check is tuned). The only way to
leave no choice is to decide those positions by a computation whose drift is negligible: the float64
reference forward pass (:mod:`.reference`), run only there.

Two tolerances. The fingerprint's log-prob check compares an executor's values with a verifier's, so its
allowance is the **pair tolerance** (``LoadedModel.tolerance``: 4 x (worst honest executor drift + worst honest
verifier drift), both against one baseline). The near-tie rule needs less: each party's **tie tolerance**
(:mod:`.tie_tolerance`) bounds only its OWN float32 row's distance to the exact-arithmetic row, measured by
calibration against the float64 reference for the path the party runs (standard graph, or the 4-bit kernel on
AMX / FMA with integer / float decode rows), ``max(1e-5, 4 x worst own distance)``.

The rule, at output index ``i`` with seed material ``seed`` and sampling params ``params``:

* a party computes its own float32 log-prob row and :func:`.sampling.admissible_tokens` under its own tie
  tolerance ``tie``: the tokens the sampler could pick on some row within ``tie`` of it. That set is the party's
  **ambiguity detector**;
* one token ``t`` in it: the pick is ``t``;
* more than one: the pick is :func:`.sampling.sample` on the float64 reference row (same seed, noise,
  top-k/top-p, greedy too) for prompt + output so far.

The executor emits the pick (:func:`resolve`, with its own ``tie``); a verifier accepts a claimed token exactly
when it is the pick by its own row and its own ``tie`` (:func:`check_rows`; :class:`.fingerprint.FingerprintChecker`
checks the claimed log-prob values against the pair tolerance, apart).

Proof sketch. Let ``E`` be the exact-arithmetic log-probs of the model and suppose each party's float32 row is
within its own ``tie`` of ``E`` (what calibration measures, with a factor 4 for the positions it did not see;
``tests/test_tiebreak_own_drift.py`` and ``benchmarks/sampler_freedom.py`` check the float32-to-float64 distance
against it). (1) If a party's set is ``{t}``, then ``t`` is the sampler's pick on ``E``: ``E`` is one of the rows
the set ranges over, and the sampler picks exactly one token on it. This uses the party's own ``tie`` only,
never the other party's: the two sides may have different widths. (2) The reference row differs from ``E`` by
float64 rounding (~1e-12), so its pick equals the pick on ``E`` unless the exact key gap is below ~1e-10 —
probability ~1e-10·(1/T) per position. (3) Hence every honest party's pick, by whichever branch, is the pick on
``E``: an honest executor and an honest verifier agree (no false reject), and a token other than that pick is
rejected by every honest verifier (no choice), both except with negligible probability. Nothing here needs the
pair bound: it bounds executor-to-verifier distances, which decide nothing once each side's pick is ``E``'s. The
fingerprint's log-prob check is unchanged and still binds the claimed rows to the recomputed ones.

Cost: the reference runs only at ambiguous positions (a share of ~``2*tie/T`` per position on each side;
``benchmarks/sampler_freedom.py`` counts them), lazily, once per row. The tie tolerance is smaller than the pair
tolerance (on SmolLM2's kernel path about a quarter of it, docs/models.md), and so is the share of near ties.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..log import get_logger
from .sampling import SamplingParams, admissible_tokens, gumbel_keys, judge_rows, sample, sampler_slack

ReferenceRow = Callable[[int], np.ndarray]
"""Output index -> the float64 reference log-prob row that predicts that index."""


def _log():  # bound per call, so that log.configure() made later still applies
    return get_logger("p2pinfer.runtime.tiebreak")


def is_ambiguous(logprobs: np.ndarray, params: SamplingParams, seed_material: bytes, index: int,
                 tolerance: float) -> bool:
    """Could drift of at most ``tolerance`` change the sampler's pick from this row? Exactly
    ``len(admissible_tokens(...)) > 1``, with the admissible set built only under top-k/top-p: greedy needs one
    comparison with the row's maximum and plain sampling one pass over the keys."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if params.greedy:  # admissible_tokens' greedy set: within 2 * tolerance of the best log-prob
        return int(np.sum(lp >= float(np.max(lp)) - 2.0 * tolerance)) > 1
    if _is_plain(params):
        return _plain_pick(lp, params, seed_material, index, tolerance) is None
    return len(admissible_tokens(lp, params, seed_material, index, tolerance)) > 1


def _is_plain(params: SamplingParams) -> bool:
    """Sampling without top-k/top-p: every token is a candidate under any drift."""
    return not params.greedy and params.top_k == 0 and params.top_p >= 1.0


def _plain_pick(logprobs: np.ndarray, params: SamplingParams, seed_material: bytes, index: int,
                tolerance: float) -> int | None:
    """The sampler's pick when no drift of at most ``tolerance`` can change it, None at a near tie; for
    sampling without top-k/top-p, in one pass over the keys (the cost of :func:`.sampling.sample`)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    slack = sampler_slack(params, tolerance)
    keys = gumbel_keys(lp / params.temperature, seed_material, index, slack)
    best = int(np.argmax(keys))
    first = float(keys[best])
    keys[best] = -np.inf
    return best if float(np.max(keys)) < first - slack else None


def resolve(logprobs: np.ndarray, params: SamplingParams, seed_material: bytes, index: int,
            tolerance: float | None, reference_row: ReferenceRow) -> int:
    """The token an executor emits at ``index`` from its own float32 row (see the module docstring).

    ``tolerance`` is the executor's own tie tolerance (:func:`.tie_tolerance.tie_tolerance`). None (a model not calibrated yet: calibration's own greedy runs, tooling) cannot tell a near
    tie and takes the float32 pick; a peer serves only calibrated models, so no served output is made so.
    """
    if tolerance is None:
        return sample(logprobs, params, seed_material, index)
    if _is_plain(params):
        token = _plain_pick(logprobs, params, seed_material, index, tolerance)
        if token is not None:
            return token
        admitted = admissible_tokens(logprobs, params, seed_material, index, tolerance)
    else:
        admitted = admissible_tokens(logprobs, params, seed_material, index, tolerance)
        if len(admitted) == 1:
            return int(admitted[0])
    token = sample(reference_row(index), params, seed_material, index)
    _log().info("tiebreak.reference", index=index, admitted=len(admitted), token=token,
                fp32_pick=sample(logprobs, params, seed_material, index))
    return token


def settle_near_ties(rows, params: SamplingParams, seed_material: bytes, start_index: int, tokens: np.ndarray,
                     tolerance: float, ok: np.ndarray, reference_row: ReferenceRow | None,
                     near: np.ndarray | None = None) -> np.ndarray:
    """``ok`` (the drift-only check's verdicts, :func:`.sampling.acceptable_rows`) with every accepted near
    tie re-judged: the token must be the reference's pick. ``rows``: a float64 matrix or
    :class:`.sampling.LogProbRows`. ``reference_row`` None (pure tooling without a model) leaves ``ok`` as it
    is — the drift-only rule, which leaves a choice at near ties; :func:`.verify.verify_result` always passes
    one. ``near``: :func:`is_ambiguous` per row when the caller has it already (:func:`.sampling.judge_rows`
    gives it from the same pass as ``ok``); otherwise it is computed here for every accepted row."""
    ok = np.array(ok, dtype=bool)
    if reference_row is None or not ok.any():
        return ok
    tokens = np.asarray(tokens, dtype=np.int64)
    for r in np.flatnonzero(ok):
        i = start_index + int(r)
        if not (near[r] if near is not None else is_ambiguous(rows[int(r)], params, seed_material, i, tolerance)):
            continue
        pick = sample(reference_row(i), params, seed_material, i)
        ok[r] = int(tokens[r]) == pick
        _log().info("tiebreak.checked", index=i, token=int(tokens[r]), reference=pick, accept=bool(ok[r]))
    return ok


def check_rows(logprobs: np.ndarray, params: SamplingParams, seed_material: bytes, start_index: int,
               tokens: np.ndarray, tolerance: float, reference_row: ReferenceRow | None) -> np.ndarray:
    """Per row (output index ``start_index + r``): is ``tokens[r]`` the pick by this verifier's rows? A token
    outside the admissible set is rejected; at a near tie it must equal the reference pick."""
    lp = np.asarray(logprobs, dtype=np.float64)
    ok, near = judge_rows(lp, params, seed_material, start_index, np.asarray(tokens, dtype=np.int64), tolerance)
    return settle_near_ties(lp, params, seed_material, start_index, tokens, tolerance, ok, reference_row, near)
