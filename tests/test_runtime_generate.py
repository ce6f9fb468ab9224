"""The generation loop: stopping rules, chat templates, fail-over continuation, trio responsiveness."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trio

from p2pinfer.runtime import (
    FALLBACK_TEMPLATE, ChatTemplateError, SamplingParams, TokenStream, generate, load_model, render_chat,
    sampling_seed,
)

PROMPT = "def parse_args(argv):\n    parser = argparse."
SAMPLED = SamplingParams(temperature=0.9, top_k=50, top_p=0.95)


def test_same_request_same_output_and_seed_changes_it(trained_model) -> None:
    ids = trained_model.encode(PROMPT)
    seed = sampling_seed(bytes(32), None)
    a = generate(trained_model, ids, max_tokens=40, params=SAMPLED, seed_material=seed)
    b = generate(trained_model, ids, max_tokens=40, params=SAMPLED, seed_material=seed)
    c = generate(trained_model, ids, max_tokens=40, params=SAMPLED, seed_material=sampling_seed(bytes(32), 5))
    assert a.output_ids == b.output_ids and a.fingerprint_bytes == b.fingerprint_bytes
    assert a.output_ids != c.output_ids
    assert len(a.fingerprint_bytes) == 2 + 48 * 40
    assert a.text == trained_model.decode(a.output_ids)


@pytest.mark.parametrize("cut", [1, 7, 23, 39])
def test_continuation_after_failover_is_identical(trained_model, cut: int) -> None:
    ids = trained_model.encode(PROMPT)
    seed = sampling_seed(bytes(range(32)), None)
    full = generate(trained_model, ids, max_tokens=40, params=SAMPLED, seed_material=seed)
    resumed = generate(trained_model, ids, max_tokens=40, params=SAMPLED, seed_material=seed,
                       prefix_ids=full.output_ids[:cut])
    assert resumed.output_ids == full.output_ids
    assert resumed.text == full.text
    assert resumed.fingerprint.ids.tolist() == full.fingerprint.ids.tolist()


def test_stop_string_cuts_text(trained_model) -> None:
    ids = trained_model.encode("import os\nimport sys")
    out = generate(trained_model, ids, max_tokens=16, stop=["os\n"])
    # greedy continuation is "\nimport os\nimport os..."
    assert out.finish_reason == "stop"
    assert out.text == "\nimport "
    assert out.output_ids == [201, 806, 604, 201]


def test_eos_and_max_tokens(shared_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(shared_models / "tiny-llama-trained", folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [604]}))
    model = load_model(folder)
    ids = [806, 604, 201, 806, 702]  # greedy: 201, 806, 604, ...
    out = generate(model, ids, max_tokens=16)
    assert out.finish_reason == "eos" and out.output_ids == [201, 806, 604]
    assert out.text == "\nimport"
    out = generate(model, ids, max_tokens=2)
    assert out.finish_reason == "length" and out.output_ids == [201, 806]
    out = generate(model, ids, max_tokens=5, stop_at_eos=False)
    assert out.finish_reason == "length" and len(out.output_ids) == 5


def test_context_limit(trained_model) -> None:
    with pytest.raises(ValueError, match="context"):
        generate(trained_model, [5] * 256, max_tokens=4)
    out = generate(trained_model, [5] * 250, max_tokens=100, stop_at_eos=False)
    assert out.finish_reason == "length" and len(out.output_ids) == 6


def test_chat_template_from_tokenizer_config(shared_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(shared_models / "tiny-llama-trained", folder)
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    model = load_model(folder)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "import os"}]
    text = model.render_chat(messages)
    assert text == "<s>[SYSTEM] be brief</s>[USER] import os</s>[ASSISTANT] "
    ids = model.prompt_ids(messages=messages)
    assert ids[0] == 1 and ids.count(2) == 2  # special tokens parsed, not spelled out
    out = generate(model, ids, max_tokens=8)
    assert len(out.output_ids) >= 1


def test_fallback_template_and_sandbox(trained_model) -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert trained_model.info.chat_template is None
    assert trained_model.render_chat(messages) == "user: hi\n\nassistant:"
    assert render_chat(FALLBACK_TEMPLATE, messages, add_generation_prompt=False) == "user: hi\n\n"
    with pytest.raises(ChatTemplateError, match="refused"):
        render_chat("{{ raise_exception('no system role') }}", messages)
    with pytest.raises(ChatTemplateError):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", messages)
    with pytest.raises(ChatTemplateError, match="compile"):
        render_chat("{% for %}", messages)


async def test_stream_matches_sync_and_loop_stays_responsive(trained_model) -> None:
    ids = trained_model.encode(PROMPT)
    seed = sampling_seed(bytes(32), 3)
    expected = generate(trained_model, ids, max_tokens=200, params=SAMPLED, seed_material=seed, stop_at_eos=False)
    ticks: list[float] = []
    streamed: list[int] = []
    text = ""

    async def ticker(done: trio.Event) -> None:
        while not done.is_set():
            ticks.append(trio.current_time())
            await trio.sleep(0.002)

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker, done)
        await trio.sleep(0)
        stream = TokenStream(trained_model, ids, max_tokens=200, params=SAMPLED, seed_material=seed,
                             stop_at_eos=False)
        started = trio.current_time()
        async for token in stream:
            streamed.append(token.token_id)
            text += token.text
        elapsed = trio.current_time() - started
        done.set()
    assert streamed == expected.output_ids
    assert stream.result is not None and stream.result.output_ids == expected.output_ids
    assert text == expected.text
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    # the loop kept ticking while onnxruntime ran in worker threads
    assert len(ticks) >= max(5, elapsed / 0.05)
    assert max(gaps) < 0.25


async def test_stream_cancellation_is_clean(trained_model) -> None:
    ids = trained_model.encode(PROMPT)
    got = 0
    with trio.move_on_after(0.05):
        async for _ in TokenStream(trained_model, ids, max_tokens=200,
                                   stop_at_eos=False):
            got += 1
            await trio.sleep(0.01)
    assert 0 < got < 200
