"""Tiny random-weight GGUFs written directly (no HF checkpoint, no sentencepiece): for machines that lack the
HF tooling (the GPU box) and for tests that need quantized tensors of several types.

`write_tiny(path, arch, qtype="F32")` -> path. llama / qwen2 / gemma3 layouts as llama.cpp names them,
n_embd 256 (K-quants need rows that are multiples of 256), 2 layers, 4 heads / 2 KV heads of 64, n_ff 512,
a 260-token stub vocabulary (4 specials + 256 byte tokens, SentencePiece-style metadata). Matrices are
quantized to `qtype` (F32 / F16 / Q8_0 / Q4_0 / Q4_K / Q6_K ...) with vlm_kernels.quant.quantize; norms are F32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFValue, GGUFValueType as VT

from vlm_kernels.quant import GGMLType, quantize
from vlm.gguf import write_gguf

N_EMBD, N_LAYER, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF = 256, 2, 4, 2, 64, 512
TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
N_VOCAB = len(TOKENS)


def _mat(g, n, k, qtype):
    w = torch.randn(n, k, generator=g) / k ** 0.5
    if qtype == "F32":
        return w.numpy()
    if qtype == "F16":
        return w.half().numpy()
    return quantize(w, GGMLType[qtype])


def write_tiny(path, arch: str, qtype: str = "F32", seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    ones = lambda n: (1.0 + 0.1 * torch.randn(n, generator=g)).numpy()   # noqa: E731
    t = {"token_embd.weight": _mat(g, N_VOCAB, N_EMBD, "F32" if qtype in ("F32", "F16") else "Q8_0"),
         "output_norm.weight": ones(N_EMBD)}
    if arch == "llama":
        t["output.weight"] = _mat(g, N_VOCAB, N_EMBD, qtype if qtype in ("F32", "F16") else "Q8_0")
    for il in range(N_LAYER):
        p = f"blk.{il}."
        t.update({p + "attn_norm.weight": ones(N_EMBD), p + "ffn_norm.weight": ones(N_EMBD),
                  p + "attn_q.weight": _mat(g, N_HEAD * HEAD_DIM, N_EMBD, qtype),
                  p + "attn_k.weight": _mat(g, N_HEAD_KV * HEAD_DIM, N_EMBD, qtype),
                  p + "attn_v.weight": _mat(g, N_HEAD_KV * HEAD_DIM, N_EMBD, qtype),
                  p + "attn_output.weight": _mat(g, N_EMBD, N_HEAD * HEAD_DIM, qtype),
                  p + "ffn_gate.weight": _mat(g, N_FF, N_EMBD, qtype),
                  p + "ffn_up.weight": _mat(g, N_FF, N_EMBD, qtype),
                  p + "ffn_down.weight": _mat(g, N_EMBD, N_FF, qtype)})
        if arch == "qwen2":
            for n, rows in (("attn_q.bias", N_HEAD), ("attn_k.bias", N_HEAD_KV), ("attn_v.bias", N_HEAD_KV)):
                t[p + n] = (0.1 * torch.randn(rows * HEAD_DIM, generator=g)).numpy()
        if arch == "gemma3":
            t.update({p + "attn_q_norm.weight": ones(HEAD_DIM), p + "attn_k_norm.weight": ones(HEAD_DIM),
                      p + "post_attention_norm.weight": ones(N_EMBD), p + "post_ffw_norm.weight": ones(N_EMBD)})
    u32 = lambda v: GGUFValue(int(v), VT.UINT32)   # noqa: E731
    meta = {f"{arch}.context_length": u32(512), f"{arch}.embedding_length": u32(N_EMBD),
            f"{arch}.block_count": u32(N_LAYER), f"{arch}.feed_forward_length": u32(N_FF),
            f"{arch}.attention.head_count": u32(N_HEAD), f"{arch}.attention.head_count_kv": u32(N_HEAD_KV),
            f"{arch}.attention.key_length": u32(HEAD_DIM), f"{arch}.attention.value_length": u32(HEAD_DIM),
            f"{arch}.attention.layer_norm_rms_epsilon": GGUFValue(1e-6, VT.FLOAT32),
            f"{arch}.rope.freq_base": GGUFValue(10000.0, VT.FLOAT32),
            "tokenizer.ggml.model": GGUFValue("llama", VT.STRING),
            "tokenizer.ggml.tokens": GGUFValue(TOKENS, VT.ARRAY, VT.STRING),
            "tokenizer.ggml.scores": GGUFValue([0.0] * N_VOCAB, VT.ARRAY, VT.FLOAT32),
            "tokenizer.ggml.token_type": GGUFValue([3, 3, 3, 2] + [6] * 256, VT.ARRAY, VT.INT32),
            "tokenizer.ggml.bos_token_id": u32(2), "tokenizer.ggml.eos_token_id": u32(1),
            "tokenizer.ggml.unknown_token_id": u32(3), "tokenizer.ggml.add_space_prefix": GGUFValue(False, VT.BOOL)}
    if arch == "gemma3":
        meta["gemma3.attention.sliding_window"] = u32(8)
        meta["gemma3.attention.sliding_window_pattern"] = GGUFValue([True, False], VT.ARRAY, VT.BOOL)
    path = Path(path)
    write_gguf(path, arch, meta, {k: (np.asarray(v, dtype=np.float32) if isinstance(v, np.ndarray) and v.ndim == 1
                                      else v) for k, v in t.items()})
    return path
