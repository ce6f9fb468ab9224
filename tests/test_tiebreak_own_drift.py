"""The near-tie rule with two tolerances (runtime/tiebreak.py, runtime/tie_tolerance.py).

Each party detects near ties with its OWN tie tolerance (its float32 row's distance to the exact row), while the
fingerprint's log-prob values are checked against the pair tolerance. First as pure functions (hypothesis): an
exact row ``E``, a reference row ``E`` + float64-sized noise, executor and verifier rows ``E`` + drift within their
own tie tolerances, the pair allowance covering both. Then on a real 4-bit model (the kernel's paths: AMX / FMA
many-row, integer / float decode rows, and the standard graph), calibrated in a real store: every path's rows stay
within its recorded tie tolerance of the float64 reference, every honest path's output is accepted by every other,
greedy and sampled, and an executor that takes the runner-up at a real near tie (or the pair-width alternative
where the tie width leaves none) is rejected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.kernels import DecodePath
from p2pinfer.runtime import GREEDY, ModelStore, SamplingParams, calibrate, generate, sampling_seed, verify_result
from p2pinfer.runtime.fingerprint import FingerprintBuilder, FingerprintChecker, commitment
from p2pinfer.runtime.reference import reference_for
from p2pinfer.runtime.sampling import admissible_tokens, log_softmax, sample
from p2pinfer.runtime.tie_tolerance import session_path, tie_tolerance
from p2pinfer.runtime.tiebreak import is_ambiguous, resolve
from p2pinfer.runtime.verify import recompute_logprobs

VOCAB = 40
ROWS = 3
SEED = bytes(range(32))

params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.05, 0.3, 0.8, 1.0]),
    top_k=st.sampled_from([0, 5]),
    top_p=st.sampled_from([1.0, 0.95]),
)


def _row(rng: np.random.Generator, spread: float) -> np.ndarray:
    logits = rng.normal(0.0, spread, VOCAB)
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


def _fingerprint(rows: np.ndarray):
    builder = FingerprintBuilder()
    for row in rows:
        builder.add(row)
    return builder.build()


def _check(fp, tokens, params, verifier_rows, pair, tie, reference_row):
    checker = FingerprintChecker(fp, list(tokens), params, SEED, pair, reference_row=reference_row,
                                 tie_tolerance=tie)
    checker.check_rows(0, verifier_rows)
    return checker.verdict()


@settings(max_examples=150, deadline=None)
@given(params=params_strategy, seed=st.integers(0, 2**32 - 1), spread=st.sampled_from([0.05, 0.5, 2.0]),
       tie_e=st.sampled_from([1e-4, 0.01, 0.1]), tie_v=st.sampled_from([1e-4, 0.01, 0.1]))
def test_own_widths_agree_and_leave_no_choice(params, seed, spread, tie_e, tie_v) -> None:
    rng = np.random.default_rng(seed)
    exact = np.stack([_row(rng, spread) for _ in range(ROWS)])
    reference = exact + rng.uniform(-1e-13, 1e-13, exact.shape)
    executor = exact + rng.uniform(-tie_e, tie_e, exact.shape)
    verifier = exact + rng.uniform(-tie_v, tie_v, exact.shape)
    pair = 4.0 * (tie_e + tie_v)  # the log-prob allowance: covers executor-to-verifier distances

    def reference_row(i: int) -> np.ndarray:
        return reference[i]

    tokens = [resolve(executor[i], params, SEED, i, tie_e, reference_row) for i in range(ROWS)]
    assert tokens == [sample(exact[i], params, SEED, i) for i in range(ROWS)]  # each side's pick is E's
    fp = _fingerprint(executor)
    honest = _check(fp, tokens, params, verifier, pair, tie_v, reference_row)
    assert honest.accept, honest.reason
    for i in range(ROWS):
        # the executor's other candidates: every token the pair width admits on its row, and two at random
        others = set(admissible_tokens(executor[i], params, SEED, i, pair).tolist())
        others |= {int(t) for t in rng.integers(0, VOCAB, 2)}
        for token in sorted(others - {tokens[i]}):
            cheat = _check(fp, tokens[:i] + [token] + tokens[i + 1:], params, verifier, pair, tie_v, reference_row)
            assert not cheat.accept and cheat.first_bad_position == i, (i, token, cheat.reason)


def test_a_near_tie_outside_the_tie_width_is_decided_in_float32() -> None:
    """Two tokens 3e-4 apart in log-prob, greedy: a near tie for a pair width of 1e-3 (the float64 reference
    would be asked), not for a tie width of 1e-4 — the float32 pick stands and the runner-up is rejected."""
    row = np.log(np.full(VOCAB, 0.5 / (VOCAB - 2)))
    row[3], row[7] = np.log(0.25) + 3e-4, np.log(0.25)
    asked = []

    def reference_row(i: int) -> np.ndarray:
        asked.append(i)
        return row

    assert is_ambiguous(row, GREEDY, SEED, 0, 1e-3) and not is_ambiguous(row, GREEDY, SEED, 0, 1e-4)
    assert resolve(row, GREEDY, SEED, 0, 1e-4, reference_row) == 3 and asked == []
    fp = _fingerprint(row[None])
    assert _check(fp, [3], GREEDY, row[None], 1e-3, 1e-4, reference_row).accept
    runner_up = _check(fp, [7], GREEDY, row[None], 1e-3, 1e-4, reference_row)
    assert not runner_up.accept and "below the best token" in runner_up.reason and asked == []


# -- a real 4-bit model, calibrated in a real store ---------------------------------------------------------
SAMPLED = (SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.95))
TOKENS = 10
PROMPT = "the in he the"


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama with Q4_1 weights (the served 4-bit class), imported and calibrated in a store."""
    from gguf import GGMLQuantizationType as QT

    from gguf_fixtures import TinyLlama, write_tiny_llama
    from p2pinfer.gguf import import_gguf

    root = tmp_path_factory.mktemp("tiewidth")
    src = root / "q4_1.gguf"
    write_tiny_llama(src, TinyLlama(matrix_type=QT.Q4_1, hidden=128, intermediate=256, n_layers=2))
    folder = import_gguf(src, root / "q4_1").out_dir
    store = ModelStore(root / "store")
    record = store.import_dir(folder)
    # the store's own calibration, with prompts that fit this model's 256 positions
    result = calibrate(record.load(providers=["CPUExecutionProvider"]), prompts=("the the in he", "<tool> inthe",
                                                                                  "he in the the in"), new_tokens=12)
    return store, store.set_calibration(record.digest_hex, result.tolerance, result.to_json())


