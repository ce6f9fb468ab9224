"""Bounds on what a GGUF file declares, checked before anything is read or allocated from it.

A GGUF header is a list of declared sizes: how many tensors and metadata entries follow, how long each
string and array is, each tensor's dimensions and where its data lies. The ``gguf`` package trusts them:
an array that declares 2**62 elements at the end of a 200-byte file makes its reader loop without end,
appending an empty view per element, until memory runs out. So the importer first walks the header here,
without keeping anything, and refuses a file whose declarations do not fit in it:

* counts (tensors, metadata entries, array elements) must fit in the bytes left in the file and stay
  under :data:`MAX_TENSORS`, :data:`MAX_METADATA`, :data:`MAX_ARRAY_LENGTH`;
* strings: at most :data:`MAX_STRING_BYTES` and within the file; arrays nest at most :data:`MAX_ARRAY_DEPTH`;
* tensors: 1 to 4 dimensions, each at least 1, at most :data:`MAX_TENSOR_ELEMENTS` elements, a known GGML
  type whose block size divides the row, and data that lies inside the file's data section.

After this check every size a reader derives from the file is bounded by the file's own length (a tensor
dequantized to float32 is at most ~8 times its bytes on disk). The walk costs one pass over the header
(the tokenizer's strings), no allocation proportional to any declared size.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import GGUFImportError

MAX_TENSORS = 1 << 16             # a 405B Llama has ~1,100 tensors
MAX_METADATA = 1 << 16            # real files have a few dozen entries
MAX_ARRAY_LENGTH = 1 << 24        # the largest vocabularies (and their merges) have ~10**6 entries
MAX_STRING_BYTES = 1 << 20        # chat templates, the longest strings in real files, are ~10**4 bytes
MAX_ARRAY_DEPTH = 2
MAX_TENSOR_DIMS = 4               # GGML_MAX_DIMS
MAX_TENSOR_ELEMENTS = 1 << 40     # 4 TiB as float32: far beyond any single weight matrix
DEFAULT_ALIGNMENT = 32

_MAGIC = 0x46554747               # "GGUF", little-endian
_VERSIONS = (2, 3)
_STRING, _ARRAY = 8, 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_UINT32 = 4


class GGUFBoundsError(GGUFImportError):
    """The GGUF header declares sizes the file cannot hold (corrupt, truncated or hostile)."""


class _Walker:
    def __init__(self, data: mmap.mmap | bytes, name: str) -> None:
        self.data = data
        self.size = len(data)
        self.name = name
        self.pos = 0

    def fail(self, what: str) -> GGUFBoundsError:
        return GGUFBoundsError(f"{self.name} is not a readable GGUF file: {what} (at byte {self.pos}); "
                               "the file is corrupt, truncated or not a GGUF model")

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, fmt: str) -> int:
        n = struct.calcsize(fmt)
        if n > self.left:
            raise self.fail("it ends inside its header")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return value

    def skip(self, n: int, what: str) -> None:
        if n > self.left:
            raise self.fail(f"{what} of {n} bytes runs past the end of the file ({self.left} bytes left)")
        self.pos += n

    def count(self, what: str, limit: int, min_item_bytes: int) -> int:
        n = self.take("<Q")
        if n > limit:
            raise self.fail(f"it declares {n} {what}, more than the {limit} allowed")
        if n * min_item_bytes > self.left:
            raise self.fail(f"it declares {n} {what}, which cannot fit in the {self.left} bytes left")
        return n

    def string(self, what: str) -> bytes:
        n = self.take("<Q")
        if n > MAX_STRING_BYTES:
            raise self.fail(f"{what} declares {n} bytes, more than the {MAX_STRING_BYTES} allowed")
        start = self.pos
        self.skip(n, what)
        return bytes(self.data[start:self.pos])

    def value(self, value_type: int, depth: int = 0) -> int | None:
        """Skip one value; returns it when it is a uint32 (what general.alignment needs)."""
        if value_type == _STRING:
            self.string("a string")
            return None
        if value_type == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
            item_type = self.take("<I")
            min_bytes = 8 if item_type in (_STRING, _ARRAY) else _SCALAR_SIZES.get(item_type, 0)
            if min_bytes == 0:
                raise self.fail(f"an array of unknown value type {item_type}")
            n = self.count("array elements", MAX_ARRAY_LENGTH, min_bytes)
            if item_type in _SCALAR_SIZES:
                self.skip(n * _SCALAR_SIZES[item_type], "an array")
            else:
                for _ in range(n):
                    self.value(item_type, depth + 1)
            return None
        size = _SCALAR_SIZES.get(value_type)
        if size is None:
            raise self.fail(f"a metadata value of unknown type {value_type}")
        if value_type == _UINT32:
            return self.take("<I")
        self.skip(size, "a value")
        return None


def check_gguf_bounds(path: str | Path) -> None:
    """Raise :class:`GGUFBoundsError` unless every size the header of ``path`` declares fits the file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if path.stat().st_size == 0:
                raise GGUFBoundsError(f"{path.name} is empty, not a GGUF model")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                check_gguf_header(data, path.name)
    except FileNotFoundError:
        raise GGUFImportError(f"GGUF file not found: {path}") from None
    except OSError as exc:
        raise GGUFImportError(f"cannot read {path}: {exc.strerror or exc}") from None


