"""`ultravox` projector (Ultravox v0.5): Whisper encoder -> stack frames -> RMSNorm -> mm.a.mlp.1 -> SwiGLU ->
RMSNorm -> mm.a.mlp.2.

Ultravox's published model (fixie-ai ``ultravox_model.py``: StackAudioFrames, RMSNorm, SwiGLU, UltravoxProjector)
and llama.cpp's graph (tools/mtmd/models/whisper-enc.cpp, ``build_stack`` + the ULTRAVOX branch):

    stack  [n_pos, D] -> zero-pad n_pos up to a multiple of s, reshape to [ceil(n_pos / s), s·D]
                         (s = clip.audio.projector.stack_factor, 8 in released models)
    norm   x / sqrt(mean(x²) + 1e-6) · mm.a.norm_pre            (LlamaRMSNorm, eps 1e-6)
    up     mm.a.mlp.1 (no bias)                                  [s·D -> hidden]
    swiglu a, g = split(up, 2); silu(g) · a                      the *second* half is gated (ggml_swiglu_swapped)
    norm   RMSNorm · mm.a.norm_mid                               (v0.5 "projector_ln_mid"; v0.4 normed after mlp.2)
    down   mm.a.mlp.2 (no bias)                                  [hidden / 2 -> n_embd_text]

Tokens per chunk: ceil(n_pos / s) with n_pos = (n_frames - 1) // 2 + 1, i.e. 188 for a 30 s chunk: the last
stacked row holds 4 real frames + 4 zero rows, as in both the HF model and llama.cpp's graph. (llama.cpp's
clip_n_output_tokens counts floor(3000 / s) / 2 = 187 for the same chunk; we count the rows the graph produces.)
No markers around the audio.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vlm_kernels
from vlm.encoders.common import MmprojError
from vlm.encoders.whisper import AudioEncoder
from vlm.graph import linear

RMS_EPS = 1e-6     # Ultravox RMSNorm default; llama.cpp hard-codes the same


class UltravoxEncoder(AudioEncoder):
    PROJECTOR_TYPE = "ultravox"

    def __init__(self, config, weights, **kw):
        super().__init__(config, weights, **kw)
        s, D = int(config.stack_factor), config.n_embd
        if s <= 0:
            raise MmprojError(f"{self.path}: ultravox needs clip.audio.projector.stack_factor > 0, got {s}")
        self.stack = s
        w1, w2 = weights["mm.a.mlp.1.weight"], weights["mm.a.mlp.2.weight"]
        pre, mid = weights["mm.a.norm_pre.weight"], weights["mm.a.norm_mid.weight"]
        hidden = int(w1.shape[0])
        if w1.shape[1] != s * D or pre.numel() != s * D:
            raise MmprojError(f"{self.path}: mm.a.mlp.1.weight {tuple(w1.shape)} / mm.a.norm_pre.weight "
                              f"{tuple(pre.shape)} do not take {s} stacked frames of width {D} ({s * D})")
        if hidden % 2 or mid.numel() != hidden // 2 or w2.shape[1] != hidden // 2:
            raise MmprojError(f"{self.path}: SwiGLU halves mm.a.mlp.1's {hidden} outputs, but mm.a.norm_mid.weight "
                              f"{tuple(mid.shape)} / mm.a.mlp.2.weight {tuple(w2.shape)} do not take {hidden // 2}")

    @classmethod
    def projector_tensor_names(cls, cfg):
        return (["mm.a.norm_pre.weight", "mm.a.mlp.1.weight", "mm.a.norm_mid.weight", "mm.a.mlp.2.weight"],
                ["mm.a.mlp.1.bias", "mm.a.mlp.2.bias"])

    @property
    def n_embd_out(self) -> int:
        return int(self.weights["mm.a.mlp.2.weight"].shape[0])

    def n_tokens_pos(self, n_pos: int) -> int:
        return -(-n_pos // self.stack)

    def project(self, x: torch.Tensor, lens: list[int]) -> tuple[torch.Tensor, list[int]]:
        w, s, D = self.weights, self.stack, x.shape[-1]
        if all(n % s == 0 for n in lens):       # stacks never straddle two chunks: one reshape for all
            st = x.reshape(-1, s * D)
        else:                                   # zero-pad each chunk's tail to a multiple of s (StackAudioFrames)
            parts, row = [], 0
            for n in lens:
                parts.append(F.pad(x[row:row + n], (0, 0, 0, (-n) % s)).reshape(-1, s * D))
                row += n
            st = torch.cat(parts)
        h = vlm_kernels.rms_norm(st.contiguous(), w["mm.a.norm_pre.weight"], RMS_EPS)
        a, g = linear(h, w["mm.a.mlp.1.weight"], w.get("mm.a.mlp.1.bias")).chunk(2, dim=-1)
        h = vlm_kernels.rms_norm((F.silu(g) * a).contiguous(), w["mm.a.norm_mid.weight"], RMS_EPS)
        return linear(h, w["mm.a.mlp.2.weight"], w.get("mm.a.mlp.2.bias")), [-(-n // s) for n in lens]
