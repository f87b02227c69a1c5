"""Rotary position embedding: 1-D RoPE (GPT-J "normal" and NeoX halves), M-RoPE and the 2-D RoPE of vision towers.

x: [n_tokens, n_head, head_dim] (any strides with a contiguous last dim). The first n_rot dims (default head_dim)
are rotated in n_rot/2 pairs; dims [n_rot, head_dim) are copied unchanged (llama.cpp's partial rotation).

Pairing (which two dims one angle rotates):
  * mode="normal": adjacent pairs (2k, 2k+1) — GPT-J style, llama.cpp LLAMA_ROPE_TYPE_NORM (Llama GGUFs: the
    converter permutes Q/K rows so this equals HF's rotate_half on the unpermuted weights).
  * mode="neox":  halves (k, k + n_rot/2) — HF `rotate_half`, Qwen2/Gemma/GPT-NeoX, LLAMA_ROPE_TYPE_NEOX.
  * M-RoPE is mode="neox" with `sections` given (ggml rotates MROPE like NEOX); mode="vision" pairs halves too
    (ggml's VISION rotates with n_dims = head_dim/2 and offset n_dims, which is again (k, k + head_dim/2)).

Angle of pair k (k < n_rot/2), computed in fp32 exactly as HF does:
    inv_freq[k] = 1 / theta^(2k / n_rot)                  (fp32 torch.pow on the host, HF's formula)
    angle[t, k] = float(positions[row(k), t]) · inv_freq[k] / freq_factors[k]
  * 1-D modes: positions [n_tokens], row(k) = 0.
  * M-RoPE, mode="neox" + sections (Qwen2-VL text; HF `mrope_section`, llama.cpp `rope.dimension_sections`,
    ggml_rope_multi): positions [3 or 4, n_tokens] = planes (t, h, w[, e]); sections = pair counts
    [s_t, s_h, s_w(, s_e)] summing to n_rot/2; pair k takes the plane of the section holding k and keeps its
    global frequency index k (HF splits cos over the first half by mrope_section and repeats it for the second
    half; ggml keeps one running theta per plane, all multiplied by the same theta_scale every step).
  * vision (Qwen2-VL/2.5-VL ViT, HF Qwen2VLVisionRotaryEmbedding + apply_rotary_pos_emb_vision, llama.cpp
    GGML_ROPE_TYPE_VISION): positions [2, n_tokens] = (h, w) rows, or llama.cpp's [4, n_tokens] planes;
    sections default [n_rot/4, n_rot/4] (h then w). The frequency index restarts at every section: pair k in a
    section starting at k0 uses j = k − k0 and inv_freq_v[j] = 1 / theta^(2j / (n_rot/2)) — HF builds
    inv_freq over dim = head_dim/2 and concatenates h- and w-angles; ggml resets theta per section
    (indep_sects) with theta_scale = base^(-2/n_dims), n_dims = head_dim/2. Vision needs n_rot == head_dim
    (ggml asserts n_dims == ne0/2).
Angles differ from llama.cpp's running product theta *= theta_scale by float rounding only; we follow HF.

Output: a new [n_tokens, n_head, head_dim] tensor in x's dtype (rotation done in fp32, one rounding).
Not covered: YaRN/linear scaling (fold them into freq_factors or positions), Qwen3-VL interleaved IMROPE.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MODES = ("normal", "neox", "vision")
TARGET_PROGRAMS = 264        # ~2 per SM on an H100 (132 SMs)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _rope_kernel(
    X, POS, INV_FREQ, SEC, Y,
    n_tokens, n_head,
    stride_xt, stride_xh,            # x [n_tokens, n_head, head_dim], last dim contiguous
    stride_yt, stride_yh,            # y likewise (freshly allocated, contiguous)
    stride_pr,                       # positions [n_rows, n_tokens]: row stride (tokens contiguous)
    HALF: tl.constexpr,              # n_rot / 2 pairs
    HALF_PAD: tl.constexpr,          # next power of two >= HALF
    ADJACENT: tl.constexpr,          # pairs (2k, 2k+1) instead of (k, k + HALF)
    N_ROT: tl.constexpr, TAIL: tl.constexpr, TAIL_PAD: tl.constexpr,   # dims [N_ROT, N_ROT + TAIL) copied
    BLOCK_T: tl.constexpr, HEADS_PER_PROG: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = t < n_tokens
    k = tl.arange(0, HALF_PAD)
    k_ok = k < HALF
    mask = t_ok[:, None] & k_ok[None, :]

    # Angles for this token block, shared by every head: angle[t, k] = pos[row(k), t] * inv_freq[k] (fp32).
    row = tl.load(SEC + k, mask=k_ok, other=0)                       # int32 [HALF_PAD] position plane of pair k
    inv_freq = tl.load(INV_FREQ + k, mask=k_ok, other=0.0)           # fp32  [HALF_PAD]
    pos = tl.load(POS + row[None, :].to(tl.int64) * stride_pr + t[:, None], mask=mask, other=0)
    ang = pos.to(tl.float32) * inv_freq[None, :]
    # Reduce to [-pi, pi] with a two-constant 2*pi (6.28125 has 8 significant bits, so q*6.28125 is exact for
    # q < 2^16): positions in the 10^5 range give angles where fast hardware sin/cos lose accuracy.
    q = tl.floor(ang * 0.15915494309189535 + 0.5)
    r = (ang - q * 6.28125) - q * 0.0019353071795864769
    cos = tl.cos(r)
    sin = tl.sin(r)

    if ADJACENT:
        i0 = 2 * k
        i1 = 2 * k + 1
    else:
        i0 = k
        i1 = k + HALF
    tail = N_ROT + tl.arange(0, TAIL_PAD)
    tail_mask = t_ok[:, None] & (tail < N_ROT + TAIL)[None, :]

    for hh in range(HEADS_PER_PROG):
        h = pid_h * HEADS_PER_PROG + hh
        if h < n_head:
            xb = X + t[:, None] * stride_xt + h * stride_xh           # [BLOCK_T, 1] base of x[t, h, :]
            yb = Y + t[:, None] * stride_yt + h * stride_yh
            x0 = tl.load(xb + i0[None, :], mask=mask, other=0.0).to(tl.float32)
            x1 = tl.load(xb + i1[None, :], mask=mask, other=0.0).to(tl.float32)
            # HF: q*cos + rotate_half(q)*sin  ->  (x0 cos - x1 sin, x1 cos + x0 sin)
            y0 = x0 * cos - x1 * sin
            y1 = x1 * cos + x0 * sin
            tl.store(yb + i0[None, :], y0.to(Y.dtype.element_ty), mask=mask)
            tl.store(yb + i1[None, :], y1.to(Y.dtype.element_ty), mask=mask)
            if TAIL > 0:
                xt = tl.load(xb + tail[None, :], mask=tail_mask, other=0.0)
                tl.store(yb + tail[None, :], xt.to(Y.dtype.element_ty), mask=tail_mask)


# ----------------------------------------------------------------------------------------------------------
# host-side tables

@functools.lru_cache(maxsize=64)
def _inv_freq(theta: float, n_rot: int, mode: str, sections: tuple[int, ...],
              device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv_freq fp32 [n_rot/2], row int32 [n_rot/2]), cached per device. Computed on the CPU with HF's fp32
    formula so the angles match HF bit for bit whatever device runs the kernel."""
    half = n_rot // 2
    if mode == "vision":
        # Frequency index restarts in every section; base dim is n_rot/2 (HF: head_dim // 2).
        dim = half
        longest = max(sections)
        base = 1.0 / (theta ** (torch.arange(0, 2 * longest, 2, dtype=torch.int64).float() / dim))
        inv = torch.cat([base[:s] for s in sections])
    else:
        inv = 1.0 / (theta ** (torch.arange(0, n_rot, 2, dtype=torch.int64).float() / n_rot))
    row = torch.cat([torch.full((s,), i, dtype=torch.int32) for i, s in enumerate(sections)])
    assert inv.shape == (half,) and row.shape == (half,)
    return inv.float().to(device), row.to(device)


