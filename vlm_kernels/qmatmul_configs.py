"""Launch configurations for vlm_kernels/qmatmul.py: regime by M, config lists, tuned winners per GPU (JSON).

Regimes (../shared/reference/triton-notes.md §3a):
    "gemv"     M <= GEMV_MAX_M: CUDA-core FMAs reduced once with tl.sum, weights decoded once per chunk of
               GEMV_M_CHUNK activation rows; split-K only when N alone cannot fill the GPU.
    "dp4a"     opt-in (env VLM_QMATMUL_INT8_X=1, or a config): M <= GEMV_MAX_M, bf16 x, Q4_0 / Q8_0 weights on
               a GPU: x rounded to int8 per 32-block, integer dot products (vlm_kernels/qmatmul_dp4a.py).
    "gemm"     tensor-core tiles, split-K for small M.
    "dequant"  dequantize to x's dtype with a Triton kernel, then torch.matmul (cuBLAS): wins at large M.
Tuned winners live in vlm_kernels/configs/qmatmul_<gpu>.json (written by `bench/bench_qmatmul.py --tune`):

    {"device": "...", "triton": "3.6.0",
     "configs": {"Q4_K": {"gemv": {"4096x14336": {cfg}, "*": {cfg}},      # bucket -> "NxK" | "*" -> cfg
                          "m32":  {...}, ..., "m4096": {"*": {"regime": "dequant"}}}}}

A cfg holds BLOCK_N, BLOCK_K (weights per K step, a power of two >= 32), num_warps, num_stages, SPLIT_K (an int
or "auto"), for "gemv" optionally UNROLL (a K step is UNROLL sub-steps of BLOCK_K) and for "gemm" BLOCK_M.
Lookup: exact "NxK", then "*", then the built-in heuristic below.
The M bucket (next power of two, 8 … 4096) keys the GEMM configs; all M <= GEMV_MAX_M share one GEMV config,
so rows of y are bitwise independent of M inside the GEMV regime and inside one GEMM bucket (the K-reduction
order is fixed by the config). Under the interpreter there is exactly one config per regime.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from vlm_kernels.quant import GGMLType

# GEMV for M <= 4, the tensor-core GEMM from M = 5. Measured on an H100 (run 3, bench/results/qmatmul.csv, the
# GEMV then covered M <= 16): the GEMV's time grows ~linearly past M = 2 (14336x4096 Q4_0: 31.5 us at M=1,
# 66 at M=4, 116 at M=8, 216 at M=16) while the split-K GEMM with 16-row tiles costs the same for any M <= 16
# (4096x14336 Q4_0 / Q4_K at M=16: 61-64 us); they cross at M ~ 4.
GEMV_MAX_M = 4
GEMV_FORCE_MAX_M = 16  # a GEMV config passed explicitly (tests, tuning) may take up to this many rows
GEMV_M_CHUNK = 4       # activation rows per GEMV program (M_PAD of _qgemv_kernel)
CONFIG_DIR = Path(__file__).parent / "configs"
# Fused GEMM is used below this M and dequantize + torch.matmul from it on, unless a tuned JSON says otherwise
# per type and M bucket (its entries say "regime": "dequant"). Measured on an H100 (bench/results/qmatmul.csv):
# at M=256 on 4096x14336-class layers dequant + cuBLAS ran at 0.81-0.89x bf16 torch.matmul, the fused GEMM
# at 0.11-0.25x.
DEFAULT_DEQUANT_MIN_M = 256

# Candidate lists swept by --tune (and compiled once each by the GPU tests). Small on purpose.
# GEMV (_qgemv_kernel): a K step is UNROLL sub-steps; per sub-step and per group/nibble a program holds a
# [BLOCK_N, NB, S] tile (NB = BLOCK_K / QK, at least 1; S = 16 contiguous bytes, 32 for Q8_0 and K-quants),
# i.e. E = BLOCK_N * NB * S / (32 * num_warps) weights per thread, plus one fp32 accumulator of that size per
# activation row of its M chunk (GEMV_M_CHUNK). The lists keep E at 8 (16 for Q8_0) so M chunks of 4 rows fit
# in registers, BLOCK_N * NB < 32 * num_warps so the per-block scales load straight in the layout of the
# weights (no shared-memory conversion in the loop), and few warps with small BLOCK_N: at M=1 bandwidth comes
# from many resident programs (N / BLOCK_N of them), each streaming long contiguous runs of a few rows, with
# UNROLL independent sub-steps of loads in flight. Keyed by the block size QK (32 or 256 weights).
# Offline sm_90 compiles (bench/qmatmul_aot.py, ptxas): no convert_layout, shared memory or barrier in the K
# loop for any type; registers and spills are listed there.
GEMV_CONFIGS = {
    32: [
        dict(BLOCK_N=2, BLOCK_K=512, UNROLL=2, num_warps=2, num_stages=1),
        dict(BLOCK_N=4, BLOCK_K=256, UNROLL=4, num_warps=2, num_stages=1),
        dict(BLOCK_N=1, BLOCK_K=1024, UNROLL=2, num_warps=2, num_stages=1),
        dict(BLOCK_N=4, BLOCK_K=512, UNROLL=2, num_warps=4, num_stages=1),
        dict(BLOCK_N=2, BLOCK_K=512, UNROLL=1, num_warps=2, num_stages=1),
    ],
    256: [
        dict(BLOCK_N=2, BLOCK_K=2048, UNROLL=1, num_warps=2, num_stages=1),
        dict(BLOCK_N=4, BLOCK_K=1024, UNROLL=2, num_warps=2, num_stages=1),
        dict(BLOCK_N=1, BLOCK_K=2048, UNROLL=2, num_warps=2, num_stages=1),
        dict(BLOCK_N=4, BLOCK_K=2048, UNROLL=1, num_warps=4, num_stages=1),
        dict(BLOCK_N=2, BLOCK_K=1024, UNROLL=1, num_warps=2, num_stages=1),
    ],
}
# GEMM: BLOCK_K is the dot's K per group for 32-weight blocks; K-quants round it up to one super-block (four
# dots of K=64). With bf16/fp16 activations every listed tile compiles for sm_90 without register spills for
# every type (checked offline with ptxas; fp32 activations spill with BLOCK_N=64).
GEMM_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
]
# Interpreter: one config per regime, big tiles because it pays per tensor op, not per element.
INTERPRET_GEMV = dict(regime="gemv", BLOCK_N=64, BLOCK_K=4096, SPLIT_K=1, num_warps=4, num_stages=1)
# Built-in GEMV choice before tuning (see GEMV_CONFIGS): 32-weight blocks / 256-weight K-quants.
DEFAULT_GEMV = {qk: dict(regime="gemv", SPLIT_K="auto", **GEMV_CONFIGS[qk][0]) for qk in GEMV_CONFIGS}
# GEMV split-K "auto": enough resident warps to keep loads in flight (~32 per SM) before splitting K, and only
# for layers of at least GEMV_SPLIT_MIN_WEIGHTS weights: a smaller layer streams in a few microseconds, less than
# the extra launch of the split-K reduction costs.
GEMV_TARGET_WARPS_PER_SM = 32
GEMV_SPLIT_MIN_WEIGHTS = 1 << 25
# dp4a GEMV (vlm_kernels/qmatmul_dp4a.py): one thread per (weight row, 32-weight block) of a [BLOCK_N, NB] tile,
# NB = BLOCK_K / 32, BLOCK_N * NB / (32 * num_warps) (row, block) pairs per thread. Bytes in flight over the GPU
# are ~N * NB * type_size (x split-K): an H100 needs ~3.4 MB (HBM rate x ~1 us latency), hence NB >= 64 for
# N = 4096. Offline sm_90 compiles (bench/qmatmul_aot.py --dp4a): ~1.5-2.2 SASS instructions per weight at
# M = 1 (the float GEMV: 8.3-9.4), no spills.
DP4A_TYPES = (GGMLType.Q4_0, GGMLType.Q8_0)
DP4A_CONFIGS = [
    dict(BLOCK_N=8, BLOCK_K=2048, num_warps=4, num_stages=1),
    dict(BLOCK_N=4, BLOCK_K=2048, num_warps=4, num_stages=1),
    dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4, num_stages=1),
    dict(BLOCK_N=16, BLOCK_K=2048, num_warps=8, num_stages=1),
    dict(BLOCK_N=4, BLOCK_K=4096, num_warps=4, num_stages=1),
]
DEFAULT_DP4A = dict(regime="dp4a", SPLIT_K="auto", **DP4A_CONFIGS[0])
INTERPRET_DP4A = dict(regime="dp4a", BLOCK_N=32, BLOCK_K=2048, SPLIT_K=1, num_warps=4, num_stages=1)
INTERPRET_GEMM = dict(regime="gemm", BLOCK_M=32, BLOCK_N=32, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=1)
MAX_SPLIT_K = 32


def bucket_top(M: int) -> int:
    """Largest M of M's bucket: GEMV_MAX_M, else the next power of two in 8 … 4096 (M itself above 4096)."""
    if M <= GEMV_MAX_M:
        return GEMV_MAX_M
    if M > 4096:
        return M
    b = 8
    while b < M:
        b *= 2
    return b


