"""GGUF quant formats: block layouts, QTensor, vectorised torch dequantize/quantize.

Block layouts follow ggml-common.h. `dequantize` is bit-exact with gguf.quants.dequantize for every supported
type; `quantize` is byte-exact with gguf.quants.quantize (Q4_0..Q8_0, BF16) and with llama.cpp's reference
quantizers quantize_row_q{2..6}_K_ref (K-quants). Everything is whole-tensor torch code (CPU or CUDA).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as GGMLType
from gguf.constants import GGML_QUANT_SIZES

from vlm_kernels import quant_kquants as _kq
from vlm_kernels._quant_bits import (QK_K, _cdiv, _const, _f16, _k4_scale_min, _or_shift,  # noqa: F401
                                     _pack_bits32, _safe_inv, _signed_absmax, _split_bits, _to_f16_bytes)

FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def block_info(qtype: GGMLType) -> tuple[int, int]:
    """(weights per block, bytes per block)."""
    return GGML_QUANT_SIZES[GGMLType(qtype)]


def row_bytes(qtype: GGMLType, n: int) -> int:
    bs, ts = block_info(qtype)
    if n % bs:
        raise ValueError(f"{GGMLType(qtype).name}: row length {n} is not a multiple of the block size {bs}")
    return n // bs * ts


@dataclass
class QTensor:
    """Packed GGUF weights.

    data:  uint8 [n_rows, row_bytes] where n_rows = prod(shape[:-1]); the exact GGUF bytes (a view of the
           memory-mapped file when loaded from one).
    qtype: GGMLType.
    shape: logical torch-ordered shape (last dim = the contiguous, blocked one).
    """
    data: torch.Tensor
    qtype: GGMLType
    shape: tuple[int, ...]

    def __post_init__(self):
        self.qtype = GGMLType(self.qtype)
        self.shape = tuple(int(s) for s in self.shape)
        if self.data.dtype != torch.uint8:
            raise TypeError(f"QTensor data must be uint8, got {self.data.dtype}")
        n_rows = 1
        for s in self.shape[:-1]:
            n_rows *= s
        rb = row_bytes(self.qtype, self.shape[-1])
        if self.data.numel() != n_rows * rb:
            raise ValueError(f"QTensor {self.qtype.name} {self.shape}: expected {n_rows * rb} bytes, "
                             f"got {self.data.numel()}")
        if self.data.dim() != 2 or tuple(self.data.shape) != (n_rows, rb):
            self.data = self.data.reshape(n_rows, rb)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def to(self, device) -> "QTensor":
        return QTensor(self.data.to(device), self.qtype, self.shape)

    def cuda(self) -> "QTensor":
        return self.to("cuda")

    def cpu(self) -> "QTensor":
        return self.to("cpu")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.qtype, self.shape).to(dtype)

    @classmethod
    def from_numpy(cls, array: np.ndarray, qtype: GGMLType, shape=None) -> "QTensor":
        """Wrap GGUF bytes without copying (e.g. a gguf.GGUFReader tensor's read-only np.memmap `data`).

        `array` is uint8 [..., row_bytes] (quantized layout) or element-typed (F32/F16 arrays); `shape` (torch
        order) defaults to the one the array implies. The memory is shared: treat the tensor as read-only."""
        qtype, arr = GGMLType(qtype), np.asarray(array)
        if shape is None:
            bs, ts = block_info(qtype)
            shape = (*arr.shape[:-1], arr.shape[-1] // ts * bs) if arr.dtype == np.uint8 else arr.shape
        with warnings.catch_warnings():  # torch warns that a read-only mmap is not writable
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        return cls(data, qtype, shape)

    def __repr__(self) -> str:
        return f"QTensor({self.qtype.name}, shape={self.shape}, device={self.device})"


# ---------------------------------------------------------------------------------------------------------------
# Block helpers live in vlm_kernels/_quant_bits.py (shared with the K-quant quantizers).
# ---------------------------------------------------------------------------------------------------------------
# IQ4_NL / IQ4_XS non-linear 4-bit code book (ggml-common.h kvalues_iq4nl).
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# ---------------------------------------------------------------------------------------------------------------
# Dequantization, one function per type: blocks uint8 [n, type_size] -> writes float32 `out` [n, block_size].
# The float32 operation order copies gguf-py's numpy code (fp16 scale -> f32 first, then e.g. (d*sc)*q - dm), so
# every rounding step is the same and the result is bit-identical, including for subnormal/inf/NaN scales.
# Integer codes become float32 exactly (small integers) before the multiply; `a*b - c` is mul(out=) then sub_.
# ---------------------------------------------------------------------------------------------------------------
def _dq_q4_0(b, out):  # d f16 | qs[16]: element j = low nibble of qs[j], element j+16 = high nibble
    q = _split_bits(b[:, 2:], 4, 2).view(torch.int8).reshape(-1, 32) - 8
    torch.mul(_f16(b, 0), q.float(), out=out)


def _bits_to_bytes(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k] -> uint8 [n, 8k], element 8i + b = bit b of byte i (the bit order of a little-endian word).

    Per byte on int64 lanes: replicate it into all 8 lanes, keep bit i in lane i, then map a non-zero lane to 1
    by adding 0x7F (the carry lands in the lane's top bit, never in the next lane)."""
    v = q.to(torch.int64) * 0x01010101
    v = (v | (v << 32)) & (0x8040201008040201 - (1 << 64))  # lane i keeps bit i (signed spelling of the mask)
    return (((v + 0x7F7F7F7F7F7F7F7F) >> 7) & 0x0101010101010101).view(torch.uint8).reshape(q.shape[0], -1)


def _q5_codes(b, off):  # qh (uint32 LE, bit j = 5th bit of element j) at off, qs[16] at off+4 -> uint8 [n, 32]
    return _or_shift(_split_bits(b[:, off + 4:], 4, 2).reshape(-1, 32), _bits_to_bytes(b[:, off:off + 4]), 4)


def _dq_q2_k(b, out):  # scales[16] (lo: scale, hi: min) | qs[64]: 2-bit planes of 32 bytes | d | dmin
    n = b.shape[0]
    sc = b[:, :16]
    dl = (_f16(b, 80) * (sc & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4).float()).reshape(n, 16, 1)
    q = _split_bits(b[:, 16:80].reshape(-1, 32), 2, 4).reshape(n, 16, 16).float()
    torch.mul(dl, q, out=out.view(n, 16, 16)).sub_(ml)


def _dq_q3_k(b, out):  # hmask[32] | qs[64] 2-bit | scales[12] 6-bit packed | d
    n = b.shape[0]
    lo = _split_bits(b[:, 96:104], 4, 2).reshape(n, 16)
    hi = _split_bits(b[:, 104:108], 2, 4).reshape(n, 16)
    dl = (_f16(b, 108) * (_or_shift(lo, hi, 4).view(torch.int8) - 32).float()).reshape(n, 16, 1)
    ql = _split_bits(b[:, 32:96].reshape(-1, 32), 2, 4).reshape(n, 16, 16)
    qh = _split_bits(b[:, :32], 1, 8).reshape(n, 16, 16)
    # a set hmask bit means "no offset": q = ql - 4 * (1 - bit) = (ql | bit << 2) - 4
    q = _or_shift(ql, qh, 2).view(torch.int8) - 4
    torch.mul(dl, q.float(), out=out.view(n, 16, 16))


def _dq_q45_k(b, out, five: bool):
    """Q4_K: d | dmin | scales[12] | qs[128] (4 chunks of 32 bytes: low nibbles, then high nibbles).
    Q5_K: d | dmin | scales[12] | qh[32] (bit i of qh[j] = 5th bit of weight 32i + j) | qs[128]."""
    n = b.shape[0]
    scale, mins = _k4_scale_min(b[:, 4:16])
    q = _split_bits(b[:, 48 if five else 16:].reshape(-1, 32), 4, 2).reshape(n, 8, 32)
    if five:
        q = _or_shift(q, _split_bits(b[:, 16:48], 1, 8), 4)
    dl, ml = (_f16(b, 0) * scale).reshape(n, 8, 1), (_f16(b, 2) * mins).reshape(n, 8, 1)
    torch.mul(dl, q.float(), out=out.view(n, 8, 32)).sub_(ml)


def _dq_q6_k(b, out):  # ql[128] | qh[64] | scales int8[16] | d
    n = b.shape[0]
    dl = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).reshape(n, 16, 1)
    lo = _split_bits(b[:, :128].reshape(-1, 64), 4, 2).reshape(n, 8, 32)
    hi = _split_bits(b[:, 128:192].reshape(-1, 32), 2, 4).reshape(n, 8, 32)
    q = _or_shift(lo, hi, 4).view(torch.int8) - 32
    torch.mul(dl, q.reshape(n, 16, 16).float(), out=out.view(n, 16, 16))


