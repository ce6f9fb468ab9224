"""proto/ is the spec other implementations follow: its vectors must hold byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pinfer.identity import Identity
from p2pinfer.wire import MESSAGE_TYPES, decode_signed, sign, signing_input
from p2pinfer.wire.errors import WireError
from p2pinfer.wire.spec import record_from_json, schema_document, write_spec

PROTO = Path(__file__).resolve().parents[1] / "proto"
VECTORS = sorted(p for p in (PROTO / "vectors").glob("*.json") if p.name != "invalid.json")


def test_every_message_type_has_a_vector():
    assert {p.stem for p in VECTORS} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_vector_byte_for_byte(path):
    vector = json.loads(path.read_text())
    identity = Identity(bytes.fromhex(vector["key_seed"]))
    assert identity.public_key.hex() == vector["public_key"]
    assert identity.peer_id == vector["peer_id"]
    message = record_from_json(MESSAGE_TYPES[vector["type"]], vector["message"])
    signed = sign(identity, message)
    assert signed.payload.hex() == vector["payload"]
    assert signing_input(message.TYPE, signed.payload).hex() == vector["signing_input"]
    assert signed.signature.hex() == vector["signature"]
    assert signed.to_bytes().hex() == vector["envelope"]
    decoded = decode_signed(bytes.fromhex(vector["envelope"]))
    assert decoded.message == message


@pytest.mark.parametrize(
    "vector", json.loads((PROTO / "vectors" / "invalid.json").read_text()), ids=lambda v: v["name"]
)
def test_invalid_vectors_rejected_with_reason(vector):
    with pytest.raises(WireError) as info:
        decode_signed(bytes.fromhex(vector["hex"]))
    assert info.value.reason == vector["reason"]


def test_proto_dir_is_generated_from_the_code(tmp_path):
    """proto/ must be exactly what `python -m p2pinfer.wire.spec proto` writes (regenerate after changes)."""
    assert json.loads((PROTO / "schema.json").read_text()) == schema_document()
    for written in write_spec(tmp_path):
        committed = PROTO / written.relative_to(tmp_path)
        assert committed.read_text() == written.read_text(), f"{committed} is stale; regenerate proto/"
