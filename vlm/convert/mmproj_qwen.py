"""Qwen2-VL / Qwen2.5-VL checkpoint -> mmproj GGUF, as llama.cpp's Qwen2VLVisionModel (convert_hf_to_gguf.py)
writes it (classes Qwen2VLMmproj / Qwen25VLMmproj, registered in vlm.convert.registry).

Tensors (HF `visual.*`, transformers 5 saves them as `model.visual.*`):
  patch_embed.proj.weight [D, 3, 2, P, P]  -> v.patch_embd.weight = [:, :, 0], v.patch_embd.weight.1 = [:, :, 1]
  blocks.N.attn.qkv.{weight,bias}          -> v.blk.N.attn_{q,k,v}  (split in three along the output rows)
  blocks.N.attn.proj                        -> v.blk.N.attn_out
  blocks.N.norm1 / norm2                    -> v.blk.N.ln1 / ln2
  blocks.N.mlp.fc1 / fc2 (Qwen2-VL)         -> v.blk.N.ffn_up / ffn_down
  blocks.N.mlp.gate_proj / up_proj / down_proj (2.5) -> ffn_gate / ffn_up / ffn_down
  merger.ln_q                               -> v.post_ln
  merger.mlp.0 / mlp.2                      -> mm.0 / mm.2
Keys: clip.projector_type (qwen2vl_merger | qwen2.5vl_merger), clip.vision.{image_size (560 unless the config
says), patch_size, embedding_length (embed_dim / hidden_size), feed_forward_length (llama.cpp writes the vision
config's hidden_size for Qwen2-VL, intermediate_size for 2.5), block_count (depth), attention.head_count,
attention.layer_norm_epsilon (1e-6: HF hard-codes it in the vision tower), projection_dim (text width),
image_mean/std}; 2.5: clip.use_silu, clip.vision.n_wa_pattern = fullatt_block_indexes[0] + 1 (checked to be
periodic), clip.vision.window_size (HF window_size; llama.cpp itself uses a fixed 112). Types as mmproj.py:
patch embedding F16 in f16 files else F32, 1-D tensors F32.
"""
from __future__ import annotations

import re

import gguf
from gguf import GGMLQuantizationType as GGMLType

from vlm.convert.common import (ConvertError, MmprojConverter, SafetensorsSource, TensorPlan, check_needed,
                                matrix_type, shapes)
from vlm.convert.mmproj import CLIP_MEAN, CLIP_STD, mean_std     # Qwen2VLImageProcessor defaults (OpenAI CLIP)

_RULES = [(re.compile(p), n) for p, n in [
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)$", "v.blk.{}.attn_out.{}"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)$", "v.blk.{}.ln1.{}"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)$", "v.blk.{}.ln2.{}"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$", "v.blk.{}.ffn_up.{}"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$", "v.blk.{}.ffn_down.{}"),
    (r"blocks\.(\d+)\.mlp\.gate_proj\.(weight|bias)$", "v.blk.{}.ffn_gate.{}"),
    (r"blocks\.(\d+)\.mlp\.up_proj\.(weight|bias)$", "v.blk.{}.ffn_up.{}"),
    (r"blocks\.(\d+)\.mlp\.down_proj\.(weight|bias)$", "v.blk.{}.ffn_down.{}"),
    (r"merger\.ln_q\.(weight|bias)$", "v.post_ln.{}"),
    (r"merger\.mlp\.0\.(weight|bias)$", "mm.0.{}"),
    (r"merger\.mlp\.2\.(weight|bias)$", "mm.2.{}"),
]]
_VISUAL = re.compile(r"(?:^|\.)visual\.")


def _type(name: str, shape: tuple[int, ...], ftype) -> GGMLType:
    if len(shape) <= 1:
        return GGMLType.F32
    if name.startswith("v.patch_embd.weight"):      # .weight and .weight.1
        return GGMLType.F16 if ftype == gguf.LlamaFileType.MOSTLY_F16 else GGMLType.F32
    if not name.endswith(".weight"):
        return GGMLType.F32
    return matrix_type(ftype, shape)


def n_wa_pattern(fullatt: list[int]) -> int:
    """llama.cpp: n = fullatt_block_indexes[0] + 1, every later index n further on."""
    if not fullatt:
        raise ConvertError("Qwen2.5-VL vision config needs fullatt_block_indexes")
    n = int(fullatt[0]) + 1
    for a, b in zip(fullatt, fullatt[1:]):
        if b - a != n:
            raise ConvertError(f"fullatt_block_indexes {fullatt} are not periodic (llama.cpp's n_wa_pattern "
                               f"cannot express them)")
    return n


