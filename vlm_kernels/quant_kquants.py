"""K-quant quantization (Q2_K .. Q6_K); the public entry point is vlm_kernels.quant.quantize.

K-quant quantization: a vectorised port of llama.cpp's reference quantizers (ggml-quants.c:
quantize_row_q{2..6}_K_ref with make_qkx2_quants / make_q3_quants / make_qx_quants / nearest_int), written from
the algorithm description. Byte-exact with the C built without FMA contraction (-ffp-contract=off).
Layout: a group (sub-block) of n weights is a column of an [n, G] tensor, so "element i of every group" is the
contiguous row t[i]. The C accumulates sums left to right in float32; float addition is not associative, so
the sums below are explicit Python loops over the n (16 or 32) element positions, each one a vector op over all
G groups. The searches over candidate scales are likewise loops over the candidates, selecting with torch.where.
"""
from __future__ import annotations

import numpy as np
import torch

from vlm_kernels._quant_bits import QK_K, _cdiv, _const, _signed_absmax, _to_f16_bytes

GROUP_MAX_EPS = 1e-15


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml nearest_int: add 1.5*2^23 in float32 and read the low mantissa bits (round half to even)."""
    return ((v + 12582912.0).view(torch.int32) & 0x007FFFFF) - 0x00400000


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """[n, G] -> [G]: `float s = 0; for i: s += t[i]` in C order (bit-exact float32 accumulation)."""
    acc = t[0] + 0.0
    for i in range(1, t.shape[0]):
        acc = acc + t[i]
    return acc


def _sqrtf(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (sqrtf). torch.sqrt on CPU may go through MKL VML, which is not always
    correctly rounded: take the double sqrt rounded to float, then fix it against the exact midpoints to its
    neighbours (a 25-bit midpoint squares exactly in float64)."""
    r = torch.sqrt(v.double()).float()
    vd, inf = v.double(), torch.full_like(r, float("inf"))
    up, dn = torch.nextafter(r, inf), torch.nextafter(r, torch.zeros_like(r))
    m_up, m_dn = (r.double() + up.double()) / 2, (r.double() + dn.double()) / 2
    r = torch.where(m_up * m_up < vd, up, r)
    return torch.where(m_dn * m_dn > vd, dn, r)


def _h2f(v: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)): the value the C code reads back from the stored fp16."""
    return v.to(torch.float16).to(torch.float32)


def _make_qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants over groups: x, w [n, G] -> (scale [G], the_min [G], L float [n, G]).

    Asymmetric fit x ~ scale*L - the_min, L in [0, nmax]: start from the min/max grid, then try nstep+1 widened
    grids and keep the weighted least-squares (scale, min) whose weighted |err| or err^2 is smallest."""
    err = (lambda d: d.abs()) if use_mad else (lambda d: d * d)
    mn0 = torch.where(x.amin(0) > 0, 0.0, x.amin(0))
    mx = x.amax(0)
    wx = w * x
    sum_w, sum_x = w[0].clone(), wx[0].clone()  # C: sum_w = w[0]; sum_x = sum_w*x[0]; then += from i = 1
    for i in range(1, x.shape[0]):
        sum_w, sum_x = sum_w + w[i], sum_x + wx[i]
    iscale = _cdiv(float(nmax), mx - mn0)
    scale = _cdiv(1.0, iscale)
    L = _nearest_int(iscale * (x - mn0)).clamp_(0, nmax).float()
    best = _seq_sum(w * err(scale * L + mn0 - x))
    mn = mn0
    for step in range(nstep + 1):
        # NB: the C loop reads the *current* best min here, so later grids shift with each improvement.
        num = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)  # C float32 math
        iscale = _cdiv(float(num), mx - mn)
        la = _nearest_int(iscale * (x - mn)).clamp_(0, nmax).float()
        wl = w * la
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * la), _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = torch.where(pos, 0.0, this_min)
        cur = _seq_sum(w * err(this_scale * la + this_min - x))
        upd = (D > 0) & (cur < best)
        L = torch.where(upd, la, L)
        best, scale = torch.where(upd, cur, best), torch.where(upd, this_scale, scale)
        mn = torch.where(upd, this_min, mn)
    flat = mx == mn0  # every weight equal (after clamping min to <= 0): L = 0, scale 0
    return torch.where(flat, 0.0, scale), -torch.where(flat, mn0, mn), torch.where(flat, 0.0, L)