def dp4a_enabled() -> bool:
    """The dp4a GEMV is chosen for bf16 activations only with VLM_QMATMUL_INT8_X=1: on an H100 it made Q4_0
    decode GEMVs 1.14-1.34x faster, but rounding x to int8 moved a tiny Qwen2 Q8_0 model's bf16 logits to
    2.25e-2 of the CPU fp32 ones (the bf16 tolerance is 2e-2; the exact-x float GEMV passes)."""
    return os.environ.get("VLM_QMATMUL_INT8_X", "0") not in ("", "0")


def m_bucket(M: int) -> str:
    return "gemv" if M <= GEMV_MAX_M else f"m{min(bucket_top(M), 4096)}"


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def config_path(device_name: str) -> Path:
    override = os.environ.get("VLM_QMATMUL_CONFIGS")
    return Path(override) if override else CONFIG_DIR / f"qmatmul_{gpu_slug(device_name)}.json"


@functools.lru_cache(maxsize=8)
def _load_table(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        return {}
    with open(p) as f:
        return json.load(f).get("configs", {})


def clear_cache() -> None:
    """Forget loaded tables and memoised choices (after writing a tuned table or changing the env override)."""
    _load_table.cache_clear()
    choose.cache_clear()


def tuned_entry(device_name: str, qtype: GGMLType, bucket: str, N: int, K: int) -> dict | None:
    per_bucket = _load_table(str(config_path(device_name))).get(GGMLType(qtype).name, {}).get(bucket, {})
    hit = per_bucket.get(f"{N}x{K}") or per_bucket.get("*")
    return dict(hit) if hit else None


def pick_split(tiles: int, n_steps: int, target_programs: int, min_steps: int) -> int:
    """Largest power-of-two split with tiles * split <= target_programs and >= min_steps K steps per split."""
    split = 1
    while (split * 2 <= MAX_SPLIT_K and tiles * split * 2 <= target_programs
           and n_steps >= split * 2 * min_steps):
        split *= 2
    return split


def heuristic(M: int, N: int, K: int, qk: int, n_sm: int) -> dict:
    """Built-in choice when no tuned entry exists (CUDA)."""
    if M <= GEMV_MAX_M:
        return dict(DEFAULT_GEMV[qk])
    if M >= DEFAULT_DEQUANT_MIN_M:
        return dict(regime="dequant")
    if M <= 16:
        bm, bn, w = 16, 64, 4
    elif M <= 32:
        bm, bn, w = 32, 64, 4
    elif M <= 64:
        bm, bn, w = 64, 64, 4
    else:
        bm, bn, w = 64, 128, 8
    return dict(regime="gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, SPLIT_K="auto", num_warps=w, num_stages=3)


def resolve(cfg: dict, M: int, N: int, K: int, qk: int, n_sm: int) -> dict:
    """Fill NB (blocks per K step), iters (K steps per split) and a concrete SPLIT_K into a config."""
    cfg = dict(cfg)
    if cfg["regime"] == "dequant":
        return cfg
    n_blocks = K // qk
    nb = max(1, int(cfg["BLOCK_K"]) // qk)
    if nb & (nb - 1):
        raise ValueError(f"qmatmul config BLOCK_K={cfg['BLOCK_K']} is not a power-of-two multiple of {qk}")
    unroll = int(cfg.get("UNROLL", 1)) if cfg["regime"] == "gemv" else 1
    if cfg["regime"] == "dp4a" and qk != 32:
        raise ValueError(f"qmatmul config regime dp4a needs 32-weight blocks (Q4_0 / Q8_0), got block size {qk}")
    if unroll < 1:
        raise ValueError(f"qmatmul config UNROLL={cfg.get('UNROLL')} must be >= 1")
    n_steps = -(-n_blocks // (nb * unroll))
    split = cfg.get("SPLIT_K", "auto")
    if split == "auto":
        tiles = -(-N // cfg["BLOCK_N"])
        if cfg["regime"] in ("gemv", "dp4a"):
            # M chunks are not counted: the split (hence the K-reduction order) must not depend on M
            target = GEMV_TARGET_WARPS_PER_SM * n_sm // int(cfg.get("num_warps", 4))
            split = 1
            if N * K >= GEMV_SPLIT_MIN_WEIGHTS:
                split = pick_split(tiles, n_steps, target_programs=target, min_steps=1)
        else:
            # count M tiles at the top of M's bucket, so every M of a bucket gets the same split (and the
            # same K-reduction order: batch invariance inside a bucket)
            tiles *= -(-bucket_top(M) // cfg["BLOCK_M"])
            split = pick_split(tiles, n_steps, target_programs=2 * n_sm, min_steps=4)
    split = max(1, min(int(split), n_steps))
    cfg.update(NB=nb, SPLIT_K=split, iters=-(-n_steps // split))
    if cfg["regime"] == "gemv":
        cfg["UNROLL"] = unroll
    return cfg


@functools.lru_cache(maxsize=4096)
def choose(M: int, N: int, K: int, qtype: GGMLType, qk: int, *, interpret: bool, device_name: str = "",
           n_sm: int = 1, int8_x: bool = False) -> dict:
    """The resolved config for one call: a pure function of the shapes and the tuned table, memoised so the
    per-call cost is one dict lookup (treat the returned dict as read-only). int8_x: the caller accepts x
    rounded to int8 per 32-block (bf16 activations), so the dp4a GEMV may serve M <= GEMV_MAX_M."""
    if interpret:
        cfg = dict(INTERPRET_GEMV if M <= GEMV_MAX_M else INTERPRET_GEMM)
    elif int8_x and M <= GEMV_MAX_M and GGMLType(qtype) in DP4A_TYPES:
        cfg = tuned_entry(device_name, qtype, "dp4a", N, K) or dict(DEFAULT_DP4A)
        cfg["regime"] = "dp4a"
    else:
        cfg = tuned_entry(device_name, qtype, m_bucket(M), N, K) or heuristic(M, N, K, qk, n_sm)
        cfg.setdefault("regime", "gemv" if M <= GEMV_MAX_M else "gemm")
        if cfg["regime"] == "dp4a":     # a table may not give exact-x callers the int8-x kernel
            cfg = heuristic(M, N, K, qk, n_sm)
    return resolve(cfg, M, N, K, qk, n_sm)
