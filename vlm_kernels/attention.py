"""Prefill / encoder / cross attention over packed variable-length sequences (FlashAttention-2 style).

Layouts (token-major, as the projections produce them; any strides are accepted):
    q    [n_tokens_q, n_head,    head_dim]
    k, v [n_tokens_k, n_head_kv, head_dim]     n_head % n_head_kv == 0 (GQA / MQA: query head h reads KV head
                                               h // (n_head // n_head_kv), as in HF's repeat_kv)
    out  [n_tokens_q, n_head,    head_dim]     dtype of q (fp16, bf16 or fp32; q, k, v share one dtype)

Semantics (every variant is a boolean "visible" mask over a softmax computed in fp32):
  * Varlen: ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 [n_seq + 1], starting at 0, non-decreasing, ending at
    n_tokens_q / n_tokens_k. Sequence s owns query rows cu_seqlens_q[s]:cu_seqlens_q[s+1] and key rows
    cu_seqlens_k[s]:cu_seqlens_k[s+1]; tokens never see another sequence. Without cu_seqlens all tokens are one
    sequence (give both or neither). Validating them needs their values: CPU tensors are read directly, CUDA
    tensors cost one device->host copy (a sync; fine for prefill, never used in decode). The values checked
    are remembered for the same tensor object at the same version counter, so the layers of one forward pass
    that share a cu_seqlens tensor pay that sync once (a raw-pointer write into it would go unnoticed).
  * Positions are aligned at the END: in a sequence with lq queries and lk keys, query i sits at absolute
    position p = i + (lk - lq) and key j at position j. This covers a prefill chunk that continues a cached
    prefix (the keys are prefix + chunk) and plain self-attention (lq == lk).
  * ``causal``: key j is visible iff j <= p.
  * ``sliding_window`` W (needs causal=True): key j is visible iff also p - j < W, i.e. the W most recent
    positions including the query itself. This is HF transformers' ``sliding_window_overlay``
    (``kv_idx > q_idx - sliding_window``) used by Gemma 2/3, and llama.cpp's LLAMA_SWA_TYPE_STANDARD mask
    (masked iff p - j >= n_swa).
  * ``logit_softcap`` c (Gemma 2): s = c * tanh(scale * q.k / c), applied before the mask and the softmax.
  * ``scale`` defaults to head_dim ** -0.5.
  * A query row that sees no key at all (causal with lk < lq, or an empty key sequence) outputs zeros.

Kernel: one program per (query block of BLOCK_M rows, query head, sequence); online softmax in base 2 with
log2(e) folded into the scale. The KV loop runs only over tiles that are not fully masked (causal upper bound,
sliding-window lower bound) and is split in three parts: masked tiles before, unmasked interior tiles (no
mask arithmetic, no bounds checks on the keys), masked tiles after. Head dims that are not a power of two
(72, 80, 96) are padded to the next power of two in registers only (masked loads), never in memory.
Supported head dims: 1..256 (tuned for 64, 72, 80, 96, 128, 256).

Precision: fp32 softmax statistics and accumulator; P is rounded to the input dtype before P @ V (as in
FlashAttention); fp32 inputs use exact fp32 dots (input_precision="ieee", never TF32). Offsets inside one
sequence are int32 (a sequence must span < 2^31 elements of q / k / v). Launch: autotuned on CUDA over a
short per-head-dim list (keyed by power-of-two sequence-length buckets, head dim and variant), a fixed small
config for fp32 on CUDA, one config under the interpreter; ``config=`` forces one.
"""
from __future__ import annotations

import math
import os
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def head_dim_p2(head_dim: int) -> int:
    """Register width of the head dim: next power of two, at least 16 (tl.dot needs K >= 16 on GPU)."""
    return max(16, triton.next_power_of_2(head_dim))