def _iq4_values(codes):
    lut = _const(IQ4NL_VALUES, torch.float32, codes.device, (16,))
    return torch.index_select(lut, 0, codes.reshape(-1).to(torch.int32)).view(codes.shape)


def _dq_iq4_xs(b, out):  # d | scales_h u16 (2 bits per sub-block) | scales_l[4] (4 bits) | qs[128]
    n = b.shape[0]
    lo = _split_bits(b[:, 4:8], 4, 2).transpose(1, 2).reshape(n, 8)  # sub-block 2i: low nibble of byte i
    sh = b[:, 2:3].to(torch.int32) | (b[:, 3:4].to(torch.int32) << 8)
    hi = ((sh >> _const(tuple(range(0, 16, 2)), torch.int32, b.device, (1, 8))) & 3).to(torch.uint8)
    dl = (_f16(b, 0) * (_or_shift(lo.contiguous(), hi, 4).view(torch.int8) - 32).float()).reshape(n, 8, 1)
    codes = _split_bits(b[:, 8:].reshape(-1, 16), 4, 2).reshape(n, 8, 32)
    torch.mul(dl, _iq4_values(codes), out=out.view(n, 8, 32))


_DEQUANT = {
    GGMLType.F32: lambda b, out: out.copy_(b.view(torch.float32)),
    GGMLType.F16: lambda b, out: out.copy_(b.view(torch.float16)),
    # bf16 -> f32 is the 16 bits moved to the top half (exact for every value, NaN payloads included)
    GGMLType.BF16: lambda b, out: out.view(torch.int32).copy_(b.view(torch.int16)).bitwise_left_shift_(16),
    GGMLType.Q4_0: _dq_q4_0,
    # Q4_1: d f16 | m f16 | qs[16] (nibbles as Q4_0); x = d*q + m
    GGMLType.Q4_1: lambda b, o: torch.mul(_f16(b, 0), _split_bits(b[:, 4:], 4, 2).reshape(-1, 32).float(),
                                          out=o).add_(_f16(b, 2)),
    # Q5_0: d | qh[4] | qs[16]; Q5_1: d | m | qh[4] | qs[16]
    GGMLType.Q5_0: lambda b, o: torch.mul(_f16(b, 0), (_q5_codes(b, 2).view(torch.int8) - 16).float(), out=o),
    GGMLType.Q5_1: lambda b, o: torch.mul(_f16(b, 0), _q5_codes(b, 4).float(), out=o).add_(_f16(b, 2)),
    # Q8_0: d | qs int8[32]; gguf computes x * d
    GGMLType.Q8_0: lambda b, o: torch.mul(b[:, 2:].view(torch.int8).float(), _f16(b, 0), out=o),
    GGMLType.Q2_K: _dq_q2_k, GGMLType.Q3_K: _dq_q3_k, GGMLType.Q4_K: lambda b, o: _dq_q45_k(b, o, False),
    GGMLType.Q5_K: lambda b, o: _dq_q45_k(b, o, True), GGMLType.Q6_K: _dq_q6_k,
    # IQ4_NL: d | qs[16], 4-bit codes (nibbles as Q4_0) index the non-linear table
    GGMLType.IQ4_NL: lambda b, o: torch.mul(_f16(b, 0), _iq4_values(_split_bits(b[:, 2:], 4, 2).reshape(-1, 32)),
                                            out=o), GGMLType.IQ4_XS: _dq_iq4_xs,
}
SUPPORTED_TYPES = tuple(_DEQUANT)


