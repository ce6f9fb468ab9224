"""A finished request keeps no float64 reference (docs/models.md, "Serving memory").

The reference (the near-tie arbiter: the parsed graph, its evaluator) is built at a request's first near tie
and was kept on the model for as long as the peer served. The model now holds it weakly: the request's
``ReferenceSession`` is its only holder, and closing the session (generation or verification ends) frees it.
Real model, real near ties (a wide tie tolerance makes most sampled positions of the fixture one).
"""

from __future__ import annotations

import gc

from p2pinfer.runtime import SamplingParams, generate, sampling_seed, verify_result
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


def _resident_weight_bytes(model) -> int:
    """Rss of this process's mappings of the model's external weight file(s)."""
    from pathlib import Path

    files = {str(p.resolve()) for p in Path(model.path).iterdir() if p.name.startswith("model.onnx")}
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[5] in files
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def test_a_finished_request_keeps_no_embedding_pages(shared_models, tmp_path) -> None:
    """The standard graph's Gather faults in the embedding rows of every token a request reads or writes; the
    generation's end unmaps them, and the next request reads the same rows. (Not a verification's end: the 20-40 ms
    of the unmapping would add 10-15 % to an fp32 verification, and the pages do not set its peak.) (The
    trained fixture with its weights moved to external data, as an imported model stores them.)"""
    import shutil

    import onnx

    from p2pinfer.runtime import load_model

    source = shared_models / "tiny-llama-trained"
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        shutil.copy(source / name, tmp_path / name)
    onnx.save_model(onnx.load(str(source / "model.onnx")), str(tmp_path / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    model = load_model(tmp_path, providers=["CPUExecutionProvider"], kernel=False, tolerance=WIDE)
    assert not model.runs_kernel
    ids = model.encode(PROMPT * 4)
    model.forward(ids, model.empty_cache(), last=1)  # a run that reads the mapping, as a request's passes do
    assert _resident_weight_bytes(model) > 0
    params = SamplingParams(temperature=0.8)
    seed = sampling_seed(bytes([9]) * 32, None)
    generate(model, ids, max_tokens=12, params=params, seed_material=seed, stop_at_eos=False)
    assert _resident_weight_bytes(model) == 0
    model.forward(ids, model.empty_cache(), last=1)
    assert _resident_weight_bytes(model) > 0  # the next request reads the same rows again
