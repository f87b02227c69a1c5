"""Decode GEMV on 8-bit integer dot products (DP4A): y = x @ dequant(w).T for Q4_0 / Q8_0 weights, M <= 16.

Why: the float GEMV (`_qgemv_kernel`) spends ~8-9 SASS instructions per weight on an H100 (nibble extract,
int -> float, scale multiply, bf16 -> fp32 of x, FMA; bench/qmatmul_aot.py), which caps it near 59 % of HBM
bandwidth before any latency is counted. Here the activations are first quantized per 32-element block to int8
with one fp32 scale (ggml's Q8_1 idea, what llama.cpp's CUDA "mmvq" path does), then one `dp4a` multiplies and
adds four weight / activation byte pairs into an int32: about 1.7 instructions per weight. The block scale
multiplies once per 32 weights.

Numerics: x is rounded to int8 with scale amax / 127 per block (|error| <= scale / 2 per element, the same order
as rounding x to bf16), products and sums are exact integers, the per-block terms accumulate in fp32. So the
result equals `qmatmul_dp4a_ref` (x quantized the same way, then exact) up to fp32 summation order, and
`qmatmul_ref` up to the activation rounding (single GEMVs: 4e-3 .. 7e-3 of max |y|, inside the bf16 tolerance).
Opt-in (VLM_QMATMUL_INT8_X=1, bf16 activations only, or an explicit config): measured on an H100 it ran Q4_0
decode GEMVs 1.14-1.34x faster than the float GEMV, but a tiny Qwen2 Q8_0 model's bf16 logits landed at
2.25e-2 of the CPU fp32 ones, past the 2e-2 bf16 tolerance that the exact-x kernel meets.

    _quantize_x_kernel   x [M, K] (any float dtype) -> xq int8 [M, K], xd fp32 [M, K/32] (scale),
                         xsum int32 [M, K/32] (sum of the block's int8 values, for Q4_0's -8 offset)
    _qgemv_dp4a_kernel   weights straight from the GGUF bytes (2-byte loads: 18- and 34-byte blocks are only
                         2-byte aligned), one thread per (weight row, block) of the [BLOCK_N, NB] tile, the four
                         (Q4_0) or eight (Q8_0) 32-bit words of a block decoded in registers.
Under TRITON_INTERPRET there is no inline PTX: `_dp4a` then computes the same integer sum from the bytes.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vlm_kernels.qmatmul_kernels import store_row

DP4A_QTYPES = {2: "Q4_0", 8: "Q8_0"}     # GGMLType values handled here


@triton.jit
def _quantize_x_kernel(x_ptr, xq_ptr, xd_ptr, xs_ptr, n_blocks_total, BLOCKS: tl.constexpr):
    """grid (cdiv(M * K / 32, BLOCKS),): every 32-element block of the flattened x, independently."""
    b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    ok = b < n_blocks_total
    e = b.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :]
    v = tl.load(x_ptr + e, mask=ok[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(v), axis=1)
    d = amax / 127.0
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    q = tl.floor(v * inv[:, None] + 0.5)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int32)
    tl.store(xq_ptr + e, q.to(tl.int8), mask=ok[:, None])
    tl.store(xd_ptr + b, d, mask=ok)
    tl.store(xs_ptr + b, tl.sum(q, axis=1), mask=ok)


@triton.jit
def _dp4a(a, b, c, A_SIGNED: tl.constexpr, ASM: tl.constexpr):
    """c + sum over the 4 bytes k of a_k * b_k (b's bytes signed; a's signed or unsigned), all int32."""
    if ASM:
        if A_SIGNED:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        s = c
        for k in tl.static_range(4):
            ak = (a >> (8 * k)) & 0xFF
            if A_SIGNED:
                ak = (ak ^ 0x80) - 0x80
            bk = (((b >> (8 * k)) & 0xFF) ^ 0x80) - 0x80
            s += ak * bk
        return s


@triton.jit
def _word(wp, hw):
    """int32 word from two 2-byte loads at halfword offsets hw, hw + 1 of the int16 view `wp`."""
    lo = tl.load(wp + hw).to(tl.int32) & 0xFFFF
    hi = tl.load(wp + hw + 1).to(tl.int32)
    return lo | (hi << 16)


@triton.jit
def _dot_word(s, lo, hi, xrow, i, IS_Q4: tl.constexpr, ASM: tl.constexpr):
    """Add quant word i of each (row, block) times x's matching int8 words (x row pointers xrow: [NB])."""
    if IS_Q4:     # low nibbles are weights 4i .. 4i+3, high nibbles 16+4i .. 16+4i+3
        s = _dp4a(lo, tl.load(xrow + i)[None, :], s, False, ASM)
        s = _dp4a(hi, tl.load(xrow + 4 + i)[None, :], s, False, ASM)
    else:         # int8 weights 4i .. 4i+3
        s = _dp4a(lo, tl.load(xrow + i)[None, :], s, True, ASM)
    return s


@triton.jit
def _x_row(xw_ptr, m, M, n_words_row, blk_c):
    """Pointers [NB] to the first int32 word of x row m's blocks (row clamped to M - 1: always in bounds)."""
    return xw_ptr + tl.minimum(m, M - 1).to(tl.int64) * n_words_row + blk_c * 8


