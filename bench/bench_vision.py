#!/usr/bin/env python
"""Vision encoders: images/s for preprocess + encode at real sizes, ours vs HF transformers in the same run.

    python bench/bench_vision.py [--out DIR] [--quick] [--threads 1,2,4] [--models clip,siglip,qwen25]

Models (random weights of real shape, written to an mmproj GGUF in a temp dir and opened with load_mmproj; the HF
peer gets the SAME weights; bf16 + SDPA on CUDA, fp32 on CPU):
  clip    LLaVA-1.5 tower: CLIP ViT-L/14 336 (d 1024, 23 of 24 layers as llava runs them, quick-GELU) + mlp
          projector 1024 -> 4096 -> 4096.        HF: CLIPVisionModel (23 layers) + LlavaMultiModalProjector
  siglip  Gemma 3 tower: SigLIP-So400m 896/14 (d 1152, 27 layers, 4096 patches) + gemma3 projector (avg-pool 4,
          soft-emb RMSNorm, 1152 -> 2560).      HF: SiglipVisionModel + Gemma3MultiModalProjector
  qwen25  Qwen2.5-VL-7B vision tower (d 1280, 32 layers, window attention 112 px, full attention every 8th layer,
          SwiGLU 3420, 2×2 merger -> 3584).     HF: Qwen2_5_VisionTransformerPretrainedModel
Cases: clip / siglip on 1, 4, 16 images (1024×768 sources); qwen25 on 1 image of 4 Mpixel, 4 of 1 Mpixel, 16 of
0.5 Mpixel (HF smart_resize with max_pixels raised so the sizes stay). --quick on CPU: 1 image, towers cut to 1
layer (qwen25: 2, one windowed + one full), widths and image sizes real; on CUDA --quick drops the 4-image cases.

Measured per case (CUDA: triton.testing.do_bench median over rotating input buffers; CPU: median of a few calls):
  encode     ours: enc.encode(pixels already on the device); hf: tower + projector on the same tensors.
             ms, images/s, TFLOP/s and % of the bf16 dense peak (989 TFLOP/s H100/H200 SXM), ratio ours/hf.
  patch      vlm_kernels.patch_embed alone on the same pixels/weights, and its share of our encode time.
  preprocess ours: vlm.preprocess batch helper (preprocess_batch, thread pool) at the largest --threads count,
             hf: the transformers *ImageProcessorPil on the same uint8 arrays (one call on the list).
             Thread scaling (1, 2, 4 threads) on the largest case of each model.
  pipeline   images/s of preprocess + encode as the sequential sum of the two medians (no overlap assumed).
Results: <out>/vision.csv (appended) and <out>/vision.png. The issue's target: encoder >= 2x hf (bf16 SDPA) on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gguf  # noqa: E402

import vlm_kernels  # noqa: E402
from vlm.encoders import load_mmproj  # noqa: E402
from vlm.gguf import write_gguf  # noqa: E402
from vlm.preprocess import image as P  # noqa: E402
from vlm.preprocess.qwen_image import preprocess_qwen2vl  # noqa: E402
from _common import append_csv, device_label, git_sha, gpu_warmup, pyplot  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
PEAK_BF16_TFLOPS = 989.0
N_BUFFERS = 2
K, KV = gguf.Keys.Clip, gguf.Keys.ClipVision
QWEN_MAX_PIXELS = 4_600_000          # HF default is ~1 Mpixel: raised so the 4 Mpixel case keeps its size
QWEN_MIN_PIXELS = 56 * 56

# name -> real shape; (n_layer, n_layer_quick)
MODELS = {
    "clip": dict(d=1024, ffn=4096, n_head=16, n_layer=(23, 1), image=336, patch=14, text=4096, eps=1e-5),
    "siglip": dict(d=1152, ffn=4304, n_head=16, n_layer=(27, 1), image=896, patch=14, text=2560, eps=1e-6),
    "qwen25": dict(d=1280, ffn=3420, n_head=16, n_layer=(32, 2), patch=14, text=3584, eps=1e-6, window=112),
}


# ------------------------------------------------------------------------------------ HF models -> GGUF
def _n(t, bid=None):
    name = gguf.TENSOR_NAMES[t]
    return name.format(bid=bid) if bid is not None else name


_CLIP_BLOCK = {"self_attn.q_proj": gguf.MODEL_TENSOR.V_ENC_ATTN_Q, "self_attn.k_proj": gguf.MODEL_TENSOR.V_ENC_ATTN_K,
               "self_attn.v_proj": gguf.MODEL_TENSOR.V_ENC_ATTN_V,
               "self_attn.out_proj": gguf.MODEL_TENSOR.V_ENC_ATTN_O,
               "layer_norm1": gguf.MODEL_TENSOR.V_ENC_INPUT_NORM, "layer_norm2": gguf.MODEL_TENSOR.V_ENC_POST_ATTN_NORM,
               "mlp.fc1": gguf.MODEL_TENSOR.V_ENC_FFN_UP, "mlp.fc2": gguf.MODEL_TENSOR.V_ENC_FFN_DOWN}


def vit_tensors(sd: dict, n_layer: int) -> dict:
    """CLIP / SigLIP vision_model.* state dict -> llama.cpp mmproj tower names (as vlm.convert.mmproj writes)."""
    MT = gguf.MODEL_TENSOR
    sd = {k.split("vision_model.", 1)[-1]: v for k, v in sd.items()}
    out = {}
    for hf, t in (("embeddings.patch_embedding", MT.V_ENC_EMBD_PATCH), ("pre_layrnorm", MT.V_PRE_NORM),
                  ("post_layernorm", MT.V_POST_NORM)):
        for s in ("weight", "bias"):
            if f"{hf}.{s}" in sd:
                out[f"{_n(t)}.{s}"] = sd[f"{hf}.{s}"]
    out[_n(MT.V_ENC_EMBD_POS) + ".weight"] = sd["embeddings.position_embedding.weight"]
    if "embeddings.class_embedding" in sd:
        out[_n(MT.V_ENC_EMBD_CLS)] = sd["embeddings.class_embedding"]
    for il in range(n_layer):
        for hf, t in _CLIP_BLOCK.items():
            for s in ("weight", "bias"):
                out[f"{_n(t, il)}.{s}"] = sd[f"encoder.layers.{il}.{hf}.{s}"]
    return out


def qwen_tensors(sd: dict) -> dict:
    """Qwen2.5-VL visual.* state dict -> llama.cpp names (Conv3d split in two slices, qkv split in three)."""
    out = {}
    w = sd["patch_embed.proj.weight"]                                   # [D, 3, 2, P, P]
    out["v.patch_embd.weight"], out["v.patch_embd.weight.1"] = w[:, :, 0].contiguous(), w[:, :, 1].contiguous()
    ren = {"attn.proj": "attn_out", "norm1": "ln1", "norm2": "ln2", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, v in sd.items():
        if not k.startswith("blocks."):
            continue
        _, il, rest = k.split(".", 2)
        mod, s = rest.rsplit(".", 1)
        if mod == "attn.qkv":
            c = v.shape[0] // 3
            for i, part in enumerate(("attn_q", "attn_k", "attn_v")):
                out[f"v.blk.{il}.{part}.{s}"] = v[i * c:(i + 1) * c].contiguous()
        else:
            out[f"v.blk.{il}.{ren[mod]}.{s}"] = v
    out["v.post_ln.weight"] = sd["merger.ln_q.weight"]
    for i in (0, 2):
        for s in ("weight", "bias"):
            out[f"mm.{i}.{s}"] = sd[f"merger.mlp.{i}.{s}"]
    return out


def _fp32_norms(tensors: dict) -> dict:
    """GGUF types as the converters write them: 1-D tensors F32, matrices in the run's dtype."""
    return {k: (v.float() if v.dim() == 1 else v) for k, v in tensors.items()}


