"""The float64 reference over a per-request KV cache (``ReferenceSession``, docs/models.md "Near ties").

A request meets its near ties in order, and each asks for the reference row after prompt + output so far. The
session keeps the float64 keys/values of the positions it ran and computes only the new ones. Its rows must be
the full-prefill reference's rows to float64 rounding (the tie-break argument needs ~1e-12 of exact arithmetic),
whatever the order of the requests (a longer prefix, the same one, a shorter one, another sequence), across
chunk boundaries, and with the cache cut to its byte bound; the executor (generation) and the verifier
(verification) use one each, and still agree at every near tie.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from p2pinfer.gguf import import_gguf
from p2pinfer.runtime import SamplingParams, load_model, sampling_seed, verify_result
from p2pinfer.runtime.generate import Generation
from p2pinfer.runtime.reference import REFERENCE_CHUNK, ReferenceSession, reference_for
from p2pinfer.runtime.sampling import admissible_tokens, sample
from p2pinfer.runtime.verify import recompute_logprobs

ROUNDING = 1e-10  # float64 rounding of a log-prob row (measured: ~1e-13 on SmolLM2), far below any tolerance
PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n"


def _full(model, ids: list[int]) -> np.ndarray:
    return reference_for(model).logprobs(ids, last=1)[0]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_session_rows_equal_the_full_prefill(trained_model, data) -> None:
    """Any sequence of rows (longer, equal, shorter prefixes, a diverging sequence): each equals the row
    computed from scratch, and the session runs only the positions it did not hold."""
    vocab = trained_model.info.vocab_size or 1024
    base = trained_model.encode(PROMPT * 3)[:60]
    session = ReferenceSession(reference_for(trained_model))
    held: list[int] = []
    for _ in range(data.draw(st.integers(2, 5), label="rows")):
        n = data.draw(st.integers(1, len(base)), label="prefix")
        ids = list(base[:n])
        if data.draw(st.booleans(), label="diverge") and n > 1:
            at = data.draw(st.integers(0, n - 1), label="at")
            ids[at] = (ids[at] + 1 + data.draw(st.integers(0, vocab - 2), label="token")) % vocab
        before = session.computed_positions
        common = 0
        while common < min(len(held), n - 1) and held[common] == ids[common]:
            common += 1
        row = session.row(ids)
        np.testing.assert_allclose(row, _full(trained_model, ids), rtol=0, atol=ROUNDING)
        assert session.computed_positions - before == n - common  # only what the cache did not hold
        held = ids
    session.close()
    assert session.cached_positions == 0 and session.cached_bytes == 0


def test_rows_across_chunks_and_a_bounded_cache(trained_model) -> None:
    """Prefixes longer than a chunk (several passes over the cache; chunks of 32 here, the served default is
    REFERENCE_CHUNK), then rows after them with the cache cut to a byte bound: the same rows as from scratch
    in one pass; the cache never holds more than the bound, and a row past it recomputes only the positions
    beyond the kept prefix."""
    ids = trained_model.encode(PROMPT * 20)[:200]
    assert len(ids) == 200 and REFERENCE_CHUNK >= len(ids)
    full = reference_for(trained_model).logprobs(ids, last=len(ids))  # one pass
    whole = ReferenceSession(reference_for(trained_model), chunk=32)
    np.testing.assert_allclose(whole.logprobs(ids[:140], last=40), full[100:140], rtol=0, atol=ROUNDING)
    per_position = whole.cached_bytes // whole.cached_positions
    bound = per_position * 100
    small = ReferenceSession(reference_for(trained_model), max_bytes=bound, chunk=32)
    # (prefix, positions it reuses): the first 50 are kept whole; later rows reuse the kept first 100
    for n, reused in ((50, 0), (120, 50), (170, 100), (len(ids), 100)):
        before = small.computed_positions
        np.testing.assert_allclose(small.row(ids[:n]), full[n - 1], rtol=0, atol=ROUNDING)
        assert small.cached_bytes <= bound and small.cached_positions == min(n, 100)
        assert small.computed_positions - before == n - reused
    for session in (whole, small):
        session.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_extend_keeps_exactly_the_cache_asked_for(trained_model, data) -> None:
    """``extend(..., keep=k)`` (the cache of the first k positions only, or none): the rows are the full
    prefill's to float64 rounding, the returned cache holds exactly k positions of every layer, and they equal
    the prefix of the cache of all positions (to float64 rounding: other chunk boundaries group the same
    operations differently), wherever k falls: before the last rows (a chunk ends there and the chunks after
    it build no cache to keep), among them, at the end, or 0."""
    ref = reference_for(trained_model)
    ids = trained_model.encode(PROMPT * 8)[:150]
    n = data.draw(st.integers(2, len(ids)), label="n")
    last = data.draw(st.integers(1, min(4, n - 1)), label="last")
    start = data.draw(st.integers(0, n - last), label="start")
    keep = data.draw(st.one_of(st.just(0), st.integers(start, n)), label="keep")
    chunk = data.draw(st.sampled_from([16, 40, 256]), label="chunk")
    full_rows, full_kv = ref.extend(None, ids[:n], 0, n, chunk=256)  # one pass, every position kept
    prefix = ref.extend(None, ids[:start], 0, 1, chunk=chunk)[1] if start else None
    rows, kv = ref.extend(prefix, ids[:n], start, last, chunk=chunk, keep=keep)
    np.testing.assert_allclose(rows, full_rows[n - last:], rtol=0, atol=ROUNDING)
    assert set(kv) == (set(full_kv) if keep else set())
    for name, value in kv.items():
        assert value.shape[2] == keep and value.dtype == np.float64
        np.testing.assert_allclose(value, full_kv[name][:, :, :keep], rtol=0, atol=ROUNDING)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 600), extra=st.integers(1, 900), last=st.integers(1, 8), chunk=st.integers(1, 300),
       at=st.floats(0, 1))
def test_pass_count_is_the_chunk_loop(start, extra, last, chunk, at) -> None:
    """``_pass_count`` (which decides whether a chunk may end at the kept prefix without costing a pass) counts
    the passes of ``extend``'s chunk loop, with and without a cut."""
    from p2pinfer.runtime.reference import _pass_count

    n = start + max(extra, last)
    cut = start + int(at * (n - last - start))

    def loop(cut_at):
        count, lo = 0, start
        while cut_at is not None and lo < cut_at:
            lo, count = min(lo + chunk, cut_at), count + 1
        while n - lo - chunk >= last:
            lo, count = lo + chunk, count + 1
        return count + 1

    assert _pass_count(start, n, last, chunk, None) == loop(None)
    assert _pass_count(start, n, last, chunk, cut) == loop(cut)


