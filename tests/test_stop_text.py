"""The stop-string hold-back rule (p2pinfer.runtime.stop_text), property-tested against a one-line reference."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pinfer.runtime.stop_text import StopText

ALPHABET = "ab\n"  # few letters, so stop strings occur often and overlap pieces
pieces = st.lists(st.text(ALPHABET, max_size=4), max_size=12)
stops = st.lists(st.text(ALPHABET, max_size=4), max_size=3)


def reference(text: str, stop: list[str]) -> tuple[str, bool]:
    """The whole text cut before the first occurrence of any stop string; whether one occurred."""
    hits = [p for p in (text.find(s) for s in stop if s) if p >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def run(parts: list[str], stop: list[str]) -> tuple[list[str], StopText, int | None]:
    """Push the pieces until a stop string; returns what each release gave, the state, the stopping piece."""
    held = StopText(stop)
    released = []
    for i, part in enumerate(parts):
        if held.push(part):
            released.append(held.release(final=True))
            return released, held, i
        released.append(held.release())
    released.append(held.release(final=True))
    return released, held, None


@given(pieces, stops)
def test_the_shown_text_is_the_whole_text_cut_at_the_first_stop_string_however_it_was_split(parts, stop):
    released, held, stopped_at = run(parts, stop)
    expected, stopped = reference("".join(parts), stop)
    assert "".join(released) == held.text == expected
    assert (stopped_at is not None) == stopped
    if stopped_at is not None:  # the piece that completes the first stop string ends the text
        assert reference("".join(parts[:stopped_at]), stop) == ("".join(parts[:stopped_at]), False)


@given(pieces, stops)
def test_released_text_is_never_taken_back_and_holds_back_only_what_a_stop_string_could_still_need(parts, stop):
    held = StopText(stop)
    reach = max((len(s) for s in stop if s), default=1) - 1
    shown = ""
    for part in parts:
        if held.push(part):
            break
        shown += held.release()
        assert held.text.startswith(shown)
        assert len(held.text) - len(shown) <= reach
        assert not any(s and s in shown for s in stop)
    final, _ = reference("".join(parts), stop)
    assert final.startswith(shown)


@given(pieces)
def test_without_stop_strings_every_piece_is_released_at_once(parts):
    held = StopText([""])  # empty stop strings are ignored
    for part in parts:
        assert held.push(part) is False
        assert held.release() == part


@given(st.text(ALPHABET, max_size=8), st.text(ALPHABET, max_size=8), stops)
def test_append_does_not_cut_and_cut_at_stop_finds_what_it_skipped(head, tail, stop):
    held = StopText(stop)
    held.append(head + tail)
    assert held.text == head + tail
    expected, stopped = reference(head + tail, stop)
    assert held.cut_at_stop() == stopped
    assert held.text == expected
