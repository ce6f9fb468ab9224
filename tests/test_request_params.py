"""Request parameters: validation with clear errors, and fair candidate selection."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pinfer.request.candidates import select_candidates
from p2pinfer.request.errors import BadParameters
from p2pinfer.request.params import build_request

KEY = bytes(32)
MODEL = bytes(range(32))


def test_prompt_request():
    request = build_request(model_digest=MODEL, client_key=KEY, prompt="Hello", max_tokens=8, stop="\n")
    assert request.prompt == "Hello" and request.messages is None and request.stop == ("\n",)
    assert len(request.nonce) == 16


def test_chat_request():
    request = build_request(model_digest=MODEL, client_key=KEY, messages=[{"role": "user", "content": "Hi"}])
    assert request.messages[0].content == "Hi"


def test_fresh_nonce_gives_distinct_request_ids():
    a = build_request(model_digest=MODEL, client_key=KEY, prompt="x", created_at_ms=1)
    b = build_request(model_digest=MODEL, client_key=KEY, prompt="x", created_at_ms=1)
    assert a.request_id() != b.request_id()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of"),
        ({"prompt": 5}, "prompt must be a string"),
        ({"messages": []}, "must not be empty"),
        ({"messages": [{"role": "wizard", "content": "b"}]}, "role must be one of"),
        ({"messages": [{"content": "b"}]}, "'role' and 'content'"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 10**6}, "max_tokens"),
        ({"prompt": "a", "temperature": -1}, "temperature"),
        ({"prompt": "a", "temperature": float("nan")}, "temperature"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "top_p": 0}, "greater than 0"),
        ({"prompt": "a", "top_k": -3}, "top_k"),
        ({"prompt": "a", "stop": [""]}, "stop"),
        ({"prompt": "a", "stop": ["x"] * 9}, "stop"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a" * 300_000}, "at most 262144 bytes"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(BadParameters, match=match):
        build_request(model_digest=MODEL, client_key=KEY, **kwargs)


PEERS = [f"peer-{i}" for i in range(100)]


@given(st.binary(min_size=32, max_size=32), st.permutations(PEERS))
def test_candidate_selection_is_deterministic_and_order_free(request_id, shuffled):
    assert select_candidates(request_id, shuffled, 32) == select_candidates(request_id, PEERS, 32)
    assert len(select_candidates(request_id, PEERS, 32)) == 32


def test_candidate_selection_is_fair():
    import hashlib

    counts = dict.fromkeys(PEERS, 0)
    n = 2000
    for i in range(n):
        for peer in select_candidates(hashlib.sha256(i.to_bytes(4, "big")).digest(), PEERS, 10):
            counts[peer] += 1
    expected = n * 10 / len(PEERS)  # 200 per peer
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    # 99 degrees of freedom: the 1% critical value is about 134.6 (sampling without replacement lowers it).
    assert chi2 < 134.6, chi2