def test_a_final_row_equals_a_kept_row_and_leaves_no_cache(trained_model) -> None:
    """The verifier's last near tie (``final``): the same row as with the cache kept, and nothing held after."""
    ids = trained_model.encode(PROMPT * 8)[:150]
    kept, final = ReferenceSession(reference_for(trained_model), chunk=32), ReferenceSession(
        reference_for(trained_model), chunk=32)
    for session in (kept, final):
        session.row(ids[:90])
    np.testing.assert_allclose(final.row(ids, final=True), kept.row(ids), rtol=0, atol=ROUNDING)
    assert final.cached_positions == 0 and final.cached_bytes == 0 and kept.cached_positions == len(ids)
    assert final.computed_positions == kept.computed_positions == len(ids)  # the final row reused the cache
    kept.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_rows_at_equal_rows_from_scratch(trained_model, data) -> None:
    """A verifier's near ties in one run (``rows_at``: chunks end at every asked-for position, nothing kept):
    each row is the row of that prefix computed from scratch, to float64 rounding, at any chunk size, and the
    session holds no cache afterwards."""
    ids = trained_model.encode(PROMPT * 8)[:150]
    ends = data.draw(st.lists(st.integers(1, len(ids)), min_size=1, max_size=5), label="ends")
    chunk = data.draw(st.sampled_from([7, 32, 256]), label="chunk")
    session = ReferenceSession(reference_for(trained_model), chunk=chunk)
    session.row(ids[:20])  # a cache it had: dropped
    rows = session.rows_at(ids, ends)
    assert sorted(rows) == sorted(set(ends))
    for end, row in rows.items():
        np.testing.assert_allclose(row, _full(trained_model, ids[:end]), rtol=0, atol=ROUNDING)
    assert session.cached_positions == 0 and session.cached_bytes == 0


@pytest.fixture(scope="module")
def smollm2_q4(tmp_path_factory, smollm2_gguf):
    folder = tmp_path_factory.mktemp("smollm2-kv") / "SmolLM2-135M-Instruct"
    import_gguf(smollm2_gguf, folder)  # the served 4-bit class
    return load_model(folder, providers=["CPUExecutionProvider"])


