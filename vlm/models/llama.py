"""Llama-family decoder (GGUF arch `llama`): Llama 2/3, Mistral, SmolLM, TinyLlama.

Pre-norm blocks: x += Wo·attn(rope(Wq·n(x)), rope(Wk·n(x)), Wv·n(x)); x += Wd·(silu(Wg·n(x)) * Wu·n(x)).
RoPE mode "normal" (adjacent pairs): llama.cpp's converter permutes the Q/K rows of HF checkpoints so that this
equals HF's rotate_half on the original weights (LLAMA_ROPE_TYPE_NORM). Llama 3.1 frequency scaling arrives as
the `rope_freqs.weight` tensor (divides the frequencies). Optional q/k/v/o biases are used when present.
"""
from __future__ import annotations

from vlm.config import TextConfig
from vlm.models.base import TextModel

ATTN_BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias")


class LlamaModel(TextModel):
    ARCH = "llama"
    ROPE_MODE = "normal"
    LAYER_TENSORS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                     "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                     "ffn_down.weight")
    OPTIONAL_LAYER_TENSORS = ATTN_BIASES

    @classmethod
    def config_from_gguf(cls, f) -> TextConfig:
        cfg = TextConfig.from_gguf(f, rope_mode=cls.ROPE_MODE)
        # llama.cpp's llama graph has no sliding window (Mistral v0.1's 4096 window is ignored there too).
        return cfg.with_(sliding_window=None, swa_layers=())

    @classmethod
    def tensor_names(cls, cfg: TextConfig) -> tuple[list[str], list[str]]:
        req = ["token_embd.weight", "output_norm.weight"]
        opt = ["rope_freqs.weight"]
        if not cfg.tied_output:
            req.append("output.weight")
        for il in range(cfg.n_layer):
            req += [f"blk.{il}.{n}" for n in cls.LAYER_TENSORS]
            opt += [f"blk.{il}.{n}" for n in cls.OPTIONAL_LAYER_TENSORS]
        return req, opt

    def build(self, gb):
        cfg, w = self.config, self.weights
        n, H, Hkv, D = gb.n_tokens, cfg.n_head, cfg.n_head_kv, cfg.head_dim
        freq_factors = w.get("rope_freqs.weight")
        x = gb.build_inp_embd()
        h = gb.build_norm(x, self.layers[0]["attn_norm.weight"]) if cfg.n_layer else x
        for il, L in enumerate(self.layers):
            gb.tap("attn_norm", il, h)
            q = gb.linear(h, L["attn_q.weight"], L.get("attn_q.bias")).view(n, H, D)
            k = gb.linear(h, L["attn_k.weight"], L.get("attn_k.bias")).view(n, Hkv, D)
            v = gb.linear(h, L["attn_v.weight"], L.get("attn_v.bias")).view(n, Hkv, cfg.head_dim_v)
            q, k = gb.build_rope_qk(q, k, il, freq_factors=freq_factors)
            a = gb.build_attn(il, q, k, v, window=cfg.layer_window(il))
            a = gb.linear(a.reshape(n, H * cfg.head_dim_v), L["attn_output.weight"], L.get("attn_output.bias"))
            gb.tap("attn_out", il, a)
            h, x = gb.build_norm(a, L["ffn_norm.weight"], residual=x)      # x += attn; h = norm(x)
            f = gb.build_ffn(h, L["ffn_up.weight"], L["ffn_gate.weight"], L["ffn_down.weight"], act="silu")
            gb.tap("ffn_out", il, f)
            nxt = self.layers[il + 1]["attn_norm.weight"] if il + 1 < cfg.n_layer else w["output_norm.weight"]
            h, x = gb.build_norm(f, nxt, residual=x)                        # x += ffn; h = next norm(x)
            gb.tap("l_out", il, x)
        gb.tap("result_norm", -1, h)
        return gb.build_output(h, self.output_weight)
