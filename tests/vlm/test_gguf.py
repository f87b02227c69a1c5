"""vlm.gguf reader/writer: equality with gguf.GGUFReader on the real Gemma 3 file, round trips of every value and
ggml type, malformed-file errors (each with the message that names the problem), and `vlm inspect`."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFValue, GGUFValueType as VT
from gguf.constants import GGML_QUANT_SIZES

import real_models
from vlm_kernels.quant import GGMLType, QTensor
from vlm.gguf import (GGUFError, GGUFFile, GGUFFormatError, GGUFKeyError, GGUFUnsupportedError, StringArray,
                      write_gguf)

DEQUANT_ROWS = 48      # rows per tensor compared against gguf.quants (see test_real_dequant_matches_gguf_quants)
ALL_TYPES = sorted(GGML_QUANT_SIZES, key=int)


# ---- real file fixtures (one session-scoped file and one GGUFReader, ~12 s) ---------------------------------------
@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return real_models.gemma3_270m()      # builds models/gemma-3-270m-q4_k_m.gguf once, or skips with the reason


@pytest.fixture(scope="session")
def gemma(gemma_path):
    with GGUFFile(gemma_path) as f:
        yield f


@pytest.fixture(scope="session")
def gemma_reader(gemma_path):
    from gguf import GGUFReader
    return GGUFReader(gemma_path)


real = pytest.mark.xdist_group("gemma_gguf")   # keep the expensive GGUFReader on one worker


@real
def test_real_open_reads_table_and_vocab(gemma_path):
    """Behaviour only; the open time (target < 1.5 s on 2 cores) is measured by bench/bench_gguf_load.py."""
    with GGUFFile(gemma_path) as f:
        assert len(f.tensors) > 0 and len(f.get("tokenizer.ggml.tokens")) == 262144


@real
def test_real_metadata_matches_gguf_reader(gemma, gemma_reader):
    r = gemma_reader
    fields = {k: v for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert list(gemma.metadata) == list(fields)
    assert gemma.version == int(r.fields["GGUF.version"].contents())
    assert (gemma.alignment, gemma.data_offset) == (r.alignment, r.data_offset)
    for key, field in fields.items():
        ours = gemma.metadata[key]
        vtype, sub = gemma.value_type(key)
        assert vtype == field.types[0], key
        if vtype == VT.ARRAY:
            assert sub == field.types[-1], key
            ours = ours.tolist() if isinstance(ours, (np.ndarray, StringArray)) else ours
        assert ours == field.contents(), key
    assert gemma.arch == "gemma3" and gemma.arch_get("block_count") == 18
    assert isinstance(gemma.get("tokenizer.ggml.tokens"), StringArray)
    assert gemma.get("tokenizer.ggml.scores").dtype == np.float32


@real
def test_real_tensor_table_matches_gguf_reader(gemma, gemma_reader):
    theirs = gemma_reader.tensors
    assert list(gemma.tensors) == [t.name for t in theirs]
    for t in theirs:
        ours = gemma.tensors[t.name]
        assert ours.qtype == t.tensor_type, t.name
        assert ours.shape == tuple(reversed(t.shape.tolist())), t.name
        assert (ours.offset, ours.nbytes, ours.n_elements) == (t.data_offset, t.n_bytes, t.n_elements), t.name
        q = gemma.tensor(t.name)
        assert q.qtype == t.tensor_type and q.shape == ours.shape
        assert np.array_equal(q.data.numpy().reshape(-1), t.data.view(np.uint8).reshape(-1)), t.name


@real
def test_real_float_tensors_load_exactly(gemma, gemma_reader):
    for t in gemma_reader.tensors:
        if t.tensor_type == GGMLType.F32:
            expected = torch.from_numpy(np.array(t.data)).reshape(gemma.tensors[t.name].shape)
            assert torch.equal(gemma.load(t.name), expected), t.name


@real
def test_real_dequant_matches_gguf_quants(gemma):
    """vlm_kernels.quant.dequantize vs gguf.quants.dequantize of the same bytes, bit-exact, every tensor.

    Blocks never span rows, so rows are independent: DEQUANT_ROWS rows per tensor (first, last and random ones in
    between) cover every tensor and type without dequantizing token_embd's 168M weights twice in numpy (~10 s)."""
    from gguf.quants import dequantize as gguf_dequantize
    from vlm_kernels.quant import dequantize
    rng = np.random.default_rng(0)
    for name, info in gemma.tensors.items():
        q = gemma.tensor(name)
        n_rows = q.data.shape[0]
        rows = np.unique(np.concatenate([[0, n_rows - 1], rng.integers(0, n_rows, DEQUANT_ROWS - 2)]))
        data = q.data[torch.from_numpy(rows)]
        shape = (len(rows), info.shape[-1])
        theirs = gguf_dequantize(data.numpy(), info.qtype).reshape(shape)
        ours = dequantize(data, info.qtype, shape)
        assert ours.dtype == torch.float32 and tuple(ours.shape) == shape, name
        assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(theirs, dtype=np.float32))), name


