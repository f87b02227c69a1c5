"""Fast memory-mapped GGUF reader (:class:`GGUFFile`).

File layout (GGUF v2/v3, little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv      x  (string key, u32 value_type, value)            string = u64 byte length + UTF-8 bytes
    n_tensors x  (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment (default 32), then the data section; tensor offsets are relative to it.
    array value = u32 item_type, u64 count, items (nested arrays allowed).

Why not ``gguf.GGUFReader``: it builds numpy views item by item, ~12 s for a 262k-token vocabulary. Here string
arrays are walked in one tight loop over the mmap (only the u64 length prefixes are read) and kept as a compact
:class:`StringArray` that decodes on access; numeric arrays are one ``np.frombuffer``. Every count read from the file
is checked against the bytes left before anything is allocated from it, so a corrupt header fails fast with a
:class:`GGUFError` naming the file, byte offset and key or tensor.

Shapes: GGUF stores ``ne`` in ggml order (ne0 = contiguous dim first); :attr:`TensorInfo.shape` is torch order.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from gguf import GGUFValue, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT

from vlm_kernels.quant import GGMLType, QTensor
from vlm.gguf.errors import GGUFError, GGUFFormatError, GGUFKeyError, GGUFUnsupportedError

__all__ = ["GGUFFile", "TensorInfo", "StringArray"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
HEADER_BYTES = 24            # magic, version, n_tensors, n_kv
MAX_DIMS = 4                 # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8        # arrays of arrays of ...; real files use at most 1 level
COMPACT_ARRAY_LEN = 256      # arrays longer than this come back as numpy arrays / StringArray, shorter as lists
# Smallest possible encodings, used to reject counts that cannot fit in the bytes that are left.
_MIN_KV_BYTES = 8 + 4 + 1            # empty key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8   # empty name, n_dims, one dim, type, offset
_MIN_ARRAY_BYTES = 4 + 8             # nested array item: item type + count

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
VT = GGUFValueType
# value type -> (struct for a scalar, little-endian numpy dtype for arrays)
_SCALARS: dict[GGUFValueType, tuple[struct.Struct, np.dtype]] = {
    VT.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    VT.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    VT.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    VT.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    VT.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    VT.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    VT.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    VT.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    VT.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    VT.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
    VT.BOOL: (struct.Struct("<B"), np.dtype("<u1")),   # any non-zero byte is true (llama.cpp reads a C bool)
}
# ggml types whose bytes are plain little-endian numbers: load() views them directly
_PLAIN_TORCH = {
    GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16,
    GGMLType.F64: torch.float64, GGMLType.I8: torch.int8, GGMLType.I16: torch.int16,
    GGMLType.I32: torch.int32, GGMLType.I64: torch.int64,
}


class StringArray(Sequence[str]):
    """Compact, read-only list of strings from one GGUF string array (e.g. ``tokenizer.ggml.tokens``).

    Holds one ``bytes`` copy of the array's region plus int64 start/end offsets; items are decoded on access
    (``tolist()`` decodes all, once, and caches). Compares equal to any sequence with the same strings.
    """
    __slots__ = ("_blob", "_starts", "_ends", "_where", "_cache")

    def __init__(self, blob: bytes, starts: np.ndarray, ends: np.ndarray, where: str):
        self._blob, self._starts, self._ends, self._where = blob, starts, ends, where
        self._cache: list[str] | None = None

    def __len__(self) -> int:
        return len(self._starts)

    def _decode(self, i: int) -> str:
        try:
            return self._blob[int(self._starts[i]):int(self._ends[i])].decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{self._where}: item {i} is not valid UTF-8 ({e.reason})") from None

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if i < -n or i >= n:
            raise IndexError(f"StringArray index {i} out of range for length {n}")
        if self._cache is not None:
            return self._cache[i]
        return self._decode(i % n)

    def tolist(self) -> list[str]:
        if self._cache is None:
            blob = self._blob
            try:
                self._cache = [blob[s:e].decode("utf-8")
                               for s, e in zip(self._starts.tolist(), self._ends.tolist())]
            except UnicodeDecodeError:
                for i in range(len(self)):   # slow path only to name the bad item
                    self._decode(i)
                raise
        return list(self._cache)

    def __iter__(self) -> Iterator[str]:
        if self._cache is None:
            self.tolist()
        return iter(self._cache)

    def __eq__(self, other) -> bool:
        if isinstance(other, StringArray):
            return len(self) == len(other) and self.tolist() == other.tolist()
        if isinstance(other, (Sequence, np.ndarray)) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(self[i]) for i in range(min(3, len(self))))
        return f"StringArray(len={len(self)}, [{head}{', ...' if len(self) > 3 else ''}])"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor-table entry. ``shape`` is torch order (ggml ``ne`` reversed); ``offset`` is the absolute byte
    offset of the data in the file (data section start + the relative offset stored in the file)."""
    name: str
    qtype: GGMLType
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def ggml_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


