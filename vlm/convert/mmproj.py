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

One converter class per HF architecture (registered in :mod:`vlm.convert.registry`): the CLIP / SigLIP family
here (:class:`ClipFamilyMmproj` and its LLaVA, Gemma 3, Idefics3 subclasses), Qwen2-VL in mmproj_qwen.py, the audio
ones in mmproj_audio.py. Missing vision-config keys take the HF config class defaults (transformers omits some when saving); a missing
preprocessor config falls back to the HF image processor's default mean/std, with a warning.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import gguf
import torch
from gguf import GGMLQuantizationType as GGMLType
from gguf import LlamaFileType
from gguf import MODEL_TENSOR as MT
from gguf import TENSOR_NAMES

from vlm.convert import registry
from vlm.convert.common import (MMPROJ_OUTTYPES, ConvertError, MmprojConverter, SafetensorsSource, TensorPlan,
                                check_needed, matrix_type, preprocessor_config, read_json, shapes)

log = logging.getLogger("vlm.convert")

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
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_HALF = [0.5, 0.5, 0.5]

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


def mean_std(hf_dir: Path, default: tuple[list[float], list[float]], *, warn: bool = True):
    """The image processor's image_mean / image_std, else `default` (the HF processor's)."""
    pre = preprocessor_config(hf_dir)
    if "image_mean" in pre and "image_std" in pre:
        return [float(x) for x in pre["image_mean"]], [float(x) for x in pre["image_std"]]
    if warn:
        log.warning("%s: no image_mean/image_std in preprocessor_config.json / processor_config.json; using the HF "
                    "image processor defaults %s / %s", hf_dir, *default)
    return list(default[0]), list(default[1])


