"""Decode attention: a few new query tokens per sequence against a contiguous per-sequence KV cache.

Layouts (the KV-cache module holds exactly this; views with other strides, e.g. one layer of a
[n_layer, n_seq, max_ctx, ...] tensor, are accepted):
    q        [n_seq, n_q, n_head, head_dim]   n_q new tokens per sequence (1..16; 3-D [n_seq, n_head, head_dim]
                                              means n_q = 1 and gives a 3-D output)
    k_cache  [n_seq, max_ctx, n_head_kv, head_dim]   cache row t holds absolute position t of that sequence
    v_cache  [n_seq, max_ctx, n_head_kv, head_dim]   (no ring buffer: a sliding-window layer keeps all rows)
    seq_lens int32 [n_seq]   valid cache rows per sequence INCLUDING the n_q new tokens, which must already
                             be written at rows seq_len - n_q .. seq_len - 1
    out      like q, dtype of q

Semantics, identical to :func:`vlm_kernels.attention.attention` with lq = n_q, lk = seq_len, causal=True
(end alignment): new token t sits at position p = seq_len - n_q + t and sees cache rows j <= p, and with
``sliding_window`` W only those with p - j < W (HF / llama.cpp convention). ``logit_softcap`` c: s = c*tanh(s/c)
before masking. ``scale`` defaults to head_dim ** -0.5. Rows of a sequence with seq_len = 0 output zeros.

Kernel: one program per (KV split, KV head, sequence) handles all n_q * (n_head / n_head_kv) query rows that
read that KV head (the GQA group in the M dim of one tl.dot, padded to >= 16 rows), so every K/V byte is read
once per step. When n_seq * n_head_kv programs cannot fill the GPU the visible KV range of each sequence is cut
into n_splits equal chunks (flash-decoding); each split writes a normalised partial output and its base-2
log-sum-exp, and a second kernel merges the splits in a fixed order (deterministic, no atomics). n_splits
depends only on shapes and the SM count, never on seq_lens values, so the launch needs no host sync and is
CUDA-graph friendly. seq_lens values are checked (<= max_ctx, >= n_q) only when seq_lens is a CPU tensor; for
CUDA seq_lens the check would cost a sync per token, so the kernel instead clamps seq_len to max_ctx (memory
safety) and trusts the caller.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vlm_kernels.attention import (SMEM_BUDGET, _tile_update, check_common, check_head_dims, head_dim_p2,
                               interpreter_on, masked_attention_fp32, softmax_constants, visible_mask)

MAX_N_Q = 16
MAX_SPLITS = 64
MIN_SPLIT_TOKENS = 256  # never cut the cache into chunks shorter than this


@triton.jit(do_not_specialize=["max_ctx", "n_splits", "window", "group", "ctx_bucket"])
def _decode_kernel(Q, K, V, SEQ_LENS, O, PART_O, PART_LSE,
                   max_ctx, n_splits, window, group, qk_scale, softcap_in, softcap_out,
                   ctx_bucket,  # autotune key only (ctx_bucket(max_ctx)): not used in the body
                   stride_qs, stride_qt, stride_qh, stride_qd,
                   stride_ks, stride_kt, stride_kh, stride_kd,
                   stride_vs, stride_vt, stride_vh, stride_vd,
                   stride_os, stride_ot, stride_oh, stride_od,
                   N_Q: tl.constexpr, BLOCK_R: tl.constexpr,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, SPLIT: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid = (n_splits, n_head_kv, n_seq)
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_len = tl.minimum(tl.load(SEQ_LENS + seq), max_ctx)

    # Row r of the tile = new token t = r // group, query head kv_head * group + r % group.
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < N_Q * group
    tok = offs_r // group
    head = kv_head * group + offs_r % group
    pos = seq_len - N_Q + tok  # absolute position of each row's token
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_mask = offs_d < HEAD_DIM
    seq64 = seq.to(tl.int64)  # cache offsets pass 2^31 (n_seq * max_ctx * n_head_kv * head_dim)
    q = tl.load(Q + seq64 * stride_qs + tok[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=r_ok[:, None] & d_mask[None, :], other=0.0)

    # This split's share of the visible key range [kv_lo, seq_len), in whole BLOCK_N tiles.
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(seq_len - N_Q - window + 1, 0)
    chunk = tl.cdiv(tl.cdiv(tl.maximum(seq_len - kv_lo, 0), n_splits), BLOCK_N) * BLOCK_N
    start = kv_lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_n = tl.arange(0, BLOCK_N)
    kT_ptrs = (K + seq64 * stride_ks + kv_head * stride_kh
               + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd)   # K^T tile [D2, BLOCK_N]
    v_ptrs = (V + seq64 * stride_vs + kv_head * stride_vh
              + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd)    # V tile   [BLOCK_N, D2]
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_P2], tl.float32)
    # Every tile is masked (keys < end, causal among the new tokens, window): decode is bandwidth bound and
    # the mask arithmetic hides under the loads.
    for start_n in range(start, end, BLOCK_N):
        acc, l_i, m_i = _tile_update(acc, l_i, m_i, q, kT_ptrs, v_ptrs, start_n, offs_n, pos, d_mask, end,
                                     window, qk_scale, softcap_in, softcap_out, stride_kt, stride_vt,
                                     True, True, HAS_WINDOW, SOFTCAP, HEAD_DIM != HEAD_DIM_P2, DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SPLIT:
        # Partials, fp32 contiguous: PART_O [n_seq, N_Q, n_head, n_splits, HEAD_DIM], PART_LSE [.., n_splits].
        n_head = tl.num_programs(1) * group
        prow = ((seq * N_Q + tok) * n_head + head) * n_splits + split
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        tl.store(PART_LSE + prow, lse, mask=r_ok)
        tl.store(PART_O + prow[:, None] * HEAD_DIM + offs_d[None, :], out, mask=r_ok[:, None] & d_mask[None, :])
    else:
        tl.store(O + seq64 * stride_os + tok[:, None] * stride_ot + head[:, None] * stride_oh
                 + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty), mask=r_ok[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(PART_O, PART_LSE, O, n_splits, n_head,
                          stride_os, stride_ot, stride_oh, stride_od,
                          N_Q: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
                          SPLITS_P2: tl.constexpr):
    # grid = (n_seq * N_Q * n_head,): one output row; merges its n_splits partials in split order.
    row = tl.program_id(0)
    seq = row // (N_Q * n_head)
    tok = (row // n_head) % N_Q
    head = row % n_head
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    s_ok = offs_s < n_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(PART_LSE + row * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    part = tl.load(PART_O + (row * n_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_ok[:, None] & d_mask[None, :], other=0.0)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (seq_len 0): weights 0, output 0
    w = tl.math.exp2(lse - m)
    den = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(O + seq.to(tl.int64) * stride_os + tok * stride_ot + head * stride_oh + offs_d * stride_od,
             out.to(O.dtype.element_ty), mask=d_mask)


# (BLOCK_N, num_warps, num_stages); CUDA autotune list, pruned for SMEM per head dim (sm_90 AOT-checked:
# no register spills; 128-key tiles at d256 would need > 227 KB of SMEM and are pruned).
_DECODE_CONFIGS = [(32, 4, 4), (64, 4, 3), (64, 4, 4), (128, 8, 3)]
INTERPRETER_CONFIG = (32, 4, 1)
FP32_CONFIG = (32, 4, 2)  # CUDA fp32 (exact FMA dots): not autotuned, no spills up to d256 on sm_90


def decode_configs(hd_p2: int, elem_bytes: int = 2) -> list[triton.Config]:
    out = []
    for bn, warps, stages in _DECODE_CONFIGS:
        if elem_bytes * hd_p2 * 2 * bn * stages <= SMEM_BUDGET:
            out.append(triton.Config({"BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return out


def _prune_decode(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    allowed = {(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
               for c in decode_configs(args["HEAD_DIM_P2"], args["Q"].element_size())}
    return [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]


_decode_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in _DECODE_CONFIGS],
    key=["ctx_bucket", "n_splits", "group", "N_Q", "BLOCK_R", "HEAD_DIM_P2", "HAS_WINDOW", "SOFTCAP"],
    prune_configs_by={"early_config_prune": _prune_decode},
)(_decode_kernel)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def ctx_bucket(max_ctx: int) -> int:
    """The power of two <= max_ctx (at least MIN_SPLIT_TOKENS): the autotune key and the split count follow it,
    not max_ctx itself. A one-sequence decode step views the cache rows [lo, end), so max_ctx grows by one per
    token; keyed on the exact value the autotuner re-benchmarked every configuration at every token."""
    return max(MIN_SPLIT_TOKENS, 1 << (max(int(max_ctx), 1).bit_length() - 1))


def choose_splits(n_seq: int, n_head_kv: int, max_ctx: int, device: torch.device) -> int:
    """KV splits per (sequence, KV head): aim at ~4 programs per SM, chunks of >= MIN_SPLIT_TOKENS of cache.

    Depends on shapes only (deterministic, no sync) and changes only when max_ctx crosses a power of two (the
    cap uses the power of two <= max_ctx, so chunks stay >= MIN_SPLIT_TOKENS). Under the interpreter a pretend 4-SM device keeps grids
    small while still exercising the split path."""
    n_sm = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    want = triton.cdiv(4 * n_sm, max(n_seq * n_head_kv, 1))
    cap = ctx_bucket(max_ctx) // MIN_SPLIT_TOKENS
    return max(1, min(want, cap, MAX_SPLITS))


def _validate(q, k_cache, v_cache, seq_lens, scale, sliding_window, logit_softcap):
    check_common("decode_attention", q, k_cache, v_cache, scale, sliding_window, logit_softcap)
    if q.dim() not in (3, 4):
        raise ValueError(f"decode_attention: q must be [n_seq, n_q, n_head, head_dim] (or 3-D for n_q=1), "
                         f"got {tuple(q.shape)}")
    q4 = q.unsqueeze(1) if q.dim() == 3 else q
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: k_cache / v_cache must both be [n_seq, max_ctx, n_head_kv, head_dim], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    n_seq, n_q, n_head, head_dim = q4.shape
    _, max_ctx, n_head_kv, kd = k_cache.shape
    if k_cache.shape[0] != n_seq:
        raise ValueError(f"decode_attention: q has {n_seq} sequences, k_cache {k_cache.shape[0]}")
    if kd != head_dim:
        raise ValueError(f"decode_attention: head_dim mismatch: q {tuple(q.shape)} vs k_cache {tuple(k_cache.shape)}")
    if n_head_kv == 0 or n_head % n_head_kv:
        raise ValueError(f"decode_attention: n_head={n_head} is not a multiple of n_head_kv={n_head_kv}")
    check_head_dims("decode_attention", head_dim)
    if max_ctx * max(k_cache.stride(1), v_cache.stride(1)) >= 2**31:  # in-sequence offsets are int32
        raise ValueError(f"decode_attention: one sequence's cache spans >= 2^31 elements "
                         f"(max_ctx={max_ctx}, row stride {k_cache.stride(1)})")
    if not 1 <= n_q <= MAX_N_Q:
        raise ValueError(f"decode_attention: {n_q} query tokens per sequence; 1..{MAX_N_Q} supported "
                         f"(use attention() for prefill)")
    if not isinstance(seq_lens, torch.Tensor):
        raise TypeError(f"decode_attention: seq_lens must be a torch.Tensor, got {type(seq_lens).__name__}")
    if seq_lens.dtype != torch.int32:
        raise TypeError(f"decode_attention: seq_lens must be int32, got {seq_lens.dtype}")
    if seq_lens.shape != (n_seq,):
        raise ValueError(f"decode_attention: seq_lens must be [n_seq]=[{n_seq}], got {tuple(seq_lens.shape)}")
    if seq_lens.device != q.device:
        raise ValueError(f"decode_attention: seq_lens is on {seq_lens.device} but q is on {q.device}")
    if seq_lens.device.type == "cpu" and n_seq:
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if hi > max_ctx:
            raise ValueError(f"decode_attention: seq_lens max {hi} > cache length max_ctx={max_ctx}")
        if lo < 0:
            raise ValueError(f"decode_attention: seq_lens has a negative entry ({lo})")
        if bool(((seq_lens > 0) & (seq_lens < n_q)).any()):
            raise ValueError(f"decode_attention: a seq_lens entry is below n_q={n_q} (the new tokens are in the "
                             f"cache, so seq_len >= n_q, or 0 for an unused slot): {seq_lens.tolist()[:16]}")
    return q4


def decode_attention_triton(q, k_cache, v_cache, seq_lens, *, scale=None, sliding_window=None,
                            logit_softcap=None, n_splits: int | None = None,
                            config: tuple[int, int, int] | None = None):
    """Triton decode attention; see the module docstring. ``n_splits`` forces the KV split count and
    ``config`` = (BLOCK_N, num_warps, num_stages) one launch configuration (tests, benchmarks)."""
    q4 = _validate(q, k_cache, v_cache, seq_lens, scale, sliding_window, logit_softcap)
    n_seq, n_q, n_head, head_dim = q4.shape
    max_ctx, n_head_kv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(q4.shape, dtype=q.dtype, device=q.device)
    if n_seq == 0:
        return out.reshape(q.shape)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    qk_scale, sc_in, sc_out = softmax_constants(scale, logit_softcap)
    group = n_head // n_head_kv
    hd_p2 = head_dim_p2(head_dim)
    if n_splits is None:
        n_splits = choose_splits(n_seq, n_head_kv, max_ctx, q.device)
    if not 1 <= n_splits <= MAX_SPLITS:
        raise ValueError(f"decode_attention: n_splits={n_splits} outside 1..{MAX_SPLITS}")
    split = n_splits > 1
    if split:
        part_o = torch.empty((n_seq, n_q, n_head, n_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((n_seq, n_q, n_head, n_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    args = (q4, k_cache, v_cache, seq_lens, out, part_o, part_lse,
            max_ctx, n_splits, int(sliding_window or 0), group, qk_scale, sc_in, sc_out, ctx_bucket(max_ctx),
            *q4.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride())
    meta = dict(N_Q=n_q, BLOCK_R=max(16, triton.next_power_of_2(n_q * group)),
                HEAD_DIM=head_dim, HEAD_DIM_P2=hd_p2, HAS_WINDOW=sliding_window is not None,
                SOFTCAP=logit_softcap is not None, SPLIT=split,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    grid = (n_splits, n_head_kv, n_seq)
    if config is None and interpreter_on():
        config = INTERPRETER_CONFIG
    elif config is None and q.dtype == torch.float32:
        config = FP32_CONFIG
    if config is not None:
        bn, warps, stages = config
        _decode_kernel[grid](*args, **meta, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    else:
        _decode_tuned[grid](*args, **meta)
    if split:
        _decode_reduce_kernel[(n_seq * n_q * n_head,)](
            part_o, part_lse, out, n_splits, n_head, *out.stride(),
            N_Q=n_q, HEAD_DIM=head_dim, HEAD_DIM_P2=hd_p2, SPLITS_P2=max(2, triton.next_power_of_2(n_splits)),
            num_warps=4 if hd_p2 * n_splits <= 4096 else 8)
    return out.reshape(q.shape)


def decode_attention_ref(q, k_cache, v_cache, seq_lens, *, scale=None, sliding_window=None, logit_softcap=None):
    """Spec: per sequence, SDPA in fp32 over cache rows [0, seq_len) with the causal(+window) end-aligned mask."""
    q4 = _validate(q, k_cache, v_cache, seq_lens, scale, sliding_window, logit_softcap)
    scale = q4.shape[-1] ** -0.5 if scale is None else float(scale)
    n_q = q4.shape[1]
    out = torch.zeros(q4.shape, dtype=q.dtype, device=q.device)
    for s, lk in enumerate(seq_lens.tolist()):
        lk = min(lk, k_cache.shape[1])
        if lk == 0:
            continue
        vis = visible_mask(n_q, lk, True, sliding_window, q.device)
        out[s] = masked_attention_fp32(q4[s], k_cache[s, :lk], v_cache[s, :lk], vis, scale,
                                       logit_softcap).to(q.dtype)
    return out.reshape(q.shape)
