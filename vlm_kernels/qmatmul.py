"""Quantized matmul straight from GGUF blocks: y = x @ dequant(w).T (+ bias).

    x: [..., K] fp16 / bf16 / fp32, contiguous;  w: QTensor [N, K];  bias: [N] or None
    y: [..., N] in x's dtype; products accumulated in fp32.

Three implementations with the same signature `(x, w, bias=None)`:
    qmatmul_triton  fused Triton kernels (vlm_kernels/qmatmul_kernels.py), regime chosen by M
                    (vlm_kernels/qmatmul_configs.py): GEMV for M <= 4 (opt-in for bf16 x and Q4_0 / Q8_0 weights,
                    VLM_QMATMUL_INT8_X=1: the "dp4a" GEMV of vlm_kernels/qmatmul_dp4a.py, x rounded to int8),
                    tensor-core split-K GEMM, and dequantize-to-x.dtype + torch.matmul where the tuned table
                    says it is faster.
    qmatmul_torch   the path used when Triton is not chosen (CPU inference): dequantized weights cached per
                    QTensor within a memory budget (env VLM_QMATMUL_CACHE_MB), else dequantized in row chunks.
    qmatmul_ref     the spec: dequantize to fp32, matmul in fp32, cast to x's dtype.
    qmatmul_dp4a_ref  what the "dp4a" regime computes: x rounded to int8 per 32-element block first.
F32 / F16 / BF16 weights are plain dense matrices: every path hands them to torch.
"""
from __future__ import annotations

import functools
import os
import threading
import weakref
from collections import OrderedDict

import torch
import triton

from vlm_kernels import qmatmul_configs as qcfg
from vlm_kernels._qblocks import GEOMETRY, IQ4_NL_VALUES, SUPPORTED
from vlm_kernels.qmatmul_dp4a import _qgemv_dp4a_kernel, _quantize_x_kernel
from vlm_kernels.qmatmul_kernels import _dequant_kernel, _qgemm_kernel, _qgemv_kernel, _splitk_reduce_kernel
from vlm_kernels.quant import FLOAT_TYPES, GGMLType, QTensor
from vlm_kernels.quant import dequantize as _quant_dequantize

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_WEIGHT_DTYPE = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------
# input checks (shared by all three paths; run before any launch)

