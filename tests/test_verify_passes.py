"""Verification in row-bounded passes: the plan covers every position once, and the check's result does not
depend on how many rows a pass computes (docs/models.md, "Serving memory")."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from p2pinfer.runtime import GREEDY, SamplingParams, generate, load_model, sampling_seed, verify_result
from p2pinfer.runtime.sampling import log_softmax
from p2pinfer.runtime.verify import recompute_logprobs, verification_passes

SEED = sampling_seed(bytes(range(32)), None)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95)
PROMPT = "def parse_args(argv):\n    parser = argparse."
N = 40


@settings(max_examples=300, deadline=None)
@given(prompt_len=st.integers(1, 3000), extra=st.integers(0, 3000), rows=st.integers(1, 700),
       prefill=st.integers(1, 700), lead=st.integers(0, 700))
def test_passes_run_every_position_once_and_keep_exactly_the_checked_rows(prompt_len, extra, rows, prefill,
                                                                          lead) -> None:
    seq_len = prompt_len + extra
    passes = verification_passes(prompt_len, seq_len, rows=rows, prefill=prefill, lead=lead)
    assert passes[0][0] == 0 and passes[-1][1] == seq_len
    assert all(a[1] == b[0] for a, b in zip(passes, passes[1:]))  # contiguous, in order: each position once
    first_row = prompt_len - 1
    kept = []
    for lo, hi, keep in passes:
        assert lo < hi and 1 <= keep <= hi - lo
        if hi <= first_row:  # a prompt-only pass: one row, not used
            assert keep == 1 and hi - lo <= prefill
        elif lo < first_row:  # the first checked pass also runs a prompt of at most `lead` positions
            assert lo == 0 and not kept and first_row <= lead  # the first pass of all
            assert keep == hi - first_row <= rows
            kept.extend(range(hi - keep, hi))
        else:  # a checked pass starts at or after the first checked row and computes at most `rows` rows
            assert lo >= first_row and keep == hi - lo <= rows
            kept.extend(range(hi - keep, hi))
    assert kept == list(range(first_row, seq_len))
    assert (passes[0][1] > first_row) == (first_row <= lead or first_row == 0)  # with a short prompt: no prompt-only pass


@pytest.mark.parametrize("bad", [(0, 5, 10), (3, 2, 10), (3, 5, 0)])
def test_a_plan_that_cannot_exist_is_refused(bad) -> None:
    prompt_len, seq_len, rows = bad
    with pytest.raises(ValueError):
        verification_passes(prompt_len, seq_len, rows=rows)


def _one_pass_rows(model, prompt_ids, output_ids) -> np.ndarray:
    seq = [*prompt_ids, *output_ids[:-1]]
    logits, _ = model.forward(seq, model.empty_cache(), last=len(output_ids))
    return log_softmax(logits)


def test_row_bounded_passes_match_one_pass_within_the_calibrated_tolerance(trained_model) -> None:
    prompt = trained_model.encode(PROMPT)
    result = generate(trained_model, prompt, max_tokens=N, params=SAMPLED, seed_material=SEED, stop_at_eos=False)
    whole = _one_pass_rows(trained_model, prompt, result.output_ids)
    passes = recompute_logprobs(trained_model, prompt, result.output_ids)
    assert passes.shape == whole.shape == (N, trained_model.info.vocab_size)
    drift = float(np.max(np.abs(passes - whole)))
    assert drift <= trained_model.tolerance, drift


@pytest.fixture(scope="module")
def cheater(shared_models, trained_model):
    """The 1 %-perturbed model under the honest digest."""
    return load_model(shared_models / "tiny-llama-trained-perturbed", digest=trained_model.digest,
                      providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("who", ["honest", "cheater"])
def test_the_verdict_does_not_depend_on_the_rows_per_pass(trained_model, cheater, params, who) -> None:
    executor = trained_model if who == "honest" else cheater
    prompt = trained_model.encode(PROMPT)
    result = generate(executor, prompt, max_tokens=N, params=params, seed_material=SEED, stop_at_eos=False)
    verdicts = [verify_result(trained_model, prompt_ids=prompt, output_ids=result.output_ids,
                              fingerprint=result.fingerprint_bytes, params=params, seed_material=SEED, max_tokens=N,
                              finish_reason=result.finish_reason, stop_at_eos=False, stop_at_first=False,
                              rows_per_pass=rows)
                for rows in (1, 7, 64, 4096)]
    assert all(v.accept == (who == "honest") for v in verdicts), [v.reason for v in verdicts]
    first = verdicts[0]
    for v in verdicts[1:]:
        assert (v.accept, v.first_bad_position, v.positions_checked, v.positions_failed) == \
            (first.accept, first.first_bad_position, first.positions_checked, first.positions_failed)
        assert abs(v.max_deviation - first.max_deviation) <= trained_model.tolerance


@pytest.mark.parametrize("fused", [True, False], ids=["fused-attention", "portable-attention"])
def test_in_place_passes_equal_forward(tmp_path, fused: bool) -> None:
    """KVPasses (one KV buffer bound as past and present, passes of several tokens) computes exactly what
    forward() computes over a growing cache; graphs whose attention cannot share the buffer fall back to it."""
    from gguf import GGMLQuantizationType as QT
    from gguf_fixtures import TinyLlama, write_tiny_llama

    from p2pinfer.gguf import import_gguf

    cfg = TinyLlama(matrix_type=QT.Q4_1, n_kv_heads=2)
    write_tiny_llama(tmp_path / "m.gguf", cfg)
    import_gguf(tmp_path / "m.gguf", tmp_path / "m", fused_attention=fused)
    model = load_model(tmp_path / "m", threads=1, providers=["CPUExecutionProvider"])
    assert model.shares_kv_buffer is fused
    ids = [5, 77, 200, 3, 260, 261, 99, 12, 140, 33, 7, 18, 64]
    _, cache = model.forward(ids[:3], model.empty_cache(), last=1)
    passes = model.passes(cache, capacity=len(ids), rows=4)
    for lo, hi in ((3, 7), (7, 8), (8, 12), (12, 13)):
        logits, cache = model.forward(ids[lo:hi], cache)
        assert np.array_equal(passes.run(ids[lo:hi]), logits), (lo, hi)
        assert passes.length == cache.length == hi
    # from an empty cache, keeping the last rows only (a verifier's prompt chunk and its first checked pass)
    fresh = model.passes(model.empty_cache(), capacity=len(ids), rows=4)
    assert fresh.keeps_rows is (fused and model.io.logits_to_keep_required)
    cache = model.empty_cache()
    for lo, hi, keep in ((0, 6, 1), (6, 10, 3), (10, 13, 3)):
        logits, cache = model.forward(ids[lo:hi], cache, last=keep)
        assert np.array_equal(fresh.run(ids[lo:hi], keep=keep), logits), (lo, hi, keep)
        assert fresh.length == cache.length == hi
    if fused:
        with pytest.raises(ValueError):
            passes.run([1])  # no room left
        with pytest.raises(ValueError):
            model.passes(model.empty_cache(), capacity=len(ids), rows=4).run(ids[:5])  # more than 4 rows


@pytest.mark.parametrize("weights", ["F32", "Q4_1"])
def test_standard_graph_binds_logits_to_keep_and_its_rows_are_unchanged(tmp_path, weights: str) -> None:
    """The standard graph's session takes ``logits_to_keep`` as a plain input (its default removed at load time,
    the stored file and digest untouched), so that every verification pass runs in place. Its rows are bit for
    bit those of the session loaded from the file as stored (the default kept) through the route it took before
    (``forward`` for the prompt chunks and a first checked pass shared with the prompt, in-place passes after
    that), at the same rows per pass; and the new default (VERIFY_ROWS up to VERIFY_SHORT positions, the prompt
    sharing the first checked pass) gives the rows of the old default (64 rows) where no pass is a single row (a one-row pass
    takes onnxruntime's matrix-vector path, which rounds differently on either session)."""
    import dataclasses

    import onnxruntime as ort
    from gguf import GGMLQuantizationType as QT
    from gguf_fixtures import TinyLlama, write_tiny_llama

    from p2pinfer.gguf import import_gguf
    from p2pinfer.runtime.digest import compute_digest
    from p2pinfer.runtime.verify import _checked_rows

    write_tiny_llama(tmp_path / "m.gguf", TinyLlama(matrix_type=getattr(QT, weights), n_kv_heads=2))
    import_gguf(tmp_path / "m.gguf", tmp_path / "m", fused_attention=True)
    stored = (tmp_path / "m" / "model.onnx").read_bytes()
    model = load_model(tmp_path / "m", threads=1, providers=["CPUExecutionProvider"], kernel=False)
    assert not model.runs_kernel
    assert (tmp_path / "m" / "model.onnx").read_bytes() == stored
    assert model.digest == compute_digest(tmp_path / "m")
    assert model.io.has_logits_to_keep and model.io.logits_to_keep_required and model.shares_kv_buffer
    assert model.passes(model.empty_cache(), capacity=8, rows=4).keeps_rows
    # the float head's Gemm writes the logits (no Reshape copying them into a second buffer); a 4-bit head is a
    # sum of terms, left as it is
    assert model.io.logits_flat is (weights == "F32")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.enable_cpu_mem_arena = 1, 1, False
    opts.log_severity_level = 3
    as_stored = ort.InferenceSession(str(tmp_path / "m" / "model.onnx"), sess_options=opts,
                                     providers=["CPUExecutionProvider"])
    assert "logits_to_keep" in {i.name for i in as_stored.get_overridable_initializers()}
    before = dataclasses.replace(model, session=as_stored,
                                 io=dataclasses.replace(model.io, logits_to_keep_required=False, logits_flat=False))

    def rows_of(m, prompt, seq, rows):
        m.prefix_kv.clear()  # every call from position 0 (a kept prefix is tests/test_prefix_kv.py's subject)
        return np.concatenate([r.copy() for _, r in _checked_rows(m, prompt, seq, rows)])

    rng = np.random.default_rng(7)
    ids = [int(t) for t in rng.integers(3, model.info.vocab_size or 256, 24)]
    for last in (None, 1, 5):  # forward, and the decode loop's steps, as before
        new_logits, new_cache = model.forward(ids[:20], model.empty_cache(), last=last)
        old_logits, old_cache = before.forward(ids[:20], before.empty_cache(), last=last)
        assert np.array_equal(new_logits, old_logits) and new_logits.shape == old_logits.shape
    decoder = model.decoder(new_cache, capacity=24)
    for token in ids[20:]:
        old_logits, old_cache = before.forward([token], old_cache)
        assert np.array_equal(decoder.step(token), old_logits[-1])
    for prompt_len, seq_len in ((3, 250), (40, 200), (130, 255)):  # no single-row pass at 64 or 128 rows
        seq = [int(t) for t in rng.integers(3, model.info.vocab_size or 256, seq_len)]
        prompt = seq[:prompt_len]
        for rows in (7, 32, 64, 128):
            assert np.array_equal(rows_of(model, prompt, seq, rows), rows_of(before, prompt, seq, rows)), \
                (prompt_len, rows)
        old = rows_of(before, prompt, seq, 64)  # the standard graph's default before
        assert old.shape[0] == seq_len - prompt_len + 1
        assert np.array_equal(rows_of(model, prompt, seq, None), old), prompt_len
