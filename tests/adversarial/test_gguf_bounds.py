"""Hostile GGUF files: small files whose headers declare absurd counts, lengths and shapes are refused with
our error before anything proportional to a declared size is allocated.

What a hostile file costs is measured in a process of its own (``gguf_target.py``), by the kernel's peak-RSS
counter reset before each read: the pytest process's RSS also moves with other tests' garbage and threads.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pinfer.gguf import GGUFImportError
from p2pinfer.gguf.bounds import (MAX_ARRAY_DEPTH, MAX_ARRAY_LENGTH, MAX_STRING_BYTES, MAX_TENSOR_ELEMENTS,
                                  GGUFBoundsError, check_gguf_header)
from p2pinfer.gguf.importer import import_gguf
from p2pinfer.gguf.reader import GGUFModel, read_llama_spec

from gguf_fixtures import TinyLlama, write_tiny_llama

U8, U32, F32, STRING, ARRAY = 0, 4, 6, 8, 9


def s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def kv(key: bytes, value_type: int, value: bytes) -> bytes:
    return s(key) + struct.pack("<I", value_type) + value


def gguf_bytes(kvs: list[bytes] = (), tensors: list[bytes] = (), *, kv_count: int | None = None,
               tensor_count: int | None = None, data: bytes = b"") -> bytes:
    head = struct.pack("<IIQQ", 0x46554747, 3, len(tensors) if tensor_count is None else tensor_count,
                       len(kvs) if kv_count is None else kv_count)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + bytes(-len(body) % 32) + data


def tensor(name: bytes, dims: list[int], ggml_type: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    return s(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims) + b"".join(
        struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset)


HOSTILE = {
    "array_of_2**62_bytes": gguf_bytes([kv(b"a", ARRAY, struct.pack("<IQ", U8, 1 << 62))]),
    "array_of_2**40_strings": gguf_bytes([kv(b"a", ARRAY, struct.pack("<IQ", STRING, 1 << 40))]),
    "array_longer_than_the_limit": gguf_bytes([kv(b"a", ARRAY, struct.pack("<IQ", U8, MAX_ARRAY_LENGTH + 1))]),
    "nested_arrays": gguf_bytes([kv(b"a", ARRAY, struct.pack("<IQ", ARRAY, 1) * (MAX_ARRAY_DEPTH + 1)
                                    + struct.pack("<IQ", U8, 0))]),
    "string_of_2**60_bytes": gguf_bytes([kv(b"k", STRING, struct.pack("<Q", 1 << 60) + b"abc")]),
    "key_of_2**63_bytes": gguf_bytes([struct.pack("<Q", 1 << 63) + b"x" * 8]),
    "string_longer_than_the_limit": gguf_bytes([kv(b"k", STRING, struct.pack("<Q", MAX_STRING_BYTES + 1))]),
    "2**40_metadata_entries": gguf_bytes(kv_count=1 << 40),
    "2**40_tensors": gguf_bytes(tensor_count=1 << 40),
    "2**31_dimensions": gguf_bytes(tensors=[tensor(b"t", [1], n_dims=1 << 31)]),
    "dimensions_overflowing_int64": gguf_bytes(tensors=[tensor(b"t", [1 << 32, 1 << 32], F32)]),
    "zero_dimension": gguf_bytes(tensors=[tensor(b"t", [0, 1 << 62], 0)]),
    "8_GiB_tensor_in_a_tiny_file": gguf_bytes(tensors=[tensor(b"t", [65536, 32768], 0)], data=bytes(64)),
    "too_many_elements": gguf_bytes(tensors=[tensor(b"t", [1 << 21, 1 << 21], 0)]),
    "data_past_the_end": gguf_bytes(tensors=[tensor(b"t", [8], 0, offset=1 << 40)], data=bytes(32)),
    "unknown_type": gguf_bytes(tensors=[tensor(b"t", [8], 999)], data=bytes(32)),
    "unknown_value_type": gguf_bytes([kv(b"k", 77, b"")]),
    "bad_alignment": gguf_bytes([kv(b"general.alignment", U32, struct.pack("<I", 3))]),
    "truncated": struct.pack("<IIQQ", 0x46554747, 3, 0, 1) + kv(b"k", U32, struct.pack("<I", 1))[:-2],
    "not_gguf": b"PK\x03\x04" + bytes(60),
}


MAX_READ_GROWTH = 32 << 20  # what refusing a hostile file may add to the reader's peak resident set
TARGET_SCRIPT = Path(__file__).with_name("gguf_target.py")


def read_in_own_process(*reads: tuple[str, Path]) -> dict[str, dict]:
    """``gguf_target.py``'s report for each (mode, path), by path: the error raised and the memory growth."""
    args = [f"{mode}:{path}" for mode, path in reads]
    # the reader is stopped at 4x the bound: a read without bounds grows until the machine's memory is gone
    done = subprocess.run([sys.executable, str(TARGET_SCRIPT), str(4 * MAX_READ_GROWTH), *args],
                          capture_output=True, text=True, timeout=600)  # generous: only a hung reader gets this far
    assert done.returncode == 0, (done.stdout[-1000:], done.stderr[-2000:])
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(reports) == len(args)
    return {r["path"]: r for r in reports}


