"""Small F32 llama GGUFs for the quantize-preset tests, reproducible bit for bit on any machine.

The weights come from a counter-based integer hash (splitmix64) and a sum of four uniforms (Irwin-Hall, scaled
to unit variance): integer and float64 arithmetic only, no library RNG stream or libm call whose last bit could
change between versions. tests/data/quantize_presets.json holds, per file and preset, the type and SHA-256 of every
tensor that llama.cpp's ``llama-quantize`` wrote for these exact inputs (how it was made: the "_about" entry).

Shapes exercise the mix rules: 8 layers (the "more bits" / n/8 / n/16 layer sets), n_embd 256 (K-quant rows),
n_ff 288 (ffn_down rows of 288 are not a multiple of 256: the Q2_K..Q6_K fallbacks), GQA 4 or 1 (the Q2_K attn_v
rule), tied or separate output.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

N_LAYER, N_EMBD, N_FF, N_VOCAB, N_HEAD, ROWS = 8, 256, 288, 32, 8, 16
MASK64 = (1 << 64) - 1

# name -> (n_head_kv, tied embeddings)
FILES = {"gqa4": (2, False), "gqa1_tied": (8, True)}


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def weights(seed: int, rows: int, cols: int) -> np.ndarray:
    """float32 [rows, cols], mean 0, std ~1, with every 97th weight an outlier (x6): K-quant scales see both."""
    n = rows * cols
    idx = np.arange(4 * n, dtype=np.uint64) + np.uint64((seed * 0x1000193) & MASK64) * np.uint64(1 << 32)
    u = (_splitmix64(idx) >> np.uint64(11)).astype(np.float64) / float(1 << 53)    # [0, 1), exact
    x = (u.reshape(4, n).sum(axis=0) - 2.0) * np.sqrt(3.0)                         # Irwin-Hall(4), var 1
    x[::97] *= 6.0
    return x.astype(np.float32).reshape(rows, cols)


def tensors(n_head_kv: int, tied: bool) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    seed = iter(range(1, 1000))
    out["token_embd.weight"] = weights(next(seed), N_VOCAB, N_EMBD)
    out["output_norm.weight"] = np.ones(N_EMBD, np.float32)
    if not tied:
        out["output.weight"] = weights(next(seed), N_VOCAB, N_EMBD)
    for i in range(N_LAYER):
        for name, cols in (("attn_q", N_EMBD), ("attn_k", N_EMBD), ("attn_v", N_EMBD), ("attn_output", N_EMBD),
                           ("ffn_gate", N_EMBD), ("ffn_up", N_EMBD), ("ffn_down", N_FF)):
            out[f"blk.{i}.{name}.weight"] = weights(next(seed), ROWS, cols)
        out[f"blk.{i}.attn_norm.weight"] = np.ones(N_EMBD, np.float32)
        out[f"blk.{i}.ffn_norm.weight"] = np.ones(N_EMBD, np.float32)
    return out


def write(path: Path, name: str) -> Path:
    """Write fixture `name` (a key of FILES) as an F32 llama GGUF with the hparams llama.cpp's loader reads."""
    from vlm.gguf import write_gguf
    n_head_kv, tied = FILES[name]
    meta = {
        "general.architecture": "llama", "general.name": f"quant-mix-{name}", "general.file_type": 0,
        "llama.block_count": N_LAYER, "llama.context_length": 128, "llama.embedding_length": N_EMBD,
        "llama.feed_forward_length": N_FF, "llama.attention.head_count": N_HEAD,
        "llama.attention.head_count_kv": n_head_kv, "llama.rope.dimension_count": N_EMBD // N_HEAD,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": N_VOCAB,
    }
    import torch
    return write_gguf(path, "llama", meta, {k: torch.from_numpy(v) for k, v in tensors(n_head_kv, tied).items()})