def build(name: str, n_layer: int, device: str, dtype, tmp: str):
    """(our encoder, hf callable(pixels) -> embeddings, spec): one model, same random weights on both sides."""
    import transformers
    spec = dict(MODELS[name], n_layer=n_layer)
    d, ffn, nh = spec["d"], spec["ffn"], spec["n_head"]
    torch.manual_seed(0)
    meta = {"general.architecture": "clip", K.HAS_VISION_ENCODER: True, KV.EMBEDDING_LENGTH: d,
            KV.FEED_FORWARD_LENGTH: ffn, KV.BLOCK_COUNT: n_layer, KV.Attention.HEAD_COUNT: nh,
            KV.Attention.LAYERNORM_EPS: spec["eps"], KV.PATCH_SIZE: spec["patch"], KV.PROJECTION_DIM: spec["text"]}
    with torch.device(device):
        if name == "clip":
            from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
            vc = transformers.CLIPVisionConfig(hidden_size=d, intermediate_size=ffn, num_hidden_layers=n_layer,
                                               num_attention_heads=nh, image_size=spec["image"], patch_size=14,
                                               hidden_act="quick_gelu", layer_norm_eps=1e-5,
                                               attn_implementation="sdpa")
            tower = transformers.CLIPVisionModel(vc)
            proj = LlavaMultiModalProjector(transformers.LlavaConfig(
                vision_config=vc.to_dict(), text_config={"model_type": "llama", "hidden_size": spec["text"]},
                projector_hidden_act="gelu", vision_feature_layer=-1))
            tensors = vit_tensors(tower.state_dict(), n_layer)
            tensors.pop("v.post_ln.weight"), tensors.pop("v.post_ln.bias")     # llava files drop it
            tensors.update({"mm.0.weight": proj.linear_1.weight, "mm.0.bias": proj.linear_1.bias,
                            "mm.2.weight": proj.linear_2.weight, "mm.2.bias": proj.linear_2.bias})
            meta.update({K.PROJECTOR_TYPE: "mlp", K.HAS_LLAVA_PROJECTOR: True, KV.IMAGE_SIZE: spec["image"],
                         "clip.vision.feature_layer": [n_layer], KV.USE_GELU: False,
                         KV.IMAGE_MEAN: list(P.OPENAI_CLIP_MEAN), KV.IMAGE_STD: list(P.OPENAI_CLIP_STD)})

            def hf(px):  # HF LLaVA: hidden state after layer 23 (= what these 23 layers output), CLS dropped
                return proj(tower(pixel_values=px).last_hidden_state[:, 1:])
        elif name == "siglip":
            from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
            vc = transformers.SiglipVisionConfig(hidden_size=d, intermediate_size=ffn, num_hidden_layers=n_layer,
                                                 num_attention_heads=nh, image_size=spec["image"], patch_size=14,
                                                 layer_norm_eps=1e-6, vision_use_head=False,
                                                 attn_implementation="sdpa")
            tower = transformers.SiglipVisionModel(vc)
            proj = Gemma3MultiModalProjector(transformers.Gemma3Config(
                vision_config=vc.to_dict(), text_config={"hidden_size": spec["text"]}, mm_tokens_per_image=256))
            torch.nn.init.normal_(proj.mm_input_projection_weight, std=0.02)
            tensors = vit_tensors(tower.state_dict(), n_layer)
            tensors["mm.input_projection.weight"] = proj.mm_input_projection_weight
            tensors["mm.soft_emb_norm.weight"] = 1.0 + proj.mm_soft_emb_norm.weight.float()   # Gemma (1 + w)
            meta.update({K.PROJECTOR_TYPE: "gemma3", KV.IMAGE_SIZE: spec["image"], KV.USE_GELU: True,
                         KV.IMAGE_MEAN: list(P.IMAGENET_STANDARD_MEAN), KV.IMAGE_STD: list(P.IMAGENET_STANDARD_STD)})

            def hf(px):
                return proj(tower(pixel_values=px).last_hidden_state)
        else:
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
            full = [i for i in range(n_layer) if (i + 1) % 8 == 0] or [n_layer - 1]
            vc = transformers.Qwen2_5_VLVisionConfig(
                depth=n_layer, hidden_size=d, intermediate_size=ffn, num_heads=nh, out_hidden_size=spec["text"],
                window_size=spec["window"], fullatt_block_indexes=full, hidden_act="silu", patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, attn_implementation="sdpa")
            tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vc)
            tensors = qwen_tensors(tower.state_dict())
            meta.update({K.PROJECTOR_TYPE: "qwen2.5vl_merger", KV.IMAGE_SIZE: 560, KV.USE_SILU: True,
                         KV.N_WA_PATTERN: full[0] + 1, KV.WINDOW_SIZE: spec["window"],
                         KV.IMAGE_MEAN: list(P.OPENAI_CLIP_MEAN), KV.IMAGE_STD: list(P.OPENAI_CLIP_STD)})
            proj = None

            def hf(inp):
                out = tower(hidden_states=inp[0], grid_thw=inp[1])
                return getattr(out, "pooler_output", None) if not isinstance(out, torch.Tensor) else out
    tower = tower.to(dtype).eval()
    if proj is not None:
        proj = proj.to(dtype).eval()
    path = os.path.join(tmp, f"mmproj-{name}.gguf")
    write_gguf(path, None, meta, _fp32_norms({k: v.detach().to(dtype) for k, v in tensors.items()}))
    del tensors
    enc = load_mmproj(path, device=device, dtype=dtype)
    os.unlink(path)
    return enc, hf, spec


