"""Canonical msgpack: round trips, determinism, and strict rejection of everything else."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.wire import codec
from p2pinfer.wire.errors import (
    ExtensionTypeError,
    MalformedError,
    NestingError,
    NonCanonicalError,
    OversizedError,
    WireError,
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _depth(value, level=1):
    if isinstance(value, list):
        return max([_depth(v, level + 1) for v in value], default=level)
    if isinstance(value, dict):
        return max([_depth(v, level + 1) for v in value.values()], default=level)
    return level


@given(values)
def test_round_trip(value):
    if _depth(value) > codec.DEFAULT_MAX_DEPTH:
        return
    encoded = codec.encode(value)
    assert codec.decode(encoded) == value
    assert codec.encode(codec.decode(encoded)) == encoded


@given(st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1), min_size=2, max_size=6), st.randoms())
def test_encoding_ignores_key_insertion_order(mapping, rnd):
    items = list(mapping.items())
    rnd.shuffle(items)
    assert codec.encode(dict(items)) == codec.encode(mapping)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_wire_errors(data):
    try:
        codec.decode(data)
    except WireError:
        pass


@given(values)
def test_every_truncation_is_rejected(value):
    encoded = codec.encode(value)
    for cut in range(len(encoded)):
        with pytest.raises(WireError):
            codec.decode(encoded[:cut])


def test_trailing_bytes_rejected():
    with pytest.raises(MalformedError, match="trailing"):
        codec.decode(codec.encode([1, 2]) + b"\x00")


def test_oversized_rejected_before_parsing():
    big = codec.encode(b"x" * 2000)
    with pytest.raises(OversizedError):
        codec.decode(big, max_size=1000)


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb(msgpack.ExtType(5, b"abc")),
        bytes.fromhex("d6ff00000001"),  # the timestamp extension (-1)
        msgpack.packb([1, msgpack.ExtType(1, b"")]),
    ],
)
def test_extension_types_rejected(data):
    with pytest.raises(ExtensionTypeError):
        codec.decode(data)


@pytest.mark.parametrize("depth", [codec.DEFAULT_MAX_DEPTH + 1, 100, 5000, 100_000])
def test_deep_nesting_rejected(depth):
    with pytest.raises(NestingError):
        codec.decode(b"\x91" * depth + b"\xc0")


def test_max_depth_accepted():
    data = b"\x91" * (codec.DEFAULT_MAX_DEPTH - 1) + b"\x90"
    assert codec.decode(data) is not None


@pytest.mark.parametrize(
    "data, why",
    [
        (bytes.fromhex("cc01"), "uint8 for a fixint"),
        (bytes.fromhex("ca3fc00000"), "float32"),
        (bytes.fromhex("82a16201a16102"), "unsorted keys"),
        (bytes.fromhex("d90161"), "str8 for a fixstr"),
        (msgpack.packb("x", use_bin_type=False), "same bytes as canonical"),
    ],
)
def test_non_canonical_rejected(data, why):
    if why == "same bytes as canonical":
        assert codec.decode(data) == "x"
        return
    with pytest.raises(NonCanonicalError):
        codec.decode(data)


def test_non_string_map_keys_rejected():
    with pytest.raises(MalformedError):
        codec.decode(msgpack.packb({1: 2}))


def test_invalid_utf8_rejected():
    with pytest.raises(MalformedError, match="UTF-8"):
        codec.decode(b"\xa2\xff\xfe")


def test_reserved_byte_rejected():
    with pytest.raises(MalformedError):
        codec.decode(b"\xc1")


def test_encode_refuses_non_wire_types():
    with pytest.raises(TypeError):
        codec.encode({"a": object()})
    with pytest.raises(TypeError):
        codec.encode({1: "a"})