@real
def test_real_file_rewrites_byte_identical(gemma, gemma_path, tmp_path):
    """typed_metadata() + every tensor's bytes through write_gguf reproduces llama.cpp's file exactly."""
    out = write_gguf(tmp_path / "copy.gguf", None, gemma.typed_metadata(),
                     {name: gemma.tensor(name) for name in gemma.tensors})
    assert out.stat().st_size == gemma_path.stat().st_size
    with open(out, "rb") as a, open(gemma_path, "rb") as b:
        while True:
            x, y = a.read(1 << 24), b.read(1 << 24)
            assert x == y
            if not x:
                break


# ---- round trips -------------------------------------------------------------------------------------------------
SCALARS = {
    "t.u8": (np.uint8(250), VT.UINT8), "t.i8": (np.int8(-7), VT.INT8), "t.u16": (np.uint16(65000), VT.UINT16),
    "t.i16": (np.int16(-300), VT.INT16), "t.u32": (np.uint32(4_000_000_000), VT.UINT32),
    "t.i32": (np.int32(-2_000_000_000), VT.INT32), "t.u64": (np.uint64(2**64 - 1), VT.UINT64),
    "t.i64": (np.int64(-2**63), VT.INT64), "t.f32": (np.float32(0.1), VT.FLOAT32),
    "t.f64": (np.float64(0.1), VT.FLOAT64), "t.bool": (np.bool_(True), VT.BOOL),
    "t.str": ("héllo ✓ 世界", VT.STRING), "t.empty_str": ("", VT.STRING),
    # plain Python values: the types llama.cpp expects
    "py.int": (7, VT.UINT32), "py.neg": (-7, VT.INT32), "py.big": (2**40, VT.UINT64), "py.float": (1e-6, VT.FLOAT32),
    "py.bool": (False, VT.BOOL),
}
NP_ARRAY_TYPES = {np.uint8: VT.UINT8, np.int8: VT.INT8, np.uint16: VT.UINT16, np.int16: VT.INT16,
                  np.uint32: VT.UINT32, np.int32: VT.INT32, np.uint64: VT.UINT64, np.int64: VT.INT64,
                  np.float32: VT.FLOAT32, np.float64: VT.FLOAT64, np.bool_: VT.BOOL}


def _array_values(n: int) -> dict:
    rng = np.random.default_rng(n)
    out = {}
    for dt, vt in NP_ARRAY_TYPES.items():
        if dt is np.bool_:
            a = rng.integers(0, 2, n).astype(np.bool_)
        elif np.issubdtype(dt, np.integer):
            info = np.iinfo(dt)
            a = rng.integers(info.min, info.max, n, dtype=dt, endpoint=True)
        else:
            a = rng.standard_normal(n).astype(dt)
        out[f"a{n}.{vt.name}"] = (a, vt)
    out[f"a{n}.str"] = ([f"t{i}-{'é' * (i % 3)}" if i % 7 else "" for i in range(n)], VT.STRING)
    return out


