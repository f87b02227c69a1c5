"""Fast plain-torch implementations: what the dispatcher runs when Triton is not chosen (CPU inference).

Each function has the signature, the input checks (same errors) and the semantics of the reference it stands
for — the `*_ref` functions in vlm_kernels/norm.py, rope.py, attention.py, decode_attention.py stay the spec and
tests/kernels/test_cpu_fast.py holds these to them (fp32: 1e-5 of max |ref|). What makes them faster:

  rms_norm_torch        one fused aten op (`torch.rms_norm`, fp32) instead of pow/mean/add/rsqrt/mul/mul;
                        the offset weight `weight + offset` is cached per weight tensor.
  layer_norm_torch      the reference already is one fused op; only the residual add/casts are avoided.
  rope_torch            cos/sin tables per (theta, n_rot, mode, sections, device), grown to the largest position
                        seen and indexed by position (the same fp32 angle pos·inv_freq as the reference, so the
                        same cos/sin values); the rotation is done with two multiplies and one add on the
                        whole head (NeoX: x·[cos, cos] + rotate_half(x)·[sin, sin]).
  decode_attention_torch per sequence: batched matmuls over the valid (and, with a window, visible) cache rows
                        only, the GQA group folded into the query rows (no repeat_interleave of K/V), a mask
                        only when several new tokens need the causal triangle.
  attention_torch       SDPA's fused CPU kernel with `is_causal` / no mask where the end-aligned mask equals
                        it (self-attention prefill, bidirectional); the reference path otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm_kernels.attention import _validate as _attn_validate
from vlm_kernels.attention import masked_attention_fp32, visible_mask
from vlm_kernels.decode_attention import _validate as _dec_validate
from vlm_kernels.norm import _check_norm_args
from vlm_kernels.rope import _check_rope_args, _inv_freq, rope_ref

# (vlm_kernels.<op> is the dispatching function, not the module: the helpers above are imported by name.)

# ----------------------------------------------------------------------------------------------------------
# norms

_OFFSET_W: dict[tuple, tuple] = {}   # (id(weight), offset) -> (weight, version, fp32 weight + offset)


def _scaled_weight(weight: torch.Tensor, offset: float) -> torch.Tensor:
    """fp32 `weight + offset`, cached per (weight tensor, offset) — weights are long-lived model tensors."""
    if offset == 0.0 and weight.dtype == torch.float32:
        return weight
    key = (id(weight), offset)
    hit = _OFFSET_W.get(key)
    version = None if weight.is_inference() else weight._version
    if hit is not None and hit[0] is weight and hit[1] == version and version is not None:
        return hit[2]
    w = weight.float() + offset
    if version is not None:
        if len(_OFFSET_W) > 4096:
            _OFFSET_W.clear()
        _OFFSET_W[key] = (weight, version, w)
    return w


def rms_norm_torch(x, weight, eps, *, offset=0.0, residual=None):
    """Same contract as vlm_kernels.norm.rms_norm_ref; fused torch.rms_norm in fp32."""
    _check_norm_args(x, weight, None, eps, residual)
    if weight is None and offset != 0.0:
        raise ValueError(f"offset={offset} needs a weight (offset is added to the weight)")
    h = x + residual if residual is not None else x     # rounded to x's dtype, like the stored stream
    w = None if weight is None else _scaled_weight(weight, float(offset))
    if h.dtype == torch.float32:
        y = torch.rms_norm(h, (h.shape[-1],), w, float(eps))
    else:
        y = torch.rms_norm(h.float(), (h.shape[-1],), w, float(eps)).to(x.dtype)
    return (y, h) if residual is not None else y


def layer_norm_torch(x, weight, bias, eps, *, residual=None):
    """Same contract as vlm_kernels.norm.layer_norm_ref (already one fused op); skips no-op casts for fp32."""
    _check_norm_args(x, weight, bias, eps, residual)
    h = x + residual if residual is not None else x
    hf = h if h.dtype == torch.float32 else h.float()
    y = F.layer_norm(hf, (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return (y, h) if residual is not None else y


# ----------------------------------------------------------------------------------------------------------
# RoPE

_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_MIN_TABLE = 1024
_MAX_TABLE = 1 << 20   # positions; beyond this the angles are computed per call (no table)


def _cos_sin_table(theta: float, n_rot: int, mode: str, secs: tuple, device, n_pos: int):
    """(cos, sin) fp32 [>= n_pos, n_rot/2] for positions 0.. — angle pos · inv_freq[k] exactly as rope_ref."""
    key = (theta, n_rot, mode, secs, str(device))
    hit = _ROPE_TABLES.get(key)
    if hit is not None and hit[0].shape[0] >= n_pos:
        return hit
    size = max(_MIN_TABLE, 1 << max(0, n_pos - 1).bit_length())
    inv, _row = _inv_freq(theta, n_rot, mode, secs, str(device))
    ang = torch.arange(size, dtype=torch.int64, device=device).float()[:, None] * inv
    hit = (ang.cos(), ang.sin())
    _ROPE_TABLES[key] = hit
    return hit


def rope_torch(x, positions, *, theta, mode="normal", sections=None, freq_factors=None, n_rot=None):
    """Same contract as vlm_kernels.rope.rope_ref, with cached cos/sin tables (1-D and M-RoPE positions >= 0)."""
    n_rot, secs, pos2 = _check_rope_args(x, positions, theta, mode, sections, freq_factors, n_rot)
    n_tokens, n_head, head_dim = x.shape
    half = n_rot // 2
    if n_tokens == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if freq_factors is not None:
        return rope_ref(x, positions, theta=theta, mode=mode, sections=sections,
                              freq_factors=freq_factors, n_rot=n_rot)
    lo, hi = (int(v) for v in torch.aminmax(pos2))  # host values: CPU is the fast path's home
    if lo < 0 or hi >= _MAX_TABLE:   # no table row for negative positions; huge ones: compute directly
        return rope_ref(x, positions, theta=theta, mode=mode, sections=sections, n_rot=n_rot)
    cos_t, sin_t = _cos_sin_table(float(theta), n_rot, mode, secs, x.device, hi + 1)
    if len(secs) == 1:
        p = pos2[0]
        cos, sin = cos_t.index_select(0, p), sin_t.index_select(0, p)          # [n_tokens, half]
    else:  # pair k reads plane row(k): gather per (token, pair)
        _inv, row = _inv_freq(float(theta), n_rot, mode, secs, str(x.device))
        idx = pos2.index_select(0, row.long()).t()                            # [n_tokens, half]
        k = torch.arange(half, device=x.device)
        cos, sin = cos_t[idx, k], sin_t[idx, k]
    xf = x if x.dtype == torch.float32 else x.float()
    xr = xf[..., :n_rot]
    if mode == "normal":   # adjacent pairs (2k, 2k+1)
        xp = xr.unflatten(-1, (half, 2))
        x0, x1 = xp[..., 0], xp[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        rot = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    else:                  # halves (k, k + half): x·[c, c] + [-x1, x0]·[s, s]
        c2 = torch.cat((cos, cos), dim=-1)[:, None, :]
        s2 = torch.cat((sin, sin), dim=-1)[:, None, :]
        x0, x1 = xr[..., :half], xr[..., half:]
        rot = xr * c2 + torch.cat((-x1, x0), dim=-1) * s2
    if n_rot < head_dim:
        rot = torch.cat((rot, xf[..., n_rot:]), dim=-1)
    return rot if rot.dtype == x.dtype else rot.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# attention

def _softcapped(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return s if softcap is None else softcap * torch.tanh(s / softcap)


def _group_attend(q, k, v, scale, softcap, vis):
    """q [n_q, H, D], k/v [lk, Hkv, D] (lk >= 1), vis bool [n_q, lk] or None (all visible) -> fp32 [n_q, H, D].
    The GQA group is folded into the query rows: one [group*n_q, D] x [D, lk] matmul per KV head."""
    n_q, n_head, d = q.shape
    lk, n_kv, dv = v.shape[0], k.shape[1], v.shape[2]
    group = n_head // n_kv
    qf = q.float().reshape(n_q, n_kv, group, d).permute(1, 2, 0, 3).reshape(n_kv, group * n_q, d)
    kf = k.float().permute(1, 2, 0)                                   # [Hkv, D, lk]
    vf = v.float().permute(1, 0, 2)                                   # [Hkv, lk, Dv]
    s = _softcapped(torch.matmul(qf, kf) * scale, softcap)            # [Hkv, group*n_q, lk]
    if vis is not None:
        s = s.view(n_kv, group, n_q, lk).masked_fill(~vis, float("-inf")).view(n_kv, group * n_q, lk)
    o = torch.matmul(torch.softmax(s, dim=-1), vf)                    # [Hkv, group*n_q, Dv]
    return o.view(n_kv, group, n_q, dv).permute(2, 0, 1, 3).reshape(n_q, n_head, dv)


def decode_attention_torch(q, k_cache, v_cache, seq_lens, *, scale=None, sliding_window=None, logit_softcap=None):
    """Same contract as vlm_kernels.decode_attention.decode_attention_ref; reads only the visible cache rows."""
    q4 = _dec_validate(q, k_cache, v_cache, seq_lens, scale, sliding_window, logit_softcap)
    n_seq, n_q = q4.shape[0], q4.shape[1]
    scale = q4.shape[-1] ** -0.5 if scale is None else float(scale)
    out = torch.empty(q4.shape, dtype=q.dtype, device=q.device)
    max_ctx = k_cache.shape[1]
    for s, lk in enumerate(seq_lens.tolist()):
        lk = min(lk, max_ctx)
        if lk == 0:
            out[s] = 0
            continue
        # query t sits at p = lk - n_q + t; the window (p - j < W) drops rows j <= lk - n_q - W for every query
        lo = max(0, lk - n_q + 1 - sliding_window) if sliding_window is not None else 0
        vis = None
        if n_q > 1:   # causal triangle among the new tokens (+ window edge), over rows [lo, lk)
            vis = visible_mask(n_q, lk, True, sliding_window, q.device)[:, lo:]
        o = _group_attend(q4[s], k_cache[s, lo:lk], v_cache[s, lo:lk], scale, logit_softcap, vis)
        out[s] = o if o.dtype == out.dtype else o.to(out.dtype)
    return out.reshape(q.shape)


def attention_torch(q, k, v, *, causal, scale=None, sliding_window=None, logit_softcap=None,
                    cu_seqlens_q=None, cu_seqlens_k=None):
    """Same contract as vlm_kernels.attention.attention_ref. Per sequence: fused SDPA (is_causal / no mask) when the
    end-aligned mask is plain causal or empty; the reference's explicit-mask path for windows, causal prefix
    continuations and softcap."""
    lens_q, lens_k = _attn_validate(q, k, v, causal, scale, sliding_window, logit_softcap,
                                     cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    group = q.shape[1] // k.shape[1]
    sq = sk = 0
    for lq, lk in zip(lens_q, lens_k):
        if lq:
            qs, ks, vs = q[sq:sq + lq], k[sk:sk + lk], v[sk:sk + lk]
            window_inert = sliding_window is None or sliding_window >= lk
            simple = logit_softcap is None and window_inert and lk > 0 and (not causal or lq == lk)
            if simple:
                qf = qs.float().transpose(0, 1)                                            # [H, lq, D]
                kf = ks.float().transpose(0, 1)
                vf = vs.float().transpose(0, 1)
                if group > 1:
                    kf = kf.repeat_interleave(group, dim=0)
                    vf = vf.repeat_interleave(group, dim=0)
                # 4-D [1, H, L, D] inputs: 3-D ones miss torch's fused CPU kernel (measured 178 -> 50 ms at 577
                # tokens) and fall back to an unfused softmax + matmul.
                o = F.scaled_dot_product_attention(qf[None], kf[None], vf[None], is_causal=causal,
                                                   scale=scale)[0].transpose(0, 1)
            elif lk == 0:
                o = torch.zeros(qs.shape[:2] + (vs.shape[2],), dtype=torch.float32, device=q.device)
            else:
                vis = visible_mask(lq, lk, causal, sliding_window, q.device)
                if lq <= 16 and not bool((~vis.any(-1)).any()):
                    o = _group_attend(qs, ks, vs, scale, logit_softcap, vis)
                else:
                    o = masked_attention_fp32(qs, ks, vs, vis, scale, logit_softcap)
            out[sq:sq + lq] = o
        sq, sk = sq + lq, sk + lk
    return out