def _check(x, w, bias, *, triton_path: bool) -> tuple[int, int]:
    if not isinstance(w, QTensor):
        raise TypeError(f"qmatmul: w must be a QTensor, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"qmatmul: w must be 2-D [N, K], got {w.qtype.name} shape {w.shape}")
    N, K = w.shape
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"qmatmul: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"qmatmul: x dtype {x.dtype} not supported (float16, bfloat16 or float32)")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"qmatmul: x {tuple(x.shape)} does not match w {w.qtype.name} [N={N}, K={K}]: "
                         f"last dim must be K={K}")
    if not x.is_contiguous():
        raise ValueError(f"qmatmul: x {tuple(x.shape)} with strides {x.stride()} must be contiguous")
    if x.device != w.device:
        raise ValueError(f"qmatmul: x is on {x.device} but w ({w.qtype.name} {w.shape}) is on {w.device}")
    if triton_path and w.qtype not in SUPPORTED and w.qtype not in FLOAT_TYPES:
        raise ValueError(f"qmatmul_triton: weight type {w.qtype.name} is not supported; supported: "
                         f"{', '.join(t.name for t in SUPPORTED)} and F32/F16/BF16")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _X_DTYPES:
            raise TypeError(f"qmatmul: bias must be a float tensor, got "
                            f"{getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (N,) or not bias.is_contiguous():
            raise ValueError(f"qmatmul: bias {tuple(bias.shape)} must be a contiguous [N={N}] vector")
        if bias.device != x.device:
            raise ValueError(f"qmatmul: bias is on {bias.device} but x is on {x.device}")
    return N, K


def _float_weight(w: QTensor) -> torch.Tensor:
    """F32/F16/BF16 QTensor bytes viewed as the dense [N, K] matrix."""
    return w.data.view(_FLOAT_WEIGHT_DTYPE[w.qtype]).reshape(w.shape)


def _dense_matmul(x2, wd, bias):
    """x2 [M, K] @ wd[N, K].T (+ bias), accumulating in fp32 on CPU, in x's dtype via cuBLAS on CUDA."""
    if x2.is_cuda and x2.dtype != torch.float32:
        y = torch.nn.functional.linear(x2, wd.to(x2.dtype), None if bias is None else bias.to(x2.dtype))
        return y
    y = torch.nn.functional.linear(x2.float(), wd.float(), None if bias is None else bias.float())
    return y.to(x2.dtype)


# ---------------------------------------------------------------------------------------------------------
# Triton path

@functools.lru_cache(maxsize=None)
def _lut(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dequantize_triton(w: QTensor, dtype: torch.dtype = torch.float32, *, block_n: int = 32,
                      block_k: int | None = None) -> torch.Tensor:
    """GGUF QTensor -> dense [N, K] `dtype` with the Triton dequant kernel (used by the "dequant" regime).
    block_k: weights per program along K (default 256 on GPU; 1024 under the interpreter, which pays per op)."""
    if block_k is None:
        block_k = 1024 if _interpret() else 256
    if w.qtype not in SUPPORTED:
        raise ValueError(f"dequantize_triton: weight type {w.qtype.name} is not supported")
    if dtype not in _X_DTYPES:
        raise TypeError(f"dequantize_triton: dtype {dtype} not supported")
    geom = GEOMETRY[w.qtype]
    N, K = w.shape
    n_blocks = K // geom.qk
    nb = max(1, block_k // geom.qk)
    out = torch.empty((N, K), dtype=dtype, device=w.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(n_blocks, nb))
    _dequant_kernel[grid](w.data.contiguous(), out, _lut(w.device), N, K, w.data.shape[1], n_blocks,
                          QTYPE=int(w.qtype), **geom.constexprs(), BLOCK_N=block_n, NB=nb)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)       # plain Python: triton.cdiv is a jit function, slow to call from the host


@functools.lru_cache(maxsize=None)
def _constexprs(qtype: GGMLType) -> dict:
    return GEOMETRY[qtype].constexprs()


def _choose_config(M, N, K, w, x_dtype, device, interpret: bool) -> dict:
    geom = GEOMETRY[w.qtype]
    if interpret:
        return qcfg.choose(M, N, K, w.qtype, geom.qk, interpret=True)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return qcfg.choose(M, N, K, w.qtype, geom.qk, interpret=False, device_name=_device_name(idx),
                       n_sm=_sm_count(idx), int8_x=x_dtype == torch.bfloat16 and qcfg.dp4a_enabled())


def qmatmul_triton(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None, *,
                   config: dict | None = None) -> torch.Tensor:
    """Fused dequant matmul. `config` (tests, tuning) overrides the table: a dict as in qmatmul_configs, with
    "regime" in {"gemv", "gemm", "dequant"}; SPLIT_K may be "auto"."""
    N, K = _check(x, w, bias, triton_path=True)
    interpret = _interpret()
    if x.device.type != "cuda" and not interpret:
        raise ValueError(f"qmatmul_triton: x is on {x.device}; Triton needs CUDA tensors or TRITON_INTERPRET=1")
    out_shape = tuple(x.shape[:-1]) + (N,)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if w.qtype in FLOAT_TYPES:
        return _dense_matmul(x2, _float_weight(w), bias).reshape(out_shape)
    out_dtype = x.dtype
    if interpret and x2.dtype == torch.bfloat16:
        # bf16 arithmetic is wrong under the interpreter (triton-notes §4.1): compute from fp32 there.
        x2 = x2.float()
    if M == 0:
        return x.new_empty(out_shape)
    geom = GEOMETRY[w.qtype]
    if config is None:
        cfg = _choose_config(M, N, K, w, x2.dtype, x.device, interpret)
    else:
        n_sm = 1 if interpret else _sm_count(x.device.index or 0)
        cfg = qcfg.resolve(config, M, N, K, geom.qk, n_sm)

    if cfg["regime"] == "dequant":
        wd = dequantize_triton(w, x2.dtype)
        y = torch.nn.functional.linear(x2, wd, None if bias is None else bias.to(x2.dtype))
        return y.to(out_dtype).reshape(out_shape)

    n_blocks = K // geom.qk
    split = cfg["SPLIT_K"]
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    ws = y if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    wdata = w.data.contiguous()
    common = (x2, wdata, y, ws, bias if has_bias else y, _lut(x.device),
              M, N, K, wdata.shape[1], n_blocks, cfg["iters"], split)
    launch = dict(QTYPE=int(w.qtype), **_constexprs(w.qtype), BLOCK_N=cfg["BLOCK_N"], NB=cfg["NB"],
                  HAS_BIAS=has_bias and split == 1, num_warps=cfg.get("num_warps", 4),
                  num_stages=cfg.get("num_stages", 2))
    if cfg["regime"] == "dp4a":
        _launch_dp4a(x2, wdata, w.qtype, y, ws, bias, cfg, M, N, K, interpret)
    elif cfg["regime"] == "gemv":
        m_pad, n_mchunks = _m_chunks(M, "GEMV")
        grid = (n_mchunks * _cdiv(N, cfg["BLOCK_N"]), split)
        _qgemv_kernel[grid](*common, n_mchunks, M_PAD=m_pad, UNROLL=cfg["UNROLL"], **launch)
    elif cfg["regime"] == "gemm":
        grid = (_cdiv(N, cfg["BLOCK_N"]), _cdiv(M, cfg["BLOCK_M"]), split)
        _qgemm_kernel[grid](*common, BLOCK_M=cfg["BLOCK_M"], IEEE=x2.dtype == torch.float32, **launch)
    else:
        raise ValueError(f"qmatmul_triton: unknown regime {cfg['regime']!r}")
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(_cdiv(M * N, block),)](ws, y, bias if has_bias else ws, M * N, N, split,
                                                             HAS_BIAS=has_bias, BLOCK=block)
    return y.reshape(out_shape)


def _quantize_x(x2: torch.Tensor, interpret: bool):
    """x [M, K] -> (int8 [M, K], fp32 scales [M, K/32], int32 block sums [M, K/32]) for the dp4a GEMV."""
    M, K = x2.shape
    nb = K // 32
    xq = torch.empty((M, K), dtype=torch.int8, device=x2.device)
    xd = torch.empty((M, nb), dtype=torch.float32, device=x2.device)
    xs = torch.empty((M, nb), dtype=torch.int32, device=x2.device)
    blocks = 256 if interpret else 32
    _quantize_x_kernel[(_cdiv(M * nb, blocks),)](x2, xq, xd, xs, M * nb, BLOCKS=blocks, num_warps=4)
    return xq, xd, xs


def _m_chunks(M: int, regime: str) -> tuple[int, int]:
    """GEMV-style kernels (float GEMV, dp4a): activation rows per program (M_PAD) and the number of M chunks."""
    if M > qcfg.GEMV_FORCE_MAX_M:
        raise ValueError(f"qmatmul_triton: the {regime} regime takes M <= {qcfg.GEMV_FORCE_MAX_M}, got M={M}")
    m_pad = 1 if M == 1 else 2 if M == 2 else qcfg.GEMV_M_CHUNK
    return m_pad, _cdiv(M, m_pad)


def _launch_dp4a(x2, wdata, qtype, y, ws, bias, cfg, M, N, K, interpret: bool) -> None:
    if qtype not in qcfg.DP4A_TYPES:
        raise ValueError(f"qmatmul_triton: the dp4a regime takes {', '.join(t.name for t in qcfg.DP4A_TYPES)} "
                         f"weights, got {qtype.name}")
    m_pad, n_mchunks = _m_chunks(M, "dp4a")
    xq, xd, xs = _quantize_x(x2, interpret)
    split = cfg["SPLIT_K"]
    grid = (n_mchunks * _cdiv(N, cfg["BLOCK_N"]), split)
    has_bias = bias is not None
    _qgemv_dp4a_kernel[grid](xq.view(torch.int32), xd, xs, wdata.view(torch.int16), y, ws,
                             bias if has_bias else y, M, N, wdata.shape[1] // 2, K // 32, cfg["iters"], split,
                             n_mchunks, IS_Q4=qtype == GGMLType.Q4_0, M_PAD=m_pad, BLOCK_N=cfg["BLOCK_N"],
                             NB=cfg["NB"], HAS_BIAS=has_bias and split == 1, ASM=not interpret,
                             num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1))


