"""Hugging Face vision-language checkpoint -> mmproj GGUF (vision tower + projector), as llama.cpp writes it.

    convert_mmproj(hf_dir, "mmproj.gguf", outtype="f32")        # CLI: vlm convert HF_DIR --mmproj -o mmproj.gguf

==================================  =================  ===========================================================
HF class (config.json)              clip.projector_type  llama.cpp source followed
==================================  =================  ===========================================================
LlavaForConditionalGeneration       mlp                tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py
  (CLIP vision tower, LLaVA-1.5)                       (the modern converter only handles Pixtral under this class)
Gemma3ForConditionalGeneration      gemma3             conversion/gemma.py Gemma3VisionModel
Idefics3ForConditionalGeneration,   idefics3           conversion/smolvlm.py SmolVLMModel
SmolVLMForConditionalGeneration
Qwen2AudioForConditionalGeneration, qwen2a, ultravox   audio: Whisper encoder + projector, see mmproj_audio.py
UltravoxModel
Qwen2VLForConditionalGeneration,    qwen2vl_merger,    conversion Qwen2VLVisionModel, see mmproj_qwen.py
Qwen2_5_VLForConditionalGeneration  qwen2.5vl_merger
==================================  =================  ===========================================================

File facts (what vlm.encoders reads, and llama.cpp's clip.cpp too):

* ``general.architecture = clip``, ``general.type = mmproj``, name / size label from the model card, then
  ``general.file_type``, ``clip.has_vision_encoder``, ``clip.vision.{projection_dim (text n_embd), image_size,
  patch_size, embedding_length, feed_forward_length, block_count, attention.head_count}``, ``image_mean/std``
  (preprocessor_config.json, then processor_config.json), then per projector: ``clip.projector_type``,
  ``clip.vision.attention.layer_norm_epsilon``, ``clip.use_gelu`` (neither gelu nor silu = quick-GELU) and
  - mlp: ``clip.vision.feature_layer`` = HF ``vision_feature_layer`` made non-negative (n_layer + i + 1: an index
    into HF's hidden_states, 0 = tower input); ``block_count`` = the deepest of them and only those layers are
    written; no ``v.post_ln`` (HF never applies it to LLaVA features); ``clip.has_llava_projector = true``.
    ``multi_modal_projector.linear_1/2`` -> ``mm.0`` / ``mm.2``.
  - gemma3: ``clip.vision.projector.scale_factor`` (the avg-pool size) only when it is not 4 (from config
    ``mm_tokens_per_image``, what HF pools with; llama.cpp reads the processor's ``image_seq_length``, the same
    number in released checkpoints);
    ``mm.soft_emb_norm.weight`` stored as 1 + w (Gemma3RMSNorm); ``mm.input_projection.weight`` kept in HF's
    [d_vision, d_text] layout.
  - idefics3: ``clip.vision.projector.scale_factor`` (pixel shuffle), ``clip.vision.preproc_image_size``
    (processor ``size.longest_edge``); ``connector.modality_projection.proj`` -> ``mm.model.fc``.
* Tower names: ``v.patch_embd.{weight,bias}`` (torch [D, 3, p, p] = ggml ne [p, p, 3, D]), ``v.class_embd``,
  ``v.position_embd.weight``, ``v.pre_ln``, ``v.post_ln``, ``v.blk.N.{attn_q, attn_k, attn_v, attn_out, ln1, ln2,
  ffn_up (fc1), ffn_down (fc2)}`` (gguf-py MODEL_TENSOR.V_*). The SigLIP ``head`` is dropped.
* Types: 1-D tensors, ``*_norm.weight``, ``v.position_embd`` and SigLIP ``embeddings`` tensors are F32; the patch
  embedding is F16 only in f16 files, else F32; Gemma 3's ``mm.input_projection`` is F16 (llama.cpp issue 13025)
  except in f32 files, where we keep it F32 (llama.cpp forces F16 even there; F32 keeps the f32 file an exact
  reference, and clip.cpp reads either type). Other matrices follow ``outtype`` (f32 / f16 / bf16 / q8_0, Q8_0
  falling back to F16 for rows that are not a multiple of 32).

Missing vision-config keys take the HF config class defaults (transformers omits some when saving); a missing
preprocessor config falls back to the HF image processor's default mean/std, with a warning.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import torch
from gguf import GGMLQuantizationType as GGMLType
from gguf import LlamaFileType
from gguf import MODEL_TENSOR as MT
from gguf import TENSOR_NAMES

from .hf_to_gguf import ConvertError, _Source, add_tensor_table, write_planned

log = logging.getLogger("vlm.convert")

MMPROJ_OUTTYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}
_FTYPE_QTYPE = {LlamaFileType.ALL_F32: GGMLType.F32, LlamaFileType.MOSTLY_F16: GGMLType.F16,
                LlamaFileType.MOSTLY_BF16: GGMLType.BF16, LlamaFileType.MOSTLY_Q8_0: GGMLType.Q8_0}
KEY_FEATURE_LAYERS = "clip.vision.feature_layer"        # not in gguf 0.19's Keys
KEY_HAS_LLAVA = gguf.Keys.Clip.HAS_LLAVA_PROJECTOR

# HF config-class defaults for keys a saved config may omit (CLIPVisionConfig, SiglipVisionConfig,
# Idefics3VisionConfig in transformers).
_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
_IDEFICS3_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                          image_size=224, patch_size=32, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# image processor defaults (OPENAI_CLIP_MEAN/STD for CLIPImageProcessor, IMAGENET_STANDARD_* = 0.5 for the others)
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_HALF = [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class _Spec:
    projector: str
    vision_defaults: dict
    mean_std: tuple[list[float], list[float]]


SPECS: dict[str, _Spec] = {
    "LlavaForConditionalGeneration": _Spec("mlp", _CLIP_DEFAULTS, (_CLIP_MEAN, _CLIP_STD)),
    "Gemma3ForConditionalGeneration": _Spec("gemma3", _SIGLIP_DEFAULTS, (_HALF, _HALF)),
    "Idefics3ForConditionalGeneration": _Spec("idefics3", _IDEFICS3_DEFAULTS, (_HALF, _HALF)),
    "SmolVLMForConditionalGeneration": _Spec("idefics3", _IDEFICS3_DEFAULTS, (_HALF, _HALF)),
}

# tower-relative HF name (after ".vision_tower." / ".vision_model.") -> (MODEL_TENSOR, suffix)
_TOWER_RULES: list[tuple[re.Pattern, MT | None]] = [(re.compile(p), t) for p, t in [
    (r"embeddings\.class_embedding$", MT.V_ENC_EMBD_CLS),
    (r"embeddings\.patch_embedding\.(weight|bias)$", MT.V_ENC_EMBD_PATCH),
    (r"embeddings\.position_embedding\.(weight)$", MT.V_ENC_EMBD_POS),
    (r"embeddings\.position_ids$", None),
    (r"pre_layrnorm\.(weight|bias)$", MT.V_PRE_NORM),
    (r"post_layernorm\.(weight|bias)$", MT.V_POST_NORM),
    (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", MT.V_ENC_ATTN_Q),
    (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)$", MT.V_ENC_ATTN_K),
    (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)$", MT.V_ENC_ATTN_V),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$", MT.V_ENC_ATTN_O),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)$", MT.V_ENC_INPUT_NORM),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)$", MT.V_ENC_POST_ATTN_NORM),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)$", MT.V_ENC_FFN_UP),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)$", MT.V_ENC_FFN_DOWN),
    (r"head\..*", None),     # SigLIP attention-pooling head: not part of any mmproj
]]
_TOWER_PREFIX = re.compile(r"(?:^|\.)(?:vision_tower|vision_model)\.(?:vision_model\.)?")
_PROJ_RULES: dict[str, dict[str, str]] = {
    "mlp": {"multi_modal_projector.linear_1.weight": "mm.0.weight", "multi_modal_projector.linear_1.bias": "mm.0.bias",
            "multi_modal_projector.linear_2.weight": "mm.2.weight", "multi_modal_projector.linear_2.bias": "mm.2.bias"},
    "gemma3": {"multi_modal_projector.mm_input_projection_weight": TENSOR_NAMES[MT.V_MM_INP_PROJ] + ".weight",
               "multi_modal_projector.mm_soft_emb_norm.weight": TENSOR_NAMES[MT.V_MM_SOFT_EMB_NORM] + ".weight"},
    "idefics3": {"connector.modality_projection.proj.weight": TENSOR_NAMES[MT.V_MMPROJ_FC] + ".weight"},
}


def _tower_name(rest: str) -> tuple[str | None, int | None, bool]:
    """-> (gguf name or None to skip, layer index, matched)."""
    for pat, t in _TOWER_RULES:
        m = pat.match(rest)
        if not m:
            continue
        if t is None:
            return None, None, True
        groups = m.groups()
        bid = int(groups[0]) if groups and groups[0].isdigit() else None
        suffix = "." + groups[-1] if groups and not groups[-1].isdigit() else ""
        base = TENSOR_NAMES[t].format(bid=bid) if bid is not None else TENSOR_NAMES[t]
        return base + suffix, bid, True
    return None, None, False


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _preprocessor_config(hf_dir: Path) -> dict:
    """preprocessor_config.json, then processor_config.json (its "image_processor" lifted), merged like llama.cpp."""
    out: dict = {}
    if (p := hf_dir / "preprocessor_config.json").is_file():
        cfg = _read_json(p)
        out.update({**cfg, **cfg.get("media_proc_cfg", {})})
    if (p := hf_dir / "processor_config.json").is_file():
        cfg = _read_json(p)
        out.update({**cfg, **cfg.get("image_processor", {})})
    return out


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    qtype: GGMLType
    load: Callable[[], torch.Tensor]


def _choose_type(gguf_name: str, hf_name: str, shape: tuple[int, ...], ftype: LlamaFileType,
                 projector: str) -> GGMLType:
    """llama.cpp's rules: MmprojModel / Gemma3VisionModel / SmolVLMModel tensor_force_quant + prepare_tensors."""
    forced: GGMLType | None = None
    if projector == "gemma3" and gguf_name.startswith("mm.input_projection"):
        forced = GGMLType.F32 if ftype == LlamaFileType.ALL_F32 else GGMLType.F16   # see module docstring
    elif projector in ("gemma3", "idefics3") and ".embeddings." in hf_name:
        forced = GGMLType.F32
    elif gguf_name.startswith("v.patch_embd.weight"):
        forced = GGMLType.F16 if ftype == LlamaFileType.MOSTLY_F16 else GGMLType.F32
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return GGMLType.F32
    if forced is None and (gguf_name.startswith(TENSOR_NAMES[MT.V_ENC_EMBD_POS]) or not gguf_name.endswith(".weight")):
        return GGMLType.F32
    if forced is not None:
        return forced
    qt = _FTYPE_QTYPE[ftype]
    if qt == GGMLType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[GGMLType.Q8_0][0]:
        return GGMLType.F16   # llama.cpp's converter falls back to F16 on QuantError
    return qt


