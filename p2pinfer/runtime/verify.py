"""Verifying a claimed result: one teacher-forced prefill over prompt + output, then the fingerprint check.

The verifier feeds ``prompt_ids + output_ids[:-1]`` through the model over the KV cache in passes that
:func:`verification_passes` plans: the prompt-only positions in chunks of
:data:`~p2pinfer.runtime.generate.PREFILL_CHUNK` tokens (no LM head where the graph has ``logits_to_keep``;
a prompt of at most that many positions runs in the first checked pass instead, where it has and the
passes run in place or the session runs the 4-bit kernel),
then the checked rows :data:`VERIFY_ROWS` or :data:`VERIFY_ROWS_STANDARD` at a time (:func:`verify_rows`), so
that the logits, the LM head's intermediates and the log-softmax pass never exist for all rows at once (what
bounds a verification's memory peak); where the session shares the KV buffer (a GroupQueryAttention graph on
CPU: the kernel's graph and the standard one, which both take ``logits_to_keep`` as a plain input), every pass
extends one in-place KV cache (:class:`~.model.KVPasses`). It takes the
log-softmax rows that predicted each output token and runs :class:`~.fingerprint.FingerprintChecker`. At a
near tie of the sampler (:mod:`.tiebreak`) the token must be the float64 reference's pick
(:mod:`.reference`, run for that row only). Those rows are computed after the forward passes, once their
buffers are freed (the two memory peaks are not added), all in one float64 run over the sequence that keeps no
cache (:meth:`~.reference.ReferenceSession.rows_at`). Freed heap is handed back after each pass (glibc keeps
onnxruntime's freed intermediates otherwise, and the heap grew pass by pass).
Before that it checks what needs no model: format, commitment, row count, and that the finish reason fits
the output (an output cut short, or running on past EOS or a stop string, is rejected).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..log import get_logger
from .fingerprint import FORMAT, Fingerprint, FingerprintChecker, FingerprintFormatError, FingerprintVerdict, \
    commitment as fingerprint_commitment, unpack
from .generate import PREFILL_CHUNK
from .memory import release_freed_memory
from .model import KVCache, LoadedModel
from .prefix_kv import PREFIX_POSITIONS
from .reference import reference_session
from .sampling import LogProbRows, SamplingParams, log_softmax
from .tie_tolerance import tie_tolerance as model_tie_tolerance

def _log():  # bound per call, so that log.configure() made later still applies
    return get_logger("p2pinfer.runtime.verify")

#: Checked rows computed per pass on the 4-bit kernel's graph (every pass extends one in-place KV cache:
#: :class:`~.model.KVPasses`). A pass's transient memory grows with its rows: the logits (49,152 float32 values
#: a row on SmolLM2) and activations. On SmolLM2 a 512-token verification peaked at files + 595-631 MB in one pass
#: and at files + 291-355 MB in passes of 64 (docs/models.md, "Serving memory"). In place (no forward copies of
#: the cache, one logits buffer), passes of 128 rows peak no higher than passes of 64 did before (4-bit, 512
#: tokens: files + 307 / 339 MB greedy / sampled against 311 / 344) and pay the per-pass costs (the 4-bit kernel
#: dequantizes every weight once a pass) half as often: 0.80-0.85 of the 64-row time on the same requests; 256
#: rows were slower again (docs/models.md, "Verification speed").
#: A row's values do not depend on the pass it is computed in (measured bit for bit), so neither does the verdict.
VERIFY_ROWS = 128
#: Checked rows per pass on the standard graph (fp32, and any session without the kernel) once the sequence is
#: longer than :data:`VERIFY_SHORT` positions (up to it: :data:`VERIFY_ROWS`). Its passes run in place too, but
#: a pass of 128 rows at the end of a 512-token check held its logits (25 MB) beside the full KV cache (26 MB)
#: and the float head's activations: the transient rose from 46-48 to ~77 MiB (fp32, 557 positions), over the
#: serving peer's limit, for a forward that pays no per-pass dequantization to amortize.
VERIFY_ROWS_STANDARD = 64
#: Sequence length (positions) up to which the standard graph also takes :data:`VERIFY_ROWS` rows a pass: the KV
#: cache is small there (46 KB a SmolLM2 position), and a 128-token check runs in one or two passes.
VERIFY_SHORT = 256
#: The fewest rows the first pass after a kept prefix computes (see _checked_rows_in_place).
MIN_PASS_ROWS = 4


def verify_rows(model: LoadedModel, seq_len: int) -> int:
    """Checked rows per pass for a teacher-forced pass over ``seq_len`` positions on ``model``'s session: passes
    that do not run in place (through ``forward``: a graph whose attention cannot share the KV buffer, a GPU)
    take :data:`VERIFY_ROWS_STANDARD`."""
    in_place = model.shares_kv_buffer and model.io.logits_to_keep_required
    if in_place and (model.runs_kernel or seq_len <= VERIFY_SHORT):
        return VERIFY_ROWS
    return VERIFY_ROWS_STANDARD


def verification_passes(prompt_len: int, seq_len: int, *, rows: int = VERIFY_ROWS,
                        prefill: int = PREFILL_CHUNK, lead: int = 0) -> list[tuple[int, int, int]]:
    """The forward passes of a teacher-forced prefill over ``seq_len`` positions whose rows from
    ``prompt_len - 1`` on are checked: ``(lo, hi, keep)`` runs positions ``lo..hi-1`` and computes the last
    ``keep`` rows. Positions before the first checked row go ``prefill`` at a time keeping one row (it is not
    used); the checked rows go ``rows`` at a time keeping all. With ``lead``, up to that many positions before
    the first checked row run in the first checked pass instead (one pass fewer for a short prompt: each pass
    of the 4-bit kernel dequantizes every weight once). Together the passes run every position once, in
    order, and their kept checked rows are exactly rows ``prompt_len - 1 .. seq_len - 1``."""
    if prompt_len < 1 or seq_len < prompt_len or rows < 1 or prefill < 1 or lead < 0:
        raise ValueError("need 1 <= prompt_len <= seq_len, rows >= 1, prefill >= 1 and lead >= 0")
    first_row = prompt_len - 1
    start = 0 if first_row <= lead else first_row  # where the first checked pass starts
    passes = [(lo, min(lo + prefill, start), 1) for lo in range(0, start, prefill)]
    passes += [(start if lo == first_row else lo, min(lo + rows, seq_len), min(lo + rows, seq_len) - lo)
               for lo in range(first_row, seq_len, rows)]
    return passes


def _reject(position: int | None, reason: str) -> FingerprintVerdict:
    return FingerprintVerdict(False, position, reason, 0.0)


def check_finish(model: LoadedModel, prompt_len: int, output_ids: Sequence[int], finish_reason: str,
                 max_tokens: int, stop: Sequence[str], stop_at_eos: bool = True) -> FingerprintVerdict | None:
    """None when the finish reason fits the output, else a rejection."""
    n = len(output_ids)
    if n == 0:
        return _reject(0, "empty output")
    if n > max_tokens:
        return _reject(max_tokens, f"output has {n} tokens, more than max_tokens={max_tokens}")
    eos = set(model.eos_token_ids) if stop_at_eos else set()
    for i, t in enumerate(output_ids[:-1]):
        if t in eos:
            return _reject(i + 1, f"output continues after EOS at index {i}")
    stops = [s for s in stop if s]
    if stops:
        text_before = model.decode(output_ids[:-1])
        hit = next((s for s in stops if s in text_before), None)
        if hit is not None:
            return _reject(n - 1, f"output continues after stop string {hit!r}")
    if finish_reason == "eos":
        if output_ids[-1] not in eos:
            return _reject(n - 1, "finish_reason is eos but the last token is not an EOS token")
    elif finish_reason == "stop":
        if not any(s in model.decode(output_ids) for s in stops):
            return _reject(n - 1, "finish_reason is stop but the output completes no stop string")
    elif finish_reason == "length":
        if n != max_tokens and prompt_len + n < model.context_length:
            return _reject(n, f"finish_reason is length but the output has {n} of max_tokens={max_tokens} tokens "
                              f"(truncated?)")
    else:
        return _reject(None, f"unknown finish_reason {finish_reason!r}")
    return None


def verify_result(model: LoadedModel, *, prompt_ids: Sequence[int], output_ids: Sequence[int],
                  fingerprint: bytes, params: SamplingParams, seed_material: bytes, max_tokens: int,
                  finish_reason: str, stop: Sequence[str] = (), commitment: bytes | None = None,
                  fingerprint_format: str = FORMAT, tolerance: float | None = None,
                  stop_at_eos: bool = True, stop_at_first: bool = True,
                  rows_per_pass: int | None = None, tie_tolerance: float | None = None) -> FingerprintVerdict:
    """Re-check an executor's claimed output. ``tolerance`` (the pair tolerance, the log-prob allowance) defaults
    to the model's calibrated one (:class:`~p2pinfer.runtime.model.ModelNotCalibratedError` when it has none);
    ``tie_tolerance`` (this verifier's near-tie detector) to its session path's calibrated one
    (:mod:`.tie_tolerance`), or to ``tolerance`` when that is given by hand. ``rows_per_pass`` bounds the
    log-prob rows one forward pass computes (memory against per-pass overhead; the verdict does not depend on it;
    None: :func:`verify_rows`).

    ``first_bad_position`` in the verdict is an output index (0-based).
    """
    t0 = time.perf_counter()
    tol = model.measured_tolerance() if tolerance is None else tolerance  # never a default: measured or refused
    if tie_tolerance is None:
        tie_tolerance = tol if tolerance is not None else model_tie_tolerance(model)
    prompt_ids, output_ids = [int(t) for t in prompt_ids], [int(t) for t in output_ids]
    verdict = _verify(model, prompt_ids, output_ids, fingerprint, params, seed_material, max_tokens,
                      finish_reason, stop, commitment, fingerprint_format, tol, stop_at_eos, stop_at_first,
                      rows_per_pass, tie_tolerance)
    _log().info("verify.done", model=model.digest_hex[:16], accept=verdict.accept,
             first_bad=verdict.first_bad_position, reason=verdict.reason or None,
             max_deviation=f"{verdict.max_deviation:.3g}", tokens=len(output_ids),
             seconds=f"{time.perf_counter() - t0:.3f}")
    return verdict


def _verify(model: LoadedModel, prompt_ids: list[int], output_ids: list[int], fingerprint: bytes,
            params: SamplingParams, seed_material: bytes, max_tokens: int, finish_reason: str,
            stop: Sequence[str], commitment: bytes | None, fingerprint_format: str, tol: float,
            stop_at_eos: bool, stop_at_first: bool, rows: int | None, tie: float) -> FingerprintVerdict:
    if fingerprint_format != FORMAT:
        return _reject(None, f"unsupported fingerprint format {fingerprint_format!r}")
    if commitment is not None and fingerprint_commitment(fingerprint, fingerprint_format) != commitment:
        return _reject(None, "commitment does not match the fingerprint bytes")
    try:
        fp: Fingerprint = unpack(fingerprint)
    except FingerprintFormatError as exc:
        return _reject(None, f"malformed fingerprint: {exc}")
    if not prompt_ids:
        return _reject(None, "empty prompt")
    if len(fp) != len(output_ids):
        return _reject(min(len(fp), len(output_ids)),
                       f"fingerprint has {len(fp)} rows for {len(output_ids)} output tokens")
    bad = check_finish(model, len(prompt_ids), output_ids, finish_reason, max_tokens, stop, stop_at_eos)
    if bad is not None:
        return bad
    seq = prompt_ids + output_ids[:-1]
    if len(seq) >= model.context_length:
        return _reject(None, f"prompt + output exceed the model's context of {model.context_length}")
    vocab = model.tokenizer.get_vocab_size(with_added_tokens=True)
    if model.info.vocab_size:
        vocab = max(vocab, model.info.vocab_size)
    if any(not 0 <= t < vocab for t in prompt_ids + output_ids):
        return _reject(None, "token ID outside the model's vocabulary")

    checker = FingerprintChecker(fp, output_ids, params, seed_material, tol, stop_at_first=stop_at_first,
                                 defer_near_ties=True, tie_tolerance=tie)
    _check_passes(checker, model, prompt_ids, seq, rows)  # its KV buffers and logits are freed when it returns
    # near ties (see tiebreak): all known now, so their float64 rows come from one reference run over the
    # sequence that keeps no cache between them (a lower memory peak than a row at a time over a kept cache);
    # those after a bad row already found are not settled (stop_at_first), so not computed
    indices = [i for i in checker.deferred_indices
               if not (stop_at_first and checker.first_bad is not None and i > checker.first_bad)]
    if indices:
        reference = reference_session(model)
        try:
            rows = reference.rows_at(prompt_ids + output_ids, [len(prompt_ids) + i for i in indices])
        finally:
            reference.close()
        checker.settle_near_ties(lambda index: rows[len(prompt_ids) + index])
    return checker.verdict()


def _check_passes(checker: FingerprintChecker, model: LoadedModel, prompt_ids: list[int], seq: list[int],
                  rows: int | None) -> None:
    passes = _checked_rows(model, prompt_ids, seq, rows)
    try:
        for start, logits in passes:
            checker.check_rows(start, LogProbRows.from_logits(logits))
            del logits  # not held while the next pass runs
            if checker.done:
                break
            # onnxruntime's intermediates of the pass just run (it runs without its arena) are freed to glibc, which
            # keeps them; the next pass's blocks do not all fit them, so the heap grew pass by pass. Handed back
            # here (2-7 ms a pass, measured on the loaded machine), 512-token verifications peaked 8-40 MB lower
            # (docs/models.md, "Serving memory")
            release_freed_memory()
    finally:
        passes.close()


def _checked_rows(model: LoadedModel, prompt_ids: list[int], seq: list[int], rows: int | None):
    """(output index of the first row, float32 logits rows) of each checked pass, in order. Where the graph has
    ``logits_to_keep`` and the session shares the KV buffer, every pass extends one in-place cache
    (:class:`~.model.KVPasses`) keeping only the rows it needs: one row of a prompt-only pass (it is not used),
    the checked rows of the first checked pass (a prompt of up to ``rows`` positions shares it). Otherwise the
    prompt-only passes, and a first checked pass that includes prompt positions, go through ``forward`` and the
    rest extend the cache in place. A pass's logits are valid until the next is asked for."""
    first_row = len(prompt_ids) - 1
    # as KVPasses.keeps_rows will say, without making its buffers (zeroed heap memory stays resident once freed)
    in_place = model.shares_kv_buffer and model.io.logits_to_keep_required
    if rows is None:
        rows = verify_rows(model, len(seq))
    # a short prompt shares the first checked pass where that costs no memory (in place) or saves work (the 4-bit
    # kernel dequantizes every weight once per pass). Through `forward` its logits and cache copy sit beside the
    # in-place passes' buffers: +17-20 MB at an fp32 verification's peak (files + 306 / 317 MB before it, 323 / 357
    # after)
    lead = rows if in_place or (model.io.has_logits_to_keep and model.runs_kernel) else 0
    if in_place:
        yield from _checked_rows_in_place(model, prompt_ids, seq, rows, lead)
        return
    passes = verification_passes(len(prompt_ids), len(seq), rows=rows, lead=lead)
    cache = model.empty_cache()
    checked = [p for p in passes if p[1] > first_row]
    for lo, hi, keep in passes[:len(passes) - len(checked)]:
        _, cache = model.forward(seq[lo:hi], cache, last=keep)
    if checked[0][0] < first_row:  # the prompt shares the first checked pass
        lo, hi, keep = checked.pop(0)
        logits, cache = model.forward(seq[lo:hi], cache, last=keep)
        yield 0, logits
        del logits  # before the in-place buffers are made
        if not checked:
            return
    extend = model.passes(cache, len(seq), rows)
    del cache  # the passes' buffers hold it now
    for lo, hi, _ in checked:
        yield lo - first_row, extend.run(seq[lo:hi])


def _checked_rows_in_place(model: LoadedModel, prompt_ids: list[int], seq: list[int], rows: int, lead: int):
    """:func:`_checked_rows` where every pass extends one in-place cache: no forward copies of the cache, no second
    logits buffer. The passes start after the longest prefix of the prompt whose keys and values this session
    kept from an earlier request (:mod:`.prefix_kv`: the same bits as computing them again), and the sequence's
    first positions are kept for the next request."""
    first_row = len(prompt_ids) - 1
    # the first pass keeps at least MIN_PASS_ROWS rows: a pass of fewer rows takes the one-row path (the kernel's
    # decode rows, onnxruntime's matrix-vector product), whose rounding differs from a many-row pass's
    skip, arrays = model.prefix_kv.lookup(model.session, prompt_ids, limit=first_row + 1 - MIN_PASS_ROWS)
    empty = model.empty_cache()
    extend = model.passes(KVCache(arrays, skip) if skip else empty, len(seq), rows)
    del arrays  # copied into the passes' buffers
    keep_positions = min(len(seq), PREFIX_POSITIONS)
    for lo, hi, keep in verification_passes(len(prompt_ids) - skip, len(seq) - skip, rows=rows, lead=lead):
        lo, hi = lo + skip, hi + skip
        logits = extend.run(seq[lo:hi], keep=keep)
        if lo < keep_positions <= hi:  # those positions are in the buffers now
            position_bytes = sum(a.shape[1] * a.shape[3] * a.itemsize for a in empty.arrays)
            model.prefix_kv.remember(model.session, seq[:keep_positions], position_bytes, extend.keys_values)
        if hi > first_row:
            yield hi - keep - first_row, logits


def recompute_logprobs(model: LoadedModel, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> np.ndarray:
    """The teacher-forced log-prob rows ``[len(output_ids), vocab]`` (for tests and calibration)."""
    seq = [*prompt_ids, *output_ids[:-1]]
    return np.concatenate([log_softmax(logits) for _, logits in _checked_rows(model, list(prompt_ids), seq, None)])
