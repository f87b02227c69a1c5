"""Patch embedding (a convolution with stride == kernel) as one gather + GEMM + epilogue kernel.

    out[m, d] = sum_k  A[m, k] · W[d, k]  (+ bias[d]) (+ pos_embed[patch(m), d])

A is never materialised (no im2col tensor): the kernel computes the address of every patch pixel from the
pixel strides while loading the A tile. Rows m are patches, columns k = (c, dt, dy, dx) in the weight's own
[D, C, T, P, P] order, so W is just the weight viewed as [D, K], K = C·T·P·P (588 for 3×14×14, 768 for 3×16×16,
1176 for Qwen2-VL's 3×2×14×14: not powers of two, the K tail is masked).

Accepted layouts (B images, C channels, patch P_h × P_w, temporal patch T):
  * 2-D:   pixels [B, C, H, W],     weight [D, C, P_h, P_w]    -> out [B, (H/P_h)·(W/P_w), D]
  * 3-D:   pixels [B, C, T_in, H, W], weight [D, C, T, P_h, P_w] -> out [B, (T_in/T)·(H/P_h)·(W/P_w), D]
           (Qwen2-VL/2.5-VL video/still patches; patch order (t, row, col), row-major, as conv + flatten(2))
  * flat:  pixels [n_patches, K] (Qwen's processor output, each row already in (C, T, P, P) order), weight
           [D, C, T, P, P], [D, C, P, P] or [D, K]                 -> out [n_patches, D]
pos_embed: [n_patches, D] or anything broadcastable to [B, n_patches, D] (e.g. [1, n_patches, D]); flat form:
broadcastable to [n_patches, D]. bias: [D].

Normalisation fused into the load (so raw uint8 images can go straight in):
    x' = (x · rescale − mean[c]) / std[c]
rescale defaults to 1/255 for uint8 pixels and 1 for float pixels; mean defaults to 0 and std to 1. uint8 pixels
are always normalised (at least rescaled); float pixels only when mean/std/rescale is given. The kernel applies
it as x·(rescale/std[c]) + (−mean[c]/std[c]) in fp32 (a few ulp from the reference's order).

Precision: pixels (any of uint8/fp16/bf16/fp32) are converted to fp32, normalised, then cast to the weight's
dtype for the tensor-core dot (as HF casts pixel_values to the patch-embed weight dtype); accumulation is fp32;
bias and pos_embed are added in fp32 and the result is rounded once. fp32 weights use input_precision="ieee"
(no TF32), so interpreter and GPU agree to 1e-5. Output dtype = the weight's dtype.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_PIXEL_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Shape-like ints that change with every image size are not specialised (no recompiles per shape); the pixel
# strides are (a unit dx stride lets the compiler vectorise the contiguous runs).
@triton.jit(do_not_specialize=["M", "n_img", "n_t", "n_ph", "n_pw", "spb", "spp", "M_BUCKET"])
def _patch_embed_kernel(
    X, W, BIAS, POS, SCALE, SHIFT, OUT,
    M, N,                                 # M patches (all images), N = D
    n_img, n_t, n_ph, n_pw,               # patches per image and its (t, row, col) grid; row m = (b, t, ph, pw)
    sxb, sxc, sxt, sxh, sxw,              # pixel strides (elements) of the [B, C, T, H, W] view
    spb, spp, spn,                        # pos_embed strides after broadcasting to [B, n_img, D]
    M_BUCKET,                             # autotune key only (coarse size class of M): not used in the body
    K: tl.constexpr,                      # C·KT·PH·PW. A compile-time constant: the weight is a contiguous
                                          # [D, K] matrix, and the compiler can then prove the 4-16 B alignment
                                          # of its rows (588 = 4·147, 1176 = 8·147) and vectorise the loads
    KT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,   # temporal patch, patch height / width
    FLAT_K: tl.constexpr,                 # pixels are a contiguous [M, K] matrix (flat form): A[m, k] at m*K + k
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, NORMALIZE: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program order: all N tiles of one M tile run next to each other, so the gathered pixels of that M tile
    # are served from L2 after the first; the weight (≤ ~3 MB) stays in L2 throughout.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    # ---- rows: patch m -> image b, temporal slot t, patch row ph, patch col pw -> pixel offset of its corner
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    m64 = m.to(tl.int64)
    b = m64 // n_img
    p = m64 % n_img                                   # patch index inside its image (pos_embed row)
    t = p // (n_ph * n_pw)
    ph = (p // n_pw) % n_ph
    pw = p % n_pw
    if FLAT_K:
        row_off = m64 * K
    else:
        row_off = b * sxb + t * (KT * sxt) + ph * (PH * sxh) + pw * (PW * sxw)  # [BLOCK_M] int64

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # ---- columns: k -> (c, dt, dy, dx) in the weight's (C, T, P_h, P_w) order -> pixel offset in a patch
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        c = k // (KT * PH * PW)
        if FLAT_K:
            col_off = k                            # contiguous columns: the compiler sees it and vectorises
        else:
            r = k % (KT * PH * PW)
            dt = r // (PH * PW)
            dy = (r // PW) % PH
            dx = r % PW
            col_off = c * sxc + dt * sxt + dy * sxh + dx * sxw                  # [BLOCK_K]
        a = tl.load(X + row_off[:, None] + col_off[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        if NORMALIZE:
            # x' = x * (rescale / std[c]) + (-mean[c] / std[c]); the K tail gets 0 * 0 + 0.
            sc = tl.load(SCALE + c, mask=k_ok, other=0.0)
            sh = tl.load(SHIFT + c, mask=k_ok, other=0.0)
            a = a.to(tl.float32) * sc[None, :] + sh[None, :]
        a = a.to(W.dtype.element_ty)
        # W^T tile [BLOCK_K, BLOCK_N]: element (k, n) of the contiguous [D, K] weight at W + n*K + k
        w = tl.load(W + n[None, :] * K + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE_FP32:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)

    # ---- epilogue: + bias[n] + pos_embed[b, p, n] in fp32, one rounding to the output dtype
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_POS:
        pos = tl.load(POS + (b * spb + p * spp)[:, None] + n[None, :] * spn, mask=mask, other=0.0)
        acc += pos.to(tl.float32)
    tl.store(OUT + m64[:, None] * N + n[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


# Curated CUDA configs (bf16/fp16 tensor cores; K ≤ ~1.2k so deep pipelines buy little). Under the interpreter
# exactly one config is used (multi-config autotune needs a GPU).
_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
_CUDA_CONFIGS_FP32 = [   # ieee fp32 dot runs on FMA units: smaller tiles keep registers in check
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2),
]
_INTERPRETER_META = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}


@functools.lru_cache(maxsize=2)
def _tuned_kernel(fp32: bool):
    return triton.autotune(configs=_CUDA_CONFIGS_FP32 if fp32 else _CUDA_CONFIGS,
                           key=["N", "K", "M_BUCKET", "KT", "PH", "PW"])(_patch_embed_kernel)


# ----------------------------------------------------------------------------------------------------------
# argument checks (shared by launcher and reference)

@dataclass
class _Geom:
    form: str                       # "2d" | "3d" | "flat"
    B: int
    C: int
    KT: int
    PH: int
    PW: int
    D: int
    K: int
    n_t: int
    n_ph: int
    n_pw: int

    @property
    def n_img(self) -> int:
        return self.n_t * self.n_ph * self.n_pw


def _shape(t) -> tuple:
    return tuple(t.shape)


def _check_patch_args(pixels, weight, bias, pos_embed, mean, std, rescale) -> _Geom:
    if not isinstance(pixels, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("pixels and weight must be torch.Tensors")
    if pixels.dtype not in _PIXEL_DTYPES:
        raise TypeError(f"pixels dtype {pixels.dtype} is not supported (uint8, float16, bfloat16, float32)")
    if weight.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"weight dtype {weight.dtype} is not supported (float16, bfloat16, float32)")
    if pixels.device != weight.device:
        raise ValueError(f"pixels are on {pixels.device} but weight is on {weight.device}")
    D = weight.shape[0]
    if pixels.dim() == 4:
        if weight.dim() != 4:
            raise ValueError(f"2-D pixels {_shape(pixels)} need a weight [D, C, P, P], got {_shape(weight)}")
        B, C, H, Wd = pixels.shape
        _, Cw, PH, PW = weight.shape
        KT, T = 1, 1
        form = "2d"
    elif pixels.dim() == 5:
        if weight.dim() != 5:
            raise ValueError(f"3-D pixels {_shape(pixels)} need a weight [D, C, T, P, P], got {_shape(weight)}")
        B, C, T, H, Wd = pixels.shape
        _, Cw, KT, PH, PW = weight.shape
        form = "3d"
    elif pixels.dim() == 2:
        if weight.dim() not in (2, 4, 5):
            raise ValueError(f"flattened pixels need a weight [D, K], [D, C, P, P] or [D, C, T, P, P], "
                             f"got {_shape(weight)}")
        K = weight[0].numel()
        if pixels.shape[1] != K:
            raise ValueError(f"flattened pixels have rows of {pixels.shape[1]} values but the weight "
                             f"{_shape(weight)} needs K = C·T·P·P = {K}")
        if weight.dim() == 2:
            # No channel structure in a [D, K] weight: take C from mean/std if given, else treat as one channel.
            ref = mean if mean is not None else std
            Cw = len(ref) if ref is not None else 1
            if K % Cw:
                raise ValueError(f"K = {K} is not divisible by the {Cw} channels of mean/std")
            KT, PH, PW = 1, 1, K // Cw
        else:
            Cw = weight.shape[1]
            KT = weight.shape[2] if weight.dim() == 5 else 1
            PH, PW = weight.shape[-2], weight.shape[-1]
        B, C, T, H, Wd, form = pixels.shape[0], Cw, KT, PH, PW, "flat"
    else:
        raise ValueError(f"pixels must be [B, C, H, W], [B, C, T, H, W] or [n_patches, K], got {_shape(pixels)}")
    if form != "flat":
        if C != Cw:
            raise ValueError(f"pixels have {C} channels but the weight {_shape(weight)} expects {Cw}")
        if H % PH or Wd % PW:
            raise ValueError(f"image size H={H}, W={Wd} is not a multiple of the patch size {PH}x{PW}")
        if T % KT:
            raise ValueError(f"T={T} frames is not a multiple of the temporal patch size {KT}")
    g = _Geom(form, B, C, KT, PH, PW, D, C * KT * PH * PW, T // KT, H // PH, Wd // PW)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or _shape(bias) != (D,):
            got = _shape(bias) if isinstance(bias, torch.Tensor) else bias
            raise ValueError(f"bias must be [D] = [{D}], got {got}")
        if not bias.is_floating_point() or bias.device != weight.device:
            raise TypeError(f"bias must be a float tensor on {weight.device}")
    if pos_embed is not None:
        if not isinstance(pos_embed, torch.Tensor) or not pos_embed.is_floating_point():
            raise TypeError("pos_embed must be a float torch.Tensor")
        if pos_embed.device != weight.device:
            raise ValueError(f"pos_embed is on {pos_embed.device} but weight is on {weight.device}")
        target = (g.B, D) if form == "flat" else (g.B, g.n_img, D)
        try:
            ok = tuple(torch.broadcast_shapes(_shape(pos_embed), target)) == target
        except RuntimeError:
            ok = False
        if not ok:
            msg = f"pos_embed {_shape(pos_embed)} does not broadcast to {target}"
            rows = pos_embed.shape[-2] if pos_embed.dim() >= 2 else 1
            n_p = g.B if form == "flat" else g.n_img
            if rows not in (1, n_p):
                msg += f": it has {rows} rows but there are {n_p} patches" + ("" if form == "flat" else " per image")
            elif pos_embed.shape[-1] not in (1, D):
                msg += f": its width {pos_embed.shape[-1]} != D = {D}"
            raise ValueError(msg)
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) != g.C:
            raise ValueError(f"{name} has {len(v)} values but pixels have {g.C} channels")
    if std is not None and any(float(s) == 0.0 for s in _as_list(std)):
        raise ValueError("std contains a zero")
    return g


def _as_list(v) -> list[float]:
    return [float(e) for e in (v.tolist() if isinstance(v, torch.Tensor) else v)]


def _norm_params(pixels, mean, std, rescale):
    """(normalize?, rescale, mean list, std list)."""
    normalize = pixels.dtype == torch.uint8 or mean is not None or std is not None or rescale is not None
    if rescale is None:
        rescale = 1.0 / 255.0 if pixels.dtype == torch.uint8 else 1.0
    return normalize, float(rescale), mean, std


def _pixels_5d(pixels: torch.Tensor, g: _Geom) -> tuple[int, int, int, int, int]:
    """Strides (b, c, t, h, w) of a [B, C, T, H, W] view of the pixels (flat rows seen as 1×1 images)."""
    if g.form == "2d":
        sb, sc, sh, sw = pixels.stride()
        return sb, sc, 0, sh, sw
    if g.form == "3d":
        return pixels.stride()
    # flat: row m is one "image" with a single patch; its K values are contiguous in (c, dt, dy, dx) order
    s0, s1 = pixels.stride()
    return s0, g.KT * g.PH * g.PW * s1, g.PH * g.PW * s1, g.PW * s1, s1


@functools.lru_cache(maxsize=16)
def _norm_tables(mean: tuple, std: tuple, rescale: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) = (rescale/std, -mean/std), fp32, cached on the device (no copy per call)."""
    m_ = torch.tensor(mean, dtype=torch.float32)
    s_ = torch.tensor(std, dtype=torch.float32)
    return (rescale / s_).to(device), (-m_ / s_).to(device)


