"""GGUF quant formats (vlm_kernels/quant.py): dequantize / quantize against the upstream oracles.

Oracles
- dequantize (all types) and quantize of F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: `gguf.quants` (numpy), compared
  bit for bit / byte for byte.
- quantize of Q2_K..Q6_K: gguf-py has no K-quant quantizer, so tests/data/kquant_vectors.npz holds the bytes of
  llama.cpp's reference quantizers. How it was made: quantize_row_q{2,3,4,5,6}_K_ref and the helpers they call
  (nearest_int, make_qkx2_quants, make_q3_quants, make_qx_quants, get_scale_min_k4) from
  ggml/src/ggml-quants.c (llama.cpp commit 01243c5), plus the block structs of ggml-common.h, were compiled
  outside this repo with `cc -O0 -ffp-contract=off -shared` (no FMA contraction: every float op rounds on its
  own) and called through ctypes on the 24 seeded rows stored as `x` (numpy default_rng(20240521): 8 N(0,1)
  rows and edge rows named in `labels`: zeros, constants, x1e5 / x1e7 / x1e-6 / x1e-30 magnitudes, one outlier,
  all-positive, all-negative, near-constant, sparse, zeroed sub-blocks, integers, heavy tail, per-sub-block
  scales). The same harness also matched our output on ~5,000 further random rows per type before the file was
  written. llama.cpp's own builds may contract to FMA on some CPUs; byte equality is with the uncontracted C.
"""

import numpy as np
import pytest
import torch
from gguf import quants as gq

from paths import DATA
from vlm_kernels.quant import (QUANTIZE_TYPES, SUPPORTED_TYPES, GGMLType, QTensor, block_info, dequantize, quantize,
                           row_bytes)

VECTORS = DATA / "kquant_vectors.npz"
K_TYPES = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
LEGACY = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0)
FLOATS = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)

# One table for this module. Oracle comparisons are exact; the round-trip rows bound quantization error itself.
TOL = {
    "dequantize vs gguf.quants": "bit-exact (NaN where the oracle has NaN, identical bits elsewhere)",
    "quantize vs gguf.quants / llama.cpp ref": "byte-exact",
    # per element, |x - dq| <= 0.5*|d| + (max|q|*|d| + |m|) * 2^-10: half a step, plus the fp16 rounding of d/m
    # (a whole step for the clipped end of Q4_0/Q5_0, see test_round_trip_error)
    "legacy round trip": "half step + fp16 scale rounding",
    # relative RMSE ||dq - x|| / ||x|| on N(0, 1) data, measured (64x1024, 3 seeds/scales): F16 2e-4,
    # BF16 1.7e-3, Q4_0 .086, Q4_1 .079, Q5_0 .043, Q5_1 .038, Q8_0 .0054, Q2_K .297, Q3_K .151, Q4_K .0715,
    # Q5_K .036, Q6_K .0177 (the usual llama.cpp figures); the bounds leave ~15% headroom.
    "round trip rel rmse": {GGMLType.F32: 0.0, GGMLType.F16: 3e-4, GGMLType.BF16: 2.5e-3, GGMLType.Q4_0: 0.10,
                            GGMLType.Q4_1: 0.09, GGMLType.Q5_0: 0.05, GGMLType.Q5_1: 0.045, GGMLType.Q8_0: 0.007,
                            GGMLType.Q2_K: 0.34, GGMLType.Q3_K: 0.175, GGMLType.Q4_K: 0.083,
                            GGMLType.Q5_K: 0.042, GGMLType.Q6_K: 0.021},
}

# Byte offsets of the fp16 scale fields in one block (ggml-common.h), to plant special values there.
F16_FIELDS = {GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
              GGMLType.Q8_0: (0,), GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2),
              GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,), GGMLType.IQ4_NL: (0,), GGMLType.IQ4_XS: (0,)}
# fp16 bit patterns: min/max subnormal (+/-), +/-inf, quiet/signalling NaN, +/-0, 1.0, max normal, a normal.
F16_SPECIAL = np.array([0x0001, 0x03FF, 0x8001, 0x83FF, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE00, 0x0000, 0x8000,
                        0x3C00, 0x7BFF, 0x1234], dtype=np.uint16)


