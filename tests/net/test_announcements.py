"""Pure rules of capacity announcements: every drop reason, sequence numbers, expiry, lookup."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.identity import Identity
from p2pinfer.net import MAX_ANNOUNCEMENT_BYTES, AnnouncementRejected, AnnouncementTable, verify_announcement
from p2pinfer.wire import CapacityAnnouncement, codec, encode_signed

from .helpers import offer

NOW = 1_800_000_000_000
ALICE = Identity(bytes(range(32)))
BOB = Identity(bytes(range(1, 33)))
DIGEST_A = b"\xaa" * 32
DIGEST_B = b"\xbb" * 32


def announcement(identity: Identity = ALICE, *, seq: int = 1, issued: int = NOW, ttl: int = 60_000,
                 free: int = 2, models: tuple = (offer(DIGEST_A),), **kw: object) -> CapacityAnnouncement:
    return CapacityAnnouncement(peer_id=kw.pop("peer_id", identity.peer_id), addrs=("/ip4/127.0.0.1/tcp/4001",),
                                models=models, free_slots=free, total_slots=4, software="p2pinfer/test",
                                seq=seq, issued_at_ms=issued, expires_at_ms=issued + ttl)


def reason_of(data: bytes, source: str | None = None, now: int = NOW) -> str:
    with pytest.raises(AnnouncementRejected) as info:
        verify_announcement(data, source_peer_id=source, now_ms=now)
    return info.value.reason


def test_valid_announcement_verifies() -> None:
    signed = verify_announcement(encode_signed(ALICE, announcement()), source_peer_id=ALICE.peer_id, now_ms=NOW)
    assert signed.message.peer_id == ALICE.peer_id


def test_each_drop_reason() -> None:
    good = encode_signed(ALICE, announcement())
    assert reason_of(b"\x00" * (MAX_ANNOUNCEMENT_BYTES + 1)) == "oversized"
    assert reason_of(b"\xc1") == "malformed"
    tampered = bytearray(good)
    tampered[-70] ^= 1  # inside the payload, signature unchanged
    assert reason_of(bytes(tampered)) in {"bad-signature", "schema", "non-canonical", "malformed"}
    env = codec.decode(good)
    env["sig"] = bytes(64)
    assert reason_of(codec.encode(env)) == "bad-signature"
    assert reason_of(encode_signed(BOB, announcement(peer_id=ALICE.peer_id))) == "signer-mismatch"
    assert reason_of(good, source=BOB.peer_id) == "source-mismatch"
    assert reason_of(good, now=NOW + 60_000) == "expired"
    assert reason_of(encode_signed(ALICE, announcement(issued=NOW + 31_000))) == "future"
    assert reason_of(encode_signed(ALICE, announcement(ttl=11 * 60_000))) == "bad-window"
    from p2pinfer.wire import Receipt  # a different, validly signed message type
    receipt = Receipt(request_id=bytes(32), model=bytes(32), client=ALICE.public_key, executor=BOB.public_key,
                      verifiers=(), result_hash=bytes(32), output_tokens=0, outcome="failed", issued_at_ms=NOW)
    assert reason_of(encode_signed(ALICE, receipt)) == "unknown-type"


def test_table_requires_strictly_increasing_seq_and_replaces() -> None:
    table = AnnouncementTable()
    first = encode_signed(ALICE, announcement(seq=5))
    table.offer(first, source_peer_id=ALICE.peer_id, now_ms=NOW)
    with pytest.raises(AnnouncementRejected) as info:
        table.offer(first, source_peer_id=ALICE.peer_id, now_ms=NOW + 1)  # replay
    assert info.value.reason == "stale"
    with pytest.raises(AnnouncementRejected):
        table.offer(encode_signed(ALICE, announcement(seq=4, issued=NOW + 5)), source_peer_id=None, now_ms=NOW + 5)
    table.offer(encode_signed(ALICE, announcement(seq=6, free=0)), source_peer_id=None, now_ms=NOW + 10)
    assert table.get(ALICE.peer_id, NOW + 10).seq == 6
    assert table.serving(DIGEST_A, NOW + 10) == []  # no free slots
    assert len(table.serving(DIGEST_A, NOW + 10, min_free_slots=0)) == 1


def test_table_expiry_and_lookup_by_digest() -> None:
    table = AnnouncementTable()
    table.offer(encode_signed(ALICE, announcement(free=1)), source_peer_id=None, now_ms=NOW)
    table.offer(encode_signed(BOB, announcement(BOB, free=3, ttl=120_000, models=(offer(DIGEST_A), offer(DIGEST_B)))),
                source_peer_id=None, now_ms=NOW)
    assert [s.peer_id for s in table.serving(DIGEST_A, NOW)] == [BOB.peer_id, ALICE.peer_id]  # most free first
    assert [s.peer_id for s in table.serving(DIGEST_B, NOW)] == [BOB.peer_id]
    assert [s.peer_id for s in table.serving(DIGEST_A, NOW, exclude=[BOB.peer_id])] == [ALICE.peer_id]
    assert table.expire(NOW + 60_000) == [ALICE.peer_id]
    assert ALICE.peer_id not in table and len(table) == 1
    # After expiry the old announcement is rejected as expired, not accepted again.
    with pytest.raises(AnnouncementRejected) as info:
        table.offer(encode_signed(ALICE, announcement(free=1)), source_peer_id=None, now_ms=NOW + 60_000)
    assert info.value.reason == "expired"


def test_table_is_bounded() -> None:
    table = AnnouncementTable(max_peers=3)
    ids = [Identity(bytes([i]) * 32) for i in range(1, 6)]
    for i, ident in enumerate(ids):
        table.offer(encode_signed(ident, announcement(ident, ttl=10_000 + i)), source_peer_id=None, now_ms=NOW)
    assert len(table) == 3
    assert {a.peer_id for a in table.live(NOW)} == {i.peer_id for i in ids[2:]}


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    with pytest.raises(AnnouncementRejected):
        verify_announcement(data, source_peer_id=None, now_ms=NOW)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=20))
def test_only_increasing_seqs_are_accepted(seqs: list[int]) -> None:
    table = AnnouncementTable()
    best = 0
    for seq in seqs:
        data = encode_signed(ALICE, announcement(seq=seq))
        if seq > best:
            table.offer(data, source_peer_id=None, now_ms=NOW)
            best = seq
        else:
            with pytest.raises(AnnouncementRejected):
                table.offer(data, source_peer_id=None, now_ms=NOW)
        assert table.last_seq(ALICE.peer_id) == best



@pytest.mark.parametrize("addr,why", [
    ("not a multiaddr", "not a multiaddr"),
    ("/ip4/0.0.0.0/tcp/4001", "wildcard"),
    ("/ip6/::/tcp/4001", "wildcard"),
    ("/ip4/10.0.0.1/tcp/0", "port 0"),
    ("/ip4/10.0.0.1", "not /ip4"),
    ("/unix/tmp/sock", "not /ip4"),
    ("/ip4/10.0.0.1/tcp/1/http", "unsupported"),
])
def test_undialable_addresses_are_rejected_at_the_validator(addr: str, why: str) -> None:
    bad = CapacityAnnouncement(**{**announcement().__dict__, "addrs": ("/ip4/127.0.0.1/tcp/4001", addr)})
    with pytest.raises(AnnouncementRejected) as info:
        verify_announcement(encode_signed(ALICE, bad), source_peer_id=None, now_ms=NOW)
    assert info.value.reason == "bad-addr" and why in info.value.detail


def test_slots_and_duplicate_models_are_checked() -> None:
    too_free = CapacityAnnouncement(**{**announcement().__dict__, "free_slots": 5, "total_slots": 4})
    assert reason_of(encode_signed(ALICE, too_free)) == "bad-slots"
    twice = announcement(models=(offer(DIGEST_A), offer(DIGEST_A, "again")))
    assert reason_of(encode_signed(ALICE, twice)) == "duplicate-model"


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_dialable_problem_never_raises(addr: str) -> None:
    from p2pinfer.net.addrs import dialable_problem, parse_dialable
    problem = dialable_problem(addr)
    assert problem is None or isinstance(problem, str)
    assert len(parse_dialable([addr])) == (1 if problem is None else 0)


def test_one_host_cannot_fill_the_table_with_keys() -> None:
    table = AnnouncementTable(max_per_host=3)
    sybils = [Identity.generate() for _ in range(5)]
    accepted = 0
    for sybil in sybils:
        data = encode_signed(sybil, announcement(sybil))
        try:
            table.offer(data, source_peer_id=None, now_ms=NOW)
            accepted += 1
        except AnnouncementRejected as exc:
            assert exc.reason == "host-quota"
    assert accepted == 3 and len(table) == 3
    # Another host is unaffected, and an expired announcement frees its slot.
    other = CapacityAnnouncement(**{**announcement(BOB).__dict__, "addrs": ("/ip4/127.0.0.2/tcp/4001",)})
    table.offer(encode_signed(BOB, other), source_peer_id=None, now_ms=NOW)
    late = encode_signed(sybils[4], announcement(sybils[4], issued=NOW + 61_000))
    table.offer(late, source_peer_id=None, now_ms=NOW + 61_000)
    assert sybils[4].peer_id in table and BOB.peer_id not in table  # BOB's expired too (same ttl)
