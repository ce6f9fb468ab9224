"""runtime/memory.py: pages of a mapped weights file that were only read are given back (and read back the same);
a mapping with a written page is never touched."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from p2pinfer.runtime.memory import drop_clean_file_pages, drop_read_only_mapped_pages, release_freed_memory

SIZE = 8 << 20


def resident_bytes(view: mmap.mmap | np.ndarray) -> int:
    """The Rss that /proc/self/smaps shows for the mapping holding ``view``'s first byte."""
    import ctypes

    if isinstance(view, np.ndarray):
        address = view.__array_interface__["data"][0]
    else:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if not head[0].endswith(":"):
                start, _, end = head[0].partition("-")
                inside = int(start, 16) <= address < int(end, 16)
            elif inside and head[0] == "Rss:":
                return int(head[1]) * 1024
    raise AssertionError("mapping not found")


def test_read_pages_are_dropped_and_read_back_unchanged(tmp_path: Path):
    path = tmp_path / "weights.data"
    content = os.urandom(SIZE)
    path.write_bytes(content)
    with open(path, "rb+") as f, mmap.mmap(f.fileno(), SIZE, access=mmap.ACCESS_COPY) as view:
        assert bytes(view) == content  # every page read, as onnxruntime's pre-packing does
        assert resident_bytes(view) >= SIZE
        assert drop_clean_file_pages([path]) >= SIZE
        assert resident_bytes(view) < SIZE // 8
        assert bytes(view) == content


def test_a_mapping_with_a_written_page_is_left_alone(tmp_path: Path):
    path = tmp_path / "weights.data"
    path.write_bytes(bytes(SIZE))
    with open(path, "rb+") as f, mmap.mmap(f.fileno(), SIZE, access=mmap.ACCESS_COPY) as view:
        view[:SIZE // 2] = b"\x01" * (SIZE // 2)  # private copies of half the pages: the file does not hold them
        assert drop_clean_file_pages([path]) == 0
        assert view[:SIZE // 2] == b"\x01" * (SIZE // 2) and view[SIZE // 2:] == bytes(SIZE // 2)
    assert path.read_bytes() == bytes(SIZE)


def test_nothing_to_drop_is_no_error(tmp_path: Path):
    assert drop_clean_file_pages([tmp_path / "missing"]) == 0
    assert drop_clean_file_pages([]) == 0
    release_freed_memory()


def test_a_read_only_memmap_block_is_dropped_and_read_back_unchanged(tmp_path: Path):
    """What the float64 reference does after each block of a mapped weight."""
    path = tmp_path / "weights.data"
    content = np.frombuffer(os.urandom(SIZE), dtype=np.float32).reshape(-1, 1024)
    content.tofile(path)
    weights = np.memmap(path, dtype=np.float32, mode="r", shape=content.shape)
    assert np.array_equal(weights.view(np.uint32), content.view(np.uint32))  # every page read (bits: NaNs too)
    assert resident_bytes(weights) >= SIZE
    half = weights[: len(weights) // 2]
    drop_read_only_mapped_pages(half)
    assert resident_bytes(weights) <= SIZE // 2 + mmap.PAGESIZE
    drop_read_only_mapped_pages(weights[len(weights) // 2:])
    assert resident_bytes(weights) < SIZE // 8
    assert np.array_equal(weights.view(np.uint32), content.view(np.uint32))


def test_a_writable_memmap_is_left_alone(tmp_path: Path):
    path = tmp_path / "weights.data"
    np.zeros(SIZE // 4, dtype=np.float32).tofile(path)
    weights = np.memmap(path, dtype=np.float32, mode="c")  # copy-on-write: written pages exist only here
    weights[:] = 1.0
    drop_read_only_mapped_pages(weights)
    assert np.all(weights == 1.0)
    drop_read_only_mapped_pages(np.ones(1024, dtype=np.float32))  # not a mapping: nothing to do
