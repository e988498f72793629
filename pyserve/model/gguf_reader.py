"""GGUF container reader: header, typed metadata and tensor infos parsed in bulk from one read-only
mmap; tensor data handed out as zero-copy numpy views into that mmap.

Why not `gguf.GGUFReader`: it builds a numpy memmap slice for every part of every field (over a
million of them for a 49k-token vocabulary with its merges): ~4 s for the default model. Here
fixed-size arrays are one `np.frombuffer` each and string arrays one tight loop over the mapped
bytes: ~0.05 s. `gguf` is not imported at all unless a file holds a tensor type missing from the
table below. Little-endian files only (GGUF v2 and v3, what llama.cpp writes on every host we run).

Layout (ggml docs/gguf.md): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count; kv_count
times (string key, u32 value type, value); tensor_count times (string name, u32 n_dims,
u64 dims[n_dims], u32 ggml type, u64 offset into the data section); padding up to
`general.alignment` (default 32); the data section. A string is a u64 byte length + UTF-8 bytes; an
array is a u32 element type + u64 count + the elements.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from .errors import ModelLoadError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS


class ValueType(IntEnum):
    """Metadata value types (the numbers are the file's; same as gguf.GGUFValueType)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size value types: numpy dtype (little-endian) of one element.
_NUMERIC: dict[ValueType, np.dtype] = {
    ValueType.UINT8: np.dtype("<u1"),
    ValueType.INT8: np.dtype("<i1"),
    ValueType.UINT16: np.dtype("<u2"),
    ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"),
    ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"),
    ValueType.BOOL: np.dtype(np.bool_),
    ValueType.UINT64: np.dtype("<u8"),
    ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}
_SCALAR_STRUCTS: dict[ValueType, struct.Struct] = {
    t: struct.Struct(code)
    for t, code in (
        (ValueType.UINT8, "<B"), (ValueType.INT8, "<b"), (ValueType.UINT16, "<H"), (ValueType.INT16, "<h"),
        (ValueType.UINT32, "<I"), (ValueType.INT32, "<i"), (ValueType.FLOAT32, "<f"), (ValueType.BOOL, "<?"),
        (ValueType.UINT64, "<Q"), (ValueType.INT64, "<q"), (ValueType.FLOAT64, "<d"),
    )
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGMLType:
    """A tensor storage type: `block_size` elements take `type_size` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int


# ggml.h's types that llama-family checkpoints use (same numbers and sizes as gguf.GGML_QUANT_SIZES,
# pinned by a test); anything else is looked up in the `gguf` package.
GGML_TYPES: dict[int, GGMLType] = {
    t.id: t
    for t in (
        GGMLType(0, "F32", 1, 4),
        GGMLType(1, "F16", 1, 2),
        GGMLType(2, "Q4_0", 32, 18),
        GGMLType(3, "Q4_1", 32, 20),
        GGMLType(6, "Q5_0", 32, 22),
        GGMLType(7, "Q5_1", 32, 24),
        GGMLType(8, "Q8_0", 32, 34),
        GGMLType(9, "Q8_1", 32, 40),
        GGMLType(10, "Q2_K", 256, 84),
        GGMLType(11, "Q3_K", 256, 110),
        GGMLType(12, "Q4_K", 256, 144),
        GGMLType(13, "Q5_K", 256, 176),
        GGMLType(14, "Q6_K", 256, 210),
        GGMLType(15, "Q8_K", 256, 292),
        GGMLType(24, "I8", 1, 1),
        GGMLType(25, "I16", 1, 2),
        GGMLType(26, "I32", 1, 4),
        GGMLType(27, "I64", 1, 8),
        GGMLType(28, "F64", 1, 8),
        GGMLType(30, "BF16", 1, 2),
    )
}

# Element dtype of the unblocked types (BF16's bits ride in uint16: numpy has no bfloat16).
ELEMENT_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("<i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}


def ggml_type(type_id: int) -> GGMLType | None:
    """The storage type numbered `type_id`, None when neither our table nor `gguf` knows it."""
    known = GGML_TYPES.get(type_id)
    if known is not None:
        return known
    try:
        import gguf

        q = gguf.GGMLQuantizationType(type_id)
        block_size, type_size = gguf.GGML_QUANT_SIZES[q]
    except (ImportError, ValueError, KeyError):
        return None
    return GGMLType(type_id, q.name, int(block_size), int(type_size))


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLType
    dims: tuple[int, ...]  # GGUF order: dims[0] is the contiguous (innermost) axis
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major (numpy/PyTorch) shape: the dims reversed."""
        return self.dims[::-1]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (dims[0] elements): whole blocks, since dims[0] is a multiple of the block."""
        return self.dims[0] // self.type.block_size * self.type.type_size if self.dims else self.type.type_size


@dataclass
class GGUFFile:
    """A parsed GGUF file. Tensor views keep the mmap alive; nothing here copies tensor data."""

    path: str
    version: int
    metadata: dict[str, Any]  # key -> Python value (int, float, bool, str, or a list of them)
    types: dict[str, tuple[ValueType, ...]]  # key -> (type,) or (ARRAY, element type[, ...])
    tensors: dict[str, TensorInfo]  # in file order
    alignment: int
    data_offset: int
    file_size: int
    buffer: mmap.mmap = field(repr=False)

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes, flat: a read-only uint8 view into the mmap."""
        return np.frombuffer(self.buffer, dtype=np.uint8, count=t.n_bytes, offset=t.offset)

    def blocks(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as rows of blocks: uint8 view of shape shape[:-1] + (row_bytes,)."""
        return self.raw(t).reshape(t.shape[:-1] + (t.row_bytes,))

    def array(self, t: TensorInfo) -> np.ndarray:
        """An unblocked tensor (F32, F16, BF16 as uint16, F64, I8..I64) as a typed view of its shape."""
        dtype = ELEMENT_DTYPES.get(t.type.name)
        if dtype is None:
            raise ModelLoadError(f"{self.path}: tensor {t.name} is {t.type.name}, stored in blocks, not elements")
        return np.frombuffer(self.buffer, dtype=dtype, count=t.n_elements, offset=t.offset).reshape(t.shape)


class _Parser:
    """Sequential reads over the mapped header; every read checks the file's end first."""

    def __init__(self, buf: mmap.mmap, size: int, path: str) -> None:
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelLoadError(
                f"{self.path}: truncated or corrupt GGUF file: {what} at byte {self.pos} needs {n} bytes, "
                f"the file has {self.size}"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str) -> bytes:
        n = self.u64(what)
        self.need(n, what)
        s = self.buf[self.pos : self.pos + n]
        self.pos += n
        return s

    def name(self, what: str) -> str:
        """A key or tensor name: must be valid UTF-8."""
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelLoadError(f"{self.path}: {what} at byte {self.pos - len(raw)} is not UTF-8: {raw[:40]!r}") from e

    def value_type(self, what: str) -> ValueType:
        t = self.u32(what)
        try:
            return ValueType(t)
        except ValueError:
            raise ModelLoadError(f"{self.path}: {what} has unknown value type {t}") from None

    def value(self, vtype: ValueType, key: str) -> tuple[Any, tuple[ValueType, ...]]:
        if vtype == ValueType.STRING:
            return _decode(self.raw_string(f"metadata {key}"), key, self.path), (vtype,)
        if vtype == ValueType.ARRAY:
            return self.array(key)
        s = _SCALAR_STRUCTS[vtype]
        self.need(s.size, f"metadata {key}")
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v, (vtype,)

    def array(self, key: str) -> tuple[list, tuple[ValueType, ...]]:
        etype = self.value_type(f"metadata {key} (array element type)")
        n = self.u64(f"metadata {key} (array length)")
        if etype in _NUMERIC:
            dtype = _NUMERIC[etype]
            self.need(n * dtype.itemsize, f"metadata {key} ({n} {etype.name} values)")
            values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).tolist()
            self.pos += n * dtype.itemsize
            return values, (ValueType.ARRAY, etype)
        if etype == ValueType.STRING:
            self.need(8 * n, f"metadata {key} ({n} strings)")  # every string has at least its length
            return self.strings(n, key), (ValueType.ARRAY, etype)
        # Arrays of arrays: no known model writes them; read them the slow, general way.
        out, sub = [], (etype,)
        for _ in range(n):
            v, sub = self.value(etype, key)
            out.append(v)
        return out, (ValueType.ARRAY,) + sub

    def strings(self, n: int, key: str) -> list[str]:
        """n strings in one tight loop (the vocabulary: tens of thousands of them). Slices of the
        mmap stop at its end, so the bound is checked once, after the loop."""
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(n):
                (ln,) = unpack(buf, pos)
                pos += 8
                append(buf[pos : pos + ln].decode("utf-8"))
                pos += ln
        except (struct.error, OverflowError):  # a length past the end of the file
            pos = self.size + 1
        except UnicodeDecodeError:  # a bad token, or a string cut short by the end of the file
            return self.strings_checked(n, key)
        if pos > self.size:
            return self.strings_checked(n, key)
        self.pos = pos
        return out

    def strings_checked(self, n: int, key: str) -> list[str]:
        """The slow path of strings(): each string bound-checked, undecodable bytes replaced."""
        out = []
        for i in range(n):
            what = f"metadata {key}[{i}] (string {i + 1} of {n})"
            self.need(8, what)
            (ln,) = _U64.unpack_from(self.buf, self.pos)
            self.need(8 + ln, what)
            out.append(_decode(self.buf[self.pos + 8 : self.pos + 8 + ln], f"{key}[{i}]", self.path))
            self.pos += 8 + ln
        return out


def _decode(raw: bytes, where: str, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("%s: metadata %s is not valid UTF-8 (%r); undecodable bytes replaced", path, where, raw[:40])
        return raw.decode("utf-8", errors="replace")


def read_gguf_file(path: str) -> GGUFFile:
    """Parse `path`'s header, metadata and tensor infos; tensor data is mapped, not read."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4 or f.read(4) != GGUF_MAGIC:
                raise ModelLoadError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # keeps its own handle
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    p = _Parser(buf, size, path)
    p.pos = 4
    version = p.u32("version")
    if version & 0xFFFF == 0 and version != 0:
        raise ModelLoadError(
            f"{path} is a big-endian GGUF file; only little-endian GGUF files are supported "
            "(convert the model again on a little-endian machine)"
        )
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported; supported: {SUPPORTED_VERSIONS}")
    n_tensors = p.u64("tensor count")
    n_kv = p.u64("metadata count")

    metadata: dict[str, Any] = {}
    types: dict[str, tuple[ValueType, ...]] = {}
    for i in range(n_kv):
        key = p.name(f"metadata key {i}")
        if key in metadata:
            raise ModelLoadError(f"{path}: metadata key {key!r} appears twice")
        metadata[key], types[key] = p.value(p.value_type(f"metadata {key}"), key)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if types["general.alignment"] != (ValueType.UINT32,) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelLoadError(f"{path}: general.alignment must be a power of two stored as uint32, got {alignment!r}")

    infos: list[tuple[str, int, tuple[int, ...], int]] = []
    for i in range(n_tensors):
        name = p.name(f"tensor name {i}")
        n_dims = p.u32(f"tensor {name} dimension count")
        if n_dims > MAX_DIMS:
            raise ModelLoadError(f"{path}: tensor {name} has {n_dims} dimensions, at most {MAX_DIMS} allowed")
        p.need(8 * n_dims, f"tensor {name} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, p.pos)
        p.pos += 8 * n_dims
        infos.append((name, p.u32(f"tensor {name} type"), dims, p.u64(f"tensor {name} offset")))
    data_offset = -(-p.pos // alignment) * alignment

    tensors: dict[str, TensorInfo] = {}
    for name, type_id, dims, rel in infos:
        if name in tensors:
            raise ModelLoadError(f"{path}: tensor {name!r} appears twice")
        t = ggml_type(type_id)
        if t is None:
            raise ModelLoadError(f"{path}: tensor {name} has unknown GGML type {type_id}")
        if dims and dims[0] % t.block_size:
            raise ModelLoadError(f"{path}: tensor {name} rows of {dims[0]} are not whole {t.name} blocks of {t.block_size}")
        n = 1
        for d in dims:
            n *= d
        info = TensorInfo(name, t, tuple(dims), data_offset + rel, n // t.block_size * t.type_size)
        if info.offset + info.n_bytes > size:
            raise ModelLoadError(
                f"{path}: truncated GGUF file: tensor {name} ends at byte {info.offset + info.n_bytes}, "
                f"the file has {size}"
            )
        tensors[name] = info
    return GGUFFile(path, version, metadata, types, tensors, alignment, data_offset, size, buf)
