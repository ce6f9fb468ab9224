"""OpenAI parity beyond the basics, with the official `openai` client against a live local network:
verified log-probs (chat and completions, streamed and not), n choices, GET /v1/models/{id}, usage of returned
tokens only, and every answer (4xx included) counted in /metrics."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import openai
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2pinfer.localnet import local_network
from p2pinfer.request.client import AsyncClient
from p2pinfer.runtime.fingerprint import unpack

from test_gateway import CHAT, MODEL_NAME, PROMPT, gateway_peer, sdk


async def test_verified_logprobs_choices_models_usage_and_metrics(model):
    async with local_network([model], peers=2) as net, gateway_peer(net, [model]) as peer:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            greedy = await client.generate(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0)
            sampled = [await client.generate(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0.9,
                                             seed=500 + i) for i in range(3)]
            plain = await client.generate(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0)
        middle = len(plain.text) // 2
        stop = plain.text[middle:middle + 2]

        def use_openai() -> dict[str, Any]:
            api = sdk(peer)
            out: dict[str, Any] = {}
            out["chat"] = api.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0,
                                                      logprobs=True, top_logprobs=3)
            out["chat_stream"] = list(api.chat.completions.create(
                model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0, logprobs=True, top_logprobs=8,
                stream=True, stream_options={"include_usage": True}))
            out["text"] = api.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0,
                                                 logprobs=2, stop=[stop])
            out["text_stream"] = list(api.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16,
                                                             temperature=0, logprobs=0, stream=True))
            out["choices"] = api.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0.9,
                                                    seed=500, n=3)
            out["choices_stream"] = list(api.chat.completions.create(
                model=MODEL_NAME, messages=CHAT, max_tokens=6, temperature=0.9, seed=7, n=2, stream=True,
                stream_options={"include_usage": True}))
            out["model"] = api.models.retrieve(MODEL_NAME)
            out["model_by_digest"] = api.models.retrieve(model.digest.hex())
            for name, call in (("unknown_model", lambda: api.models.retrieve("no-such-model")),
                               ("too_many", lambda: api.completions.create(model=MODEL_NAME, prompt="x", n=9)),
                               ("bad_top", lambda: api.chat.completions.create(
                                   model=MODEL_NAME, messages=CHAT, logprobs=True, top_logprobs=20))):
                try:
                    call()
                except openai.APIStatusError as exc:
                    out[name] = exc
            out["unknown_url"] = httpx.get(f"{peer.gateway_url}/v1/embeddings")
            out["metrics"] = httpx.get(f"{peer.gateway_url}/metrics").text
            return out

        out = await trio.to_thread.run_sync(use_openai)

    # Chat log-probs: one entry per returned token, from the executor's fingerprint, verified by the quorum.
    chat = out["chat"]
    content = chat.choices[0].logprobs.content
    assert chat.choices[0].message.content == greedy.text
    assert chat.model_extra["p2pinfer"]["verification"] == "accepted"
    assert chat.model_extra["p2pinfer"]["logprobs"] == "verified"
    assert len(content) == chat.usage.completion_tokens == len(greedy.token_ids)
    reference = unpack(greedy.result.message.fingerprint)  # another executor, same request: same numbers
    for i, entry in enumerate(content):
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely token was chosen
        assert entry.logprob == pytest.approx(float(reference.logprobs[i][0]), abs=1e-3)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
        assert all(t.logprob <= 0 for t in entry.top_logprobs)
    assert "".join(e.token for e in content).strip() == greedy.text.strip()

    # Streamed: the text as it comes, the verified log-probs on the chunk that finishes the choice.
    chunks = out["chat_stream"]
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1
    streamed = finishing[0].choices[0].logprobs.content
    assert len(streamed) == len(content) and all(len(e.top_logprobs) == 8 for e in streamed)
    assert [e.token for e in streamed] == [e.token for e in content]
    assert chunks[-1].usage.completion_tokens == len(streamed)

    # Completions with a stop string: usage counts only the tokens whose text is returned.
    text = out["text"]
    assert text.choices[0].finish_reason == "stop" and text.choices[0].text == plain.text[:plain.text.find(stop)]
    tokens = text.choices[0].logprobs.tokens
    assert text.usage.completion_tokens == len(tokens) < len(plain.token_ids)
    assert "".join(tokens).startswith(text.choices[0].text) and len("".join(tokens[:-1])) < len(text.choices[0].text)
    assert all(len(d) == 2 for d in text.choices[0].logprobs.top_logprobs)
    stream_finish = [c for c in out["text_stream"] if c.choices[0].finish_reason][0]
    assert len(stream_finish.choices[0].logprobs.tokens) == len(plain.token_ids)
    assert stream_finish.choices[0].logprobs.top_logprobs is None  # logprobs=0: the chosen tokens only

    # n choices: each its own seeded request (seed + index), the same text the SDK gets for that seed.
    choices = out["choices"].choices
    assert [c.index for c in choices] == [0, 1, 2]
    assert [c.text for c in choices] == [r.text for r in sampled]
    assert out["choices"].usage.completion_tokens == sum(len(r.token_ids) for r in sampled)
    assert len(out["choices"].model_extra["p2pinfer"]["choices"]) == 3
    by_index: dict[int, str] = {0: "", 1: ""}
    for c in out["choices_stream"]:
        for choice in c.choices:
            by_index[choice.index] += choice.delta.content or ""
    assert set(by_index) == {0, 1}
    assert len([c for c in out["choices_stream"] if c.choices and c.choices[0].finish_reason]) == 2
    assert out["choices_stream"][-1].usage.completion_tokens > 0

    # GET /v1/models/{id}, by name or digest; an unknown one is a 404.
    assert out["model"].id == MODEL_NAME and out["model_by_digest"].id == MODEL_NAME
    assert out["model"].model_extra["digest"] == model.digest.hex()
    assert out["unknown_model"].status_code == 404
    assert out["too_many"].status_code == 400 and out["bad_top"].status_code == 400

    # Every answer is counted, errors included.
    families = {f.name: f for f in text_string_to_metric_families(out["metrics"])}
    answers = {(s.labels["route"], s.labels["status"]): s.value for s in families["p2pinfer_gateway_responses"].samples
               if s.name.endswith("_total")}
    assert answers[("/v1/chat/completions", "200")] == 3
    assert answers[("/v1/completions", "200")] == 3
    assert answers[("/v1/completions", "400")] == 1 and answers[("/v1/chat/completions", "400")] == 1
    assert answers[("/v1/models/{model}", "200")] == 2 and answers[("/v1/models/{model}", "404")] == 1
    assert answers[("other", "404")] == 1


async def test_logprobs_are_withheld_until_verified(model):
    """A gateway alone in the network: nobody can re-check its result, so no log-probs are shown."""
    async with local_network([model], peers=0) as net, gateway_peer(net, [model]) as peer:

        def ask() -> Any:
            return sdk(peer).chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4, temperature=0,
                                                     logprobs=True)

        reply = await trio.to_thread.run_sync(ask)
    assert reply.choices[0].message.content  # the text itself is served, marked unverified
    assert reply.model_extra["p2pinfer"]["verification"] == "unverified"
    assert reply.choices[0].logprobs is None
    assert reply.model_extra["p2pinfer"]["logprobs"] == "withheld: verification unverified"
    assert np.isfinite(reply.usage.completion_tokens)
