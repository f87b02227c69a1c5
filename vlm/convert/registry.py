"""Which converter class handles a Hugging Face ``architectures[0]``: text models (-> the text GGUF) and mmproj
(-> the vision / audio projector GGUF). Entries are "module:Class" strings imported on use, so a new
architecture is one class plus one line here (as vlm.registry does for the engine)."""
from __future__ import annotations

import importlib

from vlm.convert.common import ConvertError

_T, _V, _Q, _A = "vlm.convert.hf_to_gguf", "vlm.convert.mmproj", "vlm.convert.mmproj_qwen", "vlm.convert.mmproj_audio"

TEXT: dict[str, str] = {
    "LlamaForCausalLM": f"{_T}:LlamaConverter",
    "MistralForCausalLM": f"{_T}:LlamaConverter",
    "Qwen2ForCausalLM": f"{_T}:Qwen2Converter",
    "Qwen2VLForConditionalGeneration": f"{_T}:Qwen2VLConverter",      # llama.cpp's qwen2vl arch for both
    "Qwen2_5_VLForConditionalGeneration": f"{_T}:Qwen2VLConverter",
    "Gemma3ForCausalLM": f"{_T}:Gemma3Converter",
    "Gemma3ForConditionalGeneration": f"{_T}:Gemma3Converter",
    # multimodal wrappers: the text half, by text_config.model_type
    "LlavaForConditionalGeneration": f"{_T}:LlavaTextConverter",
    "Idefics3ForConditionalGeneration": f"{_T}:Idefics3TextConverter",
    "Qwen2AudioForConditionalGeneration": f"{_T}:Qwen2AudioTextConverter",
    "UltravoxModel": f"{_T}:UltravoxTextConverter",
}

MMPROJ: dict[str, str] = {
    "LlavaForConditionalGeneration": f"{_V}:LlavaMmproj",
    "Gemma3ForConditionalGeneration": f"{_V}:Gemma3Mmproj",
    "Idefics3ForConditionalGeneration": f"{_V}:Idefics3Mmproj",
    "SmolVLMForConditionalGeneration": f"{_V}:Idefics3Mmproj",
    "Qwen2VLForConditionalGeneration": f"{_Q}:Qwen2VLMmproj",
    "Qwen2_5_VLForConditionalGeneration": f"{_Q}:Qwen25VLMmproj",
    "Qwen2AudioForConditionalGeneration": f"{_A}:Qwen2AudioMmproj",
    "UltravoxModel": f"{_A}:UltravoxMmproj",
}


def _load(target: str):
    mod, cls = target.split(":")
    return getattr(importlib.import_module(mod), cls)


def text_converter(arch: str | None):
    if arch not in TEXT:
        raise ConvertError(f"unsupported architecture {arch!r} in config.json; supported: {', '.join(TEXT)}")
    return _load(TEXT[arch])


def mmproj_converter(arch: str | None):
    if arch not in MMPROJ:
        raise ConvertError(f"--mmproj: unsupported architecture {arch!r}; supported: {', '.join(MMPROJ)}")
    return _load(MMPROJ[arch])
