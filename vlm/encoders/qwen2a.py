"""`qwen2a` projector (Qwen2-Audio): Whisper encoder -> AvgPool1d(2, stride 2) -> post-LN -> mm.a.fc (linear + bias).

(HF Qwen2AudioEncoder + Qwen2AudioMultiModalProjector; llama.cpp tools/mtmd/models/whisper-enc.cpp, the avg-pool
sits in clip_graph::build_vit before the final norm.) The pooling is done by the shared tower
(vlm.encoders.whisper, ``AVG_POOL = 2``), per chunk. Tokens per chunk: ((n_frames - 1) // 2 + 1) // 2, i.e. 750
for a 30 s chunk of 3000 frames. Markers around a chunk (mtmd's business): ``<|audio_bos|>`` ... ``<|audio_eos|>``.
"""
from __future__ import annotations

import torch

from vlm.encoders.common import MmprojError
from vlm.encoders.whisper import AudioEncoder
from vlm.graph import linear


class Qwen2AudioEncoder(AudioEncoder):
    PROJECTOR_TYPE = "qwen2a"
    AVG_POOL = 2
    MEDIA_BEGIN, MEDIA_END = "<|audio_bos|>", "<|audio_eos|>"      # HF Qwen2AudioProcessor

    def __init__(self, config, weights, **kw):
        super().__init__(config, weights, **kw)
        w = weights["mm.a.fc.weight"]
        if w.dim() != 2 or w.shape[1] != config.n_embd:
            raise MmprojError(f"{self.path}: mm.a.fc.weight has shape {tuple(w.shape)}, expected "
                              f"[n_embd_text, {config.n_embd}]")

    @classmethod
    def projector_tensor_names(cls, cfg):
        return ["mm.a.fc.weight"], ["mm.a.fc.bias"]

    @property
    def n_embd_out(self) -> int:
        return int(self.weights["mm.a.fc.weight"].shape[0])

    def project(self, x: torch.Tensor, lens: list[int]) -> tuple[torch.Tensor, list[int]]:
        return linear(x, self.weights["mm.a.fc.weight"], self.weights.get("mm.a.fc.bias")), lens