def _feature_layers(cfg: dict, n_layer: int) -> list[int]:
    fl = cfg.get("vision_feature_layer", cfg.get("mm_vision_select_layer", -2))
    fl = [fl] if isinstance(fl, int) else list(fl)
    out = [i if i >= 0 else n_layer + i + 1 for i in fl]
    if any(not 0 < i <= n_layer for i in out):
        raise ConvertError(f"vision_feature_layer {fl} is outside the vision tower's {n_layer} layers")
    return out


def open_checkpoint(hf_dir, out_path, outtype: str):
    """Argument checks every mmproj converter starts with -> (hf_dir, out_path, outtype key, file type, config,
    first architecture name)."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    key = outtype.lower()
    if key not in MMPROJ_OUTTYPES:
        raise ConvertError(f"unknown mmproj outtype {outtype!r}; supported: {', '.join(MMPROJ_OUTTYPES)}")
    if not hf_dir.is_dir() or not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: not a Hugging Face checkpoint folder (no config.json)")
    cfg = _read_json(hf_dir / "config.json")
    return hf_dir, out_path, key, MMPROJ_OUTTYPES[key], cfg, (cfg.get("architectures") or [None])[0]


def convert_mmproj(hf_dir, out_path, outtype: str = "f32", *, progress: bool = False) -> Path:
    """Write the mmproj GGUF (vision tower + projector) of a Hugging Face VLM checkpoint; returns the path."""
    hf_dir, out_path, key, ftype, cfg, arch = open_checkpoint(hf_dir, out_path, outtype)
    from .mmproj_audio import AUDIO_SPECS, convert_audio_mmproj
    if arch in AUDIO_SPECS:     # Qwen2-Audio, Ultravox: Whisper encoder + audio projector (mmproj_audio.py)
        return convert_audio_mmproj(hf_dir, out_path, outtype, progress=progress)
    from .mmproj_qwen import PROJECTORS as QWEN_ARCHS, convert_qwen_mmproj
    if arch in QWEN_ARCHS:      # Qwen2-VL / Qwen2.5-VL: dynamic-resolution ViT + 2×2 merger (mmproj_qwen.py)
        pre = _preprocessor_config(hf_dir)
        mean = [float(x) for x in pre.get("image_mean", _CLIP_MEAN)]
        std = [float(x) for x in pre.get("image_std", _CLIP_STD)]
        return convert_qwen_mmproj(hf_dir, out_path, cfg, ftype, mean, std, progress=progress)
    if arch not in SPECS:
        raise ConvertError(f"--mmproj: unsupported architecture {arch!r}; supported: "
                           f"{', '.join(list(SPECS) + list(AUDIO_SPECS) + list(QWEN_ARCHS))}")
    spec = SPECS[arch]
    if "vision_config" not in cfg:
        raise ConvertError(f"{hf_dir}/config.json has no vision_config: not a vision-language checkpoint")
    vis = {**spec.vision_defaults, **cfg["vision_config"]}
    text = {**cfg, **cfg.get("text_config", {})}
    n_embd_text = text.get("hidden_size", text.get("n_embd", 0))   # 0: read from the projector tensor below
    if spec.projector == "mlp":
        if vis.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ConvertError(f"LLaVA with a {vis.get('model_type')!r} vision tower is not supported (CLIP only)")
        if cfg.get("vision_feature_select_strategy", "default") != "default":
            raise ConvertError("vision_feature_select_strategy must be 'default' (CLS dropped): llama.cpp's mlp "
                               f"projector cannot express {cfg['vision_feature_select_strategy']!r}")
    pre = _preprocessor_config(hf_dir)
    if "image_mean" in pre and "image_std" in pre:
        mean, std = [float(x) for x in pre["image_mean"]], [float(x) for x in pre["image_std"]]
    else:
        mean, std = spec.mean_std
        log.warning("%s: no image_mean/image_std in preprocessor_config.json / processor_config.json; using the HF "
                    "image processor defaults %s / %s", hf_dir, mean, std)

    n_layer = int(vis["num_hidden_layers"])
    feature_layers = _feature_layers(cfg, n_layer) if spec.projector == "mlp" else []
    block_count = max(feature_layers) if feature_layers else n_layer

    # ---- tensors ------------------------------------------------------------------------------------------
    src = _Source(hf_dir)
    proj_map = _PROJ_RULES[spec.projector]
    plan: list[_Planned] = []
    unmapped = []
    for hf_name in src.names():
        m = _TOWER_PREFIX.search(hf_name)
        if m is not None:
            new, bid, ok = _tower_name(hf_name[m.end():])
            if not ok:
                unmapped.append(hf_name)
                continue
            if new is None or (bid is not None and bid >= block_count):
                continue            # LLaVA: layers past the deepest feature layer are never run
            if spec.projector == "mlp" and new.startswith(TENSOR_NAMES[MT.V_POST_NORM]):
                continue            # HF takes LLaVA features from hidden_states: post_layernorm is not applied
        else:
            rel = next((k for k in proj_map if hf_name == k or hf_name.endswith("." + k)), None)
            if rel is None:
                continue            # text model (language_model / text_model / lm_head): the text converter's part
            new = proj_map[rel]
        shape = src.shape(hf_name)

        def load(hf_name=hf_name, new=new):
            t = src.get(hf_name).to(torch.float32)
            if new == TENSOR_NAMES[MT.V_MM_SOFT_EMB_NORM] + ".weight":
                t = t + 1.0         # Gemma3RMSNorm computes x·(1 + w); clip.cpp multiplies by the stored weight
            return t

        plan.append(_Planned(new, tuple(shape), _choose_type(new, hf_name, tuple(shape), ftype, spec.projector), load))
    if unmapped:
        raise ConvertError(f"cannot map vision tensors to GGUF names: {unmapped[:8]}")
    names = {p.name: p for p in plan}
    if not n_embd_text:   # e.g. llava-hf/llava-1.5-7b-hf: text_config omits hidden_size (LlamaConfig's default)
        out_t = {"mlp": "mm.2.weight", "gemma3": "mm.input_projection.weight", "idefics3": "mm.model.fc.weight"}
        if (p := names.get(out_t[spec.projector])) is None:
            raise ConvertError(f"{hf_dir}: cannot tell the text model's width (no hidden_size, no projector)")
        n_embd_text = p.shape[1] if spec.projector == "gemma3" else p.shape[0]
    needed = ["v.patch_embd.weight", "v.position_embd.weight"] + list(proj_map.values())
    if spec.projector == "mlp":
        needed = [n for n in needed if n != "mm.2.bias"]
    if missing := [n for n in needed if n not in names]:
        raise ConvertError(f"{hf_dir}: checkpoint lacks the tensors for {', '.join(missing)}")

    # ---- metadata (llama.cpp order: type, model card, set_gguf_parameters, quantization version) ----------
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    tensors = [(p.name, p.shape, p.qtype, p.load) for p in plan]
    add_tensor_table(w, hf_dir, tensors, gguf.GGUFType.MMPROJ)

    w.add_file_type(ftype)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(int(n_embd_text))
    w.add_vision_image_size(int(vis["image_size"]))
    w.add_vision_patch_size(int(vis["patch_size"]))
    w.add_vision_embedding_length(int(vis["hidden_size"]))
    w.add_vision_feed_forward_length(int(vis["intermediate_size"]))
    w.add_vision_block_count(block_count)
    w.add_vision_head_count(int(vis["num_attention_heads"]))
    w.add_vision_image_mean(mean)
    w.add_vision_image_std(std)
    w.add_clip_projector_type(spec.projector)
    w.add_vision_attention_layernorm_eps(float(vis["layer_norm_eps"]))
    act = str(vis.get("hidden_act", "quick_gelu"))
    if spec.projector == "mlp":
        w.add_bool(KEY_HAS_LLAVA, True)
        w.add_array(KEY_FEATURE_LAYERS, feature_layers)
        if act == "silu":
            w.add_vision_use_silu(True)
        else:
            w.add_vision_use_gelu(act.startswith("gelu"))   # quick_gelu: neither flag (llama.cpp's gelu_quick)
    elif spec.projector == "gemma3":
        w.add_vision_use_gelu(True)
        n_tok = cfg.get("mm_tokens_per_image", pre.get("image_seq_length", 256))
        n_side = int(round(n_tok ** 0.5))
        pool = (int(vis["image_size"]) // int(vis["patch_size"])) // max(n_side, 1)
        if n_side * n_side != n_tok or pool <= 0:
            raise ConvertError(f"mm_tokens_per_image = {n_tok} is not a square that divides the patch grid")
        if pool != 4:
            w.add_vision_projector_scale_factor(pool)
    else:  # idefics3
        w.add_vision_projector_scale_factor(int(cfg.get("scale_factor", 2)))
        w.add_vision_use_gelu(True)
        w.add_vision_preproc_image_size(int((pre.get("size") or {}).get("longest_edge", vis["image_size"])))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return write_planned(w, out_path, tensors, desc=f"mmproj {spec.projector} -> {key}", progress=progress)
