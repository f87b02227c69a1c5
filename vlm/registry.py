"""Which class implements a GGUF file: text decoders by `general.architecture`, multimodal encoders/projectors
by `clip.projector_type`. Entries are "module:Class" strings imported lazily, so `import vlm` stays cheap and a
new model is one file plus one line here.
"""
from __future__ import annotations

import importlib
from typing import Iterable

# GGUF general.architecture -> decoder class. One file per arch under vlm/models/.
TEXT_MODELS: dict[str, str] = {
    "llama": "vlm.models.llama:LlamaModel",      # Llama 2/3, Mistral, SmolLM, TinyLlama...
    "qwen2": "vlm.models.qwen2:Qwen2Model",
    "qwen2vl": "vlm.models.qwen2vl:Qwen2VLModel",  # Qwen2-VL / Qwen2.5-VL text (M-RoPE)
    "gemma3": "vlm.models.gemma3:Gemma3Model",
}

# GGUF clip.projector_type -> encoder/projector class. One file per encoder under vlm/encoders/ (multimodal work).
ENCODERS: dict[str, str] = {
    "mlp": "vlm.encoders.mlp:MlpEncoder",                 # LLaVA-1.5 (CLIP ViT + 2-layer MLP)
    "gemma3": "vlm.encoders.gemma3:Gemma3Encoder",        # Gemma 3 (SigLIP + avg-pool + soft-emb norm)
    "idefics3": "vlm.encoders.idefics3:Idefics3Encoder",  # Idefics3 / SmolVLM (SigLIP + pixel shuffle)
    "ldp": "vlm.encoders.ldp:LdpEncoder",                 # MobileVLM (CLIP ViT + MLP + 2 mobile blocks)
    "ldpv2": "vlm.encoders.ldp:LdpV2Encoder",             # MobileVLM V2 (CLIP ViT + MLP + avg-pool 2 + PEG)
    "qwen2vl_merger": "vlm.encoders.qwen2vl:Qwen2VLEncoder",      # Qwen2-VL (2-D RoPE ViT + 2×2 merger)
    "qwen2.5vl_merger": "vlm.encoders.qwen2vl:Qwen25VLEncoder",   # Qwen2.5-VL (+ RMSNorm, SwiGLU, windows)
    # audio (Whisper encoder, vlm.encoders.whisper; open with load_audio_encoder)
    "ultravox": "vlm.encoders.ultravox:UltravoxEncoder",  # Ultravox v0.5 (stack 8 + RMSNorm + SwiGLU MLP)
    "qwen2a": "vlm.encoders.qwen2a:Qwen2AudioEncoder",    # Qwen2-Audio (avg-pool 2 + linear)
}


class UnsupportedArchError(ValueError):
    """The file's architecture / projector type has no implementation here."""


class MissingTensorsError(ValueError):
    """The file lacks tensors the architecture needs."""


def _load(target: str):
    mod, cls = target.split(":")
    return getattr(importlib.import_module(mod), cls)


def supported_text_archs() -> list[str]:
    return sorted(TEXT_MODELS)


def text_model_class(arch: str | None, path: str = "<gguf>"):
    """The decoder class for GGUF `general.architecture` == arch."""
    if arch == "clip":
        raise UnsupportedArchError(
            f"{path} is a multimodal projector (general.architecture = clip), not a text model: pass it as "
            f"mmproj=... next to the text GGUF")
    if arch not in TEXT_MODELS:
        raise UnsupportedArchError(
            f"{path}: unsupported architecture {arch!r}; supported text architectures: "
            f"{', '.join(supported_text_archs())}")
    return _load(TEXT_MODELS[arch])


def encoder_class(projector_type: str | None, path: str = "<gguf>"):
    """The encoder/projector class for GGUF `clip.projector_type`."""
    if projector_type not in ENCODERS:
        have = ", ".join(sorted(ENCODERS)) or "none yet"
        raise UnsupportedArchError(f"{path}: unsupported projector type {projector_type!r}; supported: {have}")
    return _load(ENCODERS[projector_type])


def check_tensors(have: Iterable[str], required: Iterable[str], path: str, arch: str) -> None:
    """Raise MissingTensorsError naming every required tensor that `have` lacks."""
    have = set(have)
    missing = [n for n in required if n not in have]
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        raise MissingTensorsError(f"{path}: the {arch} model is missing tensors: {shown}")