# ------------------------------------------------------------------------------------ inputs, FLOPs
def source_images(shape_hw: tuple[int, int], n: int, seed: int) -> list[np.ndarray]:
    """n uint8 RGB photos-alike (smooth gradients + noise) of height × width."""
    h, w = shape_hw
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        base = np.stack([xx / w * 200 + 20 * i, yy / h * 180, (xx + yy) / (h + w) * 220], -1)
        out.append(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def preprocessors(name: str):
    """(ours(list of uint8 arrays, threads) -> encoder input on CPU, hf(list) -> hf input on CPU)."""
    import transformers

    def cls(n):
        return getattr(transformers, n + "Pil", None) or getattr(transformers, n)
    if name == "clip":
        proc = cls("CLIPImageProcessor")(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        fn, kw = P.preprocess_clip, dict(shortest_edge=336, crop_size=336)
    elif name == "siglip":
        proc = cls("Gemma3ImageProcessor")(size={"height": 896, "width": 896})
        fn, kw = P.preprocess_gemma3, {}
    else:
        proc = cls("Qwen2VLImageProcessor")(size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS})

        def ours_q(imgs, threads):
            out = P.preprocess_batch(imgs, preprocess_qwen2vl, max_workers=threads, min_pixels=QWEN_MIN_PIXELS,
                                     max_pixels=QWEN_MAX_PIXELS)
            return [(torch.from_numpy(q.pixel_values), q.grid_thw) for q in out]

        def hf_q(imgs):
            o = proc(images=imgs, return_tensors="pt")
            return o["pixel_values"], o["image_grid_thw"]
        return ours_q, hf_q

    def ours(imgs, threads):
        return torch.from_numpy(np.stack(P.preprocess_batch(imgs, fn, max_workers=threads, **kw)))

    def hf_fn(imgs):
        return proc(images=imgs, return_tensors="pt")["pixel_values"]
    return ours, hf_fn


def vit_flops(n_tok_per_img: list[int], d: int, ffn: int, n_layer: int, gated: bool = False) -> float:
    n = sum(n_tok_per_img)
    lin = 2 * n * (4 * d * d + (3 if gated else 2) * d * ffn)
    att = 4 * d * sum(t * t for t in n_tok_per_img)
    return float(n_layer * (lin + att))


def encode_flops(name: str, spec: dict, grids: list) -> float:
    d, ffn, L, p, text = spec["d"], spec["ffn"], spec["n_layer"], spec["patch"], spec["text"]
    if name == "clip":
        n = (spec["image"] // p) ** 2
        k = len(grids)
        return vit_flops([n + 1] * k, d, ffn, L) + k * 2 * n * (3 * p * p * d + d * text + text * text)
    if name == "siglip":
        n = (spec["image"] // p) ** 2
        k = len(grids)
        return vit_flops([n] * k, d, ffn, L) + k * (2 * n * 3 * p * p * d + 2 * (n // 16) * d * text)
    from vlm.encoders.qwen2vl import window_index
    _, cu = window_index(grids, spec["window"], p)
    win = (cu[1:] - cu[:-1]).tolist()
    full = [t * h * w for t, h, w in grids]
    n = sum(full)
    n_full = len([i for i in range(L) if (i + 1) % 8 == 0] or [L - 1])
    lin = 2 * n * (4 * d * d + 3 * d * ffn) * L
    att = 4 * d * (n_full * sum(t * t for t in full) + (L - n_full) * sum(t * t for t in win))
    return float(lin + att + 2 * n * 6 * p * p * d + 2 * (n // 4) * (4 * d * 4 * d + 4 * d * text))


# ------------------------------------------------------------------------------------ timing
def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def time_fn(fn, bufs: list, reps: int, device: str):
    """(median ms of fn(buf) over rotating buffers, fn(bufs[0]) from the warm-up call)."""
    first = fn(bufs[0])
    if device == "cuda":
        import triton
        state = {"i": 0}

        def call():
            state["i"] = (state["i"] + 1) % len(bufs)
            return fn(bufs[state["i"]])
        return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")), first
    ts = []
    for r in range(reps):
        t = time.perf_counter()
        fn(bufs[r % len(bufs)])
        ts.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ts)), first


def _as_rows(out) -> torch.Tensor:
    """Embeddings of one encode call, ours (list per image) or HF (batched / flat), as [n_tokens_total, n_embd]."""
    if isinstance(out, (list, tuple)):
        out = torch.cat([o.reshape(-1, o.shape[-1]) for o in out])
    return out.reshape(-1, out.shape[-1]).float()


def time_cpu(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ts))


def cases_for(name: str, quick: bool) -> list[tuple[int, tuple[int, int]]]:
    """(n_images, source (height, width))."""
    if name == "qwen25":
        cases = [(1, (1728, 2304)), (4, (864, 1152)), (16, (612, 816))]
        if quick and not HAS_CUDA:
            return [(1, (612, 816))]
    else:
        cases = [(1, (768, 1024)), (4, (768, 1024)), (16, (768, 1024))]
        if quick and not HAS_CUDA:
            return cases[:1]
    return [c for c in cases if c[0] != 4] if quick else cases


def to_device(x, device, dtype):
    if isinstance(x, tuple):                              # HF qwen: (patches, grid_thw)
        return x[0].to(device, dtype), x[1].to(device)
    if isinstance(x, list):                               # ours qwen: [(patches, grid)]
        return [(p.to(device, dtype), g) for p, g in x]
    return x.to(device, dtype)


def bench_model(name: str, quick: bool, threads: list[int], tmp: str) -> list[dict]:
    device = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    n_layer = MODELS[name]["n_layer"][1 if quick and not HAS_CUDA else 0]
    enc, hf, spec = build(name, n_layer, device, dtype, tmp)
    ours_pre, hf_pre = preprocessors(name)
    reps = 2 if quick else 3
    reps_pre = 2                       # preprocessing: CPU work, also on the GPU machine (keep the run short)
    rows, cases = [], cases_for(name, quick)
    for ci, (n_img, src) in enumerate(cases):
        imgs = source_images(src, n_img, seed=ci)
        t_max = max(threads)
        # preprocessing (CPU): ours at the largest thread count vs HF; the thread sweep on the last (largest)
        # case only, over 4-8 images so that threads have work to share
        pre = {"ours": time_cpu(lambda: ours_pre(imgs, t_max), reps_pre),
               "hf": time_cpu(lambda: hf_pre(imgs), reps_pre)}
        if ci == len(cases) - 1:
            many = imgs[:8] if n_img >= 4 else source_images(src, 4, seed=99)
            for t in threads:
                ms = time_cpu(lambda t=t: ours_pre(many, t), reps_pre)
                rows.append(dict(model=name, n_images=len(many), src=f"{src[1]}x{src[0]}", n_layer=n_layer,
                                 device="cpu", part="preprocess_threads", provider="ours", threads=t, ms=ms,
                                 images_per_s=len(many) / ms * 1e3))
        # encoder inputs: our preprocessing output (HF's for the HF tower; equal pixels in hf mode)
        ours_in = [to_device(ours_pre(imgs, t_max), device, dtype) for _ in range(N_BUFFERS)]
        hf_in = [to_device(hf_pre(imgs), device, dtype) for _ in range(N_BUFFERS)]
        if name == "qwen25":
            grids = [g for _, g in ours_in[0]]
            enc_fn = enc.encode
            pe_w = enc.patch_w.to(dtype)
            pe_in = [torch.cat([p for p, _ in b]) for b in ours_in]

            def pe_fn(x):
                return vlm_kernels.patch_embed(x, pe_w)
        else:
            grids = [(1, spec["image"] // 14, spec["image"] // 14)] * n_img

            def enc_fn(x):
                return enc.encode(x)
            w = enc.weights
            pe_in = ours_in

            def pe_fn(x):
                return vlm_kernels.patch_embed(x, w["v.patch_embd.weight"], w.get("v.patch_embd.bias"),
                                           enc.tower.pos_patches)

        def hf_fn(x):
            with torch.inference_mode():
                return hf(x)
        torch.set_grad_enabled(False)
        ms_ours, out_ours = time_fn(enc_fn, ours_in, reps, device)
        ms_hf, out_hf = time_fn(hf_fn, hf_in, reps, device)
        ms_pe, _ = time_fn(pe_fn, pe_in, reps, device)
        # same weights, same pixels: the outputs must agree (else the comparison is not like for like)
        a, b = _as_rows(out_ours), _as_rows(out_hf)
        parity = (a - b).abs().max().item() / b.abs().max().item() if a.shape == b.shape else float("nan")
        del out_ours, out_hf, a, b
        flops = encode_flops(name, spec, grids)
        n_patches = sum(t * h * w for t, h, w in grids)
        pre_ours = pre["ours"]
        base = dict(model=name, n_images=n_img, src=f"{src[1]}x{src[0]}", n_layer=n_layer, n_patches=n_patches,
                    device=device, dtype=str(dtype).replace("torch.", ""))
        for prov, ms in (("ours", ms_ours), ("hf", ms_hf)):
            tf = flops / (ms / 1e3) / 1e12
            p_ms = pre_ours if prov == "ours" else pre["hf"]
            rows.append(dict(base, part="encode", provider=prov, threads="", ms=ms, images_per_s=n_img / ms * 1e3,
                             tflops=tf, pct_peak=100 * tf / PEAK_BF16_TFLOPS if device == "cuda" else None,
                             ratio_vs_hf=ms_hf / ms, pipeline_images_per_s=n_img / (p_ms + ms) * 1e3,
                             rel_err_vs_hf=parity))
        rows.append(dict(base, part="patch_embed", provider="ours", threads="", ms=ms_pe,
                         images_per_s=n_img / ms_pe * 1e3, share_of_encode=ms_pe / ms_ours))
        for k, ms in pre.items():
            rows.append(dict(base, part="preprocess", provider=k, threads=t_max if k == "ours" else "", ms=ms,
                             images_per_s=n_img / ms * 1e3, ratio_vs_hf=pre["hf"] / ms))
        print(f"  {name} x{n_img} ({n_patches} patches): ours {ms_ours:.1f} ms, hf {ms_hf:.1f} ms "
              f"(x{ms_hf / ms_ours:.2f}, max rel diff {parity:.2g}), patch_embed {ms_pe:.2f} ms; preprocess "
              f"ours {pre['ours']:.1f} / hf {pre['hf']:.1f} ms", flush=True)
        del ours_in, hf_in, pe_in
    del enc, hf
    if HAS_CUDA:
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------ output
def plot(rows, path, title):
    plt = pyplot()
    if plt is None:
        return
    enc = [r for r in rows if r["part"] == "encode"]
    labels = list(dict.fromkeys(f"{r['model']}\nx{r['n_images']}" for r in enc))
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(labels)), 4.5))
    for i, prov in enumerate(("ours", "hf")):
        vals = {f"{r['model']}\nx{r['n_images']}": r for r in enc if r["provider"] == prov}
        xs = [j + (i - 0.5) * 0.38 for j in range(len(labels))]
        axes[0].bar(xs, [vals[lab]["images_per_s"] if lab in vals else 0 for lab in labels], 0.38, label=prov)
        axes[1].bar(xs, [vals[lab]["pipeline_images_per_s"] if lab in vals else 0 for lab in labels], 0.38,
                    label=prov)
    for ax, t in zip(axes, ("encode images/s", "preprocess + encode images/s")):
        ax.set_yscale("log")
        ax.set_title(t, fontsize=9)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


FIELDS = ["device_name", "git_sha", "date", "part", "model", "n_images", "src", "n_layer", "n_patches", "device",
          "dtype", "provider", "threads", "ms", "images_per_s", "pipeline_images_per_s", "tflops", "pct_peak",
          "ratio_vs_hf", "share_of_encode", "rel_err_vs_hf"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--quick", action="store_true", help="CPU: 1 image, 1-2 layers; CUDA: no 4-image cases")
    ap.add_argument("--threads", default="1,2,4", help="preprocessing thread counts (default 1,2,4)")
    ap.add_argument("--models", default="clip,siglip,qwen25")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    models = [m for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    os.makedirs(args.out, exist_ok=True)
    name = device_label()
    sha, date = git_sha(), datetime.datetime.now().isoformat(timespec="seconds")
    gpu_warmup()
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_vision_") as tmp:
        for m in models:
            rows += bench_model(m, args.quick, threads, tmp)

    path = os.path.join(args.out, "vision.csv")
    append_csv(path, FIELDS, rows, device_name=name, git_sha=sha, date=date)
    plot(rows, os.path.join(args.out, "vision.png"), f"vision encoders — {name} ({sha})")

    print(f"\nvision encoders on {name} ({sha}, {date}), total {time.time() - t0:.1f} s")
    print(f"{'model':<8}{'imgs':>5}{'layers':>7}{'patches':>8}{'ours ms':>10}{'hf ms':>10}{'x hf':>7}{'img/s':>8}"
          f"{'TFLOP/s':>9}{'%peak':>7}{'pe %':>6}{'pre ms':>9}{'hf pre':>9}{'pipe x hf':>10}")
    by = {}
    for r in rows:
        if r["part"] == "preprocess_threads":
            continue
        by.setdefault((r["model"], r["n_images"]), {}).setdefault(r["part"], []).append(r)
    for (m, n), d in by.items():
        o = next(r for r in d["encode"] if r["provider"] == "ours")
        h = next(r for r in d["encode"] if r["provider"] == "hf")
        pe = d["patch_embed"][0]
        pre_o = next(r["ms"] for r in d["preprocess"] if r["provider"] == "ours")
        pre_h = next(r["ms"] for r in d["preprocess"] if r["provider"] == "hf")
        pct = f"{o['pct_peak']:.1f}" if o["pct_peak"] is not None else "-"
        print(f"{m:<8}{n:>5}{o['n_layer']:>7}{o['n_patches']:>8}{o['ms']:>10.2f}{h['ms']:>10.2f}"
              f"{o['ratio_vs_hf']:>7.2f}{o['images_per_s']:>8.1f}{o['tflops']:>9.2f}{pct:>7}"
              f"{100 * pe['share_of_encode']:>6.1f}{pre_o:>9.1f}{pre_h:>9.1f}"
              f"{o['pipeline_images_per_s'] / h['pipeline_images_per_s']:>10.2f}")
    sweep = [r for r in rows if r["part"] == "preprocess_threads"]
    if sweep:
        print("preprocess thread scaling (images/s): " + "; ".join(
            f"{r['model']} x{r['n_images']} {r['threads']}t {r['images_per_s']:.1f}" for r in sweep))
    print(f"target: encoder >= 2x hf (bf16 SDPA) on a GPU. CSV: {path}")


if __name__ == "__main__":
    main()
