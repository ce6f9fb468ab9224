"""The models on offer, aggregated from announcements, and "did you mean" (pure)."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, strategies as st

from p2pinfer.catalog import did_you_mean, models_on_offer


def announcement(models, free, total):
    return SimpleNamespace(models=[SimpleNamespace(name=n, digest=d) for n, d in models], free_slots=free,
                           total_slots=total)


def test_models_are_counted_once_per_peer_with_their_free_slots():
    a = announcement([("m", b"1"), ("m", b"1"), ("x", b"2")], 1, 2)
    b = announcement([("m", b"1")], 0, 4)
    rows = models_on_offer([a, b])
    assert [(r.name, r.peers, r.free_slots, r.total_slots) for r in rows] == [("m", 2, 1, 6), ("x", 1, 1, 2)]


@given(st.lists(st.tuples(st.sets(st.sampled_from([b"1", b"2", b"3"])), st.integers(0, 8)), max_size=12))
def test_every_serving_peer_is_counted_exactly_once(peers):
    anns = [announcement([(d.hex(), d) for d in digests], free, 8) for digests, free in peers]
    rows = {r.digest: r for r in models_on_offer(anns)}
    for digest in (b"1", b"2", b"3"):
        serving = [free for digests, free in peers if digest in digests]
        if not serving:
            assert digest not in rows
            continue
        assert rows[digest].peers == len(serving) and rows[digest].free_slots == sum(serving)


def test_did_you_mean():
    known = ["smollm2-135m-instruct", "tiny-llama-trained"]
    assert did_you_mean("tiny-llama-traned", known) == " (did you mean 'tiny-llama-trained'?)"
    assert did_you_mean("smollm2", known) == " (did you mean 'smollm2-135m-instruct'?)"
    assert did_you_mean("gpt-4", known) == ""
