"""RMSNorm and LayerNorm over the last dim, optionally fused with the residual add.

    rms_norm:   y = x / sqrt(mean(x²) + eps) · (weight + offset)
    layer_norm: y = (x − mean(x)) / sqrt(var(x) + eps) · weight + bias      (biased variance, as torch)
    residual:   h = x + residual first (rounded to x's dtype: h is the new residual stream the caller keeps),
                the norm is taken of that stored h, and both (y, h) are returned.

Math order (matches llama.cpp and HF's Gemma3RMSNorm): load in any float dtype, compute everything in fp32
(statistics, normalisation and the multiply by `weight + offset`), round once to x's dtype at the end.
Gemma's `(1 + w)` is `offset=1.0`. HF's LlamaRMSNorm rounds the normalised x to the input dtype *before* × w;
for fp32 inputs the two orders are the same computation, for fp16/bf16 they differ by at most one rounding
of the output dtype (ours is the more accurate; llama.cpp computes in fp32 like us).

x: [..., n] any leading dims (the last dim must be contiguous or it is copied); weight/bias: [n], in x's dtype
or float32 (GGUF stores norm weights as F32). Output: x's dtype and shape.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows up to this many elements are held in registers in one pass; longer rows take the chunked loop path.
MAX_FUSED_BLOCK = 16384
# Elements one program handles in the fused path (several short rows per program, e.g. q/k-norm over head_dim).
_TILE_ELEMS = 4096

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _norm_kernel(
    X, R, W, B, Y, H,                  # x [n_rows, n], residual, weight [n], bias [n], y out, h out (residual stream)
    n_rows, n,
    stride_x, stride_r, stride_y, stride_h,   # row strides (elements); the last dim is contiguous everywhere
    eps, offset,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    FUSED: tl.constexpr,               # whole row fits BLOCK_N: one pass, row kept in registers
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 row index: n_rows * stride may exceed 2^31 for long prompts × wide models.
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    x_row = X + rows[:, None] * stride_x          # [BLOCK_M, 1] row base pointers
    r_row = R + rows[:, None] * stride_r
    y_row = Y + rows[:, None] * stride_y
    h_row = H + rows[:, None] * stride_h

    if FUSED:
        mask = row_ok[:, None] & (cols < n)[None, :]
        x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(r_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            # Round h to the stream dtype, store it, and normalise exactly that stored value, so the fused op
            # equals "h = x + r; y = norm(h)" run separately.
            h = (x + r).to(H.dtype.element_ty)
            tl.store(h_row + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)
        if IS_RMS:
            rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n + eps)
            y = x * rstd[:, None]
        else:
            mean = tl.sum(x, axis=1) / n
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / n + eps)
            y = xc * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=cols < n, other=0.0).to(tl.float32)
            y = y * (w + offset)[None, :]
        if HAS_BIAS:
            b = tl.load(B + cols, mask=cols < n, other=0.0).to(tl.float32)
            y = y + b[None, :]
        tl.store(y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Long rows (BLOCK_M == 1): chunk over n. h = x + r is recomputed from the inputs in every pass (same
        # rounding each time) instead of re-reading H, so no pass depends on another pass's stores.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < n)[None, :]
            x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
                h = (x + r).to(H.dtype.element_ty)
                tl.store(h_row + c[None, :], h, mask=mask)
                x = h.to(tl.float32)
            if IS_RMS:
                acc += x * x
            else:
                acc += x
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / n + eps)
        else:
            mean = tl.sum(acc, axis=1) / n
            # Second pass: variance of the centred values (not E[x²] − mean², which cancels badly).
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, n, BLOCK_N):
                c = start + cols
                mask = row_ok[:, None] & (c < n)[None, :]
                x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    r = tl.load(r_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
                    x = (x + r).to(H.dtype.element_ty).to(tl.float32)
                xc = tl.where(mask, x - mean[:, None], 0.0)
                acc += xc * xc
            rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / n + eps)
        for start in range(0, n, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < n)[None, :]
            x = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
                x = (x + r).to(H.dtype.element_ty).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                w = tl.load(W + c, mask=c < n, other=0.0).to(tl.float32)
                y = y * (w + offset)[None, :]
            if HAS_BIAS:
                b = tl.load(B + c, mask=c < n, other=0.0).to(tl.float32)
                y = y + b[None, :]
            tl.store(y_row + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# argument checks shared by the launchers and the references (same errors whichever path dispatch picks)

def _check_vec(name: str, v, x: torch.Tensor, n: int) -> None:
    if v is None:
        return
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"{name} has shape {tuple(v.shape)} but x's last dim is n={n} (expected [{n}])")
    if v.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} dtype {v.dtype} does not match x dtype {x.dtype} (allowed: x's dtype or float32)")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but x is on {x.device}")


def _check_norm_args(x, weight, bias, eps, residual) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x dtype {x.dtype} is not supported (float16, bfloat16, float32)")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    _check_vec("weight", weight, x, n)
    _check_vec("bias", bias, x, n)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} != x dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    if not (float(eps) >= 0.0):
        raise ValueError(f"eps must be >= 0, got {eps}")
    return n


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n] -> [n_rows, n] view with a contiguous last dim (copy only when that is impossible)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous()


def _launch(x, weight, bias, eps, offset, residual, is_rms):
    n = x.shape[-1]
    x2 = _rows(x, n)
    n_rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n)
    if residual is not None:
        r2 = _rows(residual, n)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        h2 = h.view(-1, n)
    else:
        r2, h, h2 = x2, None, y2      # dummies, never touched (HAS_RESIDUAL=False)
    if n_rows == 0:
        return (y, h) if residual is not None else y

    block_n = triton.next_power_of_2(n)
    fused = block_n <= MAX_FUSED_BLOCK
    if fused:
        block_m = max(1, min(_TILE_ELEMS // block_n, triton.next_power_of_2(n_rows)))
    else:
        block_n, block_m = min(block_n, 4096), 1
    num_warps = max(1, min(16, (block_m * block_n) // 512))
    dummy = x2
    grid = (triton.cdiv(n_rows, block_m),)
    _norm_kernel[grid](
        x2, r2, weight if weight is not None else dummy, bias if bias is not None else dummy, y2, h2,
        n_rows, n, x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
        float(eps), float(offset),
        IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, FUSED=fused, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return (y, h) if residual is not None else y


# ----------------------------------------------------------------------------------------------------------
# public launchers (names fixed by vlm_kernels/_dispatch.py)

def rms_norm_triton(x, weight, eps, *, offset=0.0, residual=None):
    """RMSNorm; with `residual` returns (y, h = x + residual), else y. weight None = no scale (offset must be 0)."""
    _check_norm_args(x, weight, None, eps, residual)
    if weight is None and offset != 0.0:
        raise ValueError(f"offset={offset} needs a weight (offset is added to the weight)")
    return _launch(x, weight, None, eps, offset, residual, True)


def layer_norm_triton(x, weight, bias, eps, *, residual=None):
    """LayerNorm (weight/bias may be None); with `residual` returns (y, h = x + residual), else y."""
    _check_norm_args(x, weight, bias, eps, residual)
    return _launch(x, weight, bias, eps, 0.0, residual, False)


# ----------------------------------------------------------------------------------------------------------
# references (the spec)

def rms_norm_ref(x, weight, eps, *, offset=0.0, residual=None):
    _check_norm_args(x, weight, None, eps, residual)
    if weight is None and offset != 0.0:
        raise ValueError(f"offset={offset} needs a weight (offset is added to the weight)")
    h = x + residual if residual is not None else x     # rounded to x's dtype, like the stored stream
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.float() + offset)
    y = y.to(x.dtype)
    return (y, h) if residual is not None else y


def layer_norm_ref(x, weight, bias, eps, *, residual=None):
    _check_norm_args(x, weight, bias, eps, residual)
    h = x + residual if residual is not None else x
    y = torch.nn.functional.layer_norm(
        h.float(), (x.shape[-1],), None if weight is None else weight.float(),
        None if bias is None else bias.float(), eps).to(x.dtype)
    return (y, h) if residual is not None else y