def _m_bucket(M: int) -> int:
    """Autotune size class: one image's worth of patches, a few images, a big batch."""
    return 0 if M <= 4096 else 1 if M <= 32768 else 2


# ----------------------------------------------------------------------------------------------------------

def patch_embed_triton(pixels, weight, bias=None, pos_embed=None, *, mean=None, std=None, rescale=None):
    g = _check_patch_args(pixels, weight, bias, pos_embed, mean, std, rescale)
    normalize, rescale, mean, std = _norm_params(pixels, mean, std, rescale)
    dev = weight.device
    M = g.B if g.form == "flat" else g.B * g.n_img
    N, K = g.D, g.K
    out = torch.empty((M, N), dtype=weight.dtype, device=dev)
    if M == 0:
        return out if g.form == "flat" else out.view(g.B, g.n_img, N)
    w2 = weight.reshape(N, K).contiguous()             # a view for a contiguous weight (the usual case)
    if g.form == "flat" and pixels.stride() != (K, 1):
        pixels = pixels.contiguous()                   # the flat path assumes [M, K] row-major (processor output)
    sxb, sxc, sxt, sxh, sxw = _pixels_5d(pixels, g)
    if g.form == "flat":
        n_img, n_t, n_ph, n_pw = 1, 1, 1, 1
    else:
        n_img, n_t, n_ph, n_pw = g.n_img, g.n_t, g.n_ph, g.n_pw
    if normalize:
        scale, shift = _norm_tables(tuple(_as_list(mean)) if mean is not None else (0.0,) * g.C,
                                    tuple(_as_list(std)) if std is not None else (1.0,) * g.C, rescale, str(dev))
    else:
        scale = shift = w2
    if pos_embed is not None:
        if g.form == "flat":
            pe = pos_embed.broadcast_to((M, N))
            spb, spp, spn = pe.stride(0), 0, pe.stride(1)
        else:
            pe = pos_embed.broadcast_to((g.B, g.n_img, N))
            spb, spp, spn = pe.stride()
    else:
        pe, spb, spp, spn = w2, 0, 0, 0
    ieee = weight.dtype == torch.float32
    args = (pixels, w2, bias if bias is not None else w2, pe, scale, shift, out,
            M, N, n_img, n_t, n_ph, n_pw, sxb, sxc, sxt, sxh, sxw,
            spb, spp, spn, _m_bucket(M))
    const = dict(K=K, KT=g.KT, PH=g.PH, PW=g.PW, FLAT_K=g.form == "flat",
                 HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
                 NORMALIZE=normalize, IEEE_FP32=ieee)
    if dev.type == "cuda":
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _tuned_kernel(ieee)[grid](*args, **const)
    else:
        meta = _INTERPRETER_META
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _patch_embed_kernel[grid](*args, **const, **meta)
    return out if g.form == "flat" else out.view(g.B, g.n_img, N)