class _Parser:
    """Header/metadata/tensor-table parser over a buffer. All offsets are Python ints (no 32-bit wrap)."""

    def __init__(self, buf, size: int, name: str):
        self.buf, self.size, self.name = buf, size, name
        self.metadata: dict[str, Any] = {}
        self.types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        self.key_offsets: dict[str, int] = {}

    # ---- primitives -------------------------------------------------------------------------------------------
    def fail(self, msg: str, cls=GGUFFormatError):
        raise cls(f"{self.name}: {msg}")

    def need(self, off: int, n: int, what: str) -> None:
        if off + n > self.size:
            self.fail(f"truncated file: {what} at offset {off} needs {n} bytes, the file ends at {self.size}")

    def u32(self, off: int, what: str) -> int:
        self.need(off, 4, what)
        return _U32.unpack_from(self.buf, off)[0]

    def u64(self, off: int, what: str) -> int:
        self.need(off, 8, what)
        return _U64.unpack_from(self.buf, off)[0]

    def string(self, off: int, what: str) -> tuple[str, int]:
        n = self.u64(off, f"length of {what}")
        start = off + 8
        if n > self.size - start:
            self.fail(f"{what}: string length {n} at offset {off} runs past the end of the file ({self.size} bytes)")
        try:
            return self.buf[start:start + n].decode("utf-8"), start + n
        except UnicodeDecodeError as e:
            self.fail(f"{what} at offset {off} is not valid UTF-8 ({e.reason})")

    def check_count(self, count: int, min_bytes: int, off: int, what: str, at: int) -> None:
        """Reject a count (read at offset `at`) whose items, starting at `off`, cannot fit in the rest of the file:
        checked before anything is allocated from it."""
        left = self.size - off
        if count * min_bytes > left:
            self.fail(f"{what} {count} at offset {at} is impossible: it needs at least {count * min_bytes} bytes, "
                      f"only {left} are left in the file")

    # ---- metadata ---------------------------------------------------------------------------------------------
    def value_type(self, off: int, where: str) -> GGUFValueType:
        raw = self.u32(off, f"value type of {where}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            self.fail(f"{where}: unknown value type id {raw} at offset {off}")

    def value(self, off: int, vtype: GGUFValueType, where: str, depth: int = 0) -> tuple[Any, int]:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            st = scalar[0]
            self.need(off, st.size, f"{vtype.name} value of {where}")
            v = st.unpack_from(self.buf, off)[0]
            return (v != 0 if vtype == VT.BOOL else v), off + st.size
        if vtype == VT.STRING:
            return self.string(off, where)
        return self.array(off, where, depth)[::2]  # (value, end)

    def array(self, off: int, where: str, depth: int) -> tuple[Any, GGUFValueType, int]:
        """-> (value, item type, end offset)."""
        if depth >= MAX_ARRAY_NESTING:
            self.fail(f"{where}: arrays nested deeper than {MAX_ARRAY_NESTING} levels at offset {off}")
        itype = self.value_type(off, f"items of {where}")
        n = self.u64(off + 4, f"item count of {where}")
        at, off = off + 4, off + 12
        scalar = _SCALARS.get(itype)
        if scalar is not None:
            dt = scalar[1]
            self.check_count(n, dt.itemsize, off, f"{where}: {itype.name} array length", at)
            arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=off).astype(dt.newbyteorder("="))
            if itype == VT.BOOL:
                arr = arr != 0
            arr.setflags(write=False)           # metadata is read-only, like the mapping that holds it
            end = off + n * dt.itemsize
            return (arr if n > COMPACT_ARRAY_LEN else arr.tolist()), itype, end
        if itype == VT.STRING:
            self.check_count(n, 8, off, f"{where}: string array length", at)
            return self.string_array(off, n, where)
        # array of arrays: rare (no llama.cpp model uses one), parsed item by item
        self.check_count(n, _MIN_ARRAY_BYTES, off, f"{where}: array-of-arrays length", at)
        items = []
        for i in range(n):
            v, off = self.value(off, VT.ARRAY, f"{where}[{i}]", depth + 1)
            items.append(v)
        return items, itype, off

    def string_array(self, off: int, n: int, where: str) -> tuple[Any, GGUFValueType, int]:
        # Hot loop (262k iterations for a Gemma vocabulary): read each u64 length prefix and jump over the bytes.
        # No bounds test inside the loop: unpack_from raises struct.error once pos passes the end, and the
        # final position is checked after the loop.
        buf, unpack = self.buf, _U64.unpack_from
        starts = [0] * n
        pos = off
        i = -1
        try:
            for i in range(n):
                pos += 8 + unpack(buf, pos)[0]
                starts[i] = pos
        except (struct.error, OverflowError):
            # either string i's length prefix is cut off, or string i-1's length jumped past the end
            if pos > self.size:
                i -= 1
            self.string_past_end(where, i, n, starts[i - 1] if i else off)
        if pos > self.size:
            self.string_past_end(where, n - 1, n, starts[n - 2] if n > 1 else off)
        # starts[] holds each string's END; each string begins 8 bytes after the previous end.
        ends = np.array(starts, dtype=np.int64) - off
        begins = np.empty_like(ends)
        if n:
            begins[0] = 8
            begins[1:] = ends[:-1] + 8
        sa = StringArray(bytes(self.buf[off:pos]), begins, ends, f"{self.name}: {where}")
        return (sa if n > COMPACT_ARRAY_LEN else sa.tolist()), VT.STRING, pos

    def string_past_end(self, where: str, i: int, n: int, prefix_off: int):
        self.fail(f"{where}: string {i} of {n} (length prefix at offset {prefix_off}) runs past the end of the file "
                  f"({self.size} bytes)")

    def parse_kv(self, off: int, n_kv: int) -> int:
        for i in range(n_kv):
            key_off = off
            key, off = self.string(off, f"metadata key #{i}")
            if key in self.metadata:
                self.fail(f"duplicate metadata key {key!r} at offset {key_off} "
                          f"(first at offset {self.key_offsets[key]})")
            vtype = self.value_type(off, f"metadata key {key!r}")
            off += 4
            where = f"metadata key {key!r}"
            if vtype == VT.ARRAY:
                value, sub, off = self.array(off, where, 0)
            else:
                value, off = self.value(off, vtype, where)
                sub = None
            self.metadata[key] = value
            self.types[key] = (vtype, sub)
            self.key_offsets[key] = key_off
        return off

    # ---- tensor table -----------------------------------------------------------------------------------------
    def parse_tensor_infos(self, off: int, n_tensors: int) -> tuple[list[tuple[str, GGMLType, tuple, int, int]], int]:
        infos, seen = [], {}
        for i in range(n_tensors):
            info_off = off
            name, off = self.string(off, f"name of tensor #{i}")
            if name in seen:
                self.fail(f"duplicate tensor name {name!r} at offset {info_off} (first at offset {seen[name]})")
            seen[name] = info_off
            n_dims = self.u32(off, f"n_dims of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                self.fail(f"tensor {name!r} at offset {info_off} has {n_dims} dimensions (must be 1..{MAX_DIMS})")
            off += 4
            self.need(off, 8 * n_dims + 12, f"dims/type/offset of tensor {name!r}")
            ne = struct.unpack_from(f"<{n_dims}Q", self.buf, off)
            off += 8 * n_dims
            raw_type, rel = struct.unpack_from("<IQ", self.buf, off)
            off += 12
            try:
                qtype = GGMLType(raw_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                self.fail(f"tensor {name!r}: unknown ggml type id {raw_type} (tensor info at offset {info_off})")
            n_elements = 1
            for d in ne:
                n_elements *= d
            if any(d >= 1 << 63 for d in ne) or n_elements >= 1 << 63:
                self.fail(f"tensor {name!r}: dims {list(ne)} overflow int64 (tensor info at offset {info_off})")
            if ne[0] % block:
                self.fail(f"tensor {name!r}: {qtype.name} row length ne0={ne[0]} (n_elements {n_elements}) is not a "
                          f"multiple of the block size {block}")
            infos.append((name, qtype, tuple(reversed(ne)), rel, n_elements // block * type_size))
        return infos, off

    def alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return GGUF_DEFAULT_ALIGNMENT
        vtype, _ = self.types["general.alignment"]
        a = self.metadata["general.alignment"]
        if vtype != VT.UINT32:
            self.fail(f"metadata key 'general.alignment' has type {vtype.name}, expected UINT32")
        if a == 0 or a & (a - 1):
            self.fail(f"metadata key 'general.alignment' = {a} is not a power of two")
        return a


def _open_buffer(path: Path, size: int):
    with open(path, "rb") as fh:
        try:
            # Copy-on-write private mapping: numpy/torch views are writable (torch.frombuffer warns on read-only
            # buffers) and a write into a view can never reach the file. Pages stay shared until written.
            return mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)
        except (OSError, ValueError, OverflowError):
            return mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)


class GGUFFile:
    """A memory-mapped GGUF file: metadata, tensor table and zero-copy tensor views.

    >>> with GGUFFile("model.gguf") as f:
    ...     n_layer = f.arch_get("block_count")
    ...     w = f.tensor("blk.0.attn_q.weight")       # QTensor over the mapped bytes
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        name = str(self.path)
        self.file_size = os.path.getsize(self.path)     # FileNotFoundError / IsADirectoryError pass through
        if self.file_size < HEADER_BYTES:
            raise GGUFFormatError(f"{name}: truncated header: the file has {self.file_size} bytes, "
                                  f"a GGUF header needs {HEADER_BYTES}")
        self._mm = _open_buffer(self.path, self.file_size)
        self._closed = False
        try:
            self._parse(_Parser(self._mm, self.file_size, name))
        except BaseException:
            self._mm.close()
            raise

    def _parse(self, p: _Parser) -> None:
        magic = bytes(self._mm[0:4])
        if magic != GGUF_MAGIC:
            hint = ""
            if magic in (b"lmgg", b"fmgg", b"tjgg"):
                hint = " (a legacy GGML/GGMF/GGJT file: re-convert it to GGUF)"
            p.fail(f"bad magic {magic!r} at offset 0, expected {GGUF_MAGIC!r}: not a GGUF file{hint}")
        version = p.u32(4, "version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
                p.fail("big-endian GGUF files are not supported (the version field reads "
                       f"{int.from_bytes(version.to_bytes(4, 'little'), 'big')} byte-swapped); convert it with "
                       "gguf's gguf_convert_endian.py", GGUFUnsupportedError)
            if version == 1:
                p.fail("GGUF version 1 is not supported (obsolete 32-bit lengths); re-convert the model with a "
                       "current llama.cpp", GGUFUnsupportedError)
            p.fail(f"unsupported GGUF version {version} at offset 4 (supported: "
                   f"{', '.join(map(str, SUPPORTED_VERSIONS))})", GGUFUnsupportedError)
        n_tensors, n_kv = p.u64(8, "tensor count"), p.u64(16, "metadata kv count")
        p.check_count(n_kv, _MIN_KV_BYTES, HEADER_BYTES, "metadata kv count", 16)
        p.check_count(n_tensors, _MIN_TENSOR_INFO_BYTES, HEADER_BYTES, "tensor count", 8)
        off = p.parse_kv(HEADER_BYTES, n_kv)
        p.check_count(n_tensors, _MIN_TENSOR_INFO_BYTES, off, "tensor count", 8)
        infos, off = p.parse_tensor_infos(off, n_tensors)
        alignment = p.alignment()
        data_offset = -(-off // alignment) * alignment

        tensors: dict[str, TensorInfo] = {}
        for name, qtype, shape, rel, nbytes in infos:
            if rel % alignment:
                p.fail(f"tensor {name!r}: data offset {rel} is not a multiple of the alignment {alignment}")
            start = data_offset + rel
            if start + nbytes > self.file_size:
                p.fail(f"tensor {name!r}: data [{start}, {start + nbytes}) ({qtype.name} {list(shape)}, {nbytes} "
                       f"bytes at relative offset {rel}) is out of bounds of the file ({self.file_size} bytes)")
            tensors[name] = TensorInfo(name, qtype, shape, start, nbytes)
        by_start = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.offset)
        for a, b in zip(by_start, by_start[1:]):
            if a.offset + a.nbytes > b.offset:
                p.fail(f"tensor {a.name!r} data [{a.offset}, {a.offset + a.nbytes}) overlaps tensor {b.name!r} "
                       f"at offset {b.offset}")

        self.version, self.alignment, self.data_offset = version, alignment, data_offset
        self._metadata, self._types = p.metadata, p.types
        self.metadata: Mapping[str, Any] = MappingProxyType(p.metadata)
        self._tensors = tensors
        self.tensors: Mapping[str, TensorInfo] = MappingProxyType(tensors)
        arch = p.metadata.get("general.architecture")
        self.arch: str | None = arch if isinstance(arch, str) else None

    # ---- metadata access --------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        return self._metadata.get(key, default)

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        """``get(f"{arch}.{suffix}")``, e.g. ``f.arch_get("block_count")``."""
        if self.arch is None:
            return default
        return self._metadata.get(f"{self.arch}.{suffix}", default)

    def require(self, key: str) -> Any:
        try:
            return self._metadata[key]
        except KeyError:
            raise GGUFKeyError(f"missing metadata key {key!r} in {self.path}") from None

    def arch_require(self, suffix: str) -> Any:
        if self.arch is None:
            raise GGUFKeyError(f"missing metadata key 'general.architecture' in {self.path}")
        return self.require(f"{self.arch}.{suffix}")

    def value_type(self, key: str) -> tuple[GGUFValueType, GGUFValueType | None]:
        """(value type, array item type or None) of a metadata key, as stored in the file."""
        self.require(key)
        return self._types[key]

    def typed_metadata(self) -> dict[str, GGUFValue]:
        """Metadata with the stored value types, ready for :func:`write_gguf` to re-write unchanged."""
        out = {}
        for k, v in self._metadata.items():
            t, sub = self._types[k]
            out[k] = GGUFValue(v.tolist() if isinstance(v, (np.ndarray, StringArray)) else v, t, sub)
        return out

    # ---- tensors ----------------------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise GGUFKeyError(f"no tensor {name!r} in {self.path} ({len(self._tensors)} tensors)") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a uint8 numpy view of the mapping (no copy)."""
        t = self.info(name)
        if self._closed:
            raise GGUFError(f"{self.path} is closed")
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def tensor(self, name: str) -> QTensor:
        """Zero-copy QTensor (uint8 [n_rows, row_bytes]) over the mapped bytes, any ggml type incl. F32/F16.

        The mapping is copy-on-write: writing into the view changes this process's pages, never the file."""
        t = self.info(name)
        return QTensor(torch.from_numpy(self.raw(name)), t.qtype, t.shape)

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A dequantized copy in `dtype`, shaped like ``info(name).shape``."""
        t = self.info(name)
        plain = _PLAIN_TORCH.get(t.qtype)
        if plain is not None:
            return torch.from_numpy(self.raw(name)).view(plain).reshape(t.shape).to(dtype, copy=True)
        return self.tensor(name).dequantize(dtype)

    @property
    def n_bytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    # ---- lifetime ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap the file. Tensor views still alive keep the mapping valid until they are freed."""
        if not self._closed:
            self._closed = True
            try:
                self._mm.close()
            except BufferError:   # exported views exist: the mapping goes away with the last of them
                pass

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, v{self.version}, arch={self.arch!r}, {len(self._metadata)} keys, "
                f"{len(self._tensors)} tensors)")