def _same(a, b) -> bool:
    a = a.tolist() if isinstance(a, (np.ndarray, StringArray)) else a
    b = b.tolist() if isinstance(b, (np.ndarray, StringArray)) else b
    if isinstance(a, np.generic):
        a = a.item()
    return a == b


@pytest.mark.parametrize("n", [3, 300])   # 300 > COMPACT_ARRAY_LEN: numpy arrays / StringArray path
def test_metadata_round_trip_every_type(tmp_path, n):
    values = {**SCALARS, **_array_values(n)}
    values["nested.int"] = ([[1, 2], [3], [4, 5, 6]], VT.ARRAY)
    values["nested.str"] = ([["a", "bc"], ["", "é"]], VT.ARRAY)
    values["py.ints"] = ([1, -2, 3], VT.ARRAY)
    values["py.floats"] = ([1, 2.5], VT.ARRAY)
    path = write_gguf(tmp_path / "m.gguf", "llama", {k: v for k, (v, _) in values.items()})
    with GGUFFile(path) as f:
        assert f.arch == "llama" and f.version == 3
        assert list(f.metadata) == ["general.architecture", *values]
        for key, (value, vtype) in values.items():
            got = f.get(key)
            if key.startswith("a"):                    # arrays of vtype
                assert f.value_type(key) == (VT.ARRAY, vtype), key
                assert isinstance(got, list) == (n <= 256), key
            else:
                assert f.value_type(key)[0] == vtype, key
            if isinstance(value, float) and vtype == VT.FLOAT32:
                value = float(np.float32(value))       # a Python float is stored as FLOAT32
            assert _same(value, got), key
        assert f.value_type("py.ints") == (VT.ARRAY, VT.INT32)
        assert f.value_type("py.floats") == (VT.ARRAY, VT.FLOAT32) and f.get("py.floats") == [1.0, 2.5]
        assert f.get("t.f32") == float(np.float32(0.1)) and f.get("t.f64") == 0.1
        # a second write from typed_metadata() is byte-identical, and so is gguf.GGUFWriter's own item-by-item
        # packing (write_gguf packs long arrays in bulk)
        typed = f.typed_metadata()
        again = write_gguf(tmp_path / "again.gguf", None, typed)
    assert again.read_bytes() == path.read_bytes()
    from gguf import GGUFWriter
    w = GGUFWriter(tmp_path / "plain.gguf", typed.pop("general.architecture").value)
    for k, v in typed.items():
        w.add_key_value(k, v.value, v.type, v.sub_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert (tmp_path / "plain.gguf").read_bytes() == path.read_bytes()


def _random_qtensor(qtype: GGMLType, shape, seed=0) -> QTensor:
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    data = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n_rows, shape[-1] // block * type_size),
                                                               dtype=np.uint8))
    return QTensor(data, qtype, shape)


@pytest.mark.parametrize("alignment", [32, 64])
def test_tensor_round_trip_every_ggml_type(tmp_path, alignment):
    tensors = {}
    for i, qt in enumerate(ALL_TYPES):
        block = GGML_QUANT_SIZES[qt][0]
        shape = [(3, 2 * block), (2 * block,), (2, 3, block), (2, 1, 2, block)][i % 4]
        tensors[f"t.{qt.name}"] = _random_qtensor(qt, shape, seed=i)
    path = write_gguf(tmp_path / "q.gguf", "test", {"x": 1}, tensors, alignment=alignment)
    from gguf import GGUFReader
    reader = GGUFReader(path)
    with GGUFFile(path) as f:
        assert f.alignment == alignment and f.data_offset % alignment == 0
        assert (f.get("general.alignment") is None) == (alignment == 32)
        assert list(f.tensors) == list(tensors)
        for (name, q), rt in zip(tensors.items(), reader.tensors):
            info = f.tensors[name]
            assert (info.qtype, info.shape, info.nbytes) == (q.qtype, q.shape, q.nbytes), name
            assert info.ggml_shape == tuple(rt.shape.tolist()) and info.offset == rt.data_offset
            assert info.offset % alignment == 0
            got = f.tensor(name)
            assert got.qtype == q.qtype and got.shape == q.shape
            assert torch.equal(got.data.reshape(-1), q.data.reshape(-1)), name