def patch_embed_ref(pixels, weight, bias=None, pos_embed=None, *, mean=None, std=None, rescale=None):
    """F.conv2d / F.conv3d (stride = kernel) + flatten + add, after normalising the pixels in fp32.

    The convolution runs in the weight's dtype (pixels cast to it, as HF does); the sum with bias and
    pos_embed is done in fp32 and rounded once to the weight's dtype."""
    g = _check_patch_args(pixels, weight, bias, pos_embed, mean, std, rescale)
    normalize, rescale, mean, std = _norm_params(pixels, mean, std, rescale)
    x = pixels
    if normalize:
        x = pixels.float() * rescale
        if g.form == "flat":
            x = x.view(-1, g.C, g.K // g.C)
            view = (1, g.C, 1)
        else:
            view = (1, g.C) + (1,) * (pixels.dim() - 2)
        if mean is not None:
            x = x - torch.tensor(_as_list(mean), dtype=torch.float32, device=x.device).view(view)
        if std is not None:
            x = x / torch.tensor(_as_list(std), dtype=torch.float32, device=x.device).view(view)
        x = x.reshape(pixels.shape)
    x = x.to(weight.dtype)
    if g.form == "2d":
        y = F.conv2d(x, weight, stride=(g.PH, g.PW)).flatten(2).transpose(1, 2)
    elif g.form == "3d":
        y = F.conv3d(x, weight, stride=(g.KT, g.PH, g.PW)).flatten(2).transpose(1, 2)
    elif weight.dim() == 5:      # HF Qwen2-VL PatchEmbed: view rows as tiny videos, Conv3d
        y = F.conv3d(x.reshape(-1, g.C, g.KT, g.PH, g.PW), weight, stride=(g.KT, g.PH, g.PW)).view(-1, g.D)
    elif weight.dim() == 4:
        y = F.conv2d(x.reshape(-1, g.C, g.PH, g.PW), weight, stride=(g.PH, g.PW)).view(-1, g.D)
    else:
        y = F.linear(x, weight)
    y = y.float()
    if bias is not None:
        y = y + bias.float()
    if pos_embed is not None:
        y = y + pos_embed.float()
    return y.to(weight.dtype)