class Qwen2VLMmproj(MmprojConverter):
    PROJECTOR = "qwen2vl_merger"
    V25 = False

    def __init__(self, hf_dir, cfg, ftype):
        super().__init__(hf_dir, cfg, ftype)
        vis = self.vis = dict(cfg.get("vision_config") or {})
        if int(vis.get("temporal_patch_size", 2)) != 2:
            raise ConvertError(f"temporal_patch_size {vis.get('temporal_patch_size')} != 2 is not supported "
                               f"(llama.cpp splits the Conv3d into 2 slices)")
        if int(vis.get("spatial_merge_size", 2)) != 2:
            raise ConvertError(f"spatial_merge_size {vis.get('spatial_merge_size')} != 2 is not supported")
        if self.V25:
            self.n_embd, self.n_ff = int(vis.get("hidden_size", 1280)), int(vis.get("intermediate_size", 3420))
        else:   # Qwen2-VL: embed_dim is the ViT width, hidden_size the merger output; llama.cpp writes ffn = hidden
            self.n_embd, self.n_ff = int(vis.get("embed_dim", 1280)), int(vis.get("hidden_size", 3584))

    def plan(self) -> list[TensorPlan]:
        src = SafetensorsSource(self.hf_dir)
        plan: list = []
        for hf_name in src.names():
            m = _VISUAL.search(hf_name)
            if m is None:
                continue
            rest = hf_name[m.end():]
            shape = src.shape(hf_name)
            if rest == "patch_embed.proj.weight":
                if len(shape) != 5 or shape[2] != 2:
                    raise ConvertError(f"{hf_name}: expected a Conv3d weight [D, 3, 2, P, P], got {list(shape)}")
                for i, nm in enumerate(("v.patch_embd.weight", "v.patch_embd.weight.1")):
                    plan.append((nm, (shape[0], shape[1], shape[3], shape[4]),
                                 lambda h=hf_name, i=i: src.get(h).float()[:, :, i].contiguous()))
                continue
            mq = re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", rest)
            if mq:
                c = shape[0] // 3
                for i, part in enumerate(("attn_q", "attn_k", "attn_v")):
                    plan.append((f"v.blk.{mq.group(1)}.{part}.{mq.group(2)}", (c, *shape[1:]),
                                 lambda h=hf_name, i=i, c=c: src.get(h).float()[i * c:(i + 1) * c].contiguous()))
                continue
            for pat, fmt in _RULES:
                mm = pat.match(rest)
                if mm:
                    plan.append((fmt.format(*mm.groups()), tuple(shape), lambda h=hf_name: src.get(h).float()))
                    break
            else:
                raise ConvertError(f"cannot map vision tensor {hf_name!r} to a GGUF name")
        check_needed(self.hf_dir, {p[0] for p in plan}, ["v.patch_embd.weight", "v.patch_embd.weight.1",
                                                         "v.post_ln.weight", "mm.0.weight", "mm.2.weight"],
                     "vision tensors")
        return [(n, s, _type(n, s, self.ftype), ld) for n, s, ld in plan]

    def write_keys(self, w, tensors) -> None:
        vis = self.vis
        text = {**self.cfg, **(self.cfg.get("text_config") or {})}
        mean, std = mean_std(self.hf_dir, (CLIP_MEAN, CLIP_STD), warn=False)
        w.add_clip_has_vision_encoder(True)
        w.add_vision_projection_dim(int(text.get("hidden_size") or shapes(tensors)["mm.2.weight"][0]))
        w.add_vision_image_size(int(vis.get("image_size", 560)))
        w.add_vision_patch_size(int(vis.get("patch_size", 14)))
        w.add_vision_embedding_length(self.n_embd)
        w.add_vision_feed_forward_length(self.n_ff)
        w.add_vision_block_count(int(vis.get("depth", 32)))
        w.add_vision_head_count(int(vis.get("num_heads", 16)))
        w.add_vision_image_mean(mean)
        w.add_vision_image_std(std)
        w.add_clip_projector_type(self.PROJECTOR)
        self.version_keys(w)
        w.add_vision_attention_layernorm_eps(1e-6)

    def version_keys(self, w) -> None:
        if str(self.vis.get("hidden_act", "quick_gelu")) != "quick_gelu":
            raise ConvertError(f"Qwen2-VL vision hidden_act {self.vis.get('hidden_act')!r} is not supported "
                               f"(quick_gelu)")


class Qwen25VLMmproj(Qwen2VLMmproj):
    """Qwen2.5-VL: SwiGLU FFN (clip.use_silu), window attention (n_wa_pattern, window_size), tokens_per_second."""
    PROJECTOR = "qwen2.5vl_merger"
    V25 = True

    def version_keys(self, w) -> None:
        vis = self.vis
        w.add_vision_use_silu(True)
        w.add_vision_n_wa_pattern(n_wa_pattern(list(vis.get("fullatt_block_indexes") or [])))
        w.add_vision_window_size(int(vis.get("window_size", 112)))
        if vis.get("tokens_per_second") is not None:      # video time scale of the M-RoPE (not in llama.cpp's files)
            w.add_uint32("clip.vision.tokens_per_second", int(vis["tokens_per_second"]))