def test_smollm2_session_rows_equal_the_full_prefill(smollm2_q4) -> None:
    """The GGUF graph (GroupQueryAttention with a float64 past, MatMulNBits): a session's second and third
    rows extend its cache and equal the rows from scratch to float64 rounding."""
    model = smollm2_q4
    ids = model.prompt_ids(messages=[{"role": "user", "content": "Tell me about lighthouses."}])
    session = ReferenceSession(reference_for(model))
    for n in (len(ids) - 12, len(ids) - 11, len(ids)):
        np.testing.assert_allclose(session.row(ids[:n]), _full(model, ids[:n]), rtol=0, atol=ROUNDING)
    assert session.computed_positions == len(ids)


def test_smollm2_row_memory_holds_only_the_kept_cache(smollm2_q4) -> None:
    """A row's float64 cache is built whole only when it is kept: on SmolLM2 (30 layers, 92 KB of float64 cache
    a position), a row of 320 positions whose session keeps its first 200 ends a chunk there and builds no cache
    after it, so it peaks below the row that keeps all 320 (before, it built the whole cache and then copied
    the kept part beside it: the whole cache plus 200 positions); the verifier's last row (``final``) keeps
    nothing and peaks no higher either. Python-heap peaks, traced: deterministic, whatever the machine's load."""
    import tracemalloc

    model = smollm2_q4
    ids = (model.prompt_ids(messages=[{"role": "user", "content": "Tell me about lighthouses. " * 50}]))[:320]
    assert len(ids) == 320
    ref = reference_for(model)
    per_position = ref.cache_bytes_per_position
    assert per_position == 30 * 2 * 3 * 64 * 8

    def peak(max_bytes: int, final: bool = False) -> tuple[int, np.ndarray]:
        session = ReferenceSession(ref, max_bytes=max_bytes, chunk=128)
        tracemalloc.start()
        try:
            row = session.row(ids, final=final)
            return tracemalloc.get_traced_memory()[1], row
        finally:
            tracemalloc.stop()
            assert session.cached_positions == (0 if final else min(len(ids), max_bytes // per_position))
            session.close()

    everything, row_all = peak(1 << 40)
    bounded, row_bounded = peak(200 * per_position)
    nothing, row_final = peak(1 << 40, final=True)
    for row in (row_bounded, row_final):
        np.testing.assert_allclose(row, row_all, rtol=0, atol=ROUNDING)
    whole = len(ids) * per_position  # 29.5 MB
    assert bounded <= everything and nothing <= everything, (bounded, nothing, everything)
    assert bounded < whole + 200 * per_position - 10 * 2**20, (bounded, whole)  # the old build-then-copy peak
    # layer-major passes: one layer's float64 cache at a time, never every layer's. A row that keeps nothing
    # peaks below the cache of all its positions (it built that cache whole before: the chunks before the last
    # ran every layer), and one that keeps its cache below twice it (measured 14 / 44 MB against 29.5)
    assert nothing < whole - 5 * 2**20, (nothing, whole)
    assert everything < 2 * whole - 5 * 2**20, (everything, whole)
    # all of a verifier's near ties at once: no more than one row from scratch
    session = ReferenceSession(ref, chunk=128)
    tracemalloc.start()
    try:
        rows = session.rows_at(ids, [100, 250, len(ids)])
        together = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(rows[len(ids)], row_all, rtol=0, atol=ROUNDING)
    assert together < whole - 5 * 2**20, (together, whole)


WIDE = 0.2  # the executor and verifier tolerance: near ties on most sampled positions of the fixture


@pytest.mark.parametrize("temperature", [0.8, 1.5])
def test_executor_and_verifier_sessions_agree_at_every_near_tie(trained_model, temperature: float) -> None:
    """Executor (generation) and verifier (verification) each decide near ties over their own session: the
    executor's token is the full-prefill reference's pick at every near tie, the verifier accepts the output,
    and the executor computed each position once (not one prefix per near tie)."""
    model = trained_model.with_session()
    model.tolerance = WIDE
    params = SamplingParams(temperature=temperature)
    prompt_ids = model.encode(PROMPT)
    seed = sampling_seed(bytes([int(temperature * 10)]) * 32, None)
    gen = Generation(model, prompt_ids, 24, params, seed, stop_at_eos=False)
    gen.start()
    while gen.step() is not None:
        pass
    result = gen.result()
    rows = recompute_logprobs(model, prompt_ids, result.output_ids)
    ties = [i for i, row in enumerate(rows) if len(admissible_tokens(row, params, seed, i, WIDE)) > 1]
    assert len(ties) >= 2, ties  # several near ties in one request: the cache is used
    for i in ties:
        assert result.output_ids[i] == sample(_full(model, prompt_ids + result.output_ids[:i]), params, seed, i)
    assert gen._reference is not None
    assert gen._reference.computed_positions <= len(prompt_ids) + len(result.output_ids)
    assert gen._reference.cached_positions == 0  # freed when generation finished
    verdict = verify_result(model, prompt_ids=prompt_ids, output_ids=result.output_ids,
                            fingerprint=result.fingerprint_bytes, params=params, seed_material=seed,
                            max_tokens=24, finish_reason=result.finish_reason, commitment=result.commitment,
                            stop_at_eos=False)
    assert verdict.accept, verdict.reason


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), temperature=st.sampled_from([0.7, 1.0, 1.5]),
       top_p=st.sampled_from([1.0, 0.9]), stop_at_first=st.booleans(), split=st.integers(1, 11))
