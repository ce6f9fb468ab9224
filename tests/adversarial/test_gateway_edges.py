"""Hostile HTTP input to the OpenAI gateway: never a 500, never Python's exception text, never a request
sent into the network for input that cannot be served. Fuzzed parsing (pure) and a live gateway over real
HTTP on 127.0.0.1."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pinfer.gateway.input import MAX_BODY, MAX_JSON_DEPTH, check_text_size, parse_json_body
from p2pinfer.gateway.openai_api import ApiError, parse_chat_request, parse_completion_request
from p2pinfer.identity import Identity
from p2pinfer.localnet import LOOPBACK, local_network
from p2pinfer.net import NodeConfig
from p2pinfer.peer import ServingPeer
from p2pinfer.request.params import build_request
from p2pinfer.runtime import load_model
from p2pinfer.wire import now_ms
from p2pinfer.wire.messages import MAX_TEXT_BYTES

MODEL = "tiny-llama-trained"
PYTHON_TEXT = ("Traceback", "Error(", "Exception", "object has no attribute", "unhashable", "codec can't",
               "maximum recursion", "NoneType")

# Values a hostile client sends: every JSON type, huge and odd numbers, lone surrogates, long strings.
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**40), max_value=10**40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["\ud800", "a\udfffb", "user", "system", "assistant", "text", "m", "x" * 300]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6) | st.sampled_from(["role", "content", "type", "text"]),
                                             inner, max_size=4), max_leaves=12)
keys = st.sampled_from(["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
                        "top_p", "top_k", "stop", "seed", "stream", "stream_options", "n", "logprobs", "echo",
                        "response_format", "tools", "user", "\ud800"])
bodies = st.dictionaries(keys, json_values, max_size=8) | st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                                        "content": json_values}), max_size=3)})


def encode(body: object) -> bytes:
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()  # \ud800 travels as an escape, as on the wire


def assert_clean_error(exc: ApiError) -> None:
    assert exc.status in (400, 413), exc.status
    assert exc.message and "\n" not in exc.message and len(exc.message) < 400
    assert not any(t in exc.message for t in PYTHON_TEXT), exc.message


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_any_json_body_is_served_or_refused_with_a_clean_4xx(body):
    raw = encode(body)
    for parse in (parse_chat_request, parse_completion_request):
        try:
            spec = parse(parse_json_body(raw))
            check_text_size(spec)
        except ApiError as exc:
            assert_clean_error(exc)
            continue
        # Whatever the gateway accepts, the SDK turns into a valid wire request: nothing fails later.
        build_request(model_digest=bytes(32), client_key=bytes(32), **spec.params).validate()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_are_parsed_or_refused_with_a_clean_400(raw):
    try:
        parse_completion_request(parse_json_body(raw))
    except ApiError as exc:
        assert_clean_error(exc)


@pytest.mark.parametrize("raw, words", [
    (b"[" * 200_000, "nested"),
    (b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1), "nested"),
    (b'{"model": "m", "prompt": "\xff\xfe"}', "UTF-8"),
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', "NaN"),
    (b'{"model": "m", "prompt": "x", "temperature": -Infinity}', "-Infinity"),
    (b'{"model": "m", "prompt": "x", "temperature": 1e400}', "out of range"),
    (b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "too large"),
    (b'{"model": "m", "prompt": "\\ud800"}', "surrogate"),
    (b'{"model": "m", "prompt": "x", "stop": ["\\udfff"]}', "surrogate"),
    (b"\xef\xbb\xbf{}", "JSON"),
])
def test_hostile_bodies_get_a_400_saying_what_is_wrong(raw, words):
    with pytest.raises(ApiError) as info:
        parse_completion_request(parse_json_body(raw))
    assert_clean_error(info.value)
    assert words in info.value.message


def test_a_huge_value_is_quoted_back_shortened():
    with pytest.raises(ApiError) as info:
        parse_completion_request({"model": "m", "prompt": "x", "max_tokens": 10**4000})
    assert_clean_error(info.value)
    assert len(info.value.message) < 200


async def test_live_gateway_answers_hostile_http_with_4xx_and_sends_nothing_into_the_network(shared_models):
    model = load_model(shared_models / MODEL, name=MODEL, providers=["CPUExecutionProvider"])
    async with local_network([model], peers=1) as net:
        config = NodeConfig(listen=LOOPBACK, bootstrap=tuple(net.bootstrap_addrs), role="peer")
        async with ServingPeer(Identity.generate(), config, [model], measure_speed=False,
                               gateway=("127.0.0.1", 0)) as peer:
            with trio.fail_after(30):
                while net.peers[0].peer_id not in {a.peer_id for a in peer.node.table.live(now_ms())}:
                    await trio.sleep(0.02)
            url = peer.gateway_url
            big_chat = {"model": MODEL, "max_tokens": 4,
                        "messages": [{"role": "user", "content": "x" * 250_000}] * 6}  # 1.5 MB of text
            cases = {
                "deep": ("/v1/chat/completions", b"[" * 100_000),
                "invalid_utf8": ("/v1/completions", b'{"model": "m", "prompt": "\xc3\x28"}'),
                "nan": ("/v1/completions", b'{"model": "' + MODEL.encode() + b'", "prompt": "x", "top_p": NaN}'),
                "huge_int": ("/v1/completions", b'{"model": "' + MODEL.encode() + b'", "prompt": "x", '
                                                b'"max_tokens": ' + b"9" * 3000 + b"}"),
                "wrong_types": ("/v1/chat/completions", encode({"model": ["m"], "messages": {"role": 5}})),
                "wrong_types_2": ("/v1/chat/completions",
                                  encode({"model": MODEL, "messages": [{"role": {}, "content": 1}]})),
                "surrogate": ("/v1/completions", encode({"model": MODEL, "prompt": "\ud800"})),
                "surrogate_model": ("/v1/completions", encode({"model": "\udc00", "prompt": "x"})),
                "long_model": ("/v1/completions", encode({"model": "m" * 100_000, "prompt": "x"})),
                "big_prompt": ("/v1/completions", encode({"model": MODEL, "prompt": "x" * (MAX_TEXT_BYTES + 1)})),
                "big_chat": ("/v1/chat/completions", encode(big_chat)),
                "big_body": ("/v1/completions", b'{"prompt": "' + b"x" * MAX_BODY + b'"}'),
            }

            def post_all() -> dict[str, httpx.Response]:
                with httpx.Client(timeout=60) as http:
                    return {name: http.post(url + path, content=raw, headers={"content-type": "application/json"})
                            for name, (path, raw) in cases.items()}

            responses = await trio.to_thread.run_sync(post_all)
            for name, response in responses.items():
                assert response.status_code in (400, 413), (name, response.status_code, response.text[:300])
                error = response.json()["error"]
                assert error["message"] and "\n" not in error["message"] and len(error["message"]) < 400, name
                assert not any(t in error["message"] for t in PYTHON_TEXT), (name, error["message"])
            for name in ("big_prompt", "big_chat"):
                assert responses[name].status_code == 413
                assert responses[name].json()["error"]["code"] == "prompt_too_large"
                assert str(MAX_TEXT_BYTES) in responses[name].json()["error"]["message"]
            assert responses["big_body"].status_code == 413
            assert str(MAX_BODY) in responses["big_body"].json()["error"]["message"]
            # Nothing reached the network and nobody was booked.
            for serving in (peer, net.peers[0]):
                assert serving.server.counters["offers"] == 0
                assert serving.ledger.entry_count() == 0
            # The gateway still serves.
            ok = await trio.to_thread.run_sync(lambda: httpx.post(
                url + "/v1/completions", json={"model": MODEL, "prompt": "import os\n", "max_tokens": 2}, timeout=60))
            assert ok.status_code == 200, ok.text[:300]
