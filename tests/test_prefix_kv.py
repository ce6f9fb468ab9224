"""A verifier starts after the prompt prefix it kept from an earlier request (runtime/prefix_kv): the same rows,
bit for bit, as computing every position again."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from p2pinfer.runtime import GREEDY, generate, load_model, verify_result
from p2pinfer.runtime.prefix_kv import PREFIX_BYTES, PREFIX_POSITIONS, PrefixStore
from p2pinfer.runtime.verify import MIN_PASS_ROWS, recompute_logprobs

tokens = st.lists(st.integers(0, 5), min_size=0, max_size=80)


def _arrays(tokens_: list[int]) -> list[np.ndarray]:
    """Stand-in keys/values whose every position records its token (so a wrong slice is seen)."""
    pos = np.asarray(tokens_, dtype=np.float32)
    return [np.broadcast_to(pos[None, None, :, None] + layer, (1, 2, len(tokens_), 3)).copy() for layer in range(2)]


@given(stored=tokens, asked=tokens, limit=st.integers(0, 90))
def test_lookup_gives_the_longest_shared_prefix_within_the_limit(stored, asked, limit) -> None:
    store, session = PrefixStore(), object()
    store.remember(session, stored, 24, lambda n: _arrays(stored[:n]))
    n, arrays = store.lookup(session, asked, limit)
    held = stored[:PREFIX_POSITIONS]
    shared = next((i for i, (a, b) in enumerate(zip(held, asked)) if a != b), min(len(held), len(asked)))
    assert n == min(shared, max(limit, 0))
    assert asked[:n] == held[:n]
    if n:
        assert [a.shape[2] for a in arrays] == [n, n]
        assert np.array_equal(arrays[1][0, 0, :, 0], np.asarray(asked[:n], dtype=np.float32) + 1)
    assert store.lookup(object(), asked, limit) == (0, [])  # another session's rounding: never


def test_bounded_and_copied_only_when_new() -> None:
    store, session, copies = PrefixStore(), object(), []

    def copy(n: int) -> list[np.ndarray]:
        copies.append(n)
        return _arrays(list(range(n)))

    store.remember(session, list(range(200)), 1000, copy)
    assert copies == [PREFIX_POSITIONS]
    store.remember(session, list(range(10)), 1000, copy)  # already held: no copy
    assert copies == [PREFIX_POSITIONS]
    store.remember(session, list(range(200)), PREFIX_BYTES // 5, copy)  # large positions: the byte bound
    assert copies == [PREFIX_POSITIONS]  # the held entry already starts so
    store.remember(session, [9] * 200, PREFIX_BYTES // 5, copy)
    assert copies == [PREFIX_POSITIONS, 5]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    from p2pinfer.gguf import import_gguf

    folder = tmp_path_factory.mktemp("smollm2") / "q4"
    import_gguf(smollm2_gguf, folder, weights="native")
    return folder


def test_default_model_rows_after_the_template_prefix_are_bit_identical(smollm2) -> None:
    """On the default model (the 4-bit kernel session), a request that shares only the chat template with the one
    before it starts after the template's 24 positions, and its rows are bit for bit those computed from
    position 0 by a session that kept nothing."""
    model = load_model(smollm2, threads=2, providers=["CPUExecutionProvider"])
    model.tolerance = 1.79e-3
    assert model.runs_kernel
    first = model.prompt_ids(messages=[{"role": "user", "content": "Write a story about a lighthouse keeper."}])
    second = model.prompt_ids(messages=[{"role": "user", "content": "Explain how tides work."}])
    out = generate(model, second, max_tokens=24, params=GREEDY, seed_material=bytes(32), stop_at_eos=False)
    fresh = load_model(smollm2, threads=2, providers=["CPUExecutionProvider"])
    full = recompute_logprobs(fresh, second, out.output_ids)
    recompute_logprobs(model, first, out.output_ids)
    skip, _ = model.prefix_kv.lookup(model.session, second, limit=len(second) - MIN_PASS_ROWS)
    template = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert skip == template == 24
    assert np.array_equal(recompute_logprobs(model, second, out.output_ids).view(np.uint64), full.view(np.uint64))
    verdict = verify_result(model, prompt_ids=second, output_ids=out.output_ids, fingerprint=out.fingerprint_bytes,
                            params=GREEDY, seed_material=bytes(32), max_tokens=24, finish_reason=out.finish_reason,
                            stop_at_eos=False)
    assert verdict.accept, verdict.reason


@pytest.mark.parametrize("weights", ["Q4_1", "F32"])
def test_kept_keys_and_values_are_the_computed_ones(tmp_path, weights: str) -> None:
    """On any session the kept positions are exactly what the passes computed: the rows after them equal the rows
    of a pass that starts at the same position over a cache computed in place (on the tiny fixture onnxruntime's
    attention rounds a row differently with its keys in the past than within the pass, so a kept prefix is not
    bit-identical to a single pass there; on SmolLM2 it is, above), and honest output is accepted."""
    from gguf import GGMLQuantizationType as QT
    from gguf_fixtures import TinyLlama, write_tiny_llama

    from p2pinfer.gguf import import_gguf
    from p2pinfer.runtime.model import KVCache

    write_tiny_llama(tmp_path / "m.gguf", TinyLlama(matrix_type=getattr(QT, weights), n_kv_heads=2))
    import_gguf(tmp_path / "m.gguf", tmp_path / "m", fused_attention=True)
    model = load_model(tmp_path / "m", threads=1, providers=["CPUExecutionProvider"])
    model.tolerance = 1e-3
    common = [5, 77, 200, 3, 260, 261, 99, 12, 140, 33, 7, 18, 64, 101, 102, 103, 104, 31]
    first, second = common + [40, 41, 42, 43, 44, 45], common + [90, 91, 92, 93]
    out = generate(model, second, max_tokens=12, params=GREEDY, seed_material=bytes(32), stop_at_eos=False)
    seq = second + out.output_ids[:-1]
    plain = model.passes(model.empty_cache(), len(seq), 128)
    plain.run(seq[:len(common)], keep=1)
    expected = plain.run(seq[len(common):], keep=len(out.output_ids)).copy()
    recompute_logprobs(model, first, out.output_ids)  # keeps the first positions of `first`
    skip, arrays = model.prefix_kv.lookup(model.session, second, limit=len(second) - MIN_PASS_ROWS)
    assert skip == len(common)
    kept = model.passes(KVCache(arrays, skip), len(seq), 128).run(seq[skip:], keep=len(out.output_ids))
    assert np.array_equal(kept, expected)
    verdict = verify_result(model, prompt_ids=second, output_ids=out.output_ids, fingerprint=out.fingerprint_bytes,
                            params=GREEDY, seed_material=bytes(32), max_tokens=12, finish_reason=out.finish_reason,
                            stop_at_eos=False)
    assert verdict.accept, verdict.reason