class ClipFamilyMmproj(MmprojConverter):
    """CLIP / SigLIP tower (``v.*``) + a projector whose HF tensors map one to one (``PROJ_RULES``)."""

    VISION_DEFAULTS: dict = _CLIP_DEFAULTS
    MEAN_STD = (CLIP_MEAN, CLIP_STD)
    PROJ_RULES: dict[str, str] = {}
    OUT_TENSOR = ""            # the projector tensor whose output width is the text model's n_embd
    OUT_DIM = 0                # ... along this dim (torch order)

    def __init__(self, hf_dir, cfg, ftype):
        super().__init__(hf_dir, cfg, ftype)
        if "vision_config" not in cfg:
            raise ConvertError(f"{hf_dir}/config.json has no vision_config: not a vision-language checkpoint")
        self.vis = {**self.VISION_DEFAULTS, **cfg["vision_config"]}
        self.n_layer = int(self.vis["num_hidden_layers"])
        self.check()

    # ---- hooks ----------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse configs this projector cannot express."""

    @property
    def block_count(self) -> int:
        return self.n_layer

    def keep(self, gguf_name: str) -> bool:
        return True

    def transform(self, gguf_name: str, t: torch.Tensor) -> torch.Tensor:
        return t

    def forced_type(self, gguf_name: str, hf_name: str) -> GGMLType | None:
        if gguf_name.startswith("v.patch_embd.weight"):
            return GGMLType.F16 if self.ftype == LlamaFileType.MOSTLY_F16 else GGMLType.F32
        return None

    def needed(self) -> list[str]:
        return ["v.patch_embd.weight", "v.position_embd.weight"] + list(self.PROJ_RULES.values())

    def projector_keys(self, w: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    # ---- common ---------------------------------------------------------------------------------------------
    def choose_type(self, gguf_name: str, hf_name: str, shape: tuple[int, ...]) -> GGMLType:
        """llama.cpp's rules: MmprojModel and the subclass's tensor_force_quant + prepare_tensors."""
        forced = self.forced_type(gguf_name, hf_name)
        if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
            return GGMLType.F32
        if forced is None and (gguf_name.startswith(TENSOR_NAMES[MT.V_ENC_EMBD_POS])
                               or not gguf_name.endswith(".weight")):
            return GGMLType.F32
        return forced if forced is not None else matrix_type(self.ftype, shape)

    def plan(self) -> list[TensorPlan]:
        src = SafetensorsSource(self.hf_dir)
        plan, unmapped = [], []
        for hf_name in src.names():
            m = _TOWER_PREFIX.search(hf_name)
            if m is not None:
                new, bid, ok = _tower_name(hf_name[m.end():])
                if not ok:
                    unmapped.append(hf_name)
                    continue
                if new is None or (bid is not None and bid >= self.block_count) or not self.keep(new):
                    continue
            else:
                rel = next((k for k in self.PROJ_RULES if hf_name == k or hf_name.endswith("." + k)), None)
                if rel is None:
                    continue            # text model (language_model / text_model / lm_head): the text converter's part
                new = self.PROJ_RULES[rel]
            shape = tuple(src.shape(hf_name))

            def load(hf_name=hf_name, new=new):
                return self.transform(new, src.get(hf_name).to(torch.float32))

            plan.append((new, shape, self.choose_type(new, hf_name, shape), load))
        if unmapped:
            raise ConvertError(f"cannot map vision tensors to GGUF names: {unmapped[:8]}")
        check_needed(self.hf_dir, shapes(plan), self.needed())
        return plan

    def n_embd_text(self, tensors: list[TensorPlan]) -> int:
        text = {**self.cfg, **self.cfg.get("text_config", {})}
        n = text.get("hidden_size", text.get("n_embd", 0))
        if not n:   # e.g. llava-hf/llava-1.5-7b-hf: text_config omits hidden_size (LlamaConfig's default)
            shape = shapes(tensors).get(self.OUT_TENSOR)
            if shape is None:
                raise ConvertError(f"{self.hf_dir}: cannot tell the text model's width (no hidden_size, no "
                                   f"projector)")
            n = shape[self.OUT_DIM]
        return int(n)

    def write_keys(self, w: gguf.GGUFWriter, tensors: list[TensorPlan]) -> None:
        vis = self.vis
        mean, std = mean_std(self.hf_dir, self.MEAN_STD)
        w.add_clip_has_vision_encoder(True)
        w.add_vision_projection_dim(self.n_embd_text(tensors))
        w.add_vision_image_size(int(vis["image_size"]))
        w.add_vision_patch_size(int(vis["patch_size"]))
        w.add_vision_embedding_length(int(vis["hidden_size"]))
        w.add_vision_feed_forward_length(int(vis["intermediate_size"]))
        w.add_vision_block_count(self.block_count)
        w.add_vision_head_count(int(vis["num_attention_heads"]))
        w.add_vision_image_mean(mean)
        w.add_vision_image_std(std)
        w.add_clip_projector_type(self.PROJECTOR)
        w.add_vision_attention_layernorm_eps(float(vis["layer_norm_eps"]))
        self.projector_keys(w)


class LlavaMmproj(ClipFamilyMmproj):
    """LLaVA-1.5 (CLIP tower): feature layers as ``clip.vision.feature_layer``, only the layers up to the deepest
    one written, no post_ln (HF never applies it to LLaVA features); ``multi_modal_projector.linear_1/2`` ->
    ``mm.0`` / ``mm.2``."""
    PROJECTOR = "mlp"
    PROJ_RULES = {"multi_modal_projector.linear_1.weight": "mm.0.weight",
                  "multi_modal_projector.linear_1.bias": "mm.0.bias",
                  "multi_modal_projector.linear_2.weight": "mm.2.weight",
                  "multi_modal_projector.linear_2.bias": "mm.2.bias"}
    OUT_TENSOR = "mm.2.weight"

    def check(self) -> None:
        if self.vis.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ConvertError(f"LLaVA with a {self.vis.get('model_type')!r} vision tower is not supported (CLIP only)")
        if self.cfg.get("vision_feature_select_strategy", "default") != "default":
            raise ConvertError("vision_feature_select_strategy must be 'default' (CLS dropped): llama.cpp's mlp "
                               f"projector cannot express {self.cfg['vision_feature_select_strategy']!r}")
        fl = self.cfg.get("vision_feature_layer", self.cfg.get("mm_vision_select_layer", -2))
        fl = [fl] if isinstance(fl, int) else list(fl)
        self.feature_layers = [i if i >= 0 else self.n_layer + i + 1 for i in fl]
        if any(not 0 < i <= self.n_layer for i in self.feature_layers):
            raise ConvertError(f"vision_feature_layer {fl} is outside the vision tower's {self.n_layer} layers")

    @property
    def block_count(self) -> int:
        return max(self.feature_layers)

    def keep(self, gguf_name: str) -> bool:
        return not gguf_name.startswith(TENSOR_NAMES[MT.V_POST_NORM])

    def needed(self) -> list[str]:
        return [n for n in super().needed() if n != "mm.2.bias"]

    def projector_keys(self, w) -> None:
        w.add_bool(KEY_HAS_LLAVA, True)
        w.add_array(KEY_FEATURE_LAYERS, self.feature_layers)
        act = str(self.vis.get("hidden_act", "quick_gelu"))
        if act == "silu":
            w.add_vision_use_silu(True)
        else:
            w.add_vision_use_gelu(act.startswith("gelu"))   # quick_gelu: neither flag (llama.cpp's gelu_quick)


class _SiglipFamily(ClipFamilyMmproj):
    MEAN_STD = (_HALF, _HALF)

    def forced_type(self, gguf_name: str, hf_name: str) -> GGMLType | None:
        if ".embeddings." in hf_name:
            return GGMLType.F32
        return super().forced_type(gguf_name, hf_name)


class Gemma3Mmproj(_SiglipFamily):
    """Gemma 3 (SigLIP): avg-pool size as ``clip.vision.projector.scale_factor`` when not 4 (from
    ``mm_tokens_per_image``), ``mm.soft_emb_norm`` stored as 1 + w, ``mm.input_projection`` in HF's
    [d_vision, d_text] layout and F16 (F32 in f32 files, see the module docstring)."""
    PROJECTOR = "gemma3"
    VISION_DEFAULTS = _SIGLIP_DEFAULTS
    PROJ_RULES = {"multi_modal_projector.mm_input_projection_weight": TENSOR_NAMES[MT.V_MM_INP_PROJ] + ".weight",
                  "multi_modal_projector.mm_soft_emb_norm.weight": TENSOR_NAMES[MT.V_MM_SOFT_EMB_NORM] + ".weight"}
    OUT_TENSOR, OUT_DIM = "mm.input_projection.weight", 1

    def forced_type(self, gguf_name: str, hf_name: str) -> GGMLType | None:
        if gguf_name.startswith("mm.input_projection"):
            return GGMLType.F32 if self.ftype == LlamaFileType.ALL_F32 else GGMLType.F16
        return super().forced_type(gguf_name, hf_name)

    def transform(self, gguf_name: str, t: torch.Tensor) -> torch.Tensor:
        if gguf_name == TENSOR_NAMES[MT.V_MM_SOFT_EMB_NORM] + ".weight":
            return t + 1.0          # Gemma3RMSNorm computes x·(1 + w); clip.cpp multiplies by the stored weight
        return t

    def projector_keys(self, w) -> None:
        w.add_vision_use_gelu(True)
        n_tok = self.cfg.get("mm_tokens_per_image", preprocessor_config(self.hf_dir).get("image_seq_length", 256))
        n_side = int(round(n_tok ** 0.5))
        pool = (int(self.vis["image_size"]) // int(self.vis["patch_size"])) // max(n_side, 1)
        if n_side * n_side != n_tok or pool <= 0:
            raise ConvertError(f"mm_tokens_per_image = {n_tok} is not a square that divides the patch grid")
        if pool != 4:
            w.add_vision_projector_scale_factor(pool)


class Idefics3Mmproj(_SiglipFamily):
    """Idefics3 / SmolVLM: pixel-shuffle ``clip.vision.projector.scale_factor``, ``clip.vision.preproc_image_size``
    (processor ``size.longest_edge``); ``connector.modality_projection.proj`` -> ``mm.model.fc``."""
    PROJECTOR = "idefics3"
    VISION_DEFAULTS = _IDEFICS3_DEFAULTS
    PROJ_RULES = {"connector.modality_projection.proj.weight": TENSOR_NAMES[MT.V_MMPROJ_FC] + ".weight"}
    OUT_TENSOR = "mm.model.fc.weight"

    def projector_keys(self, w) -> None:
        w.add_vision_projector_scale_factor(int(self.cfg.get("scale_factor", 2)))
        w.add_vision_use_gelu(True)
        size = preprocessor_config(self.hf_dir).get("size") or {}
        w.add_vision_preproc_image_size(int(size.get("longest_edge", self.vis["image_size"])))


def convert_mmproj(hf_dir, out_path, outtype: str = "f32", *, progress: bool = False) -> Path:
    """Write the mmproj GGUF (vision or audio tower + projector) of a Hugging Face checkpoint; returns the path."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    key = outtype.lower()
    if key not in MMPROJ_OUTTYPES:
        raise ConvertError(f"unknown mmproj outtype {outtype!r}; supported: {', '.join(MMPROJ_OUTTYPES)}")
    if not hf_dir.is_dir() or not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: not a Hugging Face checkpoint folder (no config.json)")
    cfg = read_json(hf_dir / "config.json")
    cls = registry.mmproj_converter((cfg.get("architectures") or [None])[0])
    return cls(hf_dir, cfg, MMPROJ_OUTTYPES[key]).run(out_path, key, progress=progress)