def test_float_tensors_keep_their_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    src = {
        "f32": (torch.randn(4, 8, generator=g), GGMLType.F32),
        "f16": (torch.randn(4, 8, generator=g).half(), GGMLType.F16),
        "bf16": (torch.randn(2, 3, 8, generator=g).bfloat16(), GGMLType.BF16),
        "np_f64": (np.arange(6, dtype=np.float64).reshape(2, 3), GGMLType.F64),
        "np_i32": (np.arange(-3, 3, dtype=np.int32), GGMLType.I32),
        "i8": (torch.arange(-4, 4, dtype=torch.int8), GGMLType.I8),
    }
    path = write_gguf(tmp_path / "f.gguf", "test", {}, {k: v for k, (v, _) in src.items()})
    with GGUFFile(path) as f:
        for name, (t, qtype) in src.items():
            t = torch.as_tensor(t)
            assert f.tensors[name].qtype == qtype and f.tensors[name].shape == tuple(t.shape)
            loaded = f.load(name, dtype=t.dtype)
            assert loaded.dtype == t.dtype and torch.equal(loaded, t), name
            assert torch.equal(f.load(name), t.float()), name     # default float32
            assert f.tensor(name).qtype == qtype


def test_api_access_and_zero_copy(tmp_path):
    w = torch.arange(64, dtype=torch.float32).reshape(2, 32)
    path = write_gguf(tmp_path / "a.gguf", "demo", {"demo.block_count": 3, "general.name": "x"},
                      {"w": w, "q": _random_qtensor(GGMLType.Q8_0, (2, 64))})
    f = GGUFFile(path)
    assert f.get("demo.block_count") == 3 and f.arch_get("block_count") == 3 and f.arch_get("nope", 5) == 5
    assert f.require("general.name") == "x" and f.get("missing") is None
    with pytest.raises(GGUFKeyError, match=r"missing metadata key 'demo\.nope' in .*a\.gguf"):
        f.arch_require("nope")
    with pytest.raises(KeyError):
        f.require("nope")
    with pytest.raises(GGUFKeyError, match=r"no tensor 'x' in .*a\.gguf \(2 tensors\)"):
        f.tensor("x")
    with pytest.raises(TypeError):
        f.metadata["general.name"] = "y"       # read-only mapping
    # zero copy: two views of the same tensor share the mapped memory; load() is a copy
    a, b = f.tensor("q"), f.tensor("q")
    assert a.data.data_ptr() == b.data.data_ptr() == f.raw("q").ctypes.data
    assert f.raw("q").ctypes.data - f.raw("w").ctypes.data == f.tensors["q"].offset - f.tensors["w"].offset
    loaded = f.load("w")
    loaded += 1
    assert torch.equal(f.load("w"), w)
    view = f.tensor("w")
    f.close()
    assert torch.equal(view.data.view(torch.float32).reshape(2, 32), w)   # views outlive close()
    with pytest.raises(GGUFError, match="closed"):
        f.tensor("w")
    with GGUFFile(path) as g:
        assert "GGUFFile(" in repr(g) and g.n_bytes == 2 * 32 * 4 + 2 * 34 * 2


def test_offsets_past_4gib_sparse_file(tmp_path):
    """A tensor whose data starts past 4 GiB (sparse file: no disk used) reads back; no 32-bit offset math."""
    rel = 5 << 30
    payload = bytes(range(32)) * 4                       # 128 bytes = 32 F32 values
    head = _gguf([_kv_u32("general.alignment", 32)], [_tinfo("big", (32,), GGMLType.F32, rel)])
    path = tmp_path / "sparse.gguf"
    with open(path, "wb") as fh:
        fh.write(head)
        fh.seek(len(head) + rel)
        fh.write(payload)
    if os.stat(path).st_blocks * 512 > 1 << 30:
        pytest.skip("filesystem has no sparse files")
    with GGUFFile(path) as f:
        info = f.tensors["big"]
        assert info.offset == len(head) + rel > 1 << 32
        assert f.raw("big").tobytes() == payload
    # the same header without the data: out of bounds, with the 64-bit offset in the message
    path.write_bytes(head + payload)
    with pytest.raises(GGUFFormatError, match=rf"tensor 'big'.*relative offset {rel}\).*out of bounds"):
        GGUFFile(path)


