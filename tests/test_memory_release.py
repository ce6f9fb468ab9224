"""runtime/memory.py: pages of a mapped weights file that were only read are given back (and read back the same);
a mapping with a written page is never touched."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from p2pinfer.runtime.memory import drop_clean_file_pages, drop_library_pages, drop_read_only_mapped_pages, \
    lazy_zeros, map_clean_file_pages_singly, release_freed_memory

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


def resident_pages(array: np.ndarray) -> int:
    """Pages under ``array`` that are in memory (``mincore``; the smaps of a small anonymous mapping include its
    neighbours, which the kernel merges into one mapping)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    address = array.__array_interface__["data"][0]
    start = address // mmap.PAGESIZE * mmap.PAGESIZE
    pages = -(-(address + array.nbytes - start) // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * mmap.PAGESIZE), vec) == 0
    return sum(v & 1 for v in vec)


def test_lazy_zeros_are_zero_apart_and_resident_only_where_written():
    shapes = [(1, 3, 256, 64)] * 4
    arrays = lazy_zeros(shapes, np.float32)
    assert [a.shape for a in arrays] == shapes and all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)
    assert sum(resident_pages(a) for a in arrays) == 0
    arrays[1][:, :, :16] = 1.5
    assert resident_pages(arrays[1]) == 3 * 16 * 64 * 4 // mmap.PAGESIZE  # its three heads' first 16 positions
    assert resident_pages(arrays[0]) == resident_pages(arrays[2]) == 0
    assert not arrays[0].any() and not arrays[2].any() and (arrays[1][:, :, :16] == 1.5).all()
    assert not arrays[1][:, :, 16:].any()


def test_mapped_weights_read_a_page_at_a_time_and_unchanged(tmp_path: Path):
    import ctypes

    """What the standard graph's embedding mapping gets: after map_clean_file_pages_singly, a read of one byte
    per MiB maps its page and at most the kernel's fault-around window (64 KB by default) of cached neighbours,
    never a large page-cache folio; every byte reads the same."""
    path = tmp_path / "weights.data"
    content = os.urandom(SIZE)
    path.write_bytes(content)  # a file just written: where the page cache holds large folios, it holds them now
    with open(path, "rb") as f, mmap.mmap(f.fileno(), SIZE, access=mmap.ACCESS_READ) as view:
        address = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
        array = np.ndarray((1,), np.uint8, buffer=(ctypes.c_ubyte * 1).from_address(address))  # its address only
        assert view[0] == content[0]
        assert map_clean_file_pages_singly([path]) == SIZE
        assert resident_bytes(array) == 0
        probes = range(0, SIZE, 1 << 20)
        assert all(view[i] == content[i] for i in probes)
        assert resident_bytes(array) <= len(probes) * (64 << 10)
        assert bytes(view) == content


def test_a_written_mapping_is_not_read_singly_nor_dropped(tmp_path: Path):
    path = tmp_path / "weights.data"
    path.write_bytes(bytes(SIZE))
    with open(path, "rb+") as f, mmap.mmap(f.fileno(), SIZE, access=mmap.ACCESS_COPY) as view:
        view[:4] = b"\x01\x02\x03\x04"
        assert map_clean_file_pages_singly([path]) == 0
        assert view[:4] == b"\x01\x02\x03\x04" and view[4:] == bytes(SIZE - 4)
    assert map_clean_file_pages_singly([tmp_path / "missing"]) == 0


def test_library_pages_are_dropped_and_the_libraries_still_run():
    import subprocess
    import sys

    # a fresh process: numpy's extension modules just imported, their code pages resident and clean
    code = ("import numpy as np\nfrom p2pinfer.runtime.memory import drop_library_pages\n"
            "dropped = drop_library_pages()\n"
            "assert float(np.linalg.norm(np.arange(12.0).reshape(3, 4) @ np.ones(4))) > 0\n"
            "print(dropped)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) > 1 << 20  # MB of numpy's, libpython's and the C library's pages
    assert drop_library_pages() >= 0  # in this process too (pytest's): nothing breaks
