"""Triton kernels for y = x @ dequant(w).T straight from GGUF blocks (launchers live in kernels/qmatmul.py).

Shared conventions
    x:    [M, K] activations, row-major (fp32 / fp16 / bf16)
    w:    uint8 [N, row_bytes], row n = K/QK consecutive GGUF blocks of TYPE_SIZE bytes (the GGUF bytes as is)
    y:    [M, N] in x's dtype; with n_split > 1 the kernels write instead an fp32 workspace ws [n_split, M, N]
          of partial sums that `_splitk_reduce_kernel` adds up in a fixed order (deterministic, no atomics).
    K loop: a program owns BLOCK_N weight rows and a contiguous range of `iters` steps of NB blocks
          (split s starts at block s * iters * NB); see `_block_tile` for the tile edges.
    Per step and per group g (see kernels/_qblocks.py) the weights come as an fp32 [BLOCK_N, NB, R, S] tile
    whose element (n, b, r, j) multiplies x[:, (blk0 + b) * QK + group_offset(g) + r * RSTRIDE + j].
Regimes: `_qgemv_kernel` (M <= 4, CUDA-core FMAs + tl.sum), `_qgemm_kernel` (tensor cores, computes the
transposed tile acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T so the weight rows fill the MMA's M side even when
M is 16), `_dequant_kernel` (GGUF -> dense, for the dequantize + torch.matmul regime and for tests).
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels._qblocks import dequant_group, group_offset

# Runtime sizes that vary from call to call are not specialised on (divisibility by 16 / == 1), so one compiled
# variant serves every M, N and split; K and row_bytes stay specialised (their alignment enables wide loads).
_NO_SPECIALIZE = ["M", "N", "n_blocks", "iters", "n_split"]


@triton.jit
def _block_tile(w_ptr, rows, N, row_bytes, blk, n_blocks, TYPE_SIZE: tl.constexpr):
    """uint8 pointers [BLOCK_N, NB, 1, 1] to the first byte of each (row, block) of the tile.

    Rows >= N and blocks >= n_blocks are clamped to the last row / block, so every weight load is in bounds
    and unmasked: clamped rows are dropped by the store mask, clamped blocks meet zeroed activations (x is
    loaded with k < K)."""
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)   # int64: N * row_bytes can pass 2^31 (embeddings)
    blk_c = tl.minimum(blk, n_blocks - 1)
    # w is [N, row_bytes] uint8: block b of row n starts at byte n * row_bytes + b * TYPE_SIZE
    bp = w_ptr + rows_c[:, None] * row_bytes + (blk_c * TYPE_SIZE)[None, :]
    return bp[:, :, None, None]


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _qgemv_kernel(
    x_ptr, w_ptr, y_ptr, ws_ptr, bias_ptr, lut_ptr,
    M, N, K, row_bytes, n_blocks, iters, n_split,
    QTYPE: tl.constexpr, QK: tl.constexpr, TYPE_SIZE: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
    S: tl.constexpr, RSTRIDE: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, HAS_BIAS: tl.constexpr,
    REDUCE_EACH_STEP: tl.constexpr,
):
    """grid (cdiv(N, BLOCK_N), n_split). Two accumulation schemes (a tuning choice):
    REDUCE_EACH_STEP=False: products accumulate elementwise in an fp32 [M_PAD, BLOCK_N, NB, R, S] tile, reduced
        once after the K loop: no cross-lane reductions in the loop, but registers grow with the tile.
    REDUCE_EACH_STEP=True: each step's products are reduced at once into [M_PAD, BLOCK_N]: small accumulator
        (bigger tiles, more bytes in flight) at the price of in-loop reductions.
    Every (m, n) sees the same op sequence whatever M is, so rows of y are independent of M."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, R)
    j = tl.arange(0, S)
    ko = r[:, None] * RSTRIDE + j[None, :]          # [R, S] element offsets inside a group
    m_idx = tl.arange(0, M_PAD)
    x_rows = x_ptr + (m_idx % M) * K                # [M_PAD]; padding rows m >= M re-read row m % M
    if REDUCE_EACH_STEP:
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([M_PAD, BLOCK_N, NB, R, S], dtype=tl.float32)
    blk0 = pid_s * iters * NB
    for it in range(iters):
        blk = blk0 + it * NB + tl.arange(0, NB)     # [NB] block indices along K
        bp = _block_tile(w_ptr, rows, N, row_bytes, blk, n_blocks, TYPE_SIZE)
        for g in tl.static_range(G):
            wq = dequant_group(bp, r[None, None, :, None], j[None, None, None, :], g, lut_ptr, QTYPE)
            # activations at the same element indices: [M_PAD, NB, R, S]
            k = blk[:, None, None] * QK + group_offset(g, QTYPE) + ko[None, :, :]          # [NB, R, S]
            xv = tl.load(x_rows[:, None, None, None] + k[None], mask=(k < K)[None], other=0.0).to(tl.float32)
            prod = wq[None] * xv[:, None]           # [M_PAD, BLOCK_N, NB, R, S]
            if REDUCE_EACH_STEP:
                acc += tl.sum(tl.sum(tl.sum(prod, axis=4), axis=3), axis=2)
            else:
                acc += prod
    if REDUCE_EACH_STEP:
        y = acc
    else:
        y = tl.sum(tl.sum(tl.sum(acc, axis=4), axis=3), axis=2)    # [M_PAD, BLOCK_N]
    out_mask = (m_idx[:, None] < M) & (rows < N)[None, :]
    offs = m_idx[:, None] * N + rows[None, :]
    if n_split == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:   # this split's [M, N] slice of the fp32 workspace
        tl.store(ws_ptr + pid_s.to(tl.int64) * M * N + offs, y, mask=out_mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _qgemm_kernel(
    x_ptr, w_ptr, y_ptr, ws_ptr, bias_ptr, lut_ptr,
    M, N, K, row_bytes, n_blocks, iters, n_split,
    QTYPE: tl.constexpr, QK: tl.constexpr, TYPE_SIZE: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
    S: tl.constexpr, RSTRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
):
    """grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), n_split). Weights are dequantized to x's dtype in registers
    (fp32 accumulate); IEEE=True (fp32 x) keeps fp32 dots exact instead of TF32."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ms < M
    x_rows = x_ptr + ms.to(tl.int64) * K            # [BLOCK_M] activation row pointers
    r = tl.arange(0, R)
    j = tl.arange(0, S)
    ko = r[:, None] * RSTRIDE + j[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    blk0 = pid_s * iters * NB
    for it in range(iters):
        blk = blk0 + it * NB + tl.arange(0, NB)
        bp = _block_tile(w_ptr, rows, N, row_bytes, blk, n_blocks, TYPE_SIZE)
        for g in tl.static_range(G):
            wq = dequant_group(bp, r[None, None, :, None], j[None, None, None, :], g, lut_ptr, QTYPE)
            a = tl.reshape(wq, [BLOCK_N, NB * R * S]).to(x_ptr.dtype.element_ty)
            k = blk[:, None, None] * QK + group_offset(g, QTYPE) + ko[None, :, :]          # [NB, R, S]
            xt = tl.load(x_rows[None, None, None, :] + k[:, :, :, None],
                         mask=(k < K)[:, :, :, None] & m_ok[None, None, None, :], other=0.0)  # [NB, R, S, BM]
            xt = tl.reshape(xt, [NB * R * S, BLOCK_M])
            if IEEE:
                acc = tl.dot(a, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, xt, acc)
    # acc[n, m] is y[m, n]
    out_mask = row_ok[:, None] & m_ok[None, :]
    offs = ms.to(tl.int64)[None, :] * N + rows[:, None]
    if n_split == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(ws_ptr + pid_s.to(tl.int64) * M * N + offs, acc, mask=out_mask)


@triton.jit(do_not_specialize=["MN", "N", "n_split"])
def _splitk_reduce_kernel(ws_ptr, y_ptr, bias_ptr, MN, N, n_split, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[i] = sum_s ws[s, i] (+ bias[i % N]), summed in split order: deterministic."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(n_split):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequant_kernel(
    w_ptr, out_ptr, lut_ptr, N, K, row_bytes, n_blocks,
    QTYPE: tl.constexpr, QK: tl.constexpr, TYPE_SIZE: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
    S: tl.constexpr, RSTRIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, NB: tl.constexpr,
):
    """grid (cdiv(N, BLOCK_N), cdiv(n_blocks, NB)): out[N, K] (out's dtype) = dequant(w)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    blk = tl.program_id(1) * NB + tl.arange(0, NB)
    r = tl.arange(0, R)
    j = tl.arange(0, S)
    bp = _block_tile(w_ptr, rows, N, row_bytes, blk, n_blocks, TYPE_SIZE)
    out_rows = out_ptr + rows.to(tl.int64)[:, None, None, None] * K
    for g in tl.static_range(G):
        wq = dequant_group(bp, r[None, None, :, None], j[None, None, None, :], g, lut_ptr, QTYPE)
        k = blk[:, None, None] * QK + group_offset(g, QTYPE) + r[None, :, None] * RSTRIDE + j[None, None, :]
        tl.store(out_rows + k[None], wq.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None, None, None] & (k < K)[None])
