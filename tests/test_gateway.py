"""The OpenAI-compatible gateway, driven by the official `openai` package against a live local network."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
import openai
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2pinfer.identity import Identity
from p2pinfer.localnet import LOOPBACK, local_network
from p2pinfer.net import NodeConfig
from p2pinfer.peer import ServingPeer
from p2pinfer.request.client import AsyncClient
from p2pinfer.wire import now_ms

MODEL_NAME = "tiny-llama-trained"
PROMPT = "import os\nimport sys"
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def main("}]
SAMPLING = dict(max_tokens=12, temperature=0.8, seed=1234)


@asynccontextmanager
async def gateway_peer(net: Any, models: list, *, key: str | None = None,
                       control_socket: Any = None) -> AsyncIterator[ServingPeer]:
    """A serving peer with its gateway on 127.0.0.1 (a free port), joined to ``net``."""
    config = NodeConfig(listen=LOOPBACK, bootstrap=tuple(net.bootstrap_addrs), role="peer")
    peer = ServingPeer(Identity.generate(), config, models, measure_speed=False, gateway=("127.0.0.1", 0),
                       gateway_key=key, control_socket=control_socket)
    async with peer:
        others = {p.peer_id for p in net.peers}
        with trio.fail_after(20):
            while not others <= {a.peer_id for a in peer.node.table.live(now_ms())}:
                await trio.sleep(0.02)
        yield peer


def sdk(peer: ServingPeer, key: str = "unused", **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{peer.gateway_url}/v1", api_key=key, max_retries=0, timeout=60, **options)


async def test_openai_sdk_chat_and_completions_match_the_p2pinfer_sdk(model):
    async with local_network([model], peers=2) as net, gateway_peer(net, [model]) as peer:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            expected_text = (await client.generate(model=MODEL_NAME, prompt=PROMPT, **SAMPLING)).text
            expected_chat = await client.generate(model=MODEL_NAME, messages=CHAT, **SAMPLING)

        def use_openai() -> dict[str, Any]:
            api = sdk(peer)
            out: dict[str, Any] = {"models": api.models.list().data}
            raw = api.chat.completions.with_raw_response.create(model=MODEL_NAME, messages=CHAT, **SAMPLING)
            out["chat_headers"], out["chat"] = raw.headers, raw.parse()
            out["chat_stream"] = list(api.chat.completions.create(
                model=MODEL_NAME, messages=CHAT, stream=True, stream_options={"include_usage": True}, **SAMPLING))
            out["text"] = api.completions.create(model=MODEL_NAME, prompt=PROMPT, **SAMPLING)
            out["text_stream"] = list(api.completions.create(model=MODEL_NAME, prompt=PROMPT, stream=True,
                                                             **SAMPLING))
            out["metrics"] = httpx.get(f"{peer.gateway_url}/metrics").text
            return out

        out = await trio.to_thread.run_sync(use_openai)
        status = peer.gateway.status()

    # GET /v1/models: the network's models by name, with their digest.
    assert [(m.id, m.model_extra["digest"]) for m in out["models"]] == [(MODEL_NAME, model.digest.hex())]

    # Chat, whole response: the same text as the p2pinfer SDK for the same seeded request.
    chat = out["chat"]
    assert chat.object == "chat.completion" and chat.model == MODEL_NAME
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected_chat.text
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage.completion_tokens == len(expected_chat.token_ids)
    assert chat.usage.prompt_tokens == len(expected_chat.result.message.prompt_ids)
    extra = chat.model_extra["p2pinfer"]
    # The gateway's own peer serves the model too: it bids in its own elections over a loopback stream.
    assert extra["executor"] in {p.peer_id for p in net.peers} | {peer.peer_id}
    # Three serving peers: one executes, the other two re-check it, so the outcome is known.
    assert extra["verification"] == "accepted"
    assert out["chat_headers"]["x-p2pinfer-executor"] == extra["executor"]
    assert out["chat_headers"]["x-p2pinfer-verification"] == "accepted"

    # Chat, streamed: one id and created, a role first, content deltas, finish_reason last, then usage.
    chunks = out["chat_stream"]
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks[:-1] if c.choices[0].finish_reason is None]
    assert "".join(c.choices[0].delta.content or "" for c in content) == expected_chat.text
    finishing = chunks[-2]
    assert finishing.choices[0].finish_reason == chat.choices[0].finish_reason
    assert finishing.model_extra["p2pinfer"]["verification"] == "accepted"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected_chat.token_ids)
    assert all(c.usage is None for c in chunks[:-1])

    # Completions, whole and streamed.
    assert out["text"].object == "text_completion"
    assert out["text"].choices[0].text == expected_text
    text_chunks = out["text_stream"]
    assert "".join(c.choices[0].text for c in text_chunks) == expected_text
    assert text_chunks[-1].choices[0].finish_reason == out["text"].choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])

    # /metrics, in the Prometheus text format.
    families = {f.name: f for f in text_string_to_metric_families(out["metrics"])}
    requests = {tuple(sorted(s.labels.items())): s.value for s in families["p2pinfer_gateway_requests"].samples
                if s.name.endswith("_total")}
    assert requests[(("endpoint", "chat"), ("outcome", "ok"))] == 2
    assert requests[(("endpoint", "completions"), ("outcome", "ok"))] == 2
    ttft = {s.name: s.value for s in families["p2pinfer_gateway_time_to_first_token_seconds"].samples}
    assert ttft["p2pinfer_gateway_time_to_first_token_seconds_count"] == 4
    latency = {s.name: s.value for s in families["p2pinfer_gateway_token_latency_seconds"].samples}
    assert latency["p2pinfer_gateway_token_latency_seconds_count"] > 0
    tokens = [s.value for s in families["p2pinfer_gateway_tokens"].samples if s.name.endswith("_total")]
    assert tokens == [2 * len(expected_chat.token_ids) + 2 * out["text"].usage.completion_tokens]
    verification = {s.labels["outcome"]: s.value for s in families["p2pinfer_verification_outcomes"].samples
                    if s.name.endswith("_total")}
    assert verification == {"accepted": 4}
    assert families["p2pinfer_known_peers"].samples[0].value >= 2  # clients announce themselves too
    assert "p2pinfer_gossip_rejected" in families and "p2pinfer_elections_won" in families

    # The status JSON behind `p2pinfer status`: known peers with models, recent requests.
    serving = [p for p in status["known_peers"] if p["models"]]
    assert {p["peer_id"] for p in serving} == {p.peer_id for p in net.peers}
    assert all(p["models"][0]["name"] == MODEL_NAME for p in serving)
    assert [r["outcome"] for r in status["recent_requests"]] == ["ok"] * 4


async def test_errors_use_openai_status_codes_and_bodies(model):
    async with local_network([model], peers=1) as net, gateway_peer(net, [], key="s3cret") as peer:

        def call(fn: Any) -> Any:
            try:
                fn()
            except openai.APIStatusError as exc:
                return exc
            raise AssertionError("expected an error")

        def errors_before_killing() -> dict[str, Any]:
            api = sdk(peer, key="s3cret")
            out = {
                "unknown_model": call(lambda: api.chat.completions.create(model="no-such-model", messages=CHAT)),
                "bad_temperature": call(lambda: api.completions.create(model=MODEL_NAME, prompt="x", temperature=7)),
                "too_many_choices": call(lambda: api.chat.completions.create(model=MODEL_NAME, messages=CHAT, n=5)),
                "bad_role": call(lambda: api.chat.completions.create(
                    model=MODEL_NAME, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])),
                "wrong_key": call(lambda: sdk(peer, key="wrong").models.list()),
                "not_found_url": httpx.post(f"{peer.gateway_url}/v1/embeddings",
                                            headers={"authorization": "Bearer s3cret"}, json={}),
                "bad_json": httpx.post(f"{peer.gateway_url}/v1/completions", content=b"{not json",
                                       headers={"authorization": "Bearer s3cret"}),
            }
            out["ok"] = api.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2).choices[0].text
            return out

        out = await trio.to_thread.run_sync(errors_before_killing)

        def hang_up_after_the_first_token() -> None:
            body = {"model": MODEL_NAME, "prompt": "import os\n", "max_tokens": 200, "temperature": 0.8,
                    "seed": 99, "stream": True}
            with httpx.stream("POST", f"{peer.gateway_url}/v1/completions", json=body,
                              headers={"authorization": "Bearer s3cret"}, timeout=30) as response:
                assert response.status_code == 200
                next(response.iter_lines())

        await trio.to_thread.run_sync(hang_up_after_the_first_token)
        executor = net.peers[0].server
        with trio.fail_after(10):  # the hang-up cancels the request in the network: the executor stops too
            while not (executor.recent and executor.recent[-1].outcome.startswith("failed")):
                await trio.sleep(0.02)
        hung_up = peer.gateway.metrics.recent[-1]
        assert hung_up.outcome == "cancelled" and hung_up.tokens < 200
        assert executor.recent[-1].tokens < 200
        # The only peer serving the model dies: its announcement is still live, but nobody bids.
        await net.kill(net.peers[0].peer_id)

        def no_capacity() -> tuple[Any, Any]:
            api = sdk(peer, key="s3cret")
            return (call(lambda: api.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)),
                    call(lambda: list(api.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2,
                                                                  stream=True))))

        busy, busy_stream = await trio.to_thread.run_sync(no_capacity)

    assert isinstance(out["unknown_model"], openai.NotFoundError)
    assert out["unknown_model"].body["code"] == "model_not_found"
    assert "no-such-model" in out["unknown_model"].body["message"]
    assert "GET /v1/models" in out["unknown_model"].body["message"]
    for name, param in (("bad_temperature", "temperature"), ("too_many_choices", "n"), ("bad_role", "messages[0].role")):
        assert isinstance(out[name], openai.BadRequestError), name
        assert out[name].body["param"] == param and out[name].body["type"] == "invalid_request_error"
    assert isinstance(out["wrong_key"], openai.AuthenticationError)
    assert out["wrong_key"].body["code"] == "invalid_api_key"
    assert out["not_found_url"].status_code == 404 and "error" in out["not_found_url"].json()
    assert out["bad_json"].status_code == 400 and out["bad_json"].json()["error"]["code"] == "invalid_json"
    assert out["ok"]
    for error in (busy, busy_stream):  # a stream that fails before its first token gets a real status too
        assert isinstance(error, openai.InternalServerError) and error.status_code == 503
        assert error.body["code"] == "no_capacity" and error.body["type"] == "server_error"
