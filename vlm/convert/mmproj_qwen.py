"""Qwen2-VL / Qwen2.5-VL checkpoint -> mmproj GGUF, as llama.cpp's Qwen2VLVisionModel (convert_hf_to_gguf.py)
writes it. Called from vlm.convert.mmproj.convert_mmproj for these architectures.

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
from pathlib import Path
from typing import Callable

import gguf
from gguf import GGMLQuantizationType as GGMLType

from .hf_to_gguf import ConvertError, _Source, add_tensor_table, write_planned

PROJECTORS = {"Qwen2VLForConditionalGeneration": "qwen2vl_merger",
              "Qwen2_5_VLForConditionalGeneration": "qwen2.5vl_merger"}
_QWEN_MEAN = [0.48145466, 0.4578275, 0.40821073]      # Qwen2VLImageProcessor defaults (OpenAI CLIP)
_QWEN_STD = [0.26862954, 0.26130258, 0.27577711]

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
    from .mmproj import _FTYPE_QTYPE
    if len(shape) <= 1:
        return GGMLType.F32
    if name.startswith("v.patch_embd.weight"):      # .weight and .weight.1
        return GGMLType.F16 if ftype == gguf.LlamaFileType.MOSTLY_F16 else GGMLType.F32
    if not name.endswith(".weight"):
        return GGMLType.F32
    qt = _FTYPE_QTYPE[ftype]
    if qt == GGMLType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[GGMLType.Q8_0][0]:
        return GGMLType.F16
    return qt


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


def convert_qwen_mmproj(hf_dir: Path, out_path: Path, cfg: dict, ftype, mean, std, *, progress=False) -> Path:
    arch = cfg["architectures"][0]
    projector = PROJECTORS[arch]
    v25 = projector == "qwen2.5vl_merger"
    vis = dict(cfg.get("vision_config") or {})
    text = {**cfg, **(cfg.get("text_config") or {})}
    if int(vis.get("temporal_patch_size", 2)) != 2:
        raise ConvertError(f"temporal_patch_size {vis.get('temporal_patch_size')} != 2 is not supported "
                           f"(llama.cpp splits the Conv3d into 2 slices)")
    if int(vis.get("spatial_merge_size", 2)) != 2:
        raise ConvertError(f"spatial_merge_size {vis.get('spatial_merge_size')} != 2 is not supported")
    if v25:
        n_embd, n_ff = int(vis.get("hidden_size", 1280)), int(vis.get("intermediate_size", 3420))
    else:   # Qwen2-VL: embed_dim is the ViT width, hidden_size the merger output; llama.cpp writes ffn = hidden_size
        n_embd, n_ff = int(vis.get("embed_dim", 1280)), int(vis.get("hidden_size", 3584))
    n_layer = int(vis.get("depth", 32))
    n_head = int(vis.get("num_heads", 16))

    src = _Source(hf_dir)
    plan: list[tuple[str, tuple[int, ...], Callable]] = []
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
    names = {p[0] for p in plan}
    needed = ["v.patch_embd.weight", "v.patch_embd.weight.1", "v.post_ln.weight", "mm.0.weight", "mm.2.weight"]
    if missing := [n for n in needed if n not in names]:
        raise ConvertError(f"{hf_dir}: checkpoint lacks the vision tensors for {', '.join(missing)}")
    n_embd_text = int(text.get("hidden_size") or dict((p[0], p[1]) for p in plan)["mm.2.weight"][0])

    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    typed = [(n, s, _type(n, s, ftype), ld) for n, s, ld in plan]
    add_tensor_table(w, hf_dir, typed, gguf.GGUFType.MMPROJ)
    w.add_file_type(ftype)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(n_embd_text)
    w.add_vision_image_size(int(vis.get("image_size", 560)))
    w.add_vision_patch_size(int(vis.get("patch_size", 14)))
    w.add_vision_embedding_length(n_embd)
    w.add_vision_feed_forward_length(n_ff)
    w.add_vision_block_count(n_layer)
    w.add_vision_head_count(n_head)
    w.add_vision_image_mean(mean)
    w.add_vision_image_std(std)
    w.add_clip_projector_type(projector)
    if v25:
        w.add_vision_use_silu(True)
        w.add_vision_n_wa_pattern(n_wa_pattern(list(vis.get("fullatt_block_indexes") or [])))
        w.add_vision_window_size(int(vis.get("window_size", 112)))
        if vis.get("tokens_per_second") is not None:      # video time scale of the M-RoPE (not in llama.cpp's files)
            w.add_uint32("clip.vision.tokens_per_second", int(vis["tokens_per_second"]))
    elif str(vis.get("hidden_act", "quick_gelu")) != "quick_gelu":
        raise ConvertError(f"Qwen2-VL vision hidden_act {vis.get('hidden_act')!r} is not supported (quick_gelu)")
    w.add_vision_attention_layernorm_eps(1e-6)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return write_planned(w, out_path, typed, desc=f"mmproj {projector} -> {out_path.name}", progress=progress)
