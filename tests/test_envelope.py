"""Signed envelopes: signatures, domain separation, type expectations, versions and replay protection."""

from __future__ import annotations

import pytest

from p2pinfer.identity import Identity
from p2pinfer.wire import (
    Refusal,
    ReplayGuard,
    TaskOffer,
    TokenChunk,
    check_window,
    codec,
    decode_signed,
    encode_signed,
    sign,
    signing_input,
)
from p2pinfer.wire.errors import (
    ReplayError,
    SchemaError,
    SignatureError,
    UnknownTypeError,
    VersionError,
)

ALICE = Identity(bytes([1]) * 32)
MALLORY = Identity(bytes([2]) * 32)
REFUSAL = Refusal(request_id=bytes(32), code="busy", message="no free slot")


def _envelope(**overrides):
    signed = sign(ALICE, REFUSAL)
    fields = {"v": 1, "type": "refusal", "payload": signed.payload, "signer": signed.signer, "sig": signed.signature}
    fields.update(overrides)
    return codec.encode(fields)


def test_valid_envelope_decodes():
    signed = decode_signed(_envelope())
    assert signed.message == REFUSAL
    assert signed.signer_peer_id == ALICE.peer_id


def test_every_flipped_signature_bit_is_rejected():
    signed = sign(ALICE, REFUSAL)
    for bit in range(0, 512, 7):
        sig = bytearray(signed.signature)
        sig[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(SignatureError):
            decode_signed(_envelope(sig=bytes(sig)))


def test_tampered_payload_rejected():
    signed = sign(ALICE, REFUSAL)
    other = Refusal(request_id=bytes(32), code="busy", message="no free slot!").encode()
    with pytest.raises(SignatureError):
        decode_signed(_envelope(payload=other, sig=signed.signature))


def test_other_signer_rejected():
    with pytest.raises(SignatureError):
        decode_signed(_envelope(signer=MALLORY.public_key))


def test_signature_for_another_type_is_not_valid_for_this_one():
    # Same payload bytes, signed under the domain of another message type: must not verify as a refusal.
    payload = REFUSAL.encode()
    wrong_domain_sig = ALICE.sign(signing_input("verdict", payload))
    with pytest.raises(SignatureError):
        decode_signed(_envelope(sig=wrong_domain_sig))
    # And a signature under another protocol version is not valid either.
    with pytest.raises(SignatureError):
        decode_signed(_envelope(sig=ALICE.sign(signing_input("refusal", payload, version=2))))


def test_relabelled_type_rejected():
    offer = TaskOffer(request_id=bytes(32), model=bytes(32), max_tokens=4, epoch_seed=b"", expires_at_ms=10)
    signed = sign(ALICE, offer)
    with pytest.raises(SignatureError):
        decode_signed(codec.encode({"v": 1, "type": "refusal", "payload": signed.payload, "signer": signed.signer,
                                    "sig": signed.signature}))


def test_unexpected_type_rejected_before_signature_check():
    with pytest.raises(UnknownTypeError, match="not acceptable"):
        decode_signed(_envelope(), expect=TokenChunk)
    with pytest.raises(UnknownTypeError, match="unknown message type"):
        decode_signed(_envelope(type="gossip-bomb"))


def test_version_mismatch_rejected():
    with pytest.raises(VersionError, match="v1"):
        decode_signed(_envelope(v=2))


@pytest.mark.parametrize(
    "overrides",
    [{"signer": b"short"}, {"sig": b"x" * 63}, {"payload": "text"}, {"type": 7}, {"extra": 1}],
)
def test_malformed_envelope_fields_rejected(overrides):
    with pytest.raises((SchemaError, UnknownTypeError)):
        decode_signed(_envelope(**overrides))


def test_not_a_map_rejected():
    with pytest.raises(SchemaError):
        decode_signed(codec.encode([1, 2, 3]))


def test_message_id_is_stable_and_type_bound():
    a = sign(ALICE, REFUSAL)
    b = sign(MALLORY, REFUSAL)
    assert a.message_id == b.message_id  # same statement, whoever signed it
    assert decode_signed(a.to_bytes()).message_id == a.message_id


def test_replay_guard_accepts_once_and_forgets_after_expiry():
    guard = ReplayGuard()
    guard.check_and_remember(b"m1", expires_at_ms=2_000, now=1_000)
    with pytest.raises(ReplayError, match="already"):
        guard.check_and_remember(b"m1", expires_at_ms=2_000, now=1_500)
    with pytest.raises(ReplayError, match="expired"):
        guard.check_and_remember(b"m2", expires_at_ms=1_000, now=1_500)
    guard.check_and_remember(b"m3", expires_at_ms=3_000, now=1_500)
    assert len(guard) == 2
    guard.check_and_remember(b"m4", expires_at_ms=9_000, now=2_500)  # m1 forgotten (expired)
    assert len(guard) == 2


def test_replay_guard_is_bounded():
    guard = ReplayGuard(max_entries=10)
    for i in range(100):
        guard.check_and_remember(i.to_bytes(4, "big"), expires_at_ms=10_000 + i, now=0)
    assert len(guard) == 10


@pytest.mark.parametrize(
    "issued, expires, now, match",
    [
        (1_000, 500, 1_000, "before it was issued"),
        (1_000, 2_000, 3_000, "expired"),
        (100_000, 110_000, 1_000, "future"),
        (0, 10**9, 1, "exceeds the maximum"),
    ],
)
def test_check_window_rejects(issued, expires, now, match):
    with pytest.raises(ReplayError, match=match):
        check_window(issued, expires, now=now)


def test_check_window_accepts_fresh():
    check_window(1_000, 61_000, now=30_000)