# ---------------------------------------------------------------------------------------------------------
# torch path: cached dequantized weights within a budget, else chunked dequantization

def dequantize_rows(w: QTensor, row0: int = 0, row1: int | None = None) -> torch.Tensor:
    """fp32 dequantization of rows [row0, row1) of a 2-D QTensor, on w's device."""
    row1 = w.shape[0] if row1 is None else row1
    if w.qtype in FLOAT_TYPES:
        return _float_weight(w)[row0:row1].float()
    return _quant_dequantize(w.data[row0:row1], w.qtype, (row1 - row0, w.shape[1]))


def _budget_bytes(device: torch.device) -> int:
    default = "4096" if device.type == "cpu" else "0"
    return int(float(os.environ.get("VLM_QMATMUL_CACHE_MB", default)) * 2**20)


class _DequantCache:
    """Dequantized copies stored on the QTensor objects themselves (so they die with them), with a global
    least-recently-used budget. Entries remember the data pointer, version and dtype they were made from (one
    dtype per QTensor: CPU always uses fp32)."""

    ATTR = "_qmatmul_dense"

    def __init__(self):
        self._lock = threading.RLock()   # re-entrant: a weakref callback may fire during a locked section
        self._lru: OrderedDict[int, tuple[weakref.ref, int]] = OrderedDict()
        self.nbytes = 0

    def _forget(self, key: int) -> None:
        ref, n = self._lru.pop(key, (None, 0))
        self.nbytes -= n
        obj = ref() if ref is not None else None
        if obj is not None:
            obj.__dict__.pop(self.ATTR, None)

    def get(self, w: QTensor, dtype: torch.dtype) -> torch.Tensor | None:
        hit = w.__dict__.get(self.ATTR)
        stamp = (w.data.data_ptr(), w.data._version, dtype)
        with self._lock:
            if hit is not None and hit[0] == stamp:
                self._lru.move_to_end(id(w))
                return hit[1]
            if hit is not None:
                self._forget(id(w))
            budget = _budget_bytes(w.device)
            need = w.shape[0] * w.shape[1] * torch.empty((), dtype=dtype).element_size()
            if need > budget:
                return None
        dense = dequantize_rows(w).to(dtype)
        with self._lock:
            while self._lru and self.nbytes + need > budget:
                self._forget(next(iter(self._lru)))
            key = id(w)
            self._lru[key] = (weakref.ref(w, lambda _r, k=key: self._gone(k)), need)
            self.nbytes += need
            w.__dict__[self.ATTR] = (stamp, dense)
        return dense

    def _gone(self, key: int) -> None:
        with self._lock:
            _ref, n = self._lru.pop(key, (None, 0))
            self.nbytes -= n

    def clear(self) -> None:
        with self._lock:
            for key in list(self._lru):
                self._forget(key)