def _check_rope_args(x, positions, theta, mode, sections, freq_factors, n_rot):
    """Validate; returns (n_rot, sections tuple, positions as [n_rows, n_tokens])."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be [n_tokens, n_head, head_dim], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x dtype {x.dtype} is not supported (float16, bfloat16, float32)")
    n_tokens, n_head, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if n_rot is None:
        n_rot = head_dim
    n_rot = int(n_rot)
    if n_rot <= 0 or n_rot % 2 or n_rot > head_dim:
        raise ValueError(f"n_rot must be even and in (0, head_dim={head_dim}], got {n_rot}")
    if mode == "vision" and n_rot != head_dim:
        raise ValueError(f"vision RoPE rotates the whole head: n_rot={n_rot} != head_dim={head_dim}")
    if not (float(theta) > 0.0):
        raise ValueError(f"theta must be > 0, got {theta}")
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be an integer torch.Tensor, got {type(positions).__name__}")
    if positions.dtype not in _INT_DTYPES:
        raise TypeError(f"positions dtype {positions.dtype} is not an integer type (int32/int64)")
    if positions.device != x.device:
        raise ValueError(f"positions are on {positions.device} but x is on {x.device}")
    half = n_rot // 2

    if mode == "normal" and sections is not None:
        raise ValueError(f"sections (M-RoPE) need mode='neox' or 'vision', got mode='normal' with {list(sections)}")
    if mode != "vision" and sections is None:
        if positions.dim() != 1:
            raise ValueError(f"mode={mode!r} without sections needs positions [n_tokens], got shape "
                             f"{tuple(positions.shape)} (pass sections for M-RoPE)")
        pos2 = positions.view(1, -1)
        secs = (half,)
    else:
        if positions.dim() != 2:
            raise ValueError(f"mode={mode!r} needs positions [n_rows, n_tokens], got shape {tuple(positions.shape)}")
        n_rows = positions.shape[0]
        allowed = (2, 4) if mode == "vision" else (3, 4)
        what = "vision RoPE" if mode == "vision" else "M-RoPE"
        if n_rows not in allowed:
            raise ValueError(f"{what} needs positions with {' or '.join(map(str, allowed))} rows, "
                             f"got shape {tuple(positions.shape)}")
        if sections is None:
            if n_rot % 4:
                raise ValueError(f"vision RoPE with default sections needs head_dim % 4 == 0, got {n_rot}")
            sections = [n_rot // 4, n_rot // 4]
        secs = tuple(int(s) for s in sections)
        if len(secs) < 2 or len(secs) > 4 or any(s < 0 for s in secs):
            raise ValueError(f"sections must be 2-4 non-negative pair counts, got {list(sections)}")
        if sum(secs) != half:
            raise ValueError(f"sections {list(secs)} sum to {sum(secs)} but must sum to n_rot/2 = {half} "
                             f"(head_dim={head_dim})")
        used = max(i for i, s in enumerate(secs) if s > 0) + 1
        if used > n_rows:
            raise ValueError(f"sections {list(secs)} use {used} position rows but positions has {n_rows}")
        pos2 = positions
    if pos2.shape[-1] != n_tokens:
        raise ValueError(f"positions cover {pos2.shape[-1]} tokens but x has n_tokens={n_tokens}")
    if freq_factors is not None:
        if not isinstance(freq_factors, torch.Tensor) or not freq_factors.is_floating_point():
            raise TypeError("freq_factors must be a floating-point torch.Tensor")
        if freq_factors.shape != (half,):
            raise ValueError(f"freq_factors has shape {tuple(freq_factors.shape)}, expected [n_rot/2] = [{half}]")
        if freq_factors.device != x.device:
            raise ValueError(f"freq_factors are on {freq_factors.device} but x is on {x.device}")
    return n_rot, secs, pos2


def _tables(x, theta, mode, secs, freq_factors, n_rot):
    inv, row = _inv_freq(float(theta), n_rot, mode, secs, str(x.device))
    if freq_factors is not None:
        inv = inv / freq_factors.float()           # llama.cpp: theta / ff  (ff > 1 lowers the frequency)
    return inv.contiguous(), row.contiguous()


# ----------------------------------------------------------------------------------------------------------

def rope_triton(x, positions, *, theta, mode="normal", sections=None, freq_factors=None, n_rot=None):
    n_rot, secs, pos2 = _check_rope_args(x, positions, theta, mode, sections, freq_factors, n_rot)
    inv, row = _tables(x, theta, mode, secs, freq_factors, n_rot)
    n_tokens, n_head, head_dim = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    pos2 = pos2.contiguous()
    y = torch.empty((n_tokens, n_head, head_dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    half = n_rot // 2
    half_pad = triton.next_power_of_2(half)
    tail = head_dim - n_rot
    block_t = max(1, min(2048 // half_pad, triton.next_power_of_2(n_tokens)))
    # Heads per program: as many as keep >= ~2 programs per SM, so the angles (libdevice sin/cos, the costly
    # part) are reused across heads in prefill, while decode (one token) still spreads over the heads.
    token_blocks = triton.cdiv(n_tokens, block_t)
    want = max(1, min(n_head, (n_head * token_blocks) // TARGET_PROGRAMS))
    heads_per_prog = 1 << (want.bit_length() - 1)              # power of two <= want
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(n_head, heads_per_prog))
    _rope_kernel[grid](
        x, pos2, inv, row, y, n_tokens, n_head,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), pos2.stride(0),
        HALF=half, HALF_PAD=half_pad, ADJACENT=(mode == "normal"),
        N_ROT=n_rot, TAIL=tail, TAIL_PAD=triton.next_power_of_2(max(tail, 1)),
        BLOCK_T=block_t, HEADS_PER_PROG=heads_per_prog, num_warps=4,
    )
    return y


def rope_ref(x, positions, *, theta, mode="normal", sections=None, freq_factors=None, n_rot=None):
    n_rot, secs, pos2 = _check_rope_args(x, positions, theta, mode, sections, freq_factors, n_rot)
    inv, row = _tables(x, theta, mode, secs, freq_factors, n_rot)
    half = n_rot // 2
    ang = pos2[row.long()].t().float() * inv                 # [n_tokens, half]: plane row(k) of pair k
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]  # broadcast over heads
    xf = x.float()
    if mode == "normal":
        x0, x1 = xf[..., 0:n_rot:2], xf[..., 1:n_rot:2]
    else:
        x0, x1 = xf[..., :half], xf[..., half:n_rot]
    y0 = x0 * cos - x1 * sin
    y1 = x1 * cos + x0 * sin
    rot = torch.stack((y0, y1), dim=-1).flatten(-2) if mode == "normal" else torch.cat((y0, y1), dim=-1)
    return torch.cat((rot, xf[..., n_rot:]), dim=-1).to(x.dtype)
