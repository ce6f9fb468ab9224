"""One limit on a request's text, and the frames it must fit: the SDK refuses a too-large request locally,
before any offer, and a peer refuses one on the wire."""

from __future__ import annotations

import pytest

from p2pinfer.identity import Identity
from p2pinfer.localnet import local_network
from p2pinfer.request.client import AsyncClient
from p2pinfer.request.errors import PromptTooLarge
from p2pinfer.request.params import build_request
from p2pinfer.request.protocol import MAX_TASK_FRAME, MAX_VERIFY_FRAME
from p2pinfer.runtime import load_model
from p2pinfer.wire import Assignment, Bid, ChatMessage, Request, SchemaError, VerifyTask, encode_signed
from p2pinfer.wire.messages import (MAX_BID_SET_BYTES, MAX_BIDS, MAX_NEW_TOKENS, MAX_QUORUM, MAX_SIGNED_RESULT_BYTES,
                                    MAX_TEXT_BYTES, MAX_VERIFY_EVIDENCE_BYTES)

MODEL = "tiny-llama-trained"


def largest_request(**overrides) -> Request:
    """The request with the most bytes the wire allows: 256 messages holding MAX_TEXT_BYTES together."""
    per_message = MAX_TEXT_BYTES // 256
    fields = dict(model=bytes(32), prompt=None,
                  messages=tuple(ChatMessage(role="assistant", content="\x7f" * per_message) for _ in range(256)),
                  max_tokens=MAX_NEW_TOKENS, temperature=10.0, top_p=1.0, top_k=1 << 20, stop=("\x7f" * 64,) * 8,
                  seed=2**64 - 1, nonce=bytes(16), client=bytes(32), created_at_ms=(1 << 53) - 1)
    fields.update(overrides)
    return Request(**fields)


def test_the_largest_assignment_fits_its_frame():
    identity = Identity.generate()
    bids = tuple(Bid(request_id=bytes(32), public_key=bytes([i]) * 32, proof=bytes(80)) for i in range(MAX_BIDS))
    assignment = Assignment(request=largest_request(), epoch_seed=bytes(32), bids=bids,
                            prefix_ids=((1 << 32) - 1,) * MAX_NEW_TOKENS, attempt=MAX_BIDS)
    assert len(encode_signed(identity, assignment)) <= MAX_TASK_FRAME


def test_the_largest_verify_task_fits_its_frame():
    # the election and the failover evidence travel with the task: 64 items holding the evidence limit together
    evidence = (b"\xff" * (MAX_VERIFY_EVIDENCE_BYTES // MAX_BIDS),) * MAX_BIDS
    task = VerifyTask(request=largest_request(), result=b"\xff" * MAX_SIGNED_RESULT_BYTES,
                      inherited_tokens=MAX_NEW_TOKENS, issued_at_ms=(1 << 53) - 1,
                      bid_set=b"\xff" * MAX_BID_SET_BYTES, evidence=evidence, quorum=MAX_QUORUM)
    assert len(encode_signed(Identity.generate(), task)) <= MAX_VERIFY_FRAME


def test_failover_evidence_beyond_its_total_is_refused_on_the_wire():
    evidence = (b"\xff" * (MAX_VERIFY_EVIDENCE_BYTES // 4 + 1),) * 4
    task = VerifyTask(request=largest_request(messages=None, prompt="x"), result=b"\xff",
                      inherited_tokens=0, issued_at_ms=0, evidence=evidence)
    with pytest.raises(SchemaError, match=f"at most {MAX_VERIFY_EVIDENCE_BYTES}"):
        task.validate()


def test_text_beyond_the_limit_is_refused_on_the_wire_even_in_small_messages():
    small = (ChatMessage(role="user", content="x" * 2000),) * 200  # 400 KB, each message far below the limit
    with pytest.raises(SchemaError, match=f"at most {MAX_TEXT_BYTES}"):
        largest_request(messages=small).validate()


@pytest.mark.parametrize("text", [dict(prompt="é" * (MAX_TEXT_BYTES // 2 + 1)),
                                  dict(messages=[{"role": "user", "content": "x" * 200_000}] * 2)])
def test_the_sdk_names_the_limit(text):
    with pytest.raises(PromptTooLarge, match=f"at most {MAX_TEXT_BYTES} bytes"):
        build_request(model_digest=bytes(32), client_key=bytes(32), **text)


def test_text_at_the_limit_is_accepted():
    build_request(model_digest=bytes(32), client_key=bytes(32), prompt="x" * MAX_TEXT_BYTES).validate()


async def test_a_too_large_request_fails_locally_before_any_offer_and_books_nothing(shared_models):
    model = load_model(shared_models / MODEL, name=MODEL, providers=["CPUExecutionProvider"])
    async with local_network([model], peers=1) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            chat = [{"role": "user", "content": "x" * 250_000}] * 6  # 1.5 MB: each message alone is allowed
            with pytest.raises(PromptTooLarge, match="1500000 bytes"):
                await client.generate(model=MODEL, messages=chat, max_tokens=4)
            assert client.ledger.entry_count() == 0
        assert net.peers[0].server.counters["offers"] == 0