# ---- malformed files (hand-built bytes, independent of the code under test) ---------------------------------------
def _gstr(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype, payload: bytes) -> bytes:
    return _gstr(key) + struct.pack("<I", vtype) + payload


def _kv_u32(key, v) -> bytes:
    return _kv(key, VT.UINT32, struct.pack("<I", v))


def _tinfo(name, ne, ggml_type, offset, n_dims=None) -> bytes:
    """ne in ggml order."""
    return _gstr(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne) if n_dims is None else n_dims, *ne, ggml_type, offset)


def _gguf(kvs=(), tinfos=(), data=b"", *, version=3, magic=b"GGUF", n_kv=None, n_tensors=None, align=32,
          endian="<") -> bytes:
    head = magic + struct.pack(f"{endian}IQQ", version, len(tinfos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tinfos)
    return body + b"\0" * (-len(body) % align) + data


ARCH = _kv("general.architecture", VT.STRING, _gstr("llama"))
F32_4 = _tinfo("w", (4,), GGMLType.F32, 0)
BAD_FILES = {
    "empty": (b"", GGUFFormatError, r"truncated header: the file has 0 bytes"),
    "short": (b"GGUF\3\0\0\0", GGUFFormatError, r"truncated header: the file has 8 bytes"),
    "magic": (_gguf(magic=b"GGUG"), GGUFFormatError, r"bad magic b'GGUG' at offset 0"),
    "ggjt": (_gguf(magic=b"tjgg"), GGUFFormatError, r"legacy GGML/GGMF/GGJT"),
    "v1": (_gguf(version=1), GGUFUnsupportedError, r"GGUF version 1 is not supported"),
    "v4": (_gguf(version=4), GGUFUnsupportedError, r"unsupported GGUF version 4 at offset 4"),
    "big_endian": (_gguf([ARCH], endian=">"), GGUFUnsupportedError, r"big-endian GGUF files are not supported"),
    "kv_count": (_gguf([ARCH], n_kv=2**62), GGUFFormatError, r"metadata kv count 4611686018427387904 at offset 16 "
                                                             r"is impossible"),
    "tensor_count": (_gguf([ARCH], n_tensors=10**6), GGUFFormatError, r"tensor count 1000000 at offset 8 is "
                                                                      r"impossible"),
    "kv_truncated": (_gguf([ARCH])[:60], GGUFFormatError, r"truncated file: length of metadata key "
                                                          r"'general\.architecture' at offset 56 needs 8 bytes, the "
                                                          r"file ends at 60"),
    "key_length": (_gguf([struct.pack("<Q", 255) + b"k" + b"\0" * 16]), GGUFFormatError,
                   r"metadata key #0: string length 255 at offset 24 runs past the end of the file \(64 bytes\)"),
    "key_utf8": (_gguf([_kv(b"\xff\xfe", VT.UINT8, b"\1")]), GGUFFormatError, r"metadata key #0 at offset 24 is not "
                                                                               r"valid UTF-8"),
    "value_type": (_gguf([_kv("a.b", 13, b"\0" * 8)]), GGUFFormatError, r"metadata key 'a\.b': unknown value type "
                                                                         r"id 13 at offset 35"),
    "array_len": (_gguf([_kv("arr", VT.ARRAY, struct.pack("<IQ", VT.UINT32, 2**61))]), GGUFFormatError,
                  r"metadata key 'arr': UINT32 array length 2305843009213693952 at offset 43 is impossible"),
    "str_array_len": (_gguf([_kv("toks", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2**40))]), GGUFFormatError,
                      r"'toks': string array length 1099511627776 .* is impossible"),
    "str_array_item": (_gguf([_kv("toks", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2) + _gstr("a")
                                  + struct.pack("<Q", 1000) + b"xy")]),
                       GGUFFormatError, r"metadata key 'toks': string 1 of 2 \(length prefix at offset 61\) runs "
                                        r"past the end of the file"),
    "array_type": (_gguf([_kv("arr", VT.ARRAY, struct.pack("<IQ", 99, 1) + b"\0" * 8)]), GGUFFormatError,
                   r"items of metadata key 'arr': unknown value type id 99"),
    "nesting": (_gguf([_kv("deep", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1) * 9 + struct.pack("<IQ", VT.UINT8, 0))]),
                GGUFFormatError, r"nested deeper than 8 levels"),
    "dup_key": (_gguf([ARCH, ARCH]), GGUFFormatError, r"duplicate metadata key 'general\.architecture' at offset 69 "
                                                      r"\(first at offset 24\)"),
    "alignment_type": (_gguf([_kv("general.alignment", VT.UINT64, struct.pack("<Q", 32))]), GGUFFormatError,
                       r"'general\.alignment' has type UINT64, expected UINT32"),
    "alignment_value": (_gguf([_kv_u32("general.alignment", 48)], align=48), GGUFFormatError,
                        r"'general\.alignment' = 48 is not a power of two"),
    "ggml_type": (_gguf([], [_tinfo("w", (4,), 99, 0)], b"\0" * 16), GGUFFormatError,
                  r"tensor 'w': unknown ggml type id 99"),
    "removed_type": (_gguf([], [_tinfo("w", (32,), 4, 0)], b"\0" * 32), GGUFFormatError,
                     r"tensor 'w': unknown ggml type id 4"),
    "n_dims_0": (_gguf([], [_tinfo("w", (), GGMLType.F32, 0)]), GGUFFormatError, r"'w' .* has 0 dimensions"),
    "n_dims_5": (_gguf([], [_tinfo("w", (1, 1, 1, 1, 1), GGMLType.F32, 0)], b"\0" * 32), GGUFFormatError,
                 r"'w' .* has 5 dimensions \(must be 1\.\.4\)"),
    "dims_overflow": (_gguf([], [_tinfo("w", (2**32, 2**32), GGMLType.F32, 0)]), GGUFFormatError,
                      r"tensor 'w': dims \[4294967296, 4294967296\] overflow int64"),
    "block_multiple": (_gguf([], [_tinfo("w", (48, 2), GGMLType.Q4_0, 0)], b"\0" * 64), GGUFFormatError,
                       r"tensor 'w': Q4_0 row length ne0=48 \(n_elements 96\) is not a multiple of the block size "
                       r"32"),
    "out_of_bounds": (_gguf([], [F32_4], b"\0" * 8), GGUFFormatError,
                      r"tensor 'w': data \[\d+, \d+\) \(F32 \[4\], 16 bytes at relative offset 0\) is out of bounds"),
    "huge_offset": (_gguf([], [_tinfo("w", (4,), GGMLType.F32, 2**63)], b"\0" * 16), GGUFFormatError,
                    r"relative offset 9223372036854775808\) is out of bounds"),
    "misaligned": (_gguf([], [_tinfo("w", (4,), GGMLType.F32, 8)], b"\0" * 64), GGUFFormatError,
                   r"tensor 'w': data offset 8 is not a multiple of the alignment 32"),
    "dup_tensor": (_gguf([], [F32_4, F32_4], b"\0" * 64), GGUFFormatError, r"duplicate tensor name 'w' at offset 57 "
                                                                           r"\(first at offset 24\)"),
    "overlap": (_gguf([], [_tinfo("a", (16,), GGMLType.F32, 0), _tinfo("b", (4,), GGMLType.F32, 32)], b"\0" * 64),
                GGUFFormatError, r"tensor 'a' data \[\d+, \d+\) overlaps tensor 'b'"),
    "tinfo_truncated": (_gguf([], [F32_4])[:-20], GGUFFormatError, r"tensor count 1 at offset 8 is impossible"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_file_errors(tmp_path, case):
    data, exc, pattern = BAD_FILES[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(data)
    with pytest.raises(exc, match=pattern) as info:
        GGUFFile(path)
    assert str(path) in str(info.value)          # every message names the file


def test_version_2_file_reads(tmp_path):
    """v2 has the same layout as v3 (v3 only added big-endian files)."""
    data = np.arange(4, dtype=np.float32).tobytes()
    path = tmp_path / "v2.gguf"
    path.write_bytes(_gguf([ARCH], [F32_4], data, version=2))
    with GGUFFile(path) as f:
        assert f.version == 2 and f.arch == "llama"
        assert torch.equal(f.load("w"), torch.arange(4, dtype=torch.float32))


def test_string_array_invalid_utf8_is_lazy_and_named(tmp_path):
    items = b"".join(_gstr(f"t{i}") for i in range(299)) + _gstr(b"\xff")
    path = tmp_path / "utf8.gguf"
    path.write_bytes(_gguf([_kv("tokenizer.ggml.tokens", VT.ARRAY, struct.pack("<IQ", VT.STRING, 300) + items)]))
    with GGUFFile(path) as f:
        toks = f.get("tokenizer.ggml.tokens")
        assert len(toks) == 300 and toks[5] == "t5" and toks[-2] == "t298" and toks[1:3] == ["t1", "t2"]
        with pytest.raises(GGUFFormatError, match=r"'tokenizer\.ggml\.tokens': item 299 is not valid UTF-8"):
            toks.tolist()
        with pytest.raises(IndexError):
            toks[300]


def test_write_errors(tmp_path):
    p = tmp_path / "w.gguf"
    with pytest.raises(ValueError, match=r"metadata key 'e': gguf\.GGUFWriter cannot write an empty array"):
        write_gguf(p, "a", {"e": []})
    with pytest.raises(TypeError, match=r"metadata key 'm': array items must all be"):
        write_gguf(p, "a", {"m": [1, "x"]})
    with pytest.raises(OverflowError, match=r"metadata key 'u': GGUF UINT16 array items \[-1, 3\] do not fit"):
        write_gguf(p, "a", {"u": GGUFValue([-1, 3], VT.ARRAY, VT.UINT16)})
    with pytest.raises(TypeError, match=r"metadata key 'u': GGUF INT32 array items must be integers"):
        write_gguf(p, "a", {"u": GGUFValue([1.5], VT.ARRAY, VT.INT32)})
    with pytest.raises(struct.error, match=r"metadata key 's':"):
        write_gguf(p, "a", {"s": GGUFValue(-1, VT.UINT8)})
    with pytest.raises(ValueError, match=r"integer 36893488147419103232 does not fit in 64 bits"):
        write_gguf(p, "a", {"big": 2**65})
    with pytest.raises(ValueError, match=r"arch 'a' conflicts with metadata general\.architecture = 'b'"):
        write_gguf(p, "a", {"general.architecture": "b"})
    with pytest.raises(ValueError, match=r"alignment must be a power of two, got 48"):
        write_gguf(p, "a", {}, alignment=48)
    with pytest.raises(ValueError, match=r"tensor 's': GGUF tensors have 1\.\.4 dims, got shape \(\)"):
        write_gguf(p, "a", {}, {"s": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 1, 1, 1\)"):
        write_gguf(p, "a", {}, {"s": torch.zeros(1, 1, 1, 1, 1)})
    with pytest.raises(TypeError, match=r"tensor 'b': torch torch\.bool has no GGUF type"):
        write_gguf(p, "a", {}, {"b": torch.zeros(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"longer than 63 bytes"):
        write_gguf(p, "a", {}, {"x" * 64: torch.zeros(2)})
    assert not p.exists() and not list(tmp_path.glob(".*tmp"))   # nothing half-written


def test_alignment_from_metadata(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", "a", {"general.alignment": 64}, {"w": torch.zeros(3)})
    with GGUFFile(path) as f:
        assert f.alignment == 64 and f.value_type("general.alignment") == (VT.UINT32, None)
        assert f.tensors["w"].offset % 64 == 0
    with pytest.raises(ValueError, match=r"alignment 32 conflicts with metadata general\.alignment = 64"):
        write_gguf(tmp_path / "b.gguf", "a", {"general.alignment": 64}, alignment=32)
    gv = write_gguf(tmp_path / "c.gguf", "a", {"x": GGUFValue([1, 2], VT.ARRAY, VT.UINT16)})
    with GGUFFile(gv) as f:
        assert f.value_type("x") == (VT.ARRAY, VT.UINT16) and f.get("x") == [1, 2]


# ---- vlm inspect -------------------------------------------------------------------------------------------------
@pytest.fixture
def small_gguf(tmp_path):
    tensors = {"token_embd.weight": _random_qtensor(GGMLType.Q4_K, (4, 256)),
               "blk.0.attn_q.weight": _random_qtensor(GGMLType.Q4_K, (2, 256), seed=1),
               "output_norm.weight": torch.ones(256)}
    meta = {"llama.block_count": 1, "tokenizer.ggml.tokens": [f"tok{i}" for i in range(1000)],
            "general.name": "tiny", "tokenizer.chat_template": "{{ x }}" * 100}
    return write_gguf(tmp_path / "small.gguf", "llama", meta, tensors)


def _cli(argv, capsys):
    from vlm.cli import main
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_inspect_json(small_gguf, capsys):
    rc, out, err = _cli(["inspect", str(small_gguf), "--json"], capsys)
    assert rc == 0 and err == ""
    r = json.loads(out)
    assert r["architecture"] == "llama" and r["version"] == 3 and r["file_size"] == small_gguf.stat().st_size
    assert r["metadata"]["llama.block_count"] == {"type": "UINT32", "value": 1}
    toks = r["metadata"]["tokenizer.ggml.tokens"]
    assert toks["type"] == "ARRAY[STRING]" and toks["length"] == 1000 and toks["head"][:2] == ["tok0", "tok1"]
    assert "value" not in toks and len(toks["head"]) < 10
    assert [t["name"] for t in r["tensors"]] == ["token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"]
    assert r["tensors"][0] == {"name": "token_embd.weight", "type": "Q4_K", "shape": [4, 256], "bytes": 4 * 144,
                               "offset": r["data_offset"]}
    assert r["totals"] == {"Q4_K": {"count": 2, "n_elements": 6 * 256, "bytes": 6 * 144},
                           "F32": {"count": 1, "n_elements": 256, "bytes": 1024}}
    rc, out, _ = _cli(["inspect", str(small_gguf), "--json", "--no-tensors"], capsys)
    assert rc == 0 and "tensors" not in json.loads(out)


def test_inspect_text(small_gguf, capsys):
    rc, out, _ = _cli(["inspect", str(small_gguf)], capsys)
    assert rc == 0
    assert "architecture: llama" in out and "blk.0.attn_q.weight" in out and "2x256" in out
    assert "(1000 items)" in out and "tok999" not in out
    assert "... (702 chars)" in out                       # long strings are cut
    assert "Q4_K" in out and "totals by type" in out
    rc, out, _ = _cli(["inspect", str(small_gguf), "--no-tensors"], capsys)
    assert rc == 0 and "blk.0.attn_q.weight" not in out and "totals by type" in out


def test_inspect_broken_file_one_line_error(tmp_path, small_gguf, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(small_gguf.read_bytes()[:200])
    rc, out, err = _cli(["inspect", str(bad)], capsys)
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("vlm inspect: error: ")
    assert "string array length 1000 at offset" in err and str(bad) in err
    rc, _, err = _cli(["inspect", str(tmp_path / "missing.gguf")], capsys)
    assert rc == 1 and "No such file" in err


@real
def test_inspect_real_file(gemma_path, capsys):
    rc, out, _ = _cli(["inspect", str(gemma_path), "--json"], capsys)
    r = json.loads(out)
    assert rc == 0 and r["architecture"] == "gemma3" and r["n_tensors"] == len(r["tensors"]) == 236
    assert sum(d["bytes"] for d in r["totals"].values()) == sum(t["bytes"] for t in r["tensors"])
    assert r["metadata"]["tokenizer.ggml.tokens"]["length"] == 262144
