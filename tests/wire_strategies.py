"""Hypothesis strategies derived from the wire schemas, so every message type is covered automatically."""

from __future__ import annotations

import math

from hypothesis import strategies as st

from p2pinfer.wire.schema import Bool, Bytes, Enum, Float, Int, List, Optional, Record, Spec, Str, Struct


def for_spec(s: Spec) -> st.SearchStrategy:
    if isinstance(s, Int):
        return st.integers(s.min, s.max)
    if isinstance(s, Float):
        lo = s.min if math.isfinite(s.min) else -1e12
        hi = s.max if math.isfinite(s.max) else 1e12
        return st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    if isinstance(s, Bool):
        return st.booleans()
    if isinstance(s, Bytes):
        return st.binary(min_size=s.min_len, max_size=min(s.max_len, 96))
    if isinstance(s, Str):
        # max_len counts UTF-8 bytes; 4 bytes per code point at most.
        return st.text(min_size=s.min_len, max_size=max(s.min_len, min(s.max_len // 4, 24))).filter(
            lambda t: s.min_len <= len(t.encode()) <= s.max_len
        )
    if isinstance(s, Enum):
        return st.sampled_from(s.values)
    if isinstance(s, Optional):
        return st.none() | for_spec(s.inner)
    if isinstance(s, List):
        return st.lists(for_spec(s.item), min_size=s.min_items, max_size=min(s.max_items, 4)).map(tuple)
    if isinstance(s, Struct):
        return for_record(s.cls)
    raise TypeError(f"no strategy for {s!r}")


def for_record(cls: type[Record]) -> st.SearchStrategy:
    return st.builds(cls, **{name: for_spec(s) for name, s in cls.wire_fields()})