dequant_cache = _DequantCache()
_CHUNK_ELEMS = 1 << 22   # rows dequantized at a time on the uncached path (16 MB of fp32)


def qmatmul_torch(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Off-Triton path: cached dense weights + torch matmul (fp32 on CPU, so results equal qmatmul_ref's to fp32
    rounding and the engine keeps 1e-4 logit parity with HF fp32).

    CPU lower-byte options measured 2026-11-26 on the 2-vCPU Sapphire Rapids dev box (AVX512-BF16/AMX, shared
    with other jobs, so ±30% noise), decode GEMV of Gemma 3 270M's tied output [262144, 640] (M = 1), 2 threads:
        fp32 weights, F.linear                       44-64 ms   (671 MB read; exact)          <- default
        fp32 weights stored [K, N] (x @ Wt)          24-48 ms   (same bytes; no consistent gain over 3 runs)
        bf16 weights + bf16 x, F.linear / matmul     73-84 ms   (slower: no fast bf16 GEMV path in oneDNN here)
        bf16 torch.mv                                   28 ms   (one run)
        torch._weight_int8pack_mm, fp32 x              232 ms;  bf16 x: 38 ms
        int8 q + fp32 block scales, dequantized      ~8x slower than dense (torch's int8->fp32 convert and
        to fp32 in L2-sized row chunks, then GEMV    the scale multiply cost more than the DRAM bytes saved;
                                                     exact: d·q is exact in fp32)
    None of the faster lower-byte ones is exact: bf16 cannot hold Q8_0's d·q (fp16 d × int8 q needs up to 18
    significant bits, bf16 has 8), the fast int8 kernel needs bf16 activations, and int8pack's per-channel
    scale cannot express the per-32-block scales. Relative weight error 2^-9 puts logits far outside the 1e-4 parity
    bound (tests/vlm/test_real_gemma.py), and the fastest candidate is < 1.5x the exact path, so fp32 stays.
    """
    N, K = _check(x, w, bias, triton_path=False)
    out_shape = tuple(x.shape[:-1]) + (N,)
    x2 = x.reshape(-1, K)
    if w.qtype in FLOAT_TYPES:
        return _dense_matmul(x2, _float_weight(w), bias).reshape(out_shape)
    # CPU: fp32 weights + MKL sgemm; CUDA: weights in x's dtype + cuBLAS (fp32 accumulation inside).
    cdtype = torch.float32 if (x.device.type == "cpu" or x.dtype == torch.float32) else x.dtype
    dense = dequant_cache.get(w, cdtype)
    if dense is not None:
        if x2.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):   # CPU decode hot path
            return torch.nn.functional.linear(x2, dense, bias).reshape(out_shape)
        return _dense_matmul(x2, dense, bias).reshape(out_shape)
    y = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    step = max(1, _CHUNK_ELEMS // K)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        y[:, r0:r1] = _dense_matmul(x2, dequantize_rows(w, r0, r1).to(cdtype),
                                    None if bias is None else bias[r0:r1])
    return y.reshape(out_shape)


def qmatmul_ref(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The spec: fp32 dequantization (bit-exact with gguf-py), fp32 matmul, cast to x's dtype."""
    N, K = _check(x, w, bias, triton_path=False)
    y = x.reshape(-1, K).float() @ dequantize_rows(w).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(tuple(x.shape[:-1]) + (N,))


def qmatmul_dp4a_ref(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the "dp4a" regime computes, in float64: x rounded per 32-element block to int8 q with scale
    d = amax / 127 (q = floor(x * (127 / amax) + 0.5) in fp32, clamped to +-127), then the exact product with
    the fp32 dequantized weights, cast to x's dtype."""
    N, K = _check(x, w, bias, triton_path=False)
    xf = x.reshape(-1, K).float().reshape(-1, K // 32, 32)
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax.clamp_min(1e-30), torch.zeros_like(amax))
    q = torch.floor(xf * inv + 0.5).clamp_(-127, 127)
    xdq = (q.double() * (amax / 127.0).double()).reshape(-1, K)
    y = xdq @ dequantize_rows(w).double().T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(tuple(x.shape[:-1]) + (N,))
