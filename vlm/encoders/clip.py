"""The ViT tower of CLIP (LLaVA) and SigLIP (Gemma 3, Idefics3 / SmolVLM) mmproj files.

One implementation, shaped by which tensors the file holds (as llama.cpp's clip_graph::build_vit / the llava
graph in tools/mtmd/models/{siglip,llava}.cpp):

    x   = patch_embd(pixels) (+ patch_embd.bias)                   Conv2d stride = kernel = patch_size
    x   = [class_embd ; x] + position_embd                          CLIP: a CLS row first; SigLIP: no CLS
    x   = pre_ln(x)                                                 CLIP only ("pre_layrnorm")
    per layer:  x = x + attn_out(MHA(ln1(x)))                       non-causal, within each image only
                x = x + ffn_down(act(ffn_up(ln2(x))))              act: gelu_quick (CLIP), gelu-tanh (SigLIP)
    x   = post_ln(x)                                                if the file has v.post_ln (SigLIP; LLaVA's
                                                                    converter drops it, HF never applies it there)

Feature layers (``clip.vision.feature_layer``, LLaVA): hidden-state indices as HF counts them (0 = the tower
input after pre_ln, i = the output of layer i-1); the tower runs up to the deepest one and the selected states
are concatenated along the channel dim (one index = plain "hidden_states[k]").

Batching: the patch embedding runs once per group of same-size images (fused normalisation / bias / position
epilogue of ``vlm_kernels.patch_embed``); then the tokens of *all* images are one [n_tokens, n_embd] matrix, every
linear layer runs on it once, and attention is one ``vlm_kernels.attention`` call with ``cu_seqlens`` marking the
images (causal=False), so an image only attends to itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vlm_kernels
from vlm.encoders.common import MmprojError
from vlm.graph import linear

ACTS = {
    "gelu": lambda x: F.gelu(x, approximate="tanh"),   # ggml_gelu; HF gelu_pytorch_tanh (SigLIP)
    "gelu_quick": lambda x: x * torch.sigmoid(1.702 * x),  # HF quick_gelu (OpenAI CLIP)
    "silu": F.silu,
}
_BLOCK = ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")


def tower_tensor_names(cfg) -> tuple[list[str], list[str]]:
    """(required, optional) tower tensors. Biases, CLS, pre/post LayerNorms are optional (CLIP vs SigLIP)."""
    req = ["v.patch_embd.weight", "v.position_embd.weight"]
    opt = ["v.patch_embd.bias", "v.class_embd", "v.pre_ln.weight", "v.pre_ln.bias", "v.post_ln.weight",
           "v.post_ln.bias"]
    for il in range(cfg.n_layer):
        req += [f"v.blk.{il}.{t}.weight" for t in _BLOCK]
        opt += [f"v.blk.{il}.{t}.bias" for t in _BLOCK]
    return req, opt


def _fix_swapped_ffn(layer: dict, n_embd: int, n_ff: int) -> None:
    """Files from llama.cpp's legacy LLaVA script name fc1 "ffn_down" and fc2 "ffn_up"; llama.cpp detects that by
    shape and swaps them back (clip.cpp). Here only when the shapes are unambiguous (n_ff != n_embd)."""
    down = layer["ffn_down.weight"]
    if n_ff != n_embd and tuple(down.shape) == (n_ff, n_embd):   # torch [out, in]: down should be [n_embd, n_ff]
        layer["ffn_up.weight"], layer["ffn_down.weight"] = layer["ffn_down.weight"], layer["ffn_up.weight"]
        ub, db = layer.get("ffn_up.bias"), layer.get("ffn_down.bias")
        layer.pop("ffn_up.bias", None)
        layer.pop("ffn_down.bias", None)
        if db is not None:
            layer["ffn_up.bias"] = db
        if ub is not None:
            layer["ffn_down.bias"] = ub


class VisionTower:
    """Runs the ViT of an :class:`~vlm.encoders.base.MmprojEncoder` over groups of same-size images."""

    def __init__(self, enc):
        self.enc = enc
        cfg = enc.config
        w = enc.weights
        for layer in enc.layers:
            _fix_swapped_ffn(layer, cfg.n_embd, cfg.n_ff)
        self.act = ACTS[cfg.ffn_act]
        self.cls = w.get("v.class_embd")
        pos = w["v.position_embd.weight"]
        n_pos = cfg.n_patches_side ** 2 + (1 if self.cls is not None else 0)
        if tuple(pos.shape) != (n_pos, cfg.n_embd):
            raise MmprojError(f"{enc.path}: v.position_embd.weight has shape {tuple(pos.shape)}, expected "
                              f"[{n_pos}, {cfg.n_embd}] for {cfg.image_size}px images with {cfg.patch_size}px "
                              f"patches{' + CLS' if self.cls is not None else ''}")
        pw = w["v.patch_embd.weight"]
        if tuple(pw.shape) != (cfg.n_embd, 3, cfg.patch_size, cfg.patch_size):
            raise MmprojError(f"{enc.path}: v.patch_embd.weight has shape {tuple(pw.shape)}, expected "
                              f"[{cfg.n_embd}, 3, {cfg.patch_size}, {cfg.patch_size}]")
        if not isinstance(pw, torch.Tensor):
            raise MmprojError(f"{enc.path}: v.patch_embd.weight is quantized; it must be F32/F16/BF16 "
                              f"(llama.cpp's converter never quantizes it)")
        # CLS row = class_embd + position 0 (HF: cat([cls, patches]) + pos); patch rows get positions 1..n, added
        # in the patch-embedding epilogue.
        self.pos_patches = pos[1:] if self.cls is not None else pos
        self.cls_row = (self.cls.float() + pos[0].float()).to(enc.dtype) if self.cls is not None else None

    def tap(self, name: str, layer: int, t: torch.Tensor) -> None:
        hook = getattr(self.enc, "tap_hook", None)
        if hook is not None:
            hook(name, layer, t)

    def __call__(self, groups, layers: tuple[int, tuple[int, ...]]) -> list[torch.Tensor]:
        """groups: [(pixels [B, 3, H, W], n_patch_h, n_patch_w)]. Returns per group [B, n_patches, d_feat]
        (CLS row removed), d_feat = n_embd × max(1, number of feature layers)."""
        enc, cfg, w = self.enc, self.enc.config, self.enc.weights
        n_run, feature_layers = layers
        D, eps = cfg.n_embd, cfg.eps
        n_cls = 1 if self.cls is not None else 0

        seqs, lens = [], []
        for pixels, gh, gw in groups:
            norm = {}
            if pixels.dtype == torch.uint8:     # raw RGB: normalise in the kernel's load (x/255 - mean) / std
                norm = dict(mean=cfg.image_mean, std=cfg.image_std)
            x = vlm_kernels.patch_embed(pixels, w["v.patch_embd.weight"], w.get("v.patch_embd.bias"), self.pos_patches,
                                    **norm)                                        # [B, gh·gw, D]
            B = x.shape[0]
            if n_cls:
                x = torch.cat([self.cls_row.to(x.dtype).expand(B, 1, D), x], dim=1)
            seqs.append(x.reshape(-1, D))
            lens += [gh * gw + n_cls] * B
        x = seqs[0] if len(seqs) == 1 else torch.cat(seqs)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
        cu = cu.to(x.device)
        n_tok = x.shape[0]
        self.tap("inp_embd", -1, x)

        if "v.pre_ln.weight" in w:
            x = vlm_kernels.layer_norm(x, w["v.pre_ln.weight"], w.get("v.pre_ln.bias"), eps)
        stack = []
        for il in range(n_run):
            if il in feature_layers:
                stack.append(x)
            L = enc.layers[il]
            h = vlm_kernels.layer_norm(x, L["ln1.weight"], L.get("ln1.bias"), eps)
            if "qkv.weight" in L:               # one fused projection (vlm.encoders.base.fuse_qkv): strided views
                q, k, v = linear(h, L["qkv.weight"], L["qkv.bias"]).view(n_tok, 3, cfg.n_head, cfg.head_dim).unbind(1)
            else:
                q = linear(h, L["attn_q.weight"], L.get("attn_q.bias")).view(n_tok, cfg.n_head, cfg.head_dim)
                k = linear(h, L["attn_k.weight"], L.get("attn_k.bias")).view(n_tok, cfg.n_head, cfg.head_dim)
                v = linear(h, L["attn_v.weight"], L.get("attn_v.bias")).view(n_tok, cfg.n_head, cfg.head_dim)
            a = vlm_kernels.attention(q, k, v, causal=False, cu_seqlens_q=cu, cu_seqlens_k=cu)
            a = linear(a.reshape(n_tok, D), L["attn_out.weight"], L.get("attn_out.bias"))
            h, x = vlm_kernels.layer_norm(a, L["ln2.weight"], L.get("ln2.bias"), eps, residual=x)   # x += attn
            f = linear(self.act(linear(h, L["ffn_up.weight"], L.get("ffn_up.bias"))),
                       L["ffn_down.weight"], L.get("ffn_down.bias"))
            x = x + f
            self.tap("layer_out", il, x)
        if "v.post_ln.weight" in w:
            x = vlm_kernels.layer_norm(x, w["v.post_ln.weight"], w.get("v.post_ln.bias"), eps)
        if n_run in feature_layers:
            stack.append(x)
        feats = torch.cat(stack, dim=-1) if len(stack) > 1 else stack[0] if stack else x

        out, row = [], 0
        for pixels, gh, gw in groups:
            B, n = pixels.shape[0], gh * gw + n_cls
            out.append(feats[row:row + B * n].view(B, n, -1)[:, n_cls:])
            row += B * n
        return out
