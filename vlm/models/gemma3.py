"""Gemma 3 decoder (GGUF arch `gemma3`): sandwich norms, q/k RMSNorm, GELU-tanh gated FFN, interleaved
sliding-window layers, token embeddings scaled by √n_embd.

Per layer (llama.cpp src/models/gemma3.cpp, HF Gemma3DecoderLayer):
    h = attn_norm(x); q = q_norm(Wq h); k = k_norm(Wk h); v = Wv h; rope (NeoX) on q, k
    x += post_attention_norm(Wo · attn(q, k, v))               sliding layers: window W, theta 10 000
    x += post_ffw_norm(Wd · (gelu_tanh(Wg · ffn_norm(x)) * Wu · ffn_norm(x)))
Norm weights: HF computes x̂·(1 + w); llama.cpp's converter stores 1 + w in the GGUF, so offset 0 here.
Layer pattern: `gemma3.attention.sliding_window_pattern` when present, else llama.cpp's default of every 6th
layer global (il % 6 == 5). Attention scale: `gemma3.attention.scale` when present, else head_dim^-½ —
except Gemma 3 27B (62 layers), which llama.cpp scales by (n_embd / n_head)^-½ (HF query_pre_attn_scalar 168).
"""
from __future__ import annotations

from vlm.config import TextConfig
from vlm.models.base import TextModel

SWA_PATTERN = 6
ROPE_THETA_SWA = 10000.0


class Gemma3Model(TextModel):
    ARCH = "gemma3"
    ROPE_MODE = "neox"
    LAYER_TENSORS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                     "attn_q_norm.weight", "attn_k_norm.weight", "attn_output.weight",
                     "post_attention_norm.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                     "ffn_down.weight", "post_ffw_norm.weight")

    @classmethod
    def config_from_gguf(cls, f) -> TextConfig:
        cfg = TextConfig.from_gguf(f, rope_mode=cls.ROPE_MODE, embd_scale="sqrt_n_embd", swa_pattern=SWA_PATTERN,
                                   rope_theta_swa=ROPE_THETA_SWA)
        if cfg.attn_scale is None and cfg.n_layer == 62:   # Gemma 3 27B, as llama.cpp's LLM_TYPE_27B
            cfg = cfg.with_(attn_scale=(cfg.n_embd / cfg.n_head) ** -0.5)
        return cfg

    @classmethod
    def tensor_names(cls, cfg: TextConfig) -> tuple[list[str], list[str]]:
        req = ["token_embd.weight", "output_norm.weight"]
        if not cfg.tied_output:
            req.append("output.weight")
        for il in range(cfg.n_layer):
            req += [f"blk.{il}.{n}" for n in cls.LAYER_TENSORS]
        return req, []

    def build(self, gb):
        cfg, w = self.config, self.weights
        n, H, Hkv, D = gb.n_tokens, cfg.n_head, cfg.n_head_kv, cfg.head_dim
        off = self.NORM_OFFSET
        x = gb.build_inp_embd()
        for il, L in enumerate(self.layers):
            h = gb.build_norm(x, L["attn_norm.weight"], offset=off)
            gb.tap("attn_norm", il, h)
            q = gb.linear(h, L["attn_q.weight"]).view(n, H, D)
            k = gb.linear(h, L["attn_k.weight"]).view(n, Hkv, D)
            v = gb.linear(h, L["attn_v.weight"]).view(n, Hkv, cfg.head_dim_v)
            q = gb.build_norm(q, L["attn_q_norm.weight"], offset=off)
            k = gb.build_norm(k, L["attn_k_norm.weight"], offset=off)
            q, k = gb.build_rope_qk(q, k, il)
            a = gb.build_attn(il, q, k, v, window=cfg.layer_window(il), softcap=cfg.attn_logit_softcap)
            a = gb.linear(a.reshape(n, H * cfg.head_dim_v), L["attn_output.weight"])
            a = gb.build_norm(a, L["post_attention_norm.weight"], offset=off)
            gb.tap("attn_out", il, a)
            h, x = gb.build_norm(a, L["ffn_norm.weight"], offset=off, residual=x)   # x += attn; h = norm(x)
            f = gb.build_ffn(h, L["ffn_up.weight"], L["ffn_gate.weight"], L["ffn_down.weight"], act="gelu")
            f = gb.build_norm(f, L["post_ffw_norm.weight"], offset=off)
            gb.tap("ffn_out", il, f)
            x = x + f
            gb.tap("l_out", il, x)
        h = gb.build_norm(x, w["output_norm.weight"], offset=off)
        gb.tap("result_norm", -1, h)
        return gb.build_output(h, self.output_weight)