def test_deferred_near_ties_give_the_same_verdict(seed, temperature, top_p, stop_at_first, split) -> None:
    """The verifier decides near ties after its forward passes (``defer_near_ties``): the verdict (accept,
    first bad position, reason) is the one of deciding them inside each pass, for claims that pick any
    admissible token at near ties, or an inadmissible or tampered one. The reference row here is a fixed
    function of the index (the rule is pure; the real reference is tested above)."""
    from p2pinfer.runtime.fingerprint import Fingerprint, FingerprintBuilder, FingerprintChecker

    rng = np.random.default_rng(seed)
    n, vocab, tol = 12, 40, 0.3  # a wide tolerance: near ties on most rows
    logits = rng.standard_normal((n, vocab)) * 1.5
    rows = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    reference = {i: rows[i] + rng.standard_normal(vocab) * 0.05 for i in range(n)}
    params = SamplingParams(temperature=temperature, top_p=top_p)
    seed_material = seed.to_bytes(4, "big") * 8
    tokens = []
    for i in range(n):
        admitted = admissible_tokens(rows[i], params, seed_material, i, tol)
        tokens.append(int(admitted[rng.integers(len(admitted))]))
    if rng.random() < 0.3:
        tokens[int(rng.integers(n))] = int(rng.integers(vocab))  # perhaps inadmissible
    builder = FingerprintBuilder()
    for row in rows:
        builder.add(row)
    fp = builder.build()
    if rng.random() < 0.3:  # a tampered claimed value
        q = fp.q.copy()
        q[int(rng.integers(n)), 0] += 30000
        fp = Fingerprint(fp.ids, q)
    verdicts = []
    for defer in (False, True):
        checker = FingerprintChecker(fp, tokens, params, seed_material, tol, stop_at_first=stop_at_first,
                                     reference_row=None if defer else reference.__getitem__,
                                     defer_near_ties=defer)
        for lo, hi in ((0, split), (split, n)):
            if not checker.done:
                checker.check_rows(lo, rows[lo:hi])
        if defer:
            checker.settle_near_ties(reference.__getitem__)
        v = checker.verdict()
        verdicts.append((v.accept, v.first_bad_position, v.reason))
    assert verdicts[0] == verdicts[1]


def test_fast_operators_give_onnx_reference_bits() -> None:
    """The reference's own ``Sigmoid`` and ``Sum`` are ``onnx.reference``'s, bit for bit (only faster)."""
    from onnx.reference.ops.op_sigmoid import sigmoid
    from onnx.reference.ops.op_sum import Sum as OnnxSum

    from p2pinfer.runtime.reference import Sigmoid, Sum

    rng = np.random.default_rng(11)
    x = rng.standard_normal((64, 300)) * 10
    x[0, :6] = [0.0, -0.0, 750.0, -750.0, 1e-300, -1e-300]
    with np.errstate(over="ignore", invalid="ignore"):  # onnx.reference's overflows in the branch it drops
        expected = sigmoid(x)
    assert np.array_equal(Sigmoid._run(None, x)[0].view(np.int64), expected.view(np.int64))
    terms = [rng.standard_normal((5, 7)) for _ in range(3)]
    for k in (1, 2, 3):
        assert np.array_equal(Sum._run(None, *terms[:k])[0], OnnxSum._run(None, *terms[:k])[0])
