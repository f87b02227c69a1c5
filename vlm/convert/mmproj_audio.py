"""Hugging Face audio-LLM checkpoint -> audio mmproj GGUF (Whisper encoder ``a.*`` + projector ``mm.a.*``), as
llama.cpp's converter writes it (conversion/ ``WhisperEncoderModel`` / ``UltravoxWhisperEncoderModel`` on
``MmprojModel``): classes Qwen2AudioMmproj / UltravoxMmproj, reached through ``convert_mmproj`` (CLI: ``vlm convert
HF_DIR --mmproj``).

==================================  ===================  =====================================================
HF class (config.json)              clip.projector_type  encoder config / projector
==================================  ===================  =====================================================
Qwen2AudioForConditionalGeneration  qwen2a               ``audio_config`` (Qwen2AudioEncoderConfig);
                                                         ``multi_modal_projector.linear`` -> ``mm.a.fc``
UltravoxModel (fixie-ai, remote     ultravox             ``audio_config`` (a WhisperConfig); projector
code; v0.5 layout)                                       ``linear_1/2`` -> ``mm.a.mlp.1/2``, ``ln_pre`` ->
                                                         ``mm.a.norm_pre``, ``ln_mid`` -> ``mm.a.norm_mid``
==================================  ===================  =====================================================

Metadata, in llama.cpp's order: ``general.type = mmproj`` + model card, ``general.file_type``,
``clip.has_audio_encoder = true`` (no ``clip.has_vision_encoder`` key), ``clip.audio.{projection_dim (text
n_embd), embedding_length (d_model), feed_forward_length (encoder_ffn_dim), block_count (encoder_layers),
attention.head_count}``, ``clip.projector_type``, ``clip.audio.num_mel_bins``,
``clip.audio.attention.layer_norm_epsilon`` (config ``layer_norm_eps``, else 1e-5 = nn.LayerNorm's default) and,
for ultravox, ``clip.audio.projector.stack_factor`` (config ``stack_factor``).

Tensors (gguf-py MODEL_TENSOR.A_*): ``audio_tower.conv1/conv2`` -> ``a.conv1d.1/2`` (the biases reshaped to
[C, 1], as llama.cpp does for ggml broadcasting), ``embed_positions`` -> ``a.position_embd``, ``layers.N.
{self_attn.q/k/v/out_proj, self_attn_layer_norm, final_layer_norm, fc1, fc2}`` -> ``a.blk.N.{attn_q, attn_k,
attn_v, attn_out, ln1, ln2, ffn_up, ffn_down}``, ``layer_norm`` -> ``a.post_ln``. Checkpoint names may carry a
``model.`` prefix (transformers 5) or none (released checkpoints); text-model tensors are skipped. A Qwen2-Audio
checkpoint without ``embed_positions`` gets Whisper's sinusoidal table (max_source_positions rows).

Types: conv weights F16 (llama.cpp forces F16 in every file; in f32 files we keep F32 so the file stays an exact
reference — clip.cpp reads either), 1-D tensors, norms and biases F32, other matrices follow ``outtype`` (Q8_0 falls
back to F16 for rows that are not a multiple of 32).

Refused with a ConvertError: Ultravox without an inline ``audio_config`` (released configs carry it; only
``audio_model_id`` would need a download), a projector activation other than SwiGLU, the v0.4 layout
(``projector_ln_mid = false``: a norm after linear_2, which llama.cpp's graph cannot express) and block-causal
encoders (``audio_latency_block_size``).
"""
from __future__ import annotations

import math
import re

import torch
from gguf import GGMLQuantizationType as GGMLType
from gguf import LlamaFileType
from gguf import MODEL_TENSOR as MT
from gguf import TENSOR_NAMES

from vlm.convert.common import (ConvertError, MmprojConverter, SafetensorsSource, TensorPlan, check_needed,
                                matrix_type, shapes)

# transformers config-class defaults for keys a saved (diff-only) config may omit
_QWEN2A_DEFAULTS = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                        num_mel_bins=128, max_source_positions=1500, activation_function="gelu")
_WHISPER_DEFAULTS = dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                         num_mel_bins=80, max_source_positions=1500, activation_function="gelu")

_TOWER_PREFIX = re.compile(r"(?:^|\.)audio_tower\.")
_PROJ_PREFIX = re.compile(r"(?:^|\.)multi_modal_projector\.")
_POS = TENSOR_NAMES[MT.A_ENC_EMBD_POS] + ".weight"


def _t(t: MT, bid: int | None = None) -> str:
    return TENSOR_NAMES[t].format(bid=bid) if bid is not None else TENSOR_NAMES[t]


