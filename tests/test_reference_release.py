"""A finished request keeps no float64 reference (docs/models.md, "Serving memory").

The reference (the near-tie arbiter: the parsed graph, its evaluator) is built at a request's first near tie
and was kept on the model for as long as the peer served. The model now holds it weakly: the request's
``ReferenceSession`` is its only holder, and closing the session (generation or verification ends) frees it.
Real model, real near ties (a wide tie tolerance makes most sampled positions of the fixture one).
"""

from __future__ import annotations

import gc

from p2pinfer.runtime import SamplingParams, sampling_seed, verify_result
from p2pinfer.runtime.generate import Generation
from p2pinfer.runtime.reference import ReferenceModel, reference_for, reference_session

WIDE = 0.2
PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n"


def _built_and_freed(model) -> bool:
    """Whether a reference was built for ``model`` and nothing holds it any more."""
    held = getattr(model, "_reference_model", None)
    gc.collect()  # the evaluator's objects may form cycles: freed by the collector, not at the last decref
    return held is not None and held() is None


def test_generation_and_verification_free_their_reference(trained_model) -> None:
    model = trained_model.with_session()
    model.tolerance = WIDE
    params = SamplingParams(temperature=0.8)
    prompt_ids = model.encode(PROMPT)
    seed = sampling_seed(bytes([8]) * 32, None)
    gen = Generation(model, prompt_ids, 16, params, seed, stop_at_eos=False)
    gen.start()
    while gen.step() is not None:
        pass
    result = gen.result()
    assert gen._reference is not None and gen._reference.computed_positions > 0  # a near tie ran the reference
    assert _built_and_freed(model)
    object.__delattr__(model, "_reference_model")
    verdict = verify_result(model, prompt_ids=prompt_ids, output_ids=result.output_ids,
                            fingerprint=result.fingerprint_bytes, params=params, seed_material=seed,
                            max_tokens=16, finish_reason=result.finish_reason, commitment=result.commitment,
                            stop_at_eos=False)
    assert verdict.accept, verdict.reason
    assert _built_and_freed(model)  # the verifier's near ties built one too, and it is gone


def test_a_held_reference_is_shared_and_a_closed_session_gets_it_again(trained_model) -> None:
    ids = trained_model.encode(PROMPT)[:12]
    held = reference_for(trained_model)
    assert reference_for(trained_model) is held  # one object while someone holds it
    session = reference_session(trained_model)
    first = session.row(ids)
    assert session._reference is held
    session.close()
    assert session._reference is not held and not isinstance(session._reference, ReferenceModel)
    again = session.row(ids)  # usable after close: the same row
    assert (again == first).all()
    session.close()
    del held
    assert _built_and_freed(trained_model)
