"""Capacity-sync paging (pure): every page fits its frame, paging returns everything once, junk is refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.net.capacity_sync import (
    MAX_PAGE_ENTRIES,
    MAX_SYNC_FRAME,
    MAX_SYNC_PAGES,
    SyncPageError,
    build_sync_page,
    encode_sync_request,
    parse_sync_page,
    parse_sync_request,
)
from p2pinfer.wire import codec


def _page_through(entries: list[tuple[str, bytes]]) -> list[bytes]:
    got: list[bytes] = []
    cursor = ""
    for _ in range(MAX_SYNC_PAGES):
        reply = build_sync_page(entries, after=parse_sync_request(encode_sync_request(cursor)))
        assert len(reply) + 1 <= MAX_SYNC_FRAME  # + the response status byte
        envelopes, cursor = parse_sync_page(reply, after=cursor)
        got.extend(envelopes)
        if not cursor:
            return got
    raise AssertionError("paging did not finish")


def test_ninety_large_announcements_are_paged_to_fit_the_frame() -> None:
    # The reported failure: 90 announcements near the 16 KiB maximum made one 1.4 MB reply.
    entries = [(f"12D3KooW{i:04d}", bytes([i]) * 16_000) for i in range(90)]
    assert sorted(_page_through(entries)) == sorted(d for _, d in entries)


@given(st.dictionaries(st.text(min_size=1, max_size=20), st.integers(0, 16_000), max_size=400))
@settings(max_examples=40, deadline=None)
def test_paging_returns_every_announcement_exactly_once(sizes: dict[str, int]) -> None:
    entries = [(peer, peer.encode() + b"\x00" * size) for peer, size in sizes.items()]
    got = _page_through(entries)
    assert sorted(got) == sorted(d for _, d in entries)


@pytest.mark.parametrize("reply", [
    b"\xc1", codec.encode([b"old format"]), codec.encode({"envelopes": "x", "next": ""}),
    codec.encode({"envelopes": [b"a"] * (MAX_PAGE_ENTRIES + 1), "next": ""}),
    codec.encode({"envelopes": [1], "next": ""}), codec.encode({"envelopes": [], "next": 5}),
    codec.encode({"envelopes": [], "next": "a"}),  # does not move past the cursor "b"
    codec.encode({"envelopes": [b"\x00" * 20_000], "next": ""}),
])
def test_malformed_pages_are_refused(reply: bytes) -> None:
    with pytest.raises(SyncPageError):
        parse_sync_page(reply, after="b")


@given(st.binary(max_size=300))
def test_parsing_junk_raises_only_sync_page_error(junk: bytes) -> None:
    for parse in (lambda: parse_sync_page(junk, after=""), lambda: parse_sync_request(junk)):
        try:
            parse()
        except SyncPageError:
            pass