# tower-relative HF name -> (MODEL_TENSOR, block-id group or None); the last group is the weight/bias suffix
_TOWER_RULES: list[tuple[re.Pattern, MT | None]] = [(re.compile(p), t) for p, t in [
    (r"conv([12])\.(weight|bias)$", MT.A_ENC_CONV1D),
    (r"embed_positions\.(weight)$", MT.A_ENC_EMBD_POS),
    (r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", MT.A_ENC_ATTN_Q),
    (r"layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)$", MT.A_ENC_ATTN_K),
    (r"layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)$", MT.A_ENC_ATTN_V),
    (r"layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$", MT.A_ENC_OUTPUT),
    (r"layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", MT.A_ENC_INPUT_NORM),
    (r"layers\.(\d+)\.final_layer_norm\.(weight|bias)$", MT.A_ENC_OUTPUT_NORM),
    (r"layers\.(\d+)\.fc1\.(weight|bias)$", MT.A_ENC_FFN_UP),
    (r"layers\.(\d+)\.fc2\.(weight|bias)$", MT.A_ENC_FFN_DOWN),
    (r"layer_norm\.(weight|bias)$", MT.A_POST_NORM),
]]
def whisper_tensor_name(rest: str) -> str | None:
    """GGUF name of a Whisper-encoder tensor given its name relative to the encoder (``conv1.weight``,
    ``layers.0.fc1.bias``, ...); None if it is not one. Shared with vlm.convert.ctranslate2 and the tests."""
    for pat, t in _TOWER_RULES:
        m = pat.match(rest)
        if m:
            g = m.groups()
            bid = int(g[0]) if len(g) > 1 else None
            return _t(t, bid) + "." + g[-1]
    return None


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal position table [length, channels]: [sin | cos] halves, log-spaced timescales."""
    if channels % 2:
        raise ConvertError(f"sinusoidal positions need an even width, got d_model = {channels}")
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def _choose_type(name: str, shape: tuple[int, ...], ftype: LlamaFileType) -> GGMLType:
    if len(shape) <= 1 or not name.endswith(".weight"):      # norms, biases (conv biases are [C, 1])
        return GGMLType.F32
    if name.startswith("a.conv1d."):
        return GGMLType.F32 if ftype == LlamaFileType.ALL_F32 else GGMLType.F16   # see module docstring
    return matrix_type(ftype, shape)


class WhisperAudioMmproj(MmprojConverter):
    """Whisper encoder (``audio_tower.*`` -> ``a.*``) + a projector (``multi_modal_projector.*`` -> ``mm.a.*``,
    ``PROJ_RULES``). Subclasses give the encoder config, the projector rules and their own keys."""

    PROJ_RULES: dict[str, str] = {}
    OUT_TENSOR = ""           # projector output: its rows are the text model's n_embd

    def __init__(self, hf_dir, cfg, ftype):
        super().__init__(hf_dir, cfg, ftype)
        aud = self.aud = self.audio_config()
        if str(aud.get("activation_function", "gelu")) != "gelu":
            raise ConvertError(f"audio encoder activation {aud['activation_function']!r} is not supported (gelu "
                               f"only)")
        if aud.get("scale_embedding"):
            raise ConvertError("audio_config.scale_embedding = true is not supported (llama.cpp's graph does not "
                               "scale)")
        self.n_layer, self.d_model = int(aud["encoder_layers"]), int(aud["d_model"])

    def audio_config(self) -> dict:
        raise NotImplementedError

    def missing_positions(self) -> TensorPlan | None:
        """A position table to write when the checkpoint has none (None: it is required)."""
        return None

    def plan(self) -> list[TensorPlan]:
        src = SafetensorsSource(self.hf_dir)
        plan, unmapped = [], []
        for hf_name in src.names():
            if (m := _TOWER_PREFIX.search(hf_name)) is not None:
                new = whisper_tensor_name(hf_name[m.end():])
            elif (m := _PROJ_PREFIX.search(hf_name)) is not None:
                new = self.PROJ_RULES.get(hf_name[m.end():])
            else:
                continue                # language model / lm_head: the text converter's part
            if new is None:
                unmapped.append(hf_name)
                continue
            shape = tuple(src.shape(hf_name))
            if new.startswith("a.conv1d.") and new.endswith(".bias"):
                shape = shape + (1,)    # [C] -> [C, 1]

            def load(hf_name=hf_name, shape=shape):
                return src.get(hf_name).to(torch.float32).reshape(shape)

            plan.append((new, shape, _choose_type(new, shape, self.ftype), load))
        if unmapped:
            raise ConvertError(f"cannot map audio tensors to GGUF names: {unmapped[:8]}")
        if _POS not in shapes(plan) and (pos := self.missing_positions()) is not None:
            plan.append(pos)
        needed = ["a.conv1d.1.weight", "a.conv1d.2.weight", _POS] + [
            f"a.blk.{il}.{t}.weight" for il in range(self.n_layer)
            for t in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")]
        check_needed(self.hf_dir, shapes(plan), needed + [v for v in self.PROJ_RULES.values() if v.endswith(".weight")])
        if shapes(plan)[_POS][1] != self.d_model:
            raise ConvertError(f"embed_positions has shape {shapes(plan)[_POS]}, expected [n_pos, {self.d_model}]")
        return plan

    def write_keys(self, w, tensors) -> None:
        aud, cfg = self.aud, self.cfg
        text = {**cfg, **cfg.get("text_config", {})}
        n_embd_text = text.get("hidden_size")
        out_rows = shapes(tensors)[self.OUT_TENSOR][0]
        if n_embd_text is None or int(n_embd_text) != out_rows:
            n_embd_text = out_rows    # the projector decides (text_config may hold class defaults only)
        w.add_clip_has_audio_encoder(True)
        w.add_audio_projection_dim(int(n_embd_text))
        w.add_audio_embedding_length(self.d_model)
        w.add_audio_feed_forward_length(int(aud["encoder_ffn_dim"]))
        w.add_audio_block_count(self.n_layer)
        w.add_audio_head_count(int(aud["encoder_attention_heads"]))
        w.add_clip_projector_type(self.PROJECTOR)
        w.add_audio_num_mel_bins(int(aud["num_mel_bins"]))
        w.add_audio_attention_layernorm_eps(float(aud.get("layer_norm_eps", 1e-5)))
        self.projector_keys(w)

    def projector_keys(self, w) -> None:
        pass


class Qwen2AudioMmproj(WhisperAudioMmproj):
    PROJECTOR = "qwen2a"
    PROJ_RULES = {"linear.weight": _t(MT.A_MMPROJ_FC) + ".weight", "linear.bias": _t(MT.A_MMPROJ_FC) + ".bias"}
    OUT_TENSOR = _t(MT.A_MMPROJ_FC) + ".weight"

    def audio_config(self) -> dict:
        return {**_QWEN2A_DEFAULTS, **self.cfg.get("audio_config", {})}

    def missing_positions(self) -> TensorPlan:
        n_pos, d = int(self.aud["max_source_positions"]), self.d_model
        return (_POS, (n_pos, d), _choose_type(_POS, (n_pos, d), self.ftype), lambda: whisper_sinusoids(n_pos, d))


class UltravoxMmproj(WhisperAudioMmproj):
    PROJECTOR = "ultravox"
    PROJ_RULES = {"linear_1.weight": _t(MT.A_MMPROJ, 1) + ".weight", "linear_1.bias": _t(MT.A_MMPROJ, 1) + ".bias",
                  "linear_2.weight": _t(MT.A_MMPROJ, 2) + ".weight", "linear_2.bias": _t(MT.A_MMPROJ, 2) + ".bias",
                  "ln_pre.weight": _t(MT.A_MM_NORM_PRE) + ".weight", "ln_mid.weight": _t(MT.A_MM_NORM_MID) + ".weight"}
    OUT_TENSOR = _t(MT.A_MMPROJ, 2) + ".weight"

    def audio_config(self) -> dict:
        cfg = self.cfg
        if "audio_config" not in cfg:
            raise ConvertError(f"{self.hf_dir}/config.json has no audio_config (audio_model_id = "
                               f"{cfg.get('audio_model_id')!r}); add the Whisper encoder's config as audio_config "
                               f"(nothing is downloaded)")
        if str(cfg.get("projector_act", "swiglu")).lower() != "swiglu":
            raise ConvertError(f"Ultravox projector_act {cfg['projector_act']!r} is not supported (swiglu only, as "
                               f"llama.cpp)")
        if not cfg.get("projector_ln_mid", True):
            raise ConvertError("Ultravox v0.4 layout (projector_ln_mid = false: RMSNorm after linear_2) is not "
                               "supported: llama.cpp's ultravox graph normalises between the two linears (v0.5)")
        if cfg.get("audio_latency_block_size"):
            raise ConvertError(f"Ultravox audio_latency_block_size = {cfg['audio_latency_block_size']} "
                               f"(block-causal encoder attention) is not supported")
        return {**_WHISPER_DEFAULTS, **cfg["audio_config"]}

    def projector_keys(self, w) -> None:
        w.add_audio_stack_factor(int(self.cfg.get("stack_factor", 8)))
