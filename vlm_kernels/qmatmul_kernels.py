"""Triton kernels for y = x @ dequant(w).T straight from GGUF blocks (launchers live in vlm_kernels/qmatmul.py).

Shared conventions
    x:    [M, K] activations, row-major (fp32 / fp16 / bf16)
    w:    uint8 [N, row_bytes], row n = K/QK consecutive GGUF blocks of TYPE_SIZE bytes (the GGUF bytes as is)
    y:    [M, N] in x's dtype; with n_split > 1 the kernels write instead an fp32 workspace ws [n_split, M, N]
          of partial sums that `_splitk_reduce_kernel` adds up in a fixed order (deterministic, no atomics).
    K loop: a program owns BLOCK_N weight rows and a contiguous range of `iters` steps of NB blocks
          (split s starts at block s * iters * NB); see `_block_tile` for the tile edges.
    Per step and per group g (see vlm_kernels/_qblocks.py) the weights come as an fp32 [BLOCK_N, NB, R, S] tile
    whose element (n, b, r, j) multiplies x[:, (blk0 + b) * QK + group_offset(g) + r * RSTRIDE + j].
Regimes: `_qgemv_kernel` (M <= 4 by default, up to 16 forced; CUDA-core FMAs + tl.sum), `_qgemm_kernel` (tensor cores, computes the
transposed tile acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T so the weight rows fill the MMA's M side even when
M is 16), `_dequant_kernel` (GGUF -> dense, for the dequantize + torch.matmul regime and for tests).
"""
from __future__ import annotations

import triton
import triton.language as tl

from vlm_kernels._qblocks import dequant_group, group_offset

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


@triton.jit
def _x_chunk(x_ptr, m, M, K, k, k_ok):
    """fp32 activations x[m, k] (0 where k >= K or m >= M), k an int32 [BLOCK_N, NB, S] tile."""
    return tl.load(x_ptr + m * K + k, mask=k_ok & ((k * 0 + m) < M), other=0.0).to(tl.float32)


@triton.jit
def _gemv_store(y_ptr, ws_ptr, bias_ptr, acc, m, M, N, rows, pid_s, n_split, HAS_BIAS: tl.constexpr):
    """Reduce one activation row's [BLOCK_N, NB, S] accumulator along K and store y[m, rows] (or its split's
    workspace slice)."""
    y = tl.sum(tl.sum(acc, axis=2), axis=1)        # [BLOCK_N]
    store_row(y_ptr, ws_ptr, bias_ptr, y, m, M, N, rows, pid_s, n_split, HAS_BIAS)


@triton.jit
def store_row(y_ptr, ws_ptr, bias_ptr, y, m, M, N, rows, pid_s, n_split, HAS_BIAS: tl.constexpr):
    """Store the fp32 [BLOCK_N] result y of activation row m: y[m, rows] (+ bias) in y's dtype, or, with split-K,
    its split's fp32 workspace slice (the reduction kernel adds the bias)."""
    ok = (rows < N) & ((rows * 0 + m) < M)
    if n_split == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * N + rows, y.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(ws_ptr + (pid_s.to(tl.int64) * M + m) * N + rows, y, mask=ok)


