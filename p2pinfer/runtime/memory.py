"""Handing memory a serving process no longer needs back to the operating system (Linux; no-ops elsewhere).

Two kinds of resident memory outlive their use in a process that runs onnxruntime:

* **freed heap.** glibc keeps pages that ``free`` returned (below its trim threshold, and in the per-thread
  arenas of onnxruntime's worker threads); a verification frees ~100 MB of logits and activations per chunk.
  :func:`release_freed_memory` (``malloc_trim``) returns them.
* **weight pages already copied.** onnxruntime maps external weights (``model.onnx.data``) into memory and, for
  the MatMul/Gemm/MatMulNBits weights, builds a pre-packed copy in its own memory at session creation,
  reading every page of the mapping. A weight that a ``Gather`` also reads (the embedding, tied to the LM
  head) keeps its mapping, so all its pages stay resident beside the packed copy although a token's
  embedding row is a few KB. :func:`drop_clean_file_pages` unmaps those pages from the process (they stay in
  the page cache, which the kernel reclaims as it needs); a later read faults the page back in from the file.
  :func:`drop_read_only_mapped_pages` does the same for one block of a read-only ``np.memmap`` (the float64
  reference reads a large weight a block at a time). :func:`map_clean_file_pages_singly` makes the rows read
  later (a token's embedding) map a page each rather than a large page-cache folio each.
* **library pages only imports read.** :func:`drop_library_pages` unmaps the shared libraries' clean pages;
  what runs again faults back in.

:func:`lazy_zeros` makes zeroed buffers whose pages become resident only as they are written (the in-place
KV cache of a verification).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

_MADV_RANDOM = 1  # <sys/mman.h> on Linux (every architecture Python runs on)
_MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once: ``find_library`` runs a subprocess (``ldconfig -p``) on every call, which
    cost more than the ``malloc_trim`` it was looked up for."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand memory freed by finished work (an import, calibration sessions, a verification's logits) back to
    the OS. glibc keeps freed heap pages; without this a peer that imported and calibrated its model at start
    keeps ~150 MB more resident for as long as it serves. A no-op where ``malloc_trim`` does not exist."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def drop_clean_file_pages(paths: Iterable[Path]) -> int:
    """Unmap the resident pages of every mapping of ``paths`` in this process that holds only clean file pages
    (no page of it was ever written, so the file has exactly its content); returns the bytes unmapped.

    A mapping with any private (written, copy-on-write) page is left alone: dropping would lose the writes.
    Reading a dropped page later faults it back in from the page cache or the file, with the same bytes."""
    files = set()
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue
        files.add((info.st_dev, info.st_ino))
    return _drop_regions(files)


def _drop_regions(files: set[tuple[int, int]]) -> int:
    """Unmap the resident pages of every clean mapping of the files (dev, inode); the bytes unmapped."""
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise") or not files:
        return 0
    try:
        regions = _clean_mappings(files)
    except OSError:
        return 0
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    dropped = 0
    for start, end, resident, _, _ in regions:
        if resident and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
            dropped += resident
    return dropped


def map_clean_file_pages_singly(paths: Iterable[Path]) -> int:
    """Make every later read of this process's clean mappings of ``paths`` map one page, not a large folio
    (returns the bytes of the mappings changed; 0 where nothing applies or the kernel lacks the calls).

    A read fault maps the whole page-cache folio holding the page, and the page cache holds large folios (up to
    2 MB on ext4 with kernel 6.x: a file just written, or read by ``read()`` or by readahead). The embedding's
    ``Gather`` reads a 2.3 KB row a token, and each row cost its folio: 25-50 MB of an fp32 model mapped by one
    request. So each mapping is dropped (:func:`drop_clean_file_pages`), marked ``MADV_RANDOM`` (a fault reads
    just its page: no readahead, whose folios are large) and its file range evicted from the page cache
    (``POSIX_FADV_DONTNEED``: only pages no process maps go, so another process's mapping is untouched). A row
    read later maps its own page and the page-cache neighbours within the kernel's fault-around window (64 KB):
    measured 300 random tokens 18.9 -> 2.1 MB the first time, and at most ~64 KB a token once the neighbours
    are cached, against whole folios before. Where another process later reads the file into large folios,
    those folios are mapped whole again, as before. A page evicted here is read from disk on its first use
    (~0.4 ms a page, once). Only reads change: no byte of any mapping can."""
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise") or not hasattr(os, "posix_fadvise"):
        return 0
    files: dict[tuple[int, int], Path] = {}
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue
        files[(info.st_dev, info.st_ino)] = Path(path)
    try:
        regions = _clean_mappings(set(files)) if files else []
    except OSError:
        return 0
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    ranges: dict[tuple[int, int], list[tuple[int, int]]] = {}  # file -> (offset, length) to evict
    for start, end, _, offset, key in regions:
        size = ctypes.c_size_t(end - start)
        if libc.madvise(ctypes.c_void_p(start), size, _MADV_DONTNEED) == 0 \
                and libc.madvise(ctypes.c_void_p(start), size, _MADV_RANDOM) == 0:
            ranges.setdefault(key, []).append((offset, end - start))
    changed = 0
    for key, spans in ranges.items():
        try:
            fd = os.open(files[key], os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)  # a dirty page (a model just imported) is not evicted
            for offset, length in spans:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
                changed += length
        except OSError:
            pass
        finally:
            os.close(fd)
    return changed


def drop_library_pages() -> int:
    """Unmap this process's resident pages of its shared libraries' clean mappings (their code and read-only
    data; returns the bytes unmapped). A page used again faults back in from the page cache, unchanged; a
    mapping with any written (copy-on-write) page is left alone, so no byte can change.

    What imports and session creation touched stays mapped for as long as the process runs: in a serving
    SmolLM2 process ~65 MB of library pages (onnxruntime's and the peer's imported extension modules: QUIC,
    TLS, DNS, onnx, cryptography), a read fault mapping the whole page-cache folio around the code it runs, of
    which serving and verifying read back ~6-27 MB. Costs one read of ``/proc/self/smaps`` (10-40 ms measured)."""
    libraries: set[tuple[int, int]] = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                head = line.split()
                if len(head) >= 6 and head[4] != "0" and _is_shared_object(head[5]):
                    libraries.add((_device(head[3]), int(head[4])))
    except OSError:
        return 0
    return _drop_regions(libraries)


def _is_shared_object(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".so") or ".so." in name


def lazy_zeros(shapes: Sequence[tuple[int, ...]], dtype: np.dtype | type) -> list[np.ndarray]:
    """Zeroed C-contiguous arrays of ``shapes`` in one private anonymous mapping whose pages become resident only
    when written (and go back to the OS when the last array is freed). ``np.zeros`` of a block glibc serves
    from its heap clears it whole: a verification's 60 KV buffers (26 MB at 557 SmolLM2 positions) were all
    resident before its first pass, which writes 173 positions of them."""
    dtype = np.dtype(dtype)
    sizes = [int(np.prod(shape)) * dtype.itemsize for shape in shapes]
    region = mmap.mmap(-1, max(1, sum(sizes)), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arrays, offset = [], 0
    for shape, size in zip(shapes, sizes):
        arrays.append(np.frombuffer(region, dtype=dtype, count=size // dtype.itemsize, offset=offset).reshape(shape))
        offset += size
    return arrays


def drop_read_only_mapped_pages(view: np.ndarray) -> None:
    """Drop this process's resident pages under ``view`` when it lies in a read-only file mapping
    (``np.memmap`` opened with mode ``"r"``): nothing can have written them, and a later read faults them back
    in from the page cache with the same bytes. Pages only partly under ``view`` are kept; any other array is
    left alone. The float64 reference reads a weight matrix once, a block at a time, and calls this after each
    block, so that the matrix is never resident whole in the process."""
    if not isinstance(view, np.memmap) or getattr(view, "mode", None) != "r" or not view.flags.c_contiguous:
        return
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return
    address = view.__array_interface__["data"][0]
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + view.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def _clean_mappings(files: set[tuple[int, int]]) -> list[tuple[int, int, int, int, tuple[int, int]]]:
    """(start, end, resident bytes, file offset, (dev, inode)) of each mapping of the files (dev, inode) with no
    anonymous (written) page."""
    found: list[tuple[int, int, int, int, tuple[int, int]]] = []
    current: list | None = None  # start, end, resident, anonymous, offset, (dev, inode)
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if not head:
                continue
            if not head[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
                if current is not None and current[3] == 0:
                    found.append((current[0], current[1], current[2], current[4], current[5]))
                current = None
                if len(head) >= 5 and head[4] != "0" and (_device(head[3]), int(head[4])) in files:
                    start, _, end = head[0].partition("-")
                    current = [int(start, 16), int(end, 16), 0, 0, int(head[2], 16), (_device(head[3]), int(head[4]))]
            elif current is not None and head[0] in ("Rss:", "Anonymous:"):
                current[2 if head[0] == "Rss:" else 3] = int(head[1]) * 1024
    if current is not None and current[3] == 0:
        found.append((current[0], current[1], current[2], current[4], current[5]))
    return [region for region in found if region[0] % mmap.PAGESIZE == 0]


def _device(text: str) -> int:
    major, _, minor = text.partition(":")
    try:
        return os.makedev(int(major, 16), int(minor, 16))
    except ValueError:
        return -1
