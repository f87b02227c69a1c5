"""GGUF block layouts as Triton dequant helpers, shared by the qmatmul kernels (GEMV, GEMM, dequant).

How a block is walked. Every supported type is decoded in G *groups* per block. A group loads one run of S
contiguous packed bytes per block (plus the block's scales) and extracts R values from each byte (nibbles,
2-bit crumbs, …) along a shift axis r, giving an [.., R, S] tile of fp32 weights whose in-block element
index is

    e(g, r, j) = group_offset(g) + r * RSTRIDE + j            (j < S, r < R)

so one byte load feeds R weights and the scales are decoded once per (block, sub-block), never per weight.
The kernels load the activations at exactly those element indices, so no permutation of the weights is
needed. G * R * S == weights per block for every type.

Byte layouts (offsets inside one block; fp16 = IEEE half, little endian; see gguf/quants.py and
ggml-common.h `block_q4_0` … `block_q6_K`, `block_iq4_nl`):
    Q4_0   18 B: d f16 | qs[16]                     w = d * (nib - 8)          e = r*16 + j, nib r of qs[j]
    Q4_1   20 B: d, m f16 | qs[16]                  w = d * nib + m
    Q5_0   22 B: d | qh u32 | qs[16]                w = d * ((nib | bit e of qh << 4) - 16)
    Q5_1   24 B: d, m | qh u32 | qs[16]             w = d * q5 + m
    Q8_0   34 B: d | qs int8[32]                    w = q * d
    IQ4_NL 18 B: d | qs[16]                         w = d * kvalues[nib]
    Q2_K   84 B: scales[16] (lo 4: scale, hi 4: min) | qs[64] | d, dmin f16
                 e = half*128 + s*32 + l: crumb s of qs[half*32 + l]; sub-block e//16
                 w = (d * sc) * q - dmin * mn
    Q3_K  110 B: hmask[32] | qs[64] | scales[12] (16 x 6 bit) | d
                 q = crumb (as Q2_K) - 4 * (1 - bit (e//32) of hmask[e % 32]);  w = (d * (sc - 32)) * q
    Q4_K  144 B: d, dmin | scales[12] (8 x 6-bit scale + 8 x 6-bit min) | qs[128]
                 e = c*64 + h*32 + l: nibble h of qs[c*32 + l]; sub-block e//32;  w = (d * sc) * q - dmin * mn
    Q5_K  176 B: d, dmin | scales[12] | qh[32] | qs[128];  5th bit: bit (e//32) of qh[e % 32]
    Q6_K  210 B: ql[128] | qh[64] | scales int8[16] | d
                 e = half*128 + h*64 + l: nibble h of ql[half*64 + l]; 2 high bits: crumb ((e%128)//32) of
                 qh[half*32 + l%32];  w = (d * sc) * (q6 - 32), sub-block e//16
The fp32 expressions are evaluated in the same order as gguf-py's numpy code, so the dequant kernel is
bit-exact with gguf.quants.dequantize under the interpreter (on a GPU, FMA contraction can differ by 1 ulp).
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from vlm_kernels.quant import GGMLType


@dataclass(frozen=True)
class BlockGeom:
    qk: int         # weights per block
    type_size: int  # bytes per block
    groups: int     # G: groups per block (unrolled in the kernels)
    r: int          # R: values extracted from each loaded byte
    s: int          # S: contiguous bytes per group
    r_stride: int   # element distance between consecutive r

    def constexprs(self) -> dict:
        return dict(QK=self.qk, TYPE_SIZE=self.type_size, G=self.groups, R=self.r, S=self.s,
                    RSTRIDE=self.r_stride)


GEOMETRY: dict[GGMLType, BlockGeom] = {
    GGMLType.Q4_0: BlockGeom(32, 18, 1, 2, 16, 16),
    GGMLType.Q4_1: BlockGeom(32, 20, 1, 2, 16, 16),
    GGMLType.Q5_0: BlockGeom(32, 22, 1, 2, 16, 16),
    GGMLType.Q5_1: BlockGeom(32, 24, 1, 2, 16, 16),
    GGMLType.Q8_0: BlockGeom(32, 34, 1, 1, 32, 32),
    GGMLType.IQ4_NL: BlockGeom(32, 18, 1, 2, 16, 16),
    GGMLType.Q2_K: BlockGeom(256, 84, 4, 4, 16, 32),
    GGMLType.Q3_K: BlockGeom(256, 110, 4, 4, 16, 32),
    GGMLType.Q4_K: BlockGeom(256, 144, 4, 2, 32, 32),
    GGMLType.Q5_K: BlockGeom(256, 176, 4, 2, 32, 32),
    GGMLType.Q6_K: BlockGeom(256, 210, 4, 4, 16, 32),
}
SUPPORTED = tuple(GEOMETRY)

# IQ4_NL's non-linear 4-bit codebook (ggml-common.h `kvalues_iq4nl`); passed to the kernels as a tiny fp32 table.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# The same codebook as four little-endian int32 words of int8 bytes (entry i is byte i % 4 of word i // 4), so the
# kernels pick entries with selects and shifts in registers instead of a gather load (whose layout would not match
# the weight tile's and costs a shared-memory conversion per step in the GEMV).
_IQ4_WORDS = [int.from_bytes(bytes(v & 255 for v in IQ4_NL_VALUES[i:i + 4]), "little", signed=True)
              for i in range(0, 16, 4)]
_IQ4_W0, _IQ4_W1, _IQ4_W2, _IQ4_W3 = (tl.constexpr(v) for v in _IQ4_WORDS)

for _t, _g in GEOMETRY.items():
    assert _g.groups * _g.r * _g.s == _g.qk, _t

# Type ids as constexpr globals so the jit code reads `QTYPE == _Q4_K` rather than a bare number.
_Q4_0 = tl.constexpr(int(GGMLType.Q4_0))
_Q4_1 = tl.constexpr(int(GGMLType.Q4_1))
_Q5_0 = tl.constexpr(int(GGMLType.Q5_0))
_Q5_1 = tl.constexpr(int(GGMLType.Q5_1))
_Q8_0 = tl.constexpr(int(GGMLType.Q8_0))
_IQ4_NL = tl.constexpr(int(GGMLType.IQ4_NL))
_Q2_K = tl.constexpr(int(GGMLType.Q2_K))
_Q3_K = tl.constexpr(int(GGMLType.Q3_K))
_Q4_K = tl.constexpr(int(GGMLType.Q4_K))
_Q5_K = tl.constexpr(int(GGMLType.Q5_K))
_Q6_K = tl.constexpr(int(GGMLType.Q6_K))


@triton.jit
def group_offset(g: tl.constexpr, QTYPE: tl.constexpr):
    """In-block element index of (group g, r=0, j=0)."""
    if (QTYPE == _Q4_K) or (QTYPE == _Q5_K):
        return g * 64                       # qs chunk g (32 bytes) holds elements g*64 .. g*64+63
    elif (QTYPE == _Q2_K) or (QTYPE == _Q3_K) or (QTYPE == _Q6_K):
        return (g // 2) * 128 + (g % 2) * 16  # g = (half, 16-lane slice) of a 128-element half
    else:
        return 0                            # 32-weight blocks: one group


@triton.jit
def _u2f(q, bias: tl.constexpr):
    """float(q - bias), exact, for int32 0 <= q < 2^22 and a small integer bias, without an int -> float
    conversion (a quarter-rate instruction on NVIDIA GPUs, which would cap the GEMV below HBM speed): the bits
    0x4B000000 | q are the float 2^23 + q, and subtracting 2^23 + bias is exact. Same value as
    (q - bias).to(tl.float32), so results stay bit-identical."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)