@triton.jit
def _finish(acc, s, d_w, xd_ptr, xs_ptr, m, M, blk_c, b_ok, n_blocks, IS_Q4: tl.constexpr):
    """acc += d_w * d_x * (integer dot - 8 * sum of x's int8 block for Q4_0) per (row, block); blocks past
    K and rows past M get d_x = 0."""
    ok = b_ok & ((blk_c * 0 + m) < M)
    off = tl.minimum(m, M - 1).to(tl.int64) * n_blocks + blk_c
    xd = tl.load(xd_ptr + off, mask=ok, other=0.0)[None, :]
    if IS_Q4:
        s = s - 8 * tl.load(xs_ptr + off, mask=ok, other=0)[None, :]
    return acc + d_w * (xd * s.to(tl.float32))


@triton.jit
def _store_rows(y_ptr, ws_ptr, bias_ptr, acc, m, M, N, rows, pid_s, n_split, HAS_BIAS: tl.constexpr):
    store_row(y_ptr, ws_ptr, bias_ptr, tl.sum(acc, axis=1), m, M, N, rows, pid_s, n_split, HAS_BIAS)


@triton.jit(do_not_specialize=["M", "N", "n_blocks", "iters", "n_split", "n_mchunks"])
def _qgemv_dp4a_kernel(
    xw_ptr, xd_ptr, xs_ptr, w_ptr, y_ptr, ws_ptr, bias_ptr,
    M, N, row_hw, n_blocks, iters, n_split, n_mchunks,
    IS_Q4: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
    HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
):
    """grid (n_mchunks * cdiv(N, BLOCK_N), n_split); program (pid, s): activation rows m0 .. m0 + M_PAD - 1,
    weight rows (pid // n_mchunks) * BLOCK_N + [0, BLOCK_N), blocks [s * iters * NB, (s + 1) * iters * NB).
    w_ptr is the weights as int16 halfwords [N, row_hw]; a block is 9 (Q4_0) or 17 (Q8_0) halfwords: the fp16
    scale, then the packed quants. xw_ptr is x's int8 values as int32 words [M, K / 4]."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    m0 = (pid % n_mchunks) * M_PAD
    rows = (pid // n_mchunks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    BHW: tl.constexpr = 9 if IS_Q4 else 17                 # halfwords per block
    W: tl.constexpr = 4 if IS_Q4 else 8                     # 32-bit words of quants per block
    n_words_row = n_blocks * 8
    acc0 = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    blk0 = pid_s * iters * NB
    for it in range(iters):
        blk = blk0 + it * NB + tl.arange(0, NB)
        b_ok = blk < n_blocks
        blk_c = tl.minimum(blk, n_blocks - 1)                # clamped: in-bounds loads; xd = 0 drops them
        bp = w_ptr + rows_c[:, None] * row_hw + (blk_c * BHW)[None, :]     # [BLOCK_N, NB] block starts
        d_w = tl.load(bp).to(tl.float16, bitcast=True).to(tl.float32)
        xr0 = _x_row(xw_ptr, m0, M, n_words_row, blk_c)
        xr1 = _x_row(xw_ptr, m0 + 1, M, n_words_row, blk_c)
        xr2 = _x_row(xw_ptr, m0 + 2, M, n_words_row, blk_c)
        xr3 = _x_row(xw_ptr, m0 + 3, M, n_words_row, blk_c)
        s0 = tl.zeros([BLOCK_N, NB], dtype=tl.int32)
        s1 = tl.zeros([BLOCK_N, NB], dtype=tl.int32)
        s2 = tl.zeros([BLOCK_N, NB], dtype=tl.int32)
        s3 = tl.zeros([BLOCK_N, NB], dtype=tl.int32)
        for i in tl.static_range(W):     # each quant word decoded once, used for every activation row
            q = _word(bp, 1 + 2 * i)
            if IS_Q4:
                lo = q & 0x0F0F0F0F
            else:
                lo = q
            hi = (q >> 4) & 0x0F0F0F0F
            s0 = _dot_word(s0, lo, hi, xr0, i, IS_Q4, ASM)
            if M_PAD > 1:
                s1 = _dot_word(s1, lo, hi, xr1, i, IS_Q4, ASM)
            if M_PAD > 2:
                s2 = _dot_word(s2, lo, hi, xr2, i, IS_Q4, ASM)
                s3 = _dot_word(s3, lo, hi, xr3, i, IS_Q4, ASM)
        acc0 = _finish(acc0, s0, d_w, xd_ptr, xs_ptr, m0, M, blk_c, b_ok, n_blocks, IS_Q4)
        if M_PAD > 1:
            acc1 = _finish(acc1, s1, d_w, xd_ptr, xs_ptr, m0 + 1, M, blk_c, b_ok, n_blocks, IS_Q4)
        if M_PAD > 2:
            acc2 = _finish(acc2, s2, d_w, xd_ptr, xs_ptr, m0 + 2, M, blk_c, b_ok, n_blocks, IS_Q4)
            acc3 = _finish(acc3, s3, d_w, xd_ptr, xs_ptr, m0 + 3, M, blk_c, b_ok, n_blocks, IS_Q4)
    _store_rows(y_ptr, ws_ptr, bias_ptr, acc0, m0, M, N, rows, pid_s, n_split, HAS_BIAS)
    if M_PAD > 1:
        _store_rows(y_ptr, ws_ptr, bias_ptr, acc1, m0 + 1, M, N, rows, pid_s, n_split, HAS_BIAS)
    if M_PAD > 2:
        _store_rows(y_ptr, ws_ptr, bias_ptr, acc2, m0 + 2, M, N, rows, pid_s, n_split, HAS_BIAS)
        _store_rows(y_ptr, ws_ptr, bias_ptr, acc3, m0 + 3, M, N, rows, pid_s, n_split, HAS_BIAS)