@pytest.fixture(scope="module")
def paths(stored):
    """One session per honest path this machine can run, each loaded from the record."""
    _, record = stored
    own = record.load(providers=["CPUExecutionProvider"], threads=2)
    assert own.runs_kernel, "the 4-bit kernel should be available here (CI installs gcc)"
    sessions = {session_path(own): own}
    for options in ({"amx": False}, {"kernel": False}, {"decode": DecodePath.FLOAT}):
        model = own.with_session(threads=1, **options)
        sessions.setdefault(session_path(model), model)
    return sessions


def test_every_path_has_its_recorded_width(stored, paths) -> None:
    _, record = stored
    recorded = record.tie_tolerances
    for path, model in paths.items():
        assert path in recorded, (path, sorted(recorded))
        assert tie_tolerance(model) == recorded[path]  # its own path's width, not the pair tolerance
    assert record.calibration["paths"]["baseline,kv"] == session_path(paths[next(iter(paths))])


def test_every_paths_rows_are_within_its_tie_tolerance_of_the_float64_reference(paths) -> None:
    """The rule's premise, on rows calibration did not see: each path's KV rows (as an executor) and prefill
    rows (as a verifier) against the reference rows of the same positions."""
    own = next(iter(paths.values()))
    prompt = own.encode("he the in the he in")
    output = generate(own, prompt, max_tokens=TOKENS, params=SAMPLED[0], seed_material=SEED,
                      stop_at_eos=False).output_ids
    exact = reference_for(own).logprobs(prompt + output[:-1], last=len(output))
    for path, model in paths.items():
        _, cache = model.forward(prompt, model.empty_cache(), last=1)
        logits, _ = model.forward(prompt, model.empty_cache(), last=1)
        decoder = model.decoder(cache, capacity=len(prompt) + len(output))
        kv = [log_softmax(logits[-1])] + [log_softmax(decoder.step(t).copy()) for t in output[:-1]]
        prefill = recompute_logprobs(model, prompt, output)
        drift = max(float(np.abs(np.stack(kv) - exact).max()), float(np.abs(prefill - exact).max()))
        assert drift <= tie_tolerance(model), (path, drift, tie_tolerance(model))