@triton.jit(do_not_specialize=_NO_SPECIALIZE + ["n_mchunks"])
def _qgemv_kernel(
    x_ptr, w_ptr, y_ptr, ws_ptr, bias_ptr, lut_ptr,
    M, N, K, row_bytes, n_blocks, iters, n_split, n_mchunks,
    QTYPE: tl.constexpr, QK: tl.constexpr, TYPE_SIZE: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
    S: tl.constexpr, RSTRIDE: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """grid (n_mchunks * cdiv(N, BLOCK_N), n_split); program (pid, s) owns activation rows
    m0 .. m0 + M_PAD - 1 (M_PAD in {1, 2, 4}, m0 = (pid % n_mchunks) * M_PAD), weight rows
    (pid // n_mchunks) * BLOCK_N + [0, BLOCK_N) and split s's K range. The M chunks of one weight tile are
    neighbouring programs, so the weight bytes come from DRAM once and from L2 for the other chunks.

    Layout (why it is fast): every tensor in the K loop has the one shape [BLOCK_N, NB, S] (rows x blocks x
    contiguous bytes of a group): the packed-byte loads, the activation loads (the same element indices,
    broadcast over rows by the load itself) and the fp32 accumulators. Triton then gives them all the same
    register layout (S fastest, coalesced), so the loop has no layout conversion, shared memory or barrier;
    the R values of a byte (nibbles, crumbs) are separate unrolled steps on the same loaded bytes. Only the
    per-block scales are [BLOCK_N, NB, 1] loads, broadcast along S: Triton loads them straight in the
    broadcast layout when BLOCK_N * NB < 32 * num_warps (otherwise one small shared-memory conversion per
    step). A K step is UNROLL sub-steps of NB blocks with independent loads, to keep more bytes in flight
    per thread without growing the scale tile. Products accumulate elementwise (one FMA
    per weight and activation row); the cross-lane tl.sum happens once, after the loop.
    Every (m, n) sees the same op sequence whatever M and M_PAD are: rows of y are independent of M."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    m0 = (pid % n_mchunks) * M_PAD
    rows = (pid // n_mchunks) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows >= N / blocks >= n_blocks are clamped (in-bounds unmasked loads); the clamped rows are dropped by
    # the store mask and the clamped blocks meet zeroed activations (k >= K).
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)   # int64: N * row_bytes can pass 2^31 (embeddings)
    jj = tl.arange(0, S)
    zero = tl.zeros([BLOCK_N, NB, S], dtype=tl.int32)
    acc0 = tl.zeros([BLOCK_N, NB, S], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, NB, S], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, NB, S], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, NB, S], dtype=tl.float32)
    blk0 = pid_s * iters * UNROLL * NB
    for it in range(iters):
        for h in tl.static_range(UNROLL):
            blk = blk0 + (it * UNROLL + h) * NB + tl.arange(0, NB)    # [NB] block indices along K
            blk_c = tl.minimum(blk, n_blocks - 1)
            # w is [N, row_bytes] uint8: block b of row n starts at byte n * row_bytes + b * TYPE_SIZE
            bp = w_ptr + rows_c[:, None, None] * row_bytes + (blk_c * TYPE_SIZE)[None, :, None]  # [BN, NB, 1]
            for g in tl.static_range(G):
                for rv in tl.static_range(R):
                    r = tl.full([1, 1, 1], rv, tl.int32)
                    wq = dequant_group(bp, r, jj[None, None, :], g, lut_ptr, QTYPE)   # [BLOCK_N, NB, S]
                    # element index along K of wq[n, b, j]; + zero gives it the full tile shape (see above)
                    e0 = group_offset(g, QTYPE) + rv * RSTRIDE
                    k = (blk[:, None] * QK + e0 + jj[None, :])[None] + zero
                    k_ok = k < K
                    acc0 += wq * _x_chunk(x_ptr, m0, M, K, k, k_ok)
                    if M_PAD > 1:
                        acc1 += wq * _x_chunk(x_ptr, m0 + 1, M, K, k, k_ok)
                    if M_PAD > 2:
                        acc2 += wq * _x_chunk(x_ptr, m0 + 2, M, K, k, k_ok)
                        acc3 += wq * _x_chunk(x_ptr, m0 + 3, M, K, k, k_ok)
    _gemv_store(y_ptr, ws_ptr, bias_ptr, acc0, m0, M, N, rows, pid_s, n_split, HAS_BIAS)
    if M_PAD > 1:
        _gemv_store(y_ptr, ws_ptr, bias_ptr, acc1, m0 + 1, M, N, rows, pid_s, n_split, HAS_BIAS)
    if M_PAD > 2:
        _gemv_store(y_ptr, ws_ptr, bias_ptr, acc2, m0 + 2, M, N, rows, pid_s, n_split, HAS_BIAS)
        _gemv_store(y_ptr, ws_ptr, bias_ptr, acc3, m0 + 3, M, N, rows, pid_s, n_split, HAS_BIAS)


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