@triton.jit
def _f16(p):
    # fp16 scale: every GGUF block size and scale offset is even, so the 2-byte load is aligned
    return tl.load(p.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def _u16(p):
    return tl.load(p.to(tl.pointer_type(tl.uint16))).to(tl.int32)


@triton.jit
def _k_scale_min(bp, r, g: tl.constexpr):
    """Q4_K/Q5_K 6-bit (scale, min) of sub-block 2g + r from the 12 bytes at offset 4, read as three
    little-endian words (offset 4 of a 144 / 176-byte block is 4-byte aligned):
    bytes 0-3: scale lo6 of sub-blocks 0-3 | 2 high bits of scales 4-7;  4-7: min lo6 | high bits of mins 4-7;
    8-11: lo4 of scales 4-7 | hi4 of mins 4-7."""
    sh = (((2 * g + r) % 4) * 8).to(tl.uint32)      # [1, 1, R, 1] byte of the sub-block inside each word
    a = tl.load((bp + 4).to(tl.pointer_type(tl.uint32))) >> sh
    b = tl.load((bp + 8).to(tl.pointer_type(tl.uint32))) >> sh
    if g < 2:                                       # sub-blocks 0-3
        sc = a & 63
        mn = b & 63
    else:                                           # sub-blocks 4-7
        c = tl.load((bp + 12).to(tl.pointer_type(tl.uint32))) >> sh
        sc = (c & 15) | ((a >> 2) & 48)
        mn = ((c >> 4) & 15) | ((b >> 2) & 48)
    return sc.to(tl.int32), mn.to(tl.int32)


@triton.jit
def dequant_group(bp, r, j, g: tl.constexpr, lut_ptr, QTYPE: tl.constexpr):
    """fp32 weights of group g for a tile of blocks.

    bp:   uint8 pointers to block starts, shape [A, B, 1, 1] (e.g. rows x blocks), or [A, B, 1] with r an
          int32 [1, 1, 1] and j [1, 1, S] (one r per call: the GEMV), giving [A, B, S]. Loads are unmasked: the
          callers clamp row / block indices into the tensor and drop or zero-weight the clamped copies.
          Bytes are loaded as uint8 and widened to int32 before shifting.
    r:    int32 arange(R) shaped [1, 1, R, 1];  j: int32 arange(S) shaped [1, 1, 1, S]
    lut_ptr: the IQ4_NL codebook as fp32 (unused since the codebook is decoded in registers; kept in the
          kernels' signatures as the launchers pass it)
    returns fp32 [A, B, R, S]; element (.., r, j) is in-block weight group_offset(g) + r*RSTRIDE + j.
    """
    if QTYPE == _Q4_0:
        d = _f16(bp)
        nib = (tl.load(bp + 2 + j).to(tl.int32) >> (4 * r)) & 15
        w = d * _u2f(nib, 8)
    elif QTYPE == _Q4_1:
        d = _f16(bp)
        m = _f16(bp + 2)
        nib = (tl.load(bp + 4 + j).to(tl.int32) >> (4 * r)) & 15
        w = d * _u2f(nib, 0) + m
    elif QTYPE == _Q5_0:
        d = _f16(bp)
        qh = _u16(bp + 2 + 2 * r)          # 5th bits of elements r*16 .. r*16+15
        q = ((tl.load(bp + 6 + j).to(tl.int32) >> (4 * r)) & 15) | (((qh >> j) & 1) << 4)
        w = d * _u2f(q, 16)
    elif QTYPE == _Q5_1:
        d = _f16(bp)
        m = _f16(bp + 2)
        qh = _u16(bp + 4 + 2 * r)
        q = ((tl.load(bp + 8 + j).to(tl.int32) >> (4 * r)) & 15) | (((qh >> j) & 1) << 4)
        w = d * _u2f(q, 0) + m
    elif QTYPE == _Q8_0:
        d = _f16(bp)
        q = tl.load(bp + 2 + j).to(tl.int32) ^ 128   # the int8 value + 128
        w = _u2f(q, 128) * d
    elif QTYPE == _IQ4_NL:
        d = _f16(bp)
        nib = (tl.load(bp + 2 + j).to(tl.int32) >> (4 * r)) & 15
        # codebook entry nib: word nib // 4 of _IQ4_WORDS, byte nib % 4 (an int8; ^ 128 makes it value + 128)
        hi = (nib & 4) != 0
        word = tl.where(nib >= 8, tl.where(hi, _IQ4_W3, _IQ4_W2), tl.where(hi, _IQ4_W1, _IQ4_W0))
        w = d * _u2f(((word >> ((nib & 3) * 8)) & 255) ^ 128, 128)
    elif QTYPE == _Q2_K:
        half = g // 2
        lane = (g % 2) * 16
        d = _f16(bp + 80)
        dmin = _f16(bp + 82)
        q = (tl.load(bp + 16 + half * 32 + lane + j).to(tl.int32) >> (2 * r)) & 3
        sc = tl.load(bp + half * 8 + 2 * r + g % 2).to(tl.int32)  # sub-block e//16
        w = (d * (sc & 15).to(tl.float32)) * _u2f(q, 0) - dmin * (sc >> 4).to(tl.float32)
    elif QTYPE == _Q3_K:
        half = g // 2
        lane = (g % 2) * 16
        d = _f16(bp + 108)
        q = (tl.load(bp + 32 + half * 32 + lane + j).to(tl.int32) >> (2 * r)) & 3
        hbit = (tl.load(bp + lane + j).to(tl.int32) >> (half * 4 + r)) & 1  # hmask bit e//32
        q = q + 4 * hbit                   # q - 4 is the value: -4 where the hmask bit is clear
        sub = half * 8 + 2 * r + g % 2
        lo4 = (tl.load(bp + 96 + sub % 8).to(tl.int32) >> ((sub // 8) * 4)) & 15
        hi2 = (tl.load(bp + 104 + sub % 4).to(tl.int32) >> ((sub // 4) * 2)) & 3
        sc = (lo4 | (hi2 << 4)) - 32
        w = (d * sc.to(tl.float32)) * _u2f(q, 4)
    elif QTYPE == _Q4_K:
        d = _f16(bp)
        dmin = _f16(bp + 2)
        q = (tl.load(bp + 16 + g * 32 + j).to(tl.int32) >> (4 * r)) & 15
        sc, mn = _k_scale_min(bp, r, g)
        w = (d * sc.to(tl.float32)) * _u2f(q, 0) - dmin * mn.to(tl.float32)
    elif QTYPE == _Q5_K:
        d = _f16(bp)
        dmin = _f16(bp + 2)
        q = (tl.load(bp + 48 + g * 32 + j).to(tl.int32) >> (4 * r)) & 15
        q = q | (((tl.load(bp + 16 + j).to(tl.int32) >> (2 * g + r)) & 1) << 4)
        sc, mn = _k_scale_min(bp, r, g)
        w = (d * sc.to(tl.float32)) * _u2f(q, 0) - dmin * mn.to(tl.float32)
    else:
        tl.static_assert(QTYPE == _Q6_K, "dequant_group: unsupported GGML type")
        half = g // 2
        lane = (g % 2) * 16
        d = _f16(bp + 208)
        # e = half*128 + r*32 + lane + j: low nibble from ql[half*64 + (r%2)*32 + lane + j], nibble r//2
        ql_a = tl.load(bp + half * 64 + lane + j).to(tl.int32)
        ql_b = tl.load(bp + half * 64 + 32 + lane + j).to(tl.int32)
        lo = (tl.where((r % 2) == 0, ql_a, ql_b) >> ((r // 2) * 4)) & 15
        hi = (tl.load(bp + 128 + half * 32 + lane + j).to(tl.int32) >> (2 * r)) & 3
        q = lo | (hi << 4)                  # the value + 32
        sc = tl.load(bp + 192 + half * 8 + 2 * r + g % 2).to(tl.int32)
        sc = sc - ((sc & 128) << 1)         # int8 sub-block scale
        w = (d * sc.to(tl.float32)) * _u2f(q, 32)
    return w
