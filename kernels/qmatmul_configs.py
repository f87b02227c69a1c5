"""Launch configurations for kernels/qmatmul.py: regime by M, config lists, tuned winners per GPU (JSON).

Regimes (../shared/reference/triton-notes.md §3a):
    "gemv"     M <= GEMV_MAX_M: CUDA-core dot products (tl.sum), split-K when N alone cannot fill the GPU.
    "gemm"     tensor-core tiles, split-K for small M.
    "dequant"  dequantize to x's dtype with a Triton kernel, then torch.matmul (cuBLAS): wins at large M.
Tuned winners live in kernels/configs/qmatmul_<gpu>.json (written by `bench/bench_qmatmul.py --tune`):

    {"device": "...", "triton": "3.6.0",
     "configs": {"Q4_K": {"gemv": {"4096x14336": {cfg}, "*": {cfg}},      # bucket -> "NxK" | "*" -> cfg
                          "m16":  {...}, ..., "m4096": {"*": {"regime": "dequant"}}}}}

A cfg holds BLOCK_N, BLOCK_K (weights per K step, a power of two >= 32), num_warps, num_stages, SPLIT_K (an int
or "auto"), for "gemv" optionally REDUCE_EACH_STEP (see _qgemv_kernel) and for "gemm" BLOCK_M. Lookup: exact "NxK", then "*", then the built-in heuristic below.
The M bucket (next power of two, 8 … 4096) keys the GEMM configs; all M <= 4 share one GEMV config, so rows of
y are bitwise independent of M inside the GEMV regime and inside one GEMM bucket (the K-reduction order is
fixed by the config). Under the interpreter there is exactly one config per regime.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from kernels.quant import GGMLType

GEMV_MAX_M = 4
CONFIG_DIR = Path(__file__).parent / "configs"
# Before any measurement on a GPU, fused GEMM is used below this M and dequantize + torch.matmul from it on.
# A tuned JSON replaces this guess per type and M bucket (its entries say "regime": "dequant").
DEFAULT_DEQUANT_MIN_M = 512

# Candidate lists swept by --tune (and compiled once each by the GPU tests). Small on purpose.
# GEMV: without REDUCE_EACH_STEP the fp32 accumulator holds M_PAD x BLOCK_N x KC values, KC = BLOCK_K (32-weight
# blocks) or BLOCK_K / 4 (K-quants), so those tiles stay small; with it the tiles can be larger. All compile
# for sm_90 for every type and M_PAD (checked offline with ptxas; spills only for 32-weight blocks at M_PAD=4
# with BLOCK_N=32, BLOCK_K=512).
GEMV_CONFIGS = [
    dict(BLOCK_N=8, BLOCK_K=256, num_warps=4, num_stages=2),
    dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=2),
    dict(BLOCK_N=32, BLOCK_K=256, num_warps=8, num_stages=2),
    dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=2, REDUCE_EACH_STEP=True),
    dict(BLOCK_N=32, BLOCK_K=512, num_warps=8, num_stages=2, REDUCE_EACH_STEP=True),
    dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4, num_stages=2, REDUCE_EACH_STEP=True),
    dict(BLOCK_N=32, BLOCK_K=256, num_warps=8, num_stages=2, REDUCE_EACH_STEP=True),
]
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
INTERPRET_GEMV = dict(regime="gemv", BLOCK_N=64, BLOCK_K=1024, SPLIT_K=1, num_warps=4, num_stages=1)
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
        return dict(regime="gemv", BLOCK_N=16, BLOCK_K=256, SPLIT_K="auto", num_warps=4, num_stages=2)
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
    n_steps = -(-n_blocks // nb)
    split = cfg.get("SPLIT_K", "auto")
    if split == "auto":
        tiles = -(-N // cfg["BLOCK_N"])
        if cfg["regime"] == "gemv":
            split = pick_split(tiles, n_steps, target_programs=4 * n_sm, min_steps=2)
        else:
            # count M tiles at the top of M's bucket, so every M of a bucket gets the same split (and the
            # same K-reduction order: batch invariance inside a bucket)
            tiles *= -(-bucket_top(M) // cfg["BLOCK_M"])
            split = pick_split(tiles, n_steps, target_programs=2 * n_sm, min_steps=4)
    split = max(1, min(int(split), n_steps))
    cfg.update(NB=nb, SPLIT_K=split, iters=-(-n_steps // split))
    return cfg


@functools.lru_cache(maxsize=4096)
def choose(M: int, N: int, K: int, qtype: GGMLType, qk: int, *, interpret: bool, device_name: str = "",
           n_sm: int = 1) -> dict:
    """The resolved config for one call: a pure function of the shapes and the tuned table, memoised so the
    per-call cost is one dict lookup (treat the returned dict as read-only)."""
    if interpret:
        cfg = dict(INTERPRET_GEMV if M <= GEMV_MAX_M else INTERPRET_GEMM)
    else:
        cfg = tuned_entry(device_name, qtype, m_bucket(M), N, K) or heuristic(M, N, K, qk, n_sm)
        cfg.setdefault("regime", "gemv" if M <= GEMV_MAX_M else "gemm")
    return resolve(cfg, M, N, K, qk, n_sm)