def check_gguf_header(data: mmap.mmap | bytes, name: str = "the file") -> None:
    """The checks of :func:`check_gguf_bounds` on the file's bytes (pure; a memory map is not copied)."""
    w = _Walker(data, name)
    if w.take("<I") != _MAGIC:
        raise w.fail("it does not start with the GGUF magic bytes")
    version = w.take("<I")
    if version not in _VERSIONS:
        raise w.fail(f"GGUF version {version} is not supported (versions {_VERSIONS[0]}-{_VERSIONS[-1]} are)")
    tensor_count = w.take("<Q")
    if tensor_count > MAX_TENSORS:
        raise w.fail(f"it declares {tensor_count} tensors, more than the {MAX_TENSORS} allowed")
    kv_count = w.count("metadata entries", MAX_METADATA, 8 + 4 + 1)
    alignment = DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key = w.string("a metadata key")
        value_type = w.take("<I")
        value = w.value(value_type)
        if key == b"general.alignment" and value is not None:
            alignment = value
    if alignment == 0 or alignment & (alignment - 1):
        raise w.fail(f"general.alignment {alignment} is not a power of two")
    if tensor_count * (8 + 4 + 8 + 4 + 8) > w.left:
        raise w.fail(f"it declares {tensor_count} tensors, which cannot fit in the {w.left} bytes left")
    tensors = []
    for _ in range(tensor_count):
        tensor_name = w.string("a tensor name")
        n_dims = w.take("<I")
        if not 1 <= n_dims <= MAX_TENSOR_DIMS:
            raise w.fail(f"tensor {_show(tensor_name)} declares {n_dims} dimensions (1 to {MAX_TENSOR_DIMS} allowed)")
        dims = [w.take("<Q") for _ in range(n_dims)]
        raw_type = w.take("<I")
        offset = w.take("<Q")
        tensors.append((tensor_name, dims, raw_type, offset))
    data_start = -(-w.pos // alignment) * alignment
    for tensor_name, dims, raw_type, offset in tensors:
        label = f"tensor {_show(tensor_name)}"
        elements = 1
        for d in dims:
            if d < 1:
                raise w.fail(f"{label} has a dimension of {d}")
            elements *= d  # Python integers: no overflow to hide a huge product
            if elements > MAX_TENSOR_ELEMENTS:
                raise w.fail(f"{label} declares more than {MAX_TENSOR_ELEMENTS} elements")
        try:
            block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise w.fail(f"{label} has unknown GGML type {raw_type}") from None
        if dims[0] % block:
            raise w.fail(f"{label}'s rows of {dims[0]} are not a multiple of its type's block of {block}")
        end = data_start + offset + elements // block * type_bytes
        if offset % alignment or end > w.size:
            raise w.fail(f"{label}'s data ({elements // block * type_bytes} bytes at offset {offset}) lies outside "
                         f"the file's {max(w.size - data_start, 0)}-byte data section")


def _show(name: bytes) -> str:
    return repr(name[:64].decode("utf-8", "replace"))
