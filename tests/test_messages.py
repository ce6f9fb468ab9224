"""Every message type: schema round trips, signed round trips, and typed rejection of bad fields."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pinfer.identity import Identity
from p2pinfer.wire import MESSAGE_TYPES, Request, codec, decode_signed, encode_signed
from p2pinfer.wire.errors import SchemaError
from p2pinfer.wire.schema import Bool, Bytes, Enum, Float, Int, List, Optional, Str, Struct

from wire_strategies import for_record

IDENTITY = Identity(bytes(range(32)))

any_message = st.one_of([for_record(cls) for cls in MESSAGE_TYPES.values()])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(any_message)
def test_schema_round_trip(message):
    wire = codec.decode(message.encode())
    assert type(message).from_wire(wire) == message


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(any_message)
def test_signed_round_trip(message):
    data = encode_signed(IDENTITY, message)
    signed = decode_signed(data)
    assert signed.message == message
    assert signed.signer == IDENTITY.public_key
    assert decode_signed(data, expect=type(message)).message == message
    # Canonical: encoding the decoded message again gives the same bytes.
    assert encode_signed(IDENTITY, signed.message) == data


def _wrong_value(s):
    """A value of the wrong wire type for spec ``s``."""
    if isinstance(s, (Int, Float, Bool)):
        return "not-a-number"
    if isinstance(s, (Str, Enum)):
        return 12
    if isinstance(s, Bytes):
        return "hex-is-not-bytes"
    if isinstance(s, List):
        return {"a": 1}
    if isinstance(s, Struct):
        return [1, 2]
    if isinstance(s, Optional):
        return _wrong_value(s.inner)
    raise AssertionError(s)


@pytest.mark.parametrize("cls", MESSAGE_TYPES.values(), ids=lambda c: c.TYPE)
@settings(max_examples=10)
@given(data=st.data())
def test_every_field_rejects_wrong_types(cls, data):
    wire = data.draw(for_record(cls)).to_wire()
    for name, s in cls.wire_fields():
        bad = dict(wire, **{name: _wrong_value(s)})
        with pytest.raises(SchemaError) as info:
            cls.from_wire(bad)
        assert name in str(info.value)


@pytest.mark.parametrize("cls", MESSAGE_TYPES.values(), ids=lambda c: c.TYPE)
@settings(max_examples=10)
@given(data=st.data())
def test_missing_and_unknown_fields_rejected(cls, data):
    wire = data.draw(for_record(cls)).to_wire()
    first = next(iter(wire))
    with pytest.raises(SchemaError, match="missing"):
        cls.from_wire({k: v for k, v in wire.items() if k != first})
    with pytest.raises(SchemaError, match="unknown"):
        cls.from_wire(dict(wire, surprise=1))


def test_bool_is_not_an_int_and_limits_hold():
    from p2pinfer.wire import Refusal, TokenChunk

    with pytest.raises(SchemaError, match="integer"):
        TokenChunk.from_wire({"request_id": bytes(32), "index": True, "token_ids": [1], "text": "", "chain": b""})
    with pytest.raises(SchemaError, match="outside"):
        TokenChunk.from_wire({"request_id": bytes(32), "index": 0, "token_ids": [2**32], "text": "", "chain": b""})
    with pytest.raises(SchemaError, match="exactly 32"):
        Refusal.from_wire({"request_id": bytes(31), "code": "busy", "message": ""})
    with pytest.raises(SchemaError, match="expected one of"):
        Refusal.from_wire({"request_id": bytes(32), "code": "bored", "message": ""})


def test_invalid_message_cannot_be_signed():
    from p2pinfer.wire import Refusal

    with pytest.raises(SchemaError):
        encode_signed(IDENTITY, Refusal(request_id=b"short", code="busy", message=""))


@given(for_record(Request))
def test_request_id_is_stable_and_changes_with_content(base):

    changed = Request(**{**base.__dict__, "max_tokens": base.max_tokens % 4096 + 1})
    assert base.request_id() != changed.request_id()
    assert base.request_id() == Request(**base.__dict__).request_id()
