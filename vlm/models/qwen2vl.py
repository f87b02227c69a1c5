"""Qwen2-VL / Qwen2.5-VL text decoder (GGUF arch `qwen2vl`; llama.cpp writes both under this name).

The Qwen2 block (q/k/v biases, NeoX pairing) with M-RoPE: every token has 4 position planes (t, y, x, z) and the
rotary pairs are split into sections `{arch}.rope.dimension_sections` (HF `mrope_section`, e.g. [16, 24, 24, 0]):
pair k rotates by the plane of the section holding k (vlm_kernels.rope with `sections`). Text rows get (p, p, p, 0)
(vlm.Batch does that for 1-D positions); image rows come with their planes from vlm.mrope.
"""
from __future__ import annotations

from vlm.config import ConfigError, TextConfig
from vlm.models.qwen2 import Qwen2Model


class Qwen2VLModel(Qwen2Model):
    ARCH = "qwen2vl"
    ROPE_MODE = "mrope"

    @classmethod
    def config_from_gguf(cls, f) -> TextConfig:
        cfg = TextConfig.from_gguf(f, rope_mode=cls.ROPE_MODE).with_(sliding_window=None, swa_layers=())
        key = f"{cfg.arch}.rope.dimension_sections"
        secs = cfg.rope_sections
        if not secs or not any(secs):
            raise ConfigError(f"{getattr(f, 'path', '<gguf>')}: missing metadata key {key!r} (M-RoPE sections, "
                              f"needed for a {cfg.arch} model)")
        n_pairs = cfg.rope_dims // 2
        if sum(secs) != n_pairs or len(secs) > 4:
            raise ConfigError(f"{getattr(f, 'path', '<gguf>')}: {key} = {list(secs)} must be at most 4 pair counts "
                              f"summing to rope dims / 2 = {n_pairs}")
        return cfg
