"""Qwen2 / Qwen2.5 decoder (GGUF arch `qwen2`): the Llama block with q/k/v biases and NeoX RoPE.

llama.cpp's converter does not permute Qwen2's Q/K rows, so RoPE pairs the two halves of each head
(LLAMA_ROPE_TYPE_NEOX, HF rotate_half). Embeddings are usually tied (no output.weight).
"""
from __future__ import annotations

from vlm.models.llama import LlamaModel


class Qwen2Model(LlamaModel):
    ARCH = "qwen2"
    ROPE_MODE = "neox"
    LAYER_TENSORS = LlamaModel.LAYER_TENSORS + ("attn_q.bias", "attn_k.bias", "attn_v.bias")
    OPTIONAL_LAYER_TENSORS = ("attn_output.bias",)