def _verify(verifier, result, params, seed):
    return verify_result(verifier, prompt_ids=result.prompt_ids, output_ids=result.output_ids,
                         fingerprint=result.fingerprint_bytes, params=params, seed_material=seed,
                         max_tokens=TOKENS, finish_reason=result.finish_reason, commitment=result.commitment,
                         stop_at_eos=False, stop_at_first=False)


@pytest.mark.parametrize("params", (GREEDY,) + SAMPLED, ids=["greedy", "T1", "T0.8-top-p"])
def test_honest_paths_accept_each_other(paths, params) -> None:
    """Every honest path as executor, verified by every path, each side at its own tie width."""
    prompt = next(iter(paths.values())).encode(PROMPT)
    for n in range(2 if params.greedy else 8):
        seed = sampling_seed(bytes([n, int(params.temperature * 10)]) * 16, None)
        outputs = {path: generate(model, prompt, max_tokens=TOKENS, params=params, seed_material=seed,
                                  stop_at_eos=False) for path, model in paths.items()}
        assert len({tuple(r.output_ids) for r in outputs.values()}) == 1, outputs  # one pick: E's
        for executor, result in outputs.items():
            for verifier, model in paths.items():
                v = _verify(model, result, params, seed)
                assert v.accept, (executor, verifier, v.reason, v.max_deviation)


def _first_row_tie(model, prompt, params, tie: float, pair: float | None):
    """A request seed whose output index 0 is a near tie at ``tie`` on ``model``'s own row (with ``pair``: one
    at the pair width that is NOT one at ``tie``), found by trying seeds as a client's requests would draw them."""
    row = recompute_logprobs(model, prompt, [0])[0]
    for n in range(200_000):
        seed = sampling_seed(n.to_bytes(4, "big") * 8, None)
        if pair is None and is_ambiguous(row, params, seed, 0, tie):
            return seed
        if pair is not None and is_ambiguous(row, params, seed, 0, pair) and not is_ambiguous(row, params, seed, 0,
                                                                                                tie):
            return seed
    pytest.fail(f"no near tie in 200,000 seeds (tie {tie:.3g}, pair {pair})")


def _claim(verifier, prompt, output, rows, params, seed):
    """A complete, truthfully fingerprinted claim of ``output`` (rows: the executor's own rows behind it)."""
    data = _fingerprint(rows).pack()
    return verify_result(verifier, prompt_ids=prompt, output_ids=output, fingerprint=data, params=params,
                         seed_material=seed, max_tokens=len(output), finish_reason="length",
                         commitment=commitment(data), stop_at_eos=False)


@pytest.mark.parametrize("at_pair_width", [False, True], ids=["tie-width", "pair-width-only"])
def test_the_runner_up_at_a_near_tie_is_rejected(paths, at_pair_width) -> None:
    """The executor runs the standard graph; the verifier the kernel. At a real near tie (by the verifier's tie
    width) the honest executor's token is the reference pick and accepted; the runner-up, claimed with the
    executor's true rows, is rejected. Where only the pair width would call it a near tie, the verifier decides
    in float32 and rejects the other token all the same."""
    verifier = next(iter(paths.values()))
    executor = paths.get("standard", verifier)
    params = SamplingParams(temperature=1.0)
    prompt = verifier.encode("in the")  # a row with two likely tokens (0.69 and 0.19): near ties at ~1e-4 per seed
    tie = tie_tolerance(verifier)
    seed = _first_row_tie(verifier, prompt, params, tie, verifier.tolerance if at_pair_width else None)
    honest = generate(executor, prompt, max_tokens=1, params=params, seed_material=seed, stop_at_eos=False)
    assert honest.output_ids[0] == sample(reference_for(verifier).logprobs(prompt, last=1)[0], params, seed, 0)
    assert _claim(verifier, prompt, honest.output_ids, recompute_logprobs(executor, prompt, honest.output_ids),
                  params, seed).accept
    row = recompute_logprobs(executor, prompt, [0])
    width = verifier.tolerance if at_pair_width else tie
    others = [int(t) for t in admissible_tokens(row[0], params, seed, 0, width) if int(t) != honest.output_ids[0]]
    assert others
    for token in others:
        v = _claim(verifier, prompt, [token], row, params, seed)
        assert not v.accept and v.first_bad_position == 0 and "sampler" in v.reason, (token, v.reason)
