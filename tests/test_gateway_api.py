"""The gateway's pure parts: OpenAI request parsing, response shapes, bind addresses."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.gateway.http import GatewayConfigError, is_loopback, parse_bind
from p2pinfer.gateway.openai_api import (
    ApiError,
    chunk_object,
    parse_body,
    parse_chat_request,
    parse_completion_request,
    sse,
)
from p2pinfer.metrics import describe_verification
from p2pinfer.request.params import build_request

USER = [{"role": "user", "content": "hi"}]


def test_chat_request_maps_openai_parameters():
    spec = parse_chat_request({
        "model": "m", "stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 7,
        "temperature": 0, "top_p": 0.5, "stop": "\n", "seed": -1, "n": 1, "user": "u", "presence_penalty": 0,
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
                     {"role": "user", "content": "hi", "name": "ann"}, {"role": "assistant", "content": None}],
        "some_vendor_field": {"ignored": True},
    })
    assert spec.endpoint == "chat" and spec.stream and spec.include_usage
    assert spec.params == {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": ""}],
        "max_tokens": 7, "temperature": 0.0, "top_p": 0.5, "top_k": 0, "stop": ("\n",), "seed": 2**64 - 1}
    # What the gateway hands over is a valid p2pinfer request.
    build_request(model_digest=bytes(32), client_key=bytes(32), **spec.params)


def test_completion_defaults_follow_openai():
    spec = parse_completion_request({"model": "m", "prompt": ["once"]})
    assert spec.params["prompt"] == "once" and spec.params["max_tokens"] == 16
    assert spec.params["temperature"] == 1.0 and not spec.stream


@pytest.mark.parametrize("body, param", [
    ({"messages": USER}, "model"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": USER, "n": 5}, "n"),
    ({"model": "m", "messages": USER, "n": 0}, "n"),
    ({"model": "m", "messages": USER, "logprobs": 1}, "logprobs"),
    ({"model": "m", "messages": USER, "logprobs": True, "top_logprobs": 9}, "top_logprobs"),
    ({"model": "m", "messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ({"model": "m", "messages": USER, "tools": [{"type": "function"}]}, "tools"),
    ({"model": "m", "messages": USER, "temperature": 2.5}, "temperature"),
    ({"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": USER, "stop": ["a"] * 9}, "stop"),
    ({"model": "m", "messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
])
def test_bad_chat_parameters_are_400s_naming_the_parameter(body, param):
    with pytest.raises(ApiError) as info:
        parse_chat_request(body)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_choices_and_logprobs_parameters():
    spec = parse_chat_request({"model": "m", "messages": USER, "n": 4, "logprobs": True, "top_logprobs": 8})
    assert (spec.n, spec.logprobs, spec.top_logprobs) == (4, True, 8)
    spec = parse_completion_request({"model": "m", "prompt": "x", "logprobs": 3})
    assert (spec.n, spec.logprobs, spec.top_logprobs) == (1, True, 3)
    assert not parse_completion_request({"model": "m", "prompt": "x", "logprobs": None}).logprobs
    with pytest.raises(ApiError) as info:
        parse_completion_request({"model": "m", "prompt": "x", "logprobs": 9})
    assert info.value.param == "logprobs"


def test_returned_tokens_stop_before_a_stop_string_and_leave_out_eos():
    from p2pinfer.gateway.openai_extras import returned_token_count

    pieces = {1: "Hello", 2: ",", 3: " wor", 4: "ld", 5: "\n\n", 6: "More"}

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    # "Hello, world" then "\n\n" completes the stop string "\n\n": that last token is not returned.
    assert returned_token_count([1, 2, 3, 4, 5], "Hello, world", "stop", (), decode) == 4
    # A stop string that starts inside a token: the token is returned (part of its text is).
    assert returned_token_count([1, 2, 3, 4], "Hello, wo", "stop", (), decode) == 3
    assert returned_token_count([5], "", "stop", (), decode) == 0
    assert returned_token_count([1, 2, 9], "Hello,", "eos", (9,), decode) == 2
    assert returned_token_count([1, 2, 3], "Hello, wor", "length", (9,), decode) == 3


def test_logprobs_come_from_the_fingerprint_rows():
    import numpy as np

    from p2pinfer.gateway.openai_extras import UNLIKELY_LOGPROB, completion_logprobs, token_logprobs

    ids = np.array([[5, 7, 9], [3, 4, 6]])
    lps = np.array([[-0.1, -2.5, -4.0], [-0.7, -0.9, -3.0]])
    content = token_logprobs(ids, lps, [7, 8], 2, 2, lambda t: f"<{t}>")
    assert content[0]["token"] == "<7>" and content[0]["logprob"] == -2.5
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["<5>", "<7>"]
    assert content[1]["logprob"] == UNLIKELY_LOGPROB  # sampled outside the recorded top tokens
    assert content[0]["bytes"] == list(b"<7>")
    legacy = completion_logprobs(content, 2)
    assert legacy["tokens"] == ["<7>", "<8>"] and legacy["text_offset"] == [0, 3]
    assert legacy["top_logprobs"][0] == {"<5>": -0.1, "<7>": -2.5}


def test_body_must_be_a_json_object():
    for raw in (b"{", b"[1]", b"\xff"):
        with pytest.raises(ApiError) as info:
            parse_body(raw)
        assert info.value.status == 400 and info.value.code == "invalid_json"


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3), max_leaves=8)
keys = st.sampled_from(["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
                        "top_p", "top_k", "stop", "seed", "stream", "stream_options", "n", "logprobs", "echo",
                        "response_format", "tools", "other"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, json_values, max_size=8))
def test_any_json_body_is_parsed_or_refused_with_a_400(body):
    for parse in (parse_chat_request, parse_completion_request):
        try:
            spec = parse(body)
        except ApiError as exc:
            assert exc.status == 400 and exc.message
            continue
        try:  # whatever passes parsing is a request the network accepts (or a clear BadParameters)
            build_request(model_digest=bytes(32), client_key=bytes(32), **spec.params)
        except ValueError:
            pass


def test_stream_chunks_and_sse_framing():
    spec = parse_chat_request({"model": "m", "messages": USER, "stream": True,
                               "stream_options": {"include_usage": True}})
    usage = chunk_object(spec, "id", 1, usage_={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3
    event = sse(chunk_object(spec, "id", 1, text="é"))
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
    assert json.loads(event[6:])["choices"][0]["delta"] == {"content": "é"}


def test_bind_addresses():
    assert parse_bind("8080") == ("127.0.0.1", 8080)
    assert parse_bind("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_bind("[::1]:9") == ("::1", 9)
    for bad in ("host:", "1:99999", ":80", "[::1]80"):
        with pytest.raises(GatewayConfigError):
            parse_bind(bad)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_verification_descriptions():
    assert describe_verification(None) == "unverified"
    assert describe_verification({"outcome": "accepted"}) == "accepted"
    assert describe_verification(type("V", (), {"accepted": False})()) == "rejected"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=24), st.data())
def test_returned_tokens_are_the_fewest_that_cover_the_returned_text(pieces, data):
    from p2pinfer.gateway.openai_extras import returned_token_count

    ids = list(range(len(pieces)))

    def decode(prefix):
        return "".join(pieces[i] for i in prefix)

    full = decode(ids)
    cut = data.draw(st.integers(0, len(full)))  # where a stop string began
    text = full[:cut]
    count = returned_token_count(ids, text, "stop", (), decode)
    assert len(decode(ids[:count])) >= len(text)
    if count:
        assert len(decode(ids[:count - 1])) < len(text)
    assert returned_token_count(ids, full, "length", (), decode) == len(ids)