def softmax_constants(scale: float, logit_softcap: float | None) -> tuple[float, float, float]:
    """(qk_scale, softcap_in, softcap_out) such that the kernel's base-2 logit is

    no softcap: s2 = qk * qk_scale                                   with qk_scale = scale * log2(e)
    softcap c : s2 = softcap_out * tanh_via_exp2(qk * softcap_in)    where c * tanh(x) * log2(e) =
                c * log2(e) * (1 - 2 / (2^(2 * log2(e) * x) + 1)) and x = scale * qk / c.
    """
    if logit_softcap is None:
        return scale * LOG2E, 0.0, 0.0
    return scale * LOG2E, 2.0 * LOG2E * scale / logit_softcap, logit_softcap * LOG2E


@triton.jit
def _tile_update(acc, l_i, m_i, q, kT_ptrs, v_ptrs, start_n, offs_n, pos, d_mask, k_end, window,
                 qk_scale, softcap_in, softcap_out, stride_kt, stride_vt,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                 PAD_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over keys start_n .. start_n + BLOCK_N (shared by prefill and decode).

    q [R, D2]; kT_ptrs [D2, BLOCK_N] and v_ptrs [BLOCK_N, D2] point at key 0 of this (sequence, kv head);
    pos [R] absolute query positions; keys >= k_end are invisible. m_i / l_i / acc are in base 2.
    MASKED=False is only legal when every key of the tile is visible to every row (interior tiles).
    """
    kn = start_n + offs_n
    if MASKED:
        k_ok = kn < k_end
        kT = tl.load(kT_ptrs + start_n * stride_kt, mask=k_ok[None, :] & d_mask[:, None], other=0.0)
    elif PAD_D:
        kT = tl.load(kT_ptrs + start_n * stride_kt, mask=d_mask[:, None], other=0.0)
    else:
        kT = tl.load(kT_ptrs + start_n * stride_kt)
    qk = tl.dot(q, kT, input_precision=DOT_PREC)
    # Base-2 logit = s * mult. Without softcap s = qk and the scale multiplies inside the exp2 argument
    # (one FMA per element, as in Triton's fused-attention tutorial; max commutes with a positive scale).
    if SOFTCAP:
        # c*log2e*tanh(x) with tanh(x) = 1 - 2/(e^(2x)+1): saturates cleanly to +-1 when exp2 over/underflows.
        s = softcap_out * (1.0 - 2.0 / (tl.math.exp2(qk * softcap_in) + 1.0))
        mult = 1.0
    else:
        s = qk
        mult = qk_scale
    if MASKED:
        vis = k_ok[None, :]
        if CAUSAL:
            vis = vis & (kn[None, :] <= pos[:, None])
        if HAS_WINDOW:
            vis = vis & (pos[:, None] - kn[None, :] < window)
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * mult)
    if MASKED:
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(s * mult - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(v_ptrs + start_n * stride_vt, mask=k_ok[:, None] & d_mask[None, :], other=0.0)
    elif PAD_D:
        v = tl.load(v_ptrs + start_n * stride_vt, mask=d_mask[None, :], other=0.0)
    else:
        v = tl.load(v_ptrs + start_n * stride_vt)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


# Lengths, window and group are runtime ints that are not specialised (no recompile when one happens to be 1 or
# a multiple of 16); strides keep Triton's divisibility specialisation (vectorised loads).
@triton.jit(do_not_specialize=["n_tokens_q", "n_tokens_k", "window", "group", "bucket_q", "bucket_k"])
def _attn_fwd_kernel(Q, K, V, O, CU_Q, CU_K,
                     n_tokens_q, n_tokens_k, window, group, qk_scale, softcap_in, softcap_out,
                     stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                     stride_vt, stride_vh, stride_vd, stride_ot, stride_oh, stride_od,
                     bucket_q, bucket_k,  # autotune key only (seq-length buckets)
                     HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
                     ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid = (cdiv(max_seqlen_q, BLOCK_M), n_head, n_seq). Query blocks are visited last-first so that the
    # heaviest causal blocks start first (better tail balance); blocks past this sequence's end exit at once.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    kv_head = head // group  # GQA: query heads h*group .. h*group+group-1 share KV head h
    if VARLEN:
        q_start = tl.load(CU_Q + seq)
        q_len = tl.load(CU_Q + seq + 1) - q_start
        k_start = tl.load(CU_K + seq)
        k_len = tl.load(CU_K + seq + 1) - k_start
    else:
        q_len = n_tokens_q
        k_len = n_tokens_k
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offset = k_len - q_len  # query row i sits at absolute position i + offset (end alignment)

    # Base pointers of this (sequence, head); the token offset is widened to int64 (n_tokens * stride can
    # pass 2^31), offsets inside one sequence stay int32.
    off_q, off_o, off_k, off_v = head * stride_qh, head * stride_oh, kv_head * stride_kh, kv_head * stride_vh
    if ALIGN > 1:
        # The launcher (alignment_hint) checked: base pointers 16-byte aligned, token / head strides multiples of
        # ALIGN elements (16 bytes). Triton proves alignment only from strides divisible by 16 elements, so a
        # head stride of 72 (SigLIP's head_dim) made every q / k / v load a 2-byte scalar load and dropped the
        # cp.async pipeline (sm_90 AOT compile: 320 ld.global.b16, a 3x longer loop than head_dim 80; with the
        # hint both compile alike). The hint must sit here, on the products, inline: on the stride arguments,
        # or returned from a helper function, it is lost.
        off_q = tl.multiple_of(off_q, ALIGN)
        off_o = tl.multiple_of(off_o, ALIGN)
        off_k = tl.multiple_of(off_k, ALIGN)
        off_v = tl.multiple_of(off_v, ALIGN)
    q_base = Q + off_q
    o_base = O + off_o
    k_base = K + off_k
    v_base = V + off_v
    if VARLEN:
        st_q, st_o = q_start.to(tl.int64) * stride_qt, q_start.to(tl.int64) * stride_ot
        st_k, st_v = k_start.to(tl.int64) * stride_kt, k_start.to(tl.int64) * stride_vt
        if ALIGN > 1:
            st_q = tl.multiple_of(st_q, ALIGN)
            st_o = tl.multiple_of(st_o, ALIGN)
            st_k = tl.multiple_of(st_k, ALIGN)
            st_v = tl.multiple_of(st_v, ALIGN)
        q_base += st_q
        o_base += st_o
        k_base += st_k
        v_base += st_v

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_mask = offs_d < HEAD_DIM  # padded lanes of the head dim load 0 and are never stored
    m_ok = offs_m < q_len
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_mask[None, :], other=0.0)
    kT_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd  # K^T tile [D2, BLOCK_N]
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd   # V tile   [BLOCK_N, D2]
    pos = offs_m + offset

    # KV range that is not fully masked for rows m0 .. m0+BLOCK_M-1 (positions p_min .. p_max):
    #   causal : keys j <= p_max        -> hi;   interior (visible to every row) needs j <= p_min
    #   window : keys j >  p_min - W    -> lo;   interior needs j > p_max - W
    # Tile starts are multiples of BLOCK_N; clamps keep every `//` on non-negative values.
    hi = k_len
    full_hi = k_len
    if CAUSAL:
        hi = tl.maximum(tl.minimum(k_len, m0 + BLOCK_M + offset), 0)
        full_hi = tl.maximum(tl.minimum(k_len, m0 + offset + 1), 0)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    lo = 0
    full_lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(m0 + offset - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M + offset - window, 0), BLOCK_N) * BLOCK_N
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], tl.float32)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_P2
    for start_n in range(lo, mid_lo, BLOCK_N):  # window edge: masked
        acc, l_i, m_i = _tile_update(acc, l_i, m_i, q, kT_ptrs, v_ptrs, start_n, offs_n, pos, d_mask, k_len,
                                     window, qk_scale, softcap_in, softcap_out, stride_kt, stride_vt,
                                     True, CAUSAL, HAS_WINDOW, SOFTCAP, PAD_D, DOT_PREC)
    for start_n in range(mid_lo, mid_hi, BLOCK_N):  # interior: no masks
        acc, l_i, m_i = _tile_update(acc, l_i, m_i, q, kT_ptrs, v_ptrs, start_n, offs_n, pos, d_mask, k_len,
                                     window, qk_scale, softcap_in, softcap_out, stride_kt, stride_vt,
                                     False, CAUSAL, HAS_WINDOW, SOFTCAP, PAD_D, DOT_PREC)
    for start_n in range(mid_hi, hi, BLOCK_N):  # causal diagonal / sequence end: masked
        acc, l_i, m_i = _tile_update(acc, l_i, m_i, q, kT_ptrs, v_ptrs, start_n, offs_n, pos, d_mask, k_len,
                                     window, qk_scale, softcap_in, softcap_out, stride_kt, stride_vt,
                                     True, CAUSAL, HAS_WINDOW, SOFTCAP, PAD_D, DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows that saw no key: acc is 0 -> output 0
    out = acc / l_safe[:, None]
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------------------
# Launch configurations. On CUDA the kernel is autotuned over a short per-head-dim list; under the
# interpreter exactly one config runs (multi-config autotune needs a GPU).
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Compiled offline for sm_90 with triton 3.6 (the GPU toolchain) and
# 3.9, then `ptxas -v`: all use wgmma with cp.async pipelining and none spills registers. Left out for
# spilling: BLOCK_M=128 with 4 warps from d80 up, 128x128 tiles at d128, d256 with 4 warps.
_PREFILL_CONFIGS: dict[int, list[tuple[int, int, int, int]]] = {
    16: [(64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3)],
    32: [(64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3)],
    64: [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
    128: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3)],
    256: [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2)],
}


def fp32_config(hd_p2: int) -> tuple[int, int, int, int]:
    # Exact fp32 dots run on FMA units and keep whole tiles in registers: small tiles (no spills on sm_90).
    return (32, 32, 4, 2) if hd_p2 <= 64 else (16, 16, 4, 2)


INTERPRETER_CONFIG = (64, 64, 4, 1)  # big tiles: the interpreter pays per tile step, not per element
SMEM_BUDGET = 200 * 1024  # bytes; H100 has 227 KB per block, leave room for layout-conversion scratch


def prefill_configs(hd_p2: int, elem_bytes: int = 2) -> list[triton.Config]:
    """The CUDA autotune list for one padded head dim, minus configs whose pipelined K/V tiles overflow SMEM."""
    out = []
    for bm, bn, warps, stages in _PREFILL_CONFIGS[hd_p2]:
        smem = elem_bytes * hd_p2 * (bm + 2 * bn * stages)
        if smem <= SMEM_BUDGET:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return out


def _prune_prefill(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    elem = args["Q"].element_size()
    allowed = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
               for c in prefill_configs(args["HEAD_DIM_P2"], elem)}
    keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
    # Short sequences gain nothing from 128-row blocks.
    short = [c for c in keep if c.kwargs["BLOCK_M"] <= max(64, args["bucket_q"])]
    return short or keep


_ALL_PREFILL = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for d in sorted(_PREFILL_CONFIGS) for bm, bn, w, s in _PREFILL_CONFIGS[d]]
_ALL_PREFILL = list({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c
                     for c in _ALL_PREFILL}.values())
_attn_fwd_tuned = triton.autotune(
    configs=_ALL_PREFILL,
    key=["bucket_q", "bucket_k", "HEAD_DIM_P2", "CAUSAL", "HAS_WINDOW", "SOFTCAP", "VARLEN"],
    prune_configs_by={"early_config_prune": _prune_prefill},
)(_attn_fwd_kernel)


# ---------------------------------------------------------------------------------------------------------
def check_head_dims(what: str, head_dim: int) -> None:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{what}: head_dim {head_dim} is not supported (1..{MAX_HEAD_DIM}; tuned for "
                         f"64, 72, 80, 96, 128, 256)")


def check_common(what: str, q, k, v, scale, sliding_window, logit_softcap) -> None:
    """dtype / device / option checks shared by attention and decode_attention."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"{what}: q dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{what}: q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{what}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{what}: scale must be a finite positive number, got {scale!r}")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"{what}: sliding_window must be a positive int or None, got {sliding_window!r}")
    if logit_softcap is not None and not (isinstance(logit_softcap, (int, float)) and logit_softcap > 0):
        raise ValueError(f"{what}: logit_softcap must be a positive number or None, got {logit_softcap!r}")


_CU_CACHE: list[tuple[weakref.ref, int, torch.Tensor]] = []  # (tensor, version, validated host copy)


def _cu_host_values(cu: torch.Tensor) -> torch.Tensor:
    if cu.is_inference():  # inference tensors keep no version counter: cannot tell if it changed, so re-read
        return cu.cpu()
    for ref, version, host in _CU_CACHE:
        if ref() is cu and version == cu._version:
            return host
    host = cu.cpu()
    _CU_CACHE.insert(0, (weakref.ref(cu), cu._version, host))
    del _CU_CACHE[4:]
    return host


def _check_cu_seqlens(name: str, cu, n_tokens: int, device) -> torch.Tensor:
    """Validate one cu_seqlens tensor; returns its values on the CPU (one sync when it lives on CUDA)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"attention: {name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"attention: {name} must be 1-D [n_seq + 1] with n_seq >= 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"attention: {name} is on {cu.device} but q is on {device}")
    host = _cu_host_values(cu) if cu.device.type == "cuda" else cu
    if int(host[0]) != 0:
        raise ValueError(f"attention: {name} must start at 0, got {int(host[0])}")
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"attention: {name} is not monotonic (non-decreasing): {host.tolist()[:16]}")
    if int(host[-1]) != n_tokens:
        raise ValueError(f"attention: {name} must end at n_tokens={n_tokens}, got {int(host[-1])}")
    return host


def _seq_bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 16)), 16384)


def _validate(q, k, v, causal, scale, sliding_window, logit_softcap, cu_seqlens_q, cu_seqlens_k):
    """All input checks (shared by attention_triton and attention_ref). Returns per-sequence lengths (CPU)."""
    check_common("attention", q, k, v, scale, sliding_window, logit_softcap)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"attention: q, k, v must be 3-D [n_tokens, heads, head_dim], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    n_head, head_dim = q.shape[1], q.shape[2]
    n_head_kv = k.shape[1]
    if k.shape[2] != head_dim:
        raise ValueError(f"attention: head_dim mismatch: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    if n_head_kv == 0 or n_head % n_head_kv:
        raise ValueError(f"attention: n_head={n_head} is not a multiple of n_head_kv={n_head_kv}")
    check_head_dims("attention", head_dim)
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {causal!r}")
    if sliding_window is not None and not causal:
        raise ValueError("attention: sliding_window needs causal=True (the window looks back from each query)")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("attention: give both cu_seqlens_q and cu_seqlens_k, or neither")
    if cu_seqlens_q is None:
        return [q.shape[0]], [k.shape[0]]
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cq.numel() != ck.numel():
        raise ValueError(f"attention: cu_seqlens_q has {cq.numel() - 1} sequences, cu_seqlens_k {ck.numel() - 1}")
    return (cq[1:] - cq[:-1]).tolist(), (ck[1:] - ck[:-1]).tolist()


def alignment_hint(*ts: torch.Tensor) -> int:
    """Elements per 16 bytes when every tensor's base pointer is 16-byte aligned and its token / head strides are
    multiples of that (the kernel's ALIGN), else 1. The head-dim stride must be 1 for vector loads anyway."""
    align = 16 // ts[0].element_size()
    for t in ts:
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any(st % align for st in t.stride()[:-1]):
            return 1
    return align


def attention_triton(q, k, v, *, causal, scale=None, sliding_window=None, logit_softcap=None,
                     cu_seqlens_q=None, cu_seqlens_k=None, config: tuple[int, int, int, int] | None = None):
    """Triton attention; see the module docstring. ``config`` = (BLOCK_M, BLOCK_N, num_warps, num_stages)
    forces one launch configuration (tests, benchmarks) instead of the autotuned / interpreter default."""
    lens_q, lens_k = _validate(q, k, v, causal, scale, sliding_window, logit_softcap, cu_seqlens_q, cu_seqlens_k)
    n_tokens_q, n_head, head_dim = q.shape
    n_head_kv = k.shape[1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    qk_scale, sc_in, sc_out = softmax_constants(scale, logit_softcap)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    max_lq, max_lk = max(lens_q), max(lens_k)
    if n_tokens_q == 0 or max_lq == 0:
        return out
    # Offsets inside one sequence are int32 (only the sequence start is widened to int64).
    if max(max_lq * q.stride(0), max_lk * max(k.stride(0), v.stride(0))) >= 2**31:
        raise ValueError(f"attention: a sequence of {max(max_lq, max_lk)} tokens spans >= 2^31 elements "
                         f"(token strides q {q.stride(0)}, k {k.stride(0)}); split it")
    varlen = cu_seqlens_q is not None
    n_seq = len(lens_q)
    cu_q = cu_seqlens_q if varlen else q  # dummy pointer when not varlen (never read)
    cu_k = cu_seqlens_k if varlen else q
    hd_p2 = head_dim_p2(head_dim)
    args = (q, k, v, out, cu_q, cu_k, n_tokens_q, k.shape[0], int(sliding_window or 0), n_head // n_head_kv,
            qk_scale, sc_in, sc_out,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), _seq_bucket(max_lq), _seq_bucket(max_lk))
    meta = dict(HEAD_DIM=head_dim, HEAD_DIM_P2=hd_p2, CAUSAL=causal,
                HAS_WINDOW=sliding_window is not None, SOFTCAP=logit_softcap is not None, VARLEN=varlen,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", ALIGN=alignment_hint(q, k, v, out))
    if config is None and interpreter_on():
        config = INTERPRETER_CONFIG
    elif config is None and q.dtype == torch.float32:
        config = fp32_config(hd_p2)  # CUDA fp32: a slow exact path, not autotuned
    if config is not None:
        bm, bn, warps, stages = config
        grid = (triton.cdiv(max_lq, bm), n_head, n_seq)
        _attn_fwd_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    else:
        grid = lambda m: (triton.cdiv(max_lq, m["BLOCK_M"]), n_head, n_seq)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **meta)
    return out


# ---------------------------------------------------------------------------------------------------------
# Reference (the spec): SDPA in fp32 with an explicit boolean mask built per sequence.
def visible_mask(lq: int, lk: int, causal: bool, sliding_window: int | None, device=None) -> torch.Tensor:
    """bool [lq, lk]: True where query i (absolute position i + lk - lq) may attend key j."""
    pos = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    vis = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        vis = vis & (j <= pos)
    if sliding_window is not None:
        vis = vis & (pos - j < sliding_window)
    return vis


def masked_attention_fp32(q, k, v, vis, scale, logit_softcap):
    """One sequence: q [lq, n_head, D], k/v [lk, n_head_kv, D], vis bool [lq, lk] -> fp32 [lq, n_head, D]."""
    group = q.shape[1] // k.shape[1]
    qf = q.float().transpose(0, 1)                                     # [n_head, lq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)     # [n_head, lk, D] (HF repeat_kv order)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    if logit_softcap is None:
        o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=vis, scale=scale)
    else:  # SDPA has no softcap: the same math written out (HF Gemma 2 eager attention)
        s = (qf @ kf.transpose(-1, -2)) * scale
        s = logit_softcap * torch.tanh(s / logit_softcap)
        o = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1) @ vf
    o = torch.where(vis.any(-1)[None, :, None], o, 0.0)  # rows with no visible key -> 0 (SDPA gives NaN)
    return o.transpose(0, 1)


def attention_ref(q, k, v, *, causal, scale=None, sliding_window=None, logit_softcap=None,
                  cu_seqlens_q=None, cu_seqlens_k=None):
    lens_q, lens_k = _validate(q, k, v, causal, scale, sliding_window, logit_softcap, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    sq = sk = 0
    for lq, lk in zip(lens_q, lens_k):
        if lq:
            vis = visible_mask(lq, lk, causal, sliding_window, q.device)
            out[sq:sq + lq] = masked_attention_fp32(q[sq:sq + lq], k[sk:sk + lk], v[sk:sk + lk], vis, scale,
                                                    logit_softcap).to(q.dtype)
        sq, sk = sq + lq, sk + lk
    return out
