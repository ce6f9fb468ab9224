"""Canonical msgpack encoding and strict, bounded decoding.

Canonical form (see proto/README.md, "Encoding"):
  * integers in the smallest msgpack representation; floats always float64;
  * strings as msgpack str (valid UTF-8), byte strings as msgpack bin;
  * maps with string keys only, sorted by the keys' UTF-8 bytes;
  * no extension types (the timestamp extension included), no trailing bytes.

Decoding enforces a size limit, exact canonical form (re-encoding must give the same bytes, so one value
has exactly one encoding and hashes of payloads are stable), no extension types and bounded nesting.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import ExtensionTypeError, MalformedError, NestingError, NonCanonicalError, OversizedError

DEFAULT_MAX_SIZE = 1 << 20  # 1 MiB: the largest message we accept at all
DEFAULT_MAX_DEPTH = 8       # our deepest schema nests 4 levels

_PLAIN_SCALARS = (bool, int, float, str, bytes, type(None))


def _canonicalize(value: Any, depth: int = 0) -> Any:
    if depth > 64:
        raise NestingError("value nests too deeply to encode")
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"map keys must be str, got {type(key).__name__}")
            items.append((key.encode("utf-8"), key, _canonicalize(item, depth + 1)))
        items.sort(key=lambda t: t[0])
        return {key: item for _, key, item in items}
    if isinstance(value, (list, tuple)):
        return [_canonicalize(v, depth + 1) for v in value]
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, _PLAIN_SCALARS):
        return value
    raise TypeError(f"cannot encode {type(value).__name__} on the wire")


def encode(value: Any) -> bytes:
    """The canonical msgpack encoding of ``value`` (dicts, lists, str, bytes, int, float, bool, None)."""
    return msgpack.packb(_canonicalize(value), use_bin_type=True, use_single_float=False, datetime=False)


def _reject_ext(code: int, data: bytes) -> Any:
    raise ExtensionTypeError(f"msgpack extension type {code} is not allowed")


def _check_depth(value: Any, max_depth: int) -> None:
    # Iterative, so hostile input cannot exhaust the Python stack.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > max_depth:
                raise NestingError(f"nesting deeper than {max_depth} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif not isinstance(item, _PLAIN_SCALARS):
            raise ExtensionTypeError(f"{type(item).__name__} values are not allowed")


def decode(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Decode exactly one canonical msgpack value from ``data``, or raise a :class:`WireError` subclass."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_size:
        raise OversizedError(f"{len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise MalformedError("empty input")
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        use_list=True,
        ext_hook=_reject_ext,
        timestamp=0,
        max_buffer_size=max(len(data), 1),
        unicode_errors="strict",
    )
    unpacker.feed(data)
    try:
        value = unpacker.unpack()
    except msgpack.OutOfData:
        raise MalformedError("truncated msgpack") from None
    except ExtensionTypeError:
        raise
    except msgpack.StackError:
        raise NestingError("nesting exceeds the decoder's stack") from None
    except UnicodeDecodeError:
        raise MalformedError("string is not valid UTF-8") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # strict_map_key, reserved byte 0xc1, unhashable keys, ...
        raise MalformedError(f"invalid msgpack: {exc or type(exc).__name__}") from None
    if unpacker.tell() != len(data):
        raise MalformedError(f"{len(data) - unpacker.tell()} trailing bytes after the value")
    _check_depth(value, max_depth)
    if encode(value) != data:
        raise NonCanonicalError("not the canonical encoding (key order, integer width, float32 or str/bin)")
    return value