def _check_type(qtype, table, what: str) -> GGMLType:
    try:
        t = GGMLType(qtype)
    except ValueError:
        t = None
    if t not in table:
        raise ValueError(f"{what} of GGML type {t.name if t is not None else repr(qtype)} is not supported; "
                         f"supported: {', '.join(x.name for x in table)}")
    return t


# Weights per dequantize step. On CPU a step's temporaries stay cache-resident (~1 MiB of f32); on CUDA the step
# only bounds temporary memory for huge tensors.
_CHUNK = {"cpu": 1 << 18, "cuda": 1 << 26}


def dequantize(data: torch.Tensor, qtype: GGMLType, shape, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 GGUF bytes -> float32 tensor of `shape` (bit-exact with gguf.quants.dequantize).

    `data` may have any shape as long as it holds prod(shape[:-1]) rows of row_bytes(qtype, shape[-1]) bytes;
    it stays on its device (CPU or CUDA) and the result is allocated there, or written into `out` (a contiguous
    float32 tensor with `shape` elements, e.g. a reused buffer: saves the page faults of a fresh allocation)."""
    qtype = _check_type(qtype, _DEQUANT, "dequantization")
    if isinstance(data, QTensor):
        data = data.data
    if not isinstance(data, torch.Tensor):
        data = torch.as_tensor(data)
    if data.dtype != torch.uint8:
        raise TypeError(f"dequantize expects uint8 bytes, got {data.dtype}")
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("dequantize needs a shape with at least one dimension")
    n_rows = math.prod(shape[:-1])
    expected = n_rows * row_bytes(qtype, shape[-1])
    if data.numel() != expected:
        raise ValueError(f"{qtype.name} {shape}: expected {expected} bytes, got {data.numel()}")
    bs, ts = block_info(qtype)
    blocks = data.contiguous().reshape(-1, ts)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=data.device)
    elif out.dtype != torch.float32 or out.numel() != n_rows * shape[-1] or not out.is_contiguous() \
            or out.device != data.device:
        raise ValueError(f"out must be a contiguous float32 tensor of {n_rows * shape[-1]} elements on "
                         f"{data.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    flat = out.view(-1, bs)
    step = max(1, _CHUNK.get(data.device.type, _CHUNK["cuda"]) // bs)
    for s in range(0, blocks.shape[0], step):
        _DEQUANT[qtype](blocks[s:s + step], flat[s:s + step])
    return out.view(shape)


# ---------------------------------------------------------------------------------------------------------------
# Quantization. Legacy types follow gguf.quants (numpy) operation by operation, so the bytes are identical:
# all-zero blocks give d = 0, id = 0; truncation/rounding happens exactly where numpy/C does it.
# ---------------------------------------------------------------------------------------------------------------
def _q_legacy(x, bits: int, with_min: bool):
    """Q4_0 / Q5_0 (symmetric: d = signed absmax / -2^(bits-1)) and Q4_1 / Q5_1 (d = (max - min) / (2^bits - 1),
    m = min), as gguf.quants: q = trunc(x * id + offset) as uint8, clipped to 2^bits - 1. Element j goes to the
    low nibble of byte j, element j+16 to its high nibble; Q5 5th bits go to a little-endian uint32."""
    top = (1 << bits) - 1
    if with_min:
        mn = x.amin(1, keepdim=True)
        d = _cdiv(x.amax(1, keepdim=True) - mn, float(top))
        v = (x - mn) * _safe_inv(d) + 0.5
        head = (_to_f16_bytes(d), _to_f16_bytes(mn))
    else:
        d = _cdiv(_signed_absmax(x, 1)[:, None], float(-(1 << (bits - 1))))
        v = x * _safe_inv(d) + ((1 << (bits - 1)) + 0.5)
        head = (_to_f16_bytes(d),)
    q = torch.trunc(v).to(torch.uint8).clamp_(0, top)
    if bits == 5:
        head += (_pack_bits32(q >> 4),)
    return torch.cat(head + ((q[:, :16] & 0x0F) | (q[:, 16:] << 4),), dim=1)


def _q_q8_0(x):
    """d = absmax / 127; q = roundf(x * id), half away from zero computed like gguf's np_roundf."""
    d = _cdiv(x.abs().amax(dim=1, keepdim=True), 127.0)
    v = x * _safe_inv(d)
    a = v.abs()
    fl = torch.floor(a)
    q = (torch.sign(v) * (fl + torch.floor(2 * (a - fl)))).to(torch.int8).view(torch.uint8)
    return torch.cat((_to_f16_bytes(d), q), dim=1)


def _q_bf16(x):
    """gguf/ggml fp32 -> bf16: NaN made quiet keeping sign and payload top bits, else round to nearest even."""
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return (n & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.uint8).reshape(-1, 2)


_QUANT = {
    GGMLType.F32: lambda x: x.contiguous().view(torch.uint8).reshape(-1, 4),
    GGMLType.F16: lambda x: x.to(torch.float16).view(torch.uint8).reshape(-1, 2), GGMLType.BF16: _q_bf16,
    GGMLType.Q4_0: lambda x: _q_legacy(x, 4, False), GGMLType.Q4_1: lambda x: _q_legacy(x, 4, True),
    GGMLType.Q5_0: lambda x: _q_legacy(x, 5, False), GGMLType.Q5_1: lambda x: _q_legacy(x, 5, True),
    GGMLType.Q8_0: _q_q8_0, GGMLType.Q2_K: lambda x: _kq._q_q2_k(x), GGMLType.Q3_K: lambda x: _kq._q_q3_k(x),
    GGMLType.Q4_K: lambda x: _kq._q_q45_k(x, False), GGMLType.Q5_K: lambda x: _kq._q_q45_k(x, True),
    GGMLType.Q6_K: lambda x: _kq._q_q6_k(x),
}
QUANTIZE_TYPES = tuple(_QUANT)
K_QUANT_TYPES = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
# Weights per quantize step: bounds the [n, G] temporaries of the K-quant searches to a few MiB each.
_QUANT_CHUNK = 1 << 21


def quantize(tensor: torch.Tensor, qtype: GGMLType) -> QTensor:
    """float tensor (last dim = blocked dim) -> QTensor on the same device.

    Q4_0..Q8_0, BF16 are byte-exact with gguf.quants.quantize; Q2_K..Q6_K byte-exact with llama.cpp's
    quantize_row_q*_K_ref (no importance matrix)."""
    qtype = _check_type(qtype, _QUANT, "quantization")
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(f"quantize expects a floating-point torch.Tensor, got "
                        f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
    if tensor.dim() == 0:
        raise ValueError("quantize needs a tensor with at least one dimension")
    shape, (bs, ts) = tuple(tensor.shape), block_info(qtype)
    rb = row_bytes(qtype, shape[-1])  # raises for a row length that is not a multiple of the block
    x = tensor.detach().to(torch.float32).contiguous().reshape(-1, bs)
    if qtype not in FLOAT_TYPES and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"quantize to {qtype.name}: the tensor has inf or NaN values")
    step = max(1, _QUANT_CHUNK // bs)
    device = x.device
    if qtype in K_QUANT_TYPES and device.type != "cpu":
        # Measured on an H100: CUDA's float kernels round differently from the C reference in the K-quant scale
        # searches (Q2_K bytes differed from the CPU/C bytes), so the K-quant search always runs on the CPU.
        x = x.cpu()
    parts = [_QUANT[qtype](x[s:s + step]) for s in range(0, x.shape[0], step)]
    data = torch.cat(parts).to(device) if parts else torch.zeros((0, ts), dtype=torch.uint8, device=device)
    return QTensor(data.reshape(-1, rb), qtype, shape)