def _make_qx(x, nmax):
    """make_qx_quants(rmse_type=1, no importance): symmetric L in [-nmax, nmax) weighted by x^2, best of 19
    grids. x [n, G] -> (scale [G], L + nmax float [n, G])."""
    mx = _signed_absmax(x, 0)
    w = x * x
    wx = w * x

    def fit(num):
        l = _nearest_int(_cdiv(num, mx) * x).clamp_(-nmax, nmax - 1).float()
        return l, _seq_sum(wx * l), _seq_sum(w * l * l)

    l, sumlx, suml2 = fit(float(-nmax))
    L = l + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = fit(-float(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / suml2
        L = torch.where(upd, l + nmax, L)
        scale, best = torch.where(upd, new_scale, scale), torch.where(upd, new_scale * sumlx, best)
    zero = mx.abs() < GROUP_MAX_EPS
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L)


def _make_q3(x, nmax):
    """make_q3_quants(do_rmse=true): symmetric fit, then up to 5 passes of coordinate descent that move one L at a
    time while the weighted correlation improves. x [n, G] -> (scale [G], L + nmax float [n, G])."""
    mx = _signed_absmax(x, 0)
    w = x * x
    wx = w * x
    L = _nearest_int(_cdiv(float(-nmax), mx) * x).clamp_(-nmax, nmax - 1).float()
    sumlx, suml2 = _seq_sum(wx * L), _seq_sum(w * L * L)
    active = torch.ones_like(sumlx, dtype=torch.bool)
    for _ in range(5):
        changed = torch.zeros_like(active)
        for i in range(x.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = _nearest_int(x[i] * sl2 / slx).clamp_(-nmax, nmax - 1).float()
            slx_n = slx + wx[i] * new_l
            sl2_n = sl2 + w[i] * new_l * new_l
            acc = active & (slx > 0) & (new_l != li) & (sl2_n > 0) & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n)
            L[i] = torch.where(acc, new_l, li)
            sumlx, suml2 = torch.where(acc, slx_n, sumlx), torch.where(acc, sl2_n, suml2)
            changed |= acc
        active &= changed
        if not bool(active.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    zero = mx.abs() < GROUP_MAX_EPS
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L + nmax)


def _pos_max(t):
    """Row max of [B, k], or +0.0 when no entry is > 0 (C: `float m = 0; if (v > m) m = v;`, never -0.0)."""
    m = t.amax(1, keepdim=True)
    return torch.where(m > 0, m, 0.0)


def _groups(x, n):
    """[B, 256] -> [n, B*256/n]: column g = sub-block g (block-major); back with .t().reshape(B, 256)."""
    return x.reshape(-1, n).t().contiguous()


def _pack_2bit(L):
    """uint8 [B, 256] codes < 4 -> [B, 64]: per 128 weights, byte l holds weights l, l+32, l+64, l+96."""
    q = L.reshape(-1, 2, 4, 32) << _const((0, 2, 4, 6), torch.uint8, L.device, (1, 1, 4, 1))
    return (q[:, :, 0] | q[:, :, 1] | q[:, :, 2] | q[:, :, 3]).reshape(-1, 64)


def _bit_planes(bits):
    """uint8 [B, 256] of 0/1 -> [B, 32]: bit i of byte j = element 32i + j (Q3_K hmask, Q5_K qh)."""
    hb = bits.reshape(-1, 8, 32) << _const(tuple(range(8)), torch.uint8, bits.device, (1, 8, 1))
    return hb.sum(1, dtype=torch.uint8)  # the bits are disjoint: sum == or


def _requant(L, x, d, dm, lo, hi, n, off=0):
    """Second pass shared by the K-quants: with the stored (fp16-rounded) sub-block scale d and offset dm,
    L = clamp(nearest_int((x + dm) / d)) + off where d != 0; sub-blocks with d == 0 keep the first-pass L."""
    B = x.shape[0]
    xs = x.reshape(B, -1, n)
    v = xs / d.unsqueeze(-1) if dm is None else (xs + dm.unsqueeze(-1)) / d.unsqueeze(-1)
    new = (_nearest_int(v).clamp_(lo, hi) + off).float()
    return torch.where((d != 0).unsqueeze(-1), new, L.reshape(B, -1, n)).reshape(B, QK_K)


def _q_q2_k(x):
    B, xg = x.shape[0], _groups(x, 16)
    scales, mins, L = _make_qkx2(xg, xg.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(B, 16), mins.reshape(B, 16), L.t().reshape(B, QK_K)
    max_s, max_m = _pos_max(scales), _pos_max(mins)
    ls = torch.where(max_s > 0, _nearest_int(_cdiv(15.0, max_s) * scales), 0)
    lm = torch.where(max_m > 0, _nearest_int(_cdiv(15.0, max_m) * mins), 0)
    sc = (ls | (lm << 4)) & 0xFF
    d = torch.where(max_s > 0, _cdiv(max_s, 15.0), 0.0)
    dmin = torch.where(max_m > 0, _cdiv(max_m, 15.0), 0.0)
    L = _requant(L, x, _h2f(d) * (sc & 0x0F), _h2f(dmin) * (sc >> 4), 0, 3, 16)
    return torch.cat((sc.to(torch.uint8), _pack_2bit(L.to(torch.uint8)), _to_f16_bytes(d), _to_f16_bytes(dmin)), 1)


def _q_q3_k(x):
    B = x.shape[0]
    scales, L = _make_q3(_groups(x, 16), 4)
    scales, L = scales.reshape(B, 16), L.t().reshape(B, QK_K)
    max_s = _signed_absmax(scales, 1)[:, None]
    nz = max_s != 0
    iscale = _cdiv(-32.0, max_s)
    l = ((_nearest_int(iscale * scales) + 128) & 0xFF) - 128  # C stores it in an int8_t first
    l = torch.where(nz, l.clamp(-32, 31) + 32, 0).to(torch.uint8)
    hi = (l >> 4).reshape(B, 4, 4) << _const((0, 2, 4, 6), torch.uint8, x.device, (1, 4, 1))
    sc = torch.cat((l[:, :8] & 0x0F | ((l[:, 8:] & 0x0F) << 4), hi[:, 0] | hi[:, 1] | hi[:, 2] | hi[:, 3]), 1)
    d = torch.where(nz, _cdiv(1.0, iscale), 0.0)
    L = _requant(L, x, _h2f(d) * (l.to(torch.int32) - 32), None, -4, 3, 16, off=4).to(torch.uint8)  # 0..7
    # bit 2 of weight 32b + m goes to bit b of hmask[m]; the two low bits go to qs
    return torch.cat((_bit_planes(L >> 2), _pack_2bit(L & 3), sc, _to_f16_bytes(d)), 1)


def _pack_k4_scales(ls, lm):
    """6-bit scale/min pairs [B, 8] -> 12 bytes (inverse of _k4_scale_min)."""
    return torch.cat((ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                      (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)), 1)


def _q_q45_k(x, five: bool):
    """Q4_K (nmax 15, grids -1 + 0.1 k, k <= 20) / Q5_K (nmax 31, grids -0.5 + 0.1 k, k <= 15): 8 sub-blocks of
    32, weights av_x + |x| with av_x the sub-block RMS; 6-bit scales/mins of the block's max scale/min."""
    nmax, rmin, nstep = (31, -0.5, 15) if five else (15, -1.0, 20)
    B = x.shape[0]
    xg = _groups(x, 32)
    av_x = _sqrtf(_cdiv(_seq_sum(xg * xg), 32.0))
    scales, mins, L = _make_qkx2(xg, av_x + xg.abs(), nmax, rmin, 0.1, nstep, False)
    scales, mins, L = scales.reshape(B, 8), mins.reshape(B, 8), L.t().reshape(B, QK_K)
    max_s, max_m = _pos_max(scales), _pos_max(mins)
    inv_s = torch.where(max_s > 0, _cdiv(63.0, max_s), 0.0)
    inv_m = torch.where(max_m > 0, _cdiv(63.0, max_m), 0.0)
    ls = (_nearest_int(inv_s * scales) & 0xFF).clamp(max=63).to(torch.uint8)  # C: uint8_t ls = nearest_int(..)
    lm = (_nearest_int(inv_m * mins) & 0xFF).clamp(max=63).to(torch.uint8)
    d, dmin = _cdiv(max_s, 63.0), _cdiv(max_m, 63.0)
    L = _requant(L, x, _h2f(d) * ls, _h2f(dmin) * lm, 0, nmax, 32).to(torch.uint8)
    q = (L & 0x0F).reshape(B, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(B, 128)
    qh = (_bit_planes(L >> 4),) if five else ()  # bit i of qh[j] = 5th bit of weight 32i + j
    return torch.cat((_to_f16_bytes(d), _to_f16_bytes(dmin), _pack_k4_scales(ls, lm)) + qh + (qs,), 1)


def _q_q6_k(x):
    B = x.shape[0]
    scales, L = _make_qx(_groups(x, 16), 32)
    scales, L = scales.reshape(B, 16), L.t().reshape(B, QK_K)
    max_s = _signed_absmax(scales, 1)[:, None]
    iscale = _cdiv(-128.0, max_s)
    sc = ((_nearest_int(iscale * scales).clamp(max=127) + 128) & 0xFF) - 128  # stored as int8_t
    d = _cdiv(1.0, iscale)
    L = _requant(L, x, _h2f(d) * sc, None, -32, 31, 16, off=32).to(torch.uint8)
    lo = (L & 0x0F).reshape(B, 2, 4, 32)
    ql = torch.cat((lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)), 2).reshape(B, 128)
    qh = _pack_2bit(L >> 4)
    out = torch.cat((ql, qh, sc.to(torch.int8).view(torch.uint8), _to_f16_bytes(d)), 1)
    return torch.where(max_s.abs() < GROUP_MAX_EPS, 0, out).to(torch.uint8)  # all-zero block: every byte 0