@pytest.fixture(scope="module")
def hostile_reads(tmp_path_factory) -> dict[str, dict]:
    """Every hostile file read once, each measured alone, in one process for all of them."""
    folder = tmp_path_factory.mktemp("hostile")
    paths = {name: folder / f"{name}.gguf" for name in HOSTILE}
    for name, path in paths.items():
        path.write_bytes(HOSTILE[name])
    reports = read_in_own_process(*(("open", path) for path in paths.values()))
    return {name: reports[str(path)] for name, path in paths.items()}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_header_is_refused_with_our_error_and_small_memory(tmp_path, hostile_reads, name):
    report = hostile_reads[name]
    assert report["error"] is not None and report["error"]["type"] == "GGUFBoundsError", report
    assert report["peak_growth"] < MAX_READ_GROWTH, report
    message = report["error"]["message"]
    assert f"{name}.gguf" in message and "\n" not in message and len(message) < 400
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(HOSTILE[name])
    with pytest.raises(GGUFImportError):  # the importer refuses it the same way, leaving nothing behind
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_8_gib_tensor_names_its_size_and_the_file(tmp_path):
    with pytest.raises(GGUFBoundsError, match=r"tensor 't'.*outside the file"):
        check_gguf_header(HOSTILE["8_GiB_tensor_in_a_tiny_file"], "x.gguf")
    with pytest.raises(GGUFBoundsError, match=str(MAX_TENSOR_ELEMENTS)):
        check_gguf_header(HOSTILE["too_many_elements"], "x.gguf")


def test_a_real_file_passes_and_its_tensors_are_bounded_by_the_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, TinyLlama())
    model = GGUFModel(path)  # passes the bounds and reads as before
    spec = read_llama_spec(model)
    assert spec.n_layers >= 1


def test_a_block_count_beyond_the_tensors_is_refused_before_per_layer_work(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, TinyLlama())
    raw = bytearray(path.read_bytes())
    key = b"llama.block_count"
    at = raw.index(key) + len(key)
    assert struct.unpack_from("<I", raw, at)[0] == U32
    struct.pack_into("<I", raw, at + 4, 4_000_000_000)  # ~36 billion tensor names would be built
    path.write_bytes(bytes(raw))
    report = read_in_own_process(("spec", path))[str(path)]
    assert report["error"] is not None and report["error"]["ours"], report
    assert "block_count 4000000000" in report["error"]["message"]
    assert report["peak_growth"] < MAX_READ_GROWTH, report


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path, TinyLlama())
    return path.read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_corruption_of_a_real_header_is_read_or_refused_with_our_error(tmp_path_factory, tiny_gguf, data):
    raw = bytearray(tiny_gguf)
    header_end = min(len(raw), 4096)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, header_end - 8))
        raw[at:at + 8] = data.draw(st.binary(min_size=8, max_size=8))
    path = tmp_path_factory.getbasetemp() / "corrupt.gguf"
    path.write_bytes(bytes(raw))
    try:  # what passes the bounds is read without unbounded work; anything wrong is our error
        read_llama_spec(GGUFModel(path))
    except GGUFImportError:
        pass


def test_a_string_that_is_not_utf8_is_our_error(tmp_path, tiny_gguf):
    raw = bytearray(tiny_gguf)
    at = raw.index(b"{% for m in messages %}")  # the chat template's text
    raw[at + 3] = 0x81
    path = tmp_path / "bad-template.gguf"
    path.write_bytes(bytes(raw))
    with pytest.raises(GGUFImportError, match="not UTF-8"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 255)), min_size=1, max_size=3))
def test_any_corrupted_byte_imports_or_fails_with_our_error(tmp_path_factory, tiny_gguf, flips):
    raw = bytearray(tiny_gguf)
    for at, value in flips:
        raw[at % len(raw)] = value
    base = tmp_path_factory.getbasetemp()
    path = base / "flipped.gguf"
    path.write_bytes(bytes(raw))
    out = base / "flipped-out"
    try:  # only our error, whatever byte is wrong (bounds, metadata, tokenizer, tensors)
        import_gguf(path, out, overwrite=True)
    except GGUFImportError:
        pass