def _random_blocks(qtype, n_blocks, rng, special_frac=0.5):
    """Random bytes; fp16 scale fields overwritten by a mix of special (subnormal/inf/NaN/0) and normal values."""
    _, ts = block_info(qtype)
    raw = rng.integers(0, 256, (n_blocks, ts), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        field = raw[:, off:off + 2].copy().view(np.uint16)[:, 0]
        pick = rng.random(n_blocks) < special_frac
        field[pick] = rng.choice(F16_SPECIAL, int(pick.sum()))
        normal = ~pick & (rng.random(n_blocks) < 0.5)  # keep half of the rest finite and moderate
        field[normal] = rng.integers(0x1000, 0x5000, int(normal.sum()))
        raw[:, off:off + 2] = field.view(np.uint8).reshape(-1, 2)
    return raw


def _oracle(raw, qtype):
    with np.errstate(all="ignore"):
        return gq.dequantize(raw, qtype)


def _assert_same_bits(ours: torch.Tensor, ref: np.ndarray):
    ours = ours.detach().cpu().numpy()
    assert ours.dtype == np.float32 and ref.dtype == np.float32 and ours.shape == ref.shape
    nan_o, nan_r = np.isnan(ours), np.isnan(ref)
    assert np.array_equal(nan_o, nan_r), f"NaN positions differ at {np.argwhere(nan_o != nan_r)[:5].tolist()}"
    diff = ours[~nan_o].view(np.uint32) != ref[~nan_r].view(np.uint32)
    assert not diff.any(), (f"{diff.sum()} values differ, e.g. ours {ours[~nan_o][diff][:4]} vs "
                            f"gguf {ref[~nan_r][diff][:4]}")


# ----------------------------------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    bs, _ = block_info(qtype)
    raw = _random_blocks(qtype, 3 * 41, rng).reshape(3, -1)  # 3 rows of 41 blocks
    ours = dequantize(torch.from_numpy(raw), qtype, (3, 41 * bs))
    _assert_same_bits(ours, _oracle(raw, qtype))


@pytest.mark.parametrize("qtype", sorted(F16_FIELDS, key=int), ids=lambda t: t.name)
def test_dequantize_edge_blocks(qtype):
    """Hand-made blocks: every non-scale byte 0x00 / 0xFF / 0x88 / 0x77 / 0x0F / 0xF0, crossed with each special
    fp16 scale value in every scale field (0 * inf -> NaN, subnormal * code, -0 ...)."""
    _, ts = block_info(qtype)
    fields = F16_FIELDS[qtype]
    blocks = []
    for fill in (0x00, 0xFF, 0x88, 0x77, 0x0F, 0xF0):
        for a in F16_SPECIAL:
            for b in (F16_SPECIAL[:1] if len(fields) == 1 else (0x3C00, 0x7C00, 0x0001, 0xFE00)):
                blk = np.full(ts, fill, dtype=np.uint8)
                for off, val in zip(fields, (a, b)):
                    blk[off:off + 2] = np.array([val], dtype=np.uint16).view(np.uint8)
                blocks.append(blk)
    raw = np.stack(blocks)
    bs, _ = block_info(qtype)
    _assert_same_bits(dequantize(torch.from_numpy(raw), qtype, (len(raw), bs)), _oracle(raw, qtype))


@pytest.mark.parametrize("qtype", (GGMLType.Q4_0, GGMLType.Q6_K, GGMLType.IQ4_XS, GGMLType.BF16),
                         ids=lambda t: t.name)
@pytest.mark.parametrize("shape_blocks", [(5,), (3, 2), (2, 3, 2)], ids=["1d", "2d", "3d"])
def test_dequantize_shapes(qtype, shape_blocks):
    bs, _ = block_info(qtype)
    shape = (*shape_blocks[:-1], shape_blocks[-1] * bs)
    n_blocks = int(np.prod(shape_blocks))
    raw = _random_blocks(qtype, n_blocks, np.random.default_rng(7), special_frac=0.2)
    ref = _oracle(raw.reshape(*shape_blocks[:-1], -1), qtype)
    for data in (torch.from_numpy(raw.reshape(-1)), torch.from_numpy(raw.reshape(-1, raw.shape[-1]))):
        ours = dequantize(data, qtype, shape)
        assert ours.shape == shape
        _assert_same_bits(ours, ref)


def test_dequantize_large_tensor_chunked_path():
    """More blocks than one CPU chunk (the result is assembled from several), still bit-exact."""
    qtype = GGMLType.Q4_0
    raw = _random_blocks(qtype, 40_000, np.random.default_rng(3), special_frac=0.05).reshape(100, -1)
    _assert_same_bits(dequantize(torch.from_numpy(raw), qtype, (100, 400 * 32)), _oracle(raw, qtype))


def test_dequantize_into_out_buffer():
    qtype = GGMLType.Q6_K
    raw = torch.from_numpy(_random_blocks(qtype, 12, np.random.default_rng(9), special_frac=0.3).reshape(3, -1))
    buf = torch.full((3, 4 * 256), 123.0)
    res = dequantize(raw, qtype, (3, 4 * 256), out=buf)
    assert res.data_ptr() == buf.data_ptr()
    _assert_same_bits(buf, _oracle(raw.numpy(), qtype))
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 tensor of 3072 elements"):
        dequantize(raw, qtype, (3, 4 * 256), out=torch.empty(3, 1024, dtype=torch.float16))


# --------------------------------------------------------------------------------------------------- QTensor
def test_qtensor_from_numpy_is_a_view_and_dequantizes():
    x = torch.randn(6, 512)
    qt = quantize(x, GGMLType.Q4_K)
    arr = qt.data.numpy().copy()
    arr.flags.writeable = False  # like a GGUFReader memmap
    view = QTensor.from_numpy(arr, GGMLType.Q4_K)
    assert view.shape == (6, 512) and view.data.data_ptr() == arr.ctypes.data  # no copy
    assert torch.equal(view.dequantize(), qt.dequantize())
    f16 = np.random.default_rng(0).standard_normal((3, 4, 8)).astype(np.float16)
    t = QTensor.from_numpy(f16, GGMLType.F16)
    assert t.shape == (3, 4, 8) and torch.equal(t.dequantize(), torch.from_numpy(f16).float())


def test_qtensor_to_and_dequantize_dtype():
    qt = quantize(torch.randn(2, 3, 64), GGMLType.Q8_0)
    assert qt.data.shape == (6, row_bytes(GGMLType.Q8_0, 64)) and qt.shape == (2, 3, 64)
    moved = qt.to("cpu")
    assert moved.qtype == GGMLType.Q8_0 and moved.shape == qt.shape and torch.equal(moved.data, qt.data)
    ref = dequantize(qt.data, qt.qtype, qt.shape)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = qt.dequantize(dtype)
        assert out.dtype == dtype and torch.equal(out, ref.to(dtype))
    assert "Q8_0" in repr(qt)


# ----------------------------------------------------------------------------------------------------- errors
def test_errors():
    good = torch.zeros(row_bytes(GGMLType.Q4_0, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"IQ2_XXS.*not supported.*Q4_K"):
        dequantize(good, GGMLType.IQ2_XXS, (64,))
    with pytest.raises(ValueError, match=r"expected 36 bytes, got 35"):
        dequantize(good[:35], GGMLType.Q4_0, (64,))
    with pytest.raises(ValueError, match=r"row length 48 is not a multiple of the block size 32"):
        dequantize(good, GGMLType.Q4_0, (48,))
    with pytest.raises(TypeError, match=r"uint8"):
        dequantize(good.to(torch.int32), GGMLType.Q4_0, (64,))
    with pytest.raises(ValueError, match=r"IQ4_NL.*not supported.*Q6_K"):
        quantize(torch.zeros(32), GGMLType.IQ4_NL)
    with pytest.raises(ValueError, match=r"not a multiple of the block size 256"):
        quantize(torch.zeros(4, 100), GGMLType.Q4_K)
    with pytest.raises(TypeError, match=r"floating-point"):
        quantize(torch.zeros(32, dtype=torch.int32), GGMLType.Q8_0)
    with pytest.raises(ValueError, match=r"inf or NaN"):
        quantize(torch.tensor([float("inf")] + [0.0] * 31), GGMLType.Q8_0)
    with pytest.raises(ValueError, match=r"expected 36 bytes, got 18"):
        QTensor(good[:18], GGMLType.Q4_0, (64,))
    with pytest.raises(TypeError, match=r"uint8"):
        QTensor(torch.zeros(9, dtype=torch.int32), GGMLType.Q4_0, (64,))


# --------------------------------------------------------------------------------------------------- quantize
def _quant_inputs(bs, rng):
    """[rows, 4*bs] float32: N(0,1), scaled, all-zero, constant, one-outlier and tie-prone rows."""
    n = 4 * bs
    rows = [rng.standard_normal((7, n)), rng.standard_normal((1, n)) * 1e-4, rng.standard_normal((1, n)) * 300,
            np.zeros((1, n)), np.full((1, n), 0.25), np.full((1, n), -7.0), rng.uniform(0, 1, (1, n)),
            rng.integers(-8, 8, (1, n)).astype(np.float64),          # exact grid points: trunc/round ties
            rng.integers(-127, 128, (1, n)) + 0.5]                    # Q8_0 half-way cases for roundf
    out = rng.standard_normal((1, n))
    out[0, 5] = 1e3
    rows.append(out)
    return np.concatenate(rows).astype(np.float32)


@pytest.mark.parametrize("qtype", FLOATS + LEGACY, ids=lambda t: t.name)
def test_quantize_matches_gguf(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    bs, _ = block_info(qtype)
    x = _quant_inputs(max(bs, 32), rng)
    for shaped in (x, x.reshape(2, -1, x.shape[-1]), x.reshape(-1)):  # 2-D, 3-D, 1-D
        qt = quantize(torch.from_numpy(shaped), qtype)
        ref = gq.quantize(shaped, qtype).view(np.uint8)
        assert qt.shape == shaped.shape and qt.qtype == qtype
        assert np.array_equal(qt.data.numpy().reshape(-1), ref.reshape(-1))
        _assert_same_bits(qt.dequantize(), _oracle(ref.reshape(*shaped.shape[:-1], -1), qtype))


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_kquant_quantize_matches_llamacpp_vectors(qtype):
    vec = np.load(VECTORS)
    x, expected, labels = vec["x"], vec[qtype.name], vec["labels"]
    ours = quantize(torch.from_numpy(x), qtype).data.numpy()
    bad = np.nonzero((ours != expected).any(axis=1))[0]
    assert len(bad) == 0, f"rows {bad.tolist()} ({labels[bad].tolist()}) differ from llama.cpp"
    # and the bytes decode like gguf.quants decodes them
    _assert_same_bits(dequantize(torch.from_numpy(ours), qtype, x.shape), _oracle(ours, qtype))


@pytest.mark.parametrize("qtype", QUANTIZE_TYPES, ids=lambda t: t.name)
def test_round_trip_error(qtype):
    torch.manual_seed(int(qtype))
    x = torch.randn(16, 1024)
    qt = quantize(x, qtype)
    y = qt.dequantize()
    _assert_same_bits(y, _oracle(qt.data.numpy(), qtype).reshape(16, 1024))
    rel = ((y - x).norm() / x.norm()).item()
    assert rel <= TOL["round trip rel rmse"][qtype], f"{qtype.name}: relative RMSE {rel:.4f}"
    if qtype in LEGACY:  # hard per-element bound from the block's own (fp16) scale and min
        bs, _ = block_info(qtype)
        raw = qt.data.reshape(-1, block_info(qtype)[1])
        d = raw[:, :2].contiguous().view(torch.float16).float().abs()
        m = raw[:, 2:4].contiguous().view(torch.float16).float().abs() if qtype in (
            GGMLType.Q4_1, GGMLType.Q5_1) else torch.zeros_like(d)
        qmax = {GGMLType.Q8_0: 127, GGMLType.Q4_0: 8, GGMLType.Q5_0: 16}.get(qtype, 31)
        # Q4_0/Q5_0 map the signed absmax to -2^(b-1) exactly, so a weight of the opposite sign near -max lands
        # on +2^(b-1) and is clipped one step down: up to a whole step there, half a step everywhere else.
        step = 1.0 if qtype in (GGMLType.Q4_0, GGMLType.Q5_0) else 0.5
        err = (y - x).reshape(-1, bs).abs()
        assert bool((err <= step * d + (qmax * d + m) * 2.0 ** -10).all())


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_cuda_dequantize_matches_cpu_bits(qtype):
    rng = np.random.default_rng(11 + int(qtype))
    bs, _ = block_info(qtype)
    raw = torch.from_numpy(_random_blocks(qtype, 2 * 37, rng).reshape(2, -1))
    qt = QTensor(raw, qtype, (2, 37 * bs)).cuda()
    assert qt.device.type == "cuda"
    out = qt.dequantize()
    assert out.device.type == "cuda"
    _assert_same_bits(out, _oracle(raw.numpy(), qtype))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", QUANTIZE_TYPES, ids=lambda t: t.name)
def test_cuda_quantize_matches_cpu_bytes(qtype):
    if qtype in K_TYPES:
        x = torch.from_numpy(np.load(VECTORS)["x"])
    else:
        x = torch.from_numpy(_quant_inputs(32, np.random.default_rng(5)))
    on_gpu = quantize(x.cuda(), qtype)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.data.cpu(), quantize(x, qtype).data)
